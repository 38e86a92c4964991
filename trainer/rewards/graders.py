"""Rewards that work like OpenAI's reinforcement fine-tuning graders: ``string_check``,
``text_similarity`` and ``python_grader``.

Their ``input`` and ``reference`` are templates over the completion (``{{sample.output_text}}``,
``{{sample.output_json.FIELD}}``) and the dataset row (``{{item.FIELD}}``, dots reach nested
objects), as in OpenAI's graders, so a grader from an OpenAI job means the same here.
``python_grader`` runs the user's ``grade(sample, item) -> float`` in the reward sandbox
(``sandbox.py``), like ``code_tests`` runs completions' code.
"""

from __future__ import annotations

import ast
import contextvars
import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

from rapidfuzz import fuzz

from trainer.config import ConfigError, OperatorPolicy
from trainer.rewards.base import Option, PerCompletion, RewardError, RewardType, Scores, row_value
from trainer.rewards.sandbox import STARTUP_SLACK_S, SandboxError, run_sandboxed
from trainer.rewards.stop import current_stop

# --- templates ---------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)((?:\.\w+)*)\s*\}\}")
SAMPLE_FIELDS = ("output_text", "output_json")


def placeholders(template: str) -> list[tuple[str, list[str]]]:
    """``"{{item.a.b}} {{sample.output_text}}"`` → ``[("item", ["a", "b"]), ("sample", ["output_text"])]``."""
    return [
        (match.group(1), [part for part in match.group(2).split(".") if part])
        for match in _PLACEHOLDER.finditer(template)
    ]


def check_template(param: str, template: str) -> None:
    """ConfigError unless every ``{{...}}`` names ``sample.output_text``, ``sample.output_json[.path]``
    or ``item.FIELD[.path]``."""
    for namespace, path in placeholders(template):
        if namespace == "item" and path:
            continue
        if (
            namespace == "sample"
            and path
            and path[0] in SAMPLE_FIELDS
            and (path[0] == "output_json" or len(path) == 1)
        ):
            continue
        written = ".".join([namespace, *path])
        raise ConfigError(
            param,
            f"unknown template variable {{{{{written}}}}}; use {{{{sample.output_text}}}}, "
            "{{sample.output_json.FIELD}} or {{item.FIELD}} (a field of the dataset row)",
        )
    if "{{" in _PLACEHOLDER.sub("", template):
        raise ConfigError(
            param, "has a '{{' that opens no template variable; write variables as {{item.FIELD}}"
        )


def template_fields(template: str) -> set[str]:
    """The dataset row fields a template reads (the first part of each ``item`` path)."""
    return {path[0] for namespace, path in placeholders(template) if namespace == "item" and path}


def sample_of(completion: str) -> dict[str, Any]:
    """The ``sample`` graders see: the completion's text, and the completion parsed as JSON (or None)."""
    try:
        output_json = json.loads(completion)
    except ValueError:
        output_json = None
    return {"output_text": completion, "output_json": output_json, "output_tools": []}


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """The template with each variable replaced by its value (JSON for non-strings).

    A row that lacks an ``item`` field is a RewardError (the dataset's problem); a completion
    that is not JSON, or lacks an ``output_json`` path, renders as "" (the model's: it scores low).
    """

    def value(match: re.Match[str]) -> str:
        namespace, path = match.group(1), [part for part in match.group(2).split(".") if part]
        if namespace == "item":
            current, where = row_value(item, path[0]), path[0]
            for part in path[1:]:
                where += f".{part}"
                if not isinstance(current, dict) or part not in current:
                    raise RewardError(f"the dataset row has no {where!r} field")
                current = current[part]
            return _as_text(current)
        current = sample[path[0]]
        for part in path[1:]:
            if not isinstance(current, dict) or part not in current:
                return ""
            current = current[part]
        return "" if current is None else _as_text(current)

    return _PLACEHOLDER.sub(value, template)


def _check_templates(spec: dict[str, Any], param: str) -> None:
    for key in ("input", "reference"):
        check_template(f"{param}.{key}", spec[key])


def _fields(spec: dict[str, Any]) -> set[str]:
    return template_fields(spec["input"]) | template_fields(spec["reference"])


# --- string_check ------------------------------------------------------------------------------

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")


def string_check(text: str, reference: str, operation: str) -> float:
    """OpenAI's string_check: ``eq``/``ne`` compare exactly; ``like`` is "contains", ``ilike`` is
    "contains, ignoring case". 1.0 or 0.0."""
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    if operation == "ilike":
        return float(reference.casefold() in text.casefold())
    raise AssertionError(f"unknown operation {operation!r}")  # pragma: no cover - checked by the spec


def _build_string_check(spec: dict[str, Any], **_: Any) -> PerCompletion:
    def score(prompt: str, completion: str, row: dict[str, Any]) -> float:
        sample = sample_of(completion)
        return string_check(
            render(spec["input"], sample, row), render(spec["reference"], sample, row), spec["operation"]
        )

    return PerCompletion(score)


STRING_CHECK = RewardType(
    summary="1.0 when input (default: the completion) equals (eq), differs from (ne) or contains (like, "
    "ilike: ignoring case) reference, as OpenAI's string_check grader",
    options={
        "input": Option("string", "{{sample.output_text}}"),
        "reference": Option("string", example='"{{item.answer}}"'),
        "operation": Option("string", "eq", choices=STRING_OPERATIONS),
    },
    check=_check_templates,
    build=_build_string_check,
    fields=_fields,
)


# --- text_similarity ---------------------------------------------------------------------------

SIMILARITY_METRICS = ("fuzzy_match",)
# OpenAI's metrics this server does not compute, and why: a 400 says so instead of a guess.
UNSUPPORTED_METRICS = {
    "cosine": "it needs an embedding model",
    "bleu": "no BLEU implementation is installed here",
    "gleu": "no GLEU implementation is installed here",
    "meteor": "it needs WordNet data, which this server cannot download",
    **{f"rouge_{n}": "no ROUGE implementation is installed here" for n in (1, 2, 3, 4, 5)},
    "rouge_l": "no ROUGE implementation is installed here",
}


def fuzzy_match(text: str, reference: str) -> float:
    """Normalised Indel similarity in [0, 1] (rapidfuzz's ``fuzz.ratio`` / 100): 1 - edits / total
    length, where an edit inserts or deletes one character."""
    return fuzz.ratio(text, reference) / 100.0


def _check_text_similarity(spec: dict[str, Any], param: str) -> None:
    metric = spec["evaluation_metric"]
    if metric not in SIMILARITY_METRICS:
        why = f" ({UNSUPPORTED_METRICS[metric]})" if metric in UNSUPPORTED_METRICS else ""
        raise ConfigError(
            f"{param}.evaluation_metric",
            f"{metric!r} is not supported here{why}; supported: "
            f"{', '.join(SIMILARITY_METRICS)}. A python_grader can compute any other metric",
        )
    _check_templates(spec, param)


def _build_text_similarity(spec: dict[str, Any], **_: Any) -> PerCompletion:
    def score(prompt: str, completion: str, row: dict[str, Any]) -> float:
        sample = sample_of(completion)
        return fuzzy_match(render(spec["input"], sample, row), render(spec["reference"], sample, row))

    return PerCompletion(score)


TEXT_SIMILARITY = RewardType(
    summary="similarity in [0, 1] of input (default: the completion) to reference: fuzzy_match (rapidfuzz)",
    options={
        "input": Option("string", "{{sample.output_text}}"),
        "reference": Option("string", example='"{{item.answer}}"'),
        "evaluation_metric": Option("string", "fuzzy_match"),
    },
    check=_check_text_similarity,
    build=_build_text_similarity,
    fields=_fields,
)


# --- python_grader -----------------------------------------------------------------------------

HARNESS = Path(__file__).with_name("grader_harness.py")
MAX_SOURCE_BYTES = 256 * 1024
MAX_TIMEOUT_S = 60.0
MAX_MEMORY_MB = 2048
MAX_SANDBOXES = 8  # sandboxes grading one batch at once
MAX_PROCESSES = 8
FILE_LIMIT_MB = 10
MAX_ERROR_CHARS = 300


def _defines_grade(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "grade":
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "grade" for t in node.targets
        ):
            return True
        if isinstance(node, ast.ImportFrom | ast.Import) and any(
            (a.asname or a.name) == "grade" for a in node.names
        ):
            return True
    return False


def _check_python_grader(spec: dict[str, Any], param: str) -> None:
    source = spec["source"]
    if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
        raise ConfigError(f"{param}.source", f"is longer than {MAX_SOURCE_BYTES // 1024} KiB")
    try:
        tree = ast.parse(source, filename="grader.py")
    except SyntaxError as exc:
        raise ConfigError(f"{param}.source", f"is not valid Python: {exc.msg} (line {exc.lineno})") from None
    if not _defines_grade(tree):
        raise ConfigError(
            f"{param}.source",
            "must define grade(sample, item) -> float at the top level, e.g. "
            "def grade(sample, item): return float(sample['output_text'] == item['answer'])",
        )
    if spec["timeout_s"] > MAX_TIMEOUT_S:
        raise ConfigError(f"{param}.timeout_s", f"must be <= {MAX_TIMEOUT_S:g} s, got {spec['timeout_s']:g}")
    if spec["memory_mb"] > MAX_MEMORY_MB:
        raise ConfigError(f"{param}.memory_mb", f"must be <= {MAX_MEMORY_MB}, got {spec['memory_mb']}")


@cache
def harness_source() -> str:
    return HARNESS.read_text(encoding="utf-8")


def grade_in_sandbox(
    source: str,
    cases: list[dict[str, Any]],
    *,
    timeout_s: float,
    memory_mb: int,
    allow_unisolated: bool = False,
) -> list[float | Exception]:
    """``grade(case["sample"], case["item"])`` for each case, in one sandbox run: a score or the
    exception that stands for it. ``timeout_s`` bounds each call; the run as a whole gets
    ``timeout_s`` per case."""
    nonce = secrets.token_hex(16)
    job = json.dumps({"nonce": nonce, "source": source, "cases": cases, "timeout_s": timeout_s}).encode()
    result = run_sandboxed(
        harness_source(),
        stdin=job,
        timeout_s=timeout_s * len(cases),
        memory_mb=memory_mb,
        file_mb=FILE_LIMIT_MB,
        max_processes=MAX_PROCESSES,
        allow_unisolated=allow_unisolated,
        stop=current_stop(),
    )
    report = result.stdout.decode("utf-8", "replace")
    lines = re.findall(rf"^{nonce} (\S+) (ok|error) (.*)$", report, re.MULTILINE)
    if not any(index == "start" for index, _, _ in lines):
        if result.timed_out:
            raise SandboxError(
                f"the sandbox did not start within {timeout_s * len(cases) + STARTUP_SLACK_S:g} s"
            )
        stderr_tail = result.stderr[-300:].decode("utf-8", "replace").strip()
        raise SandboxError(f"the grader harness did not start ({result.describe()}): {stderr_tail}")
    scores: dict[int, float | Exception] = {}
    for index, outcome, value in lines:
        if index == "setup":  # the source itself failed: every case fails alike
            return [RewardError(f"the grader's source failed: {json.loads(value)}")] * len(cases)
        if index.isdigit() and int(index) < len(cases) and int(index) not in scores:
            scores[int(index)] = (
                float(json.loads(value)) if outcome == "ok" else RewardError(json.loads(value))
            )
    stopped = "it ran out of time" if result.timed_out else f"the grader process {result.describe()}"
    return [
        scores.get(index, RewardError(f"no grade: {stopped} before this sample"))
        for index in range(len(cases))
    ]


class PythonGrader:
    """Scores a batch with the user's ``grade``: the batch is split among a few sandboxes."""

    def __init__(self, spec: dict[str, Any], policy: OperatorPolicy):
        self.source = spec["source"]
        self.timeout_s = spec["timeout_s"]
        self.memory_mb = spec["memory_mb"]
        self.allow_unisolated = policy.sandbox_allow_unisolated  # the operator's, as for code_tests

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> Scores:
        cases = [
            {"sample": sample_of(completion), "item": row}
            for completion, row in zip(completions, rows, strict=True)
        ]
        if not cases:
            return []
        parts = max(1, min(len(cases), os.cpu_count() or 1, MAX_SANDBOXES))
        chunks = [
            cases[index::parts] for index in range(parts)
        ]  # round robin: chunk i holds cases i, i+parts, ...
        with ThreadPoolExecutor(max_workers=parts, thread_name_prefix="python-grader") as pool:
            # each in a copy of this context: a stop signal (``current_stop``) reaches the sandboxes
            futures = [
                pool.submit(
                    contextvars.copy_context().run,
                    grade_in_sandbox,
                    self.source,
                    chunk,
                    timeout_s=self.timeout_s,
                    memory_mb=self.memory_mb,
                    allow_unisolated=self.allow_unisolated,
                )
                for chunk in chunks
            ]
        scores: Scores = [RewardError("not graded")] * len(cases)
        for part, future in enumerate(futures):
            try:
                graded = future.result()
            except (
                Exception
            ) as exc:  # the sandbox could not run: every case of the chunk errs with the reason
                graded = [exc] * len(chunks[part])
            for offset, score in enumerate(graded):
                scores[part + offset * parts] = score
        return scores

    def close(self) -> None:
        pass


PYTHON_GRADER = RewardType(
    summary="your grade(sample, item) -> float (Python source, standard library only), run in the sandbox",
    options={
        "source": Option(
            "string",
            example="\"def grade(sample, item): return float(sample['output_text'] == item['answer'])\"",
        ),
        "timeout_s": Option("number", 5.0, above=0),
        "memory_mb": Option("integer", 512, minimum=64),
    },
    check=_check_python_grader,
    build=lambda spec, *, policy, **_: PythonGrader(spec, policy),
)
