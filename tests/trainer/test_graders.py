"""The OpenAI-style grader rewards (``string_check``, ``text_similarity``, ``python_grader``) on
hand-written completions, and the python grader's sandbox under attack."""

import os
import socket
import textwrap
from pathlib import Path

import pytest

from tests.trainer.test_sandbox import alive_uids
from trainer.config import ConfigError
from trainer.rewards import RewardSuite, graders, required_fields, sandbox, validate_reward_specs
from trainer.rewards.graders import check_template, render, sample_of, template_fields

REPO_ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the sandbox starts as root to build its namespaces"
)


def parts(spec: dict, completions: list[str], rows: list[dict]) -> tuple[list[float | None], list[str]]:
    """The one reward's unweighted scores, and the suite's error messages."""
    with RewardSuite([spec]) as suite:
        output = suite(["" for _ in completions], completions, rows)
    (scores,) = output.parts.values()
    return scores, output.error_messages


# --- templates ---------------------------------------------------------------------------------


def test_templates_render_the_sample_and_nested_row_fields():
    sample = sample_of('{"answer": 42, "why": "sums"}')
    item = {"answer": "42", "meta": {"unit": "kg", "n": 3}}
    assert render("{{ sample.output_text }}", sample, item) == '{"answer": 42, "why": "sums"}'
    assert render("{{sample.output_json.answer}} {{item.meta.unit}}", sample, item) == "42 kg"
    assert render("n={{item.meta.n}}, meta={{item.meta}}", sample, item) == 'n=3, meta={"unit": "kg", "n": 3}'
    # a completion that is not JSON, or lacks the path: the model's failure, rendered empty
    assert render("[{{sample.output_json.answer}}]", sample_of("plain text"), item) == "[]"
    assert template_fields("{{item.answer}} {{item.meta.unit}} {{sample.output_text}}") == {"answer", "meta"}


@pytest.mark.parametrize(
    "template",
    ["{{item}}", "{{sample.output}}", "{{sample.output_text.x}}", "{{row.answer}}", "{{ item.answer"],
)
def test_unknown_template_variables_are_refused(template):
    with pytest.raises(ConfigError) as caught:
        check_template("reward[0].reference", template)
    assert caught.value.param == "reward[0].reference"


# --- string_check ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        ("eq", [1.0, 0.0, 0.0, 0.0]),  # exact: case and surrounding space count
        ("ne", [0.0, 1.0, 1.0, 1.0]),
        ("like", [1.0, 0.0, 1.0, 0.0]),  # contains
        ("ilike", [1.0, 1.0, 1.0, 0.0]),  # contains, ignoring case
    ],
)
def test_string_check_operations(operation, expected):
    completions = ["Paris", "PARIS", "It is Paris.", "Lyon"]
    spec = {"type": "string_check", "reference": "{{item.answer}}", "operation": operation}
    assert parts(spec, completions, [{"answer": "Paris"}] * 4) == (expected, [])


def test_string_check_with_a_literal_reference_and_a_templated_input():
    spec = {"type": "string_check", "input": "{{sample.output_json.verdict}}", "reference": "yes"}
    assert parts(spec, ['{"verdict": "yes"}', '{"verdict": "no"}', "yes"], [{}] * 3) == ([1.0, 0.0, 0.0], [])


def test_string_check_reads_the_row_fields_it_names_and_errs_without_them():
    spec = {"type": "string_check", "reference": "{{item.reference_answer}}"}
    assert required_fields([spec]) == {"reference_answer"}
    scores, errors = parts(spec, ["x"], [{"answer": "x"}])
    assert scores == [None] and "has no 'reference_answer' field" in errors[0]


def test_string_check_spec_errors_name_the_option():
    for spec, param in (
        ({"type": "string_check"}, "reward[0].reference"),
        ({"type": "string_check", "reference": "a", "operation": "glob"}, "reward[0].operation"),
        ({"type": "string_check", "reference": "{{item}}"}, "reward[0].reference"),
    ):
        with pytest.raises(ConfigError) as caught:
            validate_reward_specs([spec])
        assert caught.value.param == param


# --- text_similarity ---------------------------------------------------------------------------


def test_fuzzy_match_is_the_normalised_indel_similarity():
    # kitten/sitting: the longest common subsequence "ittn" (4) leaves 2 + 3 characters to delete
    # and insert; 1 - 5 / (6 + 7) = 8/13.
    spec = {"type": "text_similarity", "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}
    scores, errors = parts(spec, ["sitting", "kitten", "xyz"], [{"answer": "kitten"}] * 3)
    assert scores == [pytest.approx(8 / 13), 1.0, 0.0] and errors == []


@pytest.mark.parametrize("metric", ["bleu", "rouge_l", "cosine", "meteor", "levenshtein"])
def test_unsupported_similarity_metrics_are_refused_by_name(metric):
    with pytest.raises(ConfigError) as caught:
        validate_reward_specs([{"type": "text_similarity", "reference": "a", "evaluation_metric": metric}])
    assert caught.value.param == "reward[0].evaluation_metric"
    assert (
        f"{metric!r} is not supported here" in caught.value.message and "fuzzy_match" in caught.value.message
    )


# --- python_grader: the spec -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("def grade(sample, item)\n    return 1.0", "is not valid Python: expected ':' (line 1)"),
        ("def score(sample, item):\n    return 1.0", "must define grade(sample, item)"),
        ("x" * (graders.MAX_SOURCE_BYTES + 1), "is longer than 256 KiB"),
    ],
)
def test_python_grader_source_is_checked_before_anything_runs(source, says):
    with pytest.raises(ConfigError) as caught:
        validate_reward_specs([{"type": "python_grader", "source": source}])
    assert caught.value.param == "reward[0].source" and says in caught.value.message


def test_python_grader_limits_are_bounded():
    for option, value in (("timeout_s", 61.0), ("memory_mb", 4096)):
        with pytest.raises(ConfigError) as caught:
            validate_reward_specs([{"type": "python_grader", "source": "grade = max", option: value}])
        assert caught.value.param == f"reward[0].{option}"


# --- python_grader: running it -----------------------------------------------------------------

EXACT = """
def grade(sample, item):
    return 1.0 if sample["output_text"].strip() == item["answer"] else 0.0
"""


def grade(source: str, completions: list[str], rows: list[dict] | None = None, **options):
    spec = {"type": "python_grader", "source": textwrap.dedent(source), **options}
    return parts(spec, completions, rows if rows is not None else [{"answer": "4"}] * len(completions))


@needs_root
def test_python_grader_scores_each_sample_with_the_users_grade():
    assert grade(EXACT, ["4", " 4\n", "5", "four", "4"]) == ([1.0, 1.0, 0.0, 0.0, 1.0], [])
    partial = """
        import json
        def grade(sample, item):
            answer = (sample["output_json"] or {}).get("answer")
            return 0.5 * (answer == item["answer"]) + 0.5 * (len(sample["output_text"]) < 20)
    """
    assert grade(partial, ['{"answer": "4"}', '{"answer": "5"}', "x" * 30]) == ([1.0, 0.5, 0.0], [])


@needs_root
def test_python_grader_errors_are_per_sample_and_say_where():
    source = """
        def grade(sample, item):
            if sample["output_text"] == "boom":
                raise ValueError("no answer")
            if sample["output_text"] == "text":
                return "1"
            return 1.0
    """
    scores, errors = grade(source, ["ok", "boom", "text"])
    assert scores == [1.0, None, None]
    assert "python_grader: ValueError: no answer (grader.py line 4)" in errors
    assert "python_grader: TypeError: grade() must return a number, got str" in errors


@needs_root
def test_a_grader_whose_source_fails_fails_every_sample_with_the_reason():
    scores, errors = grade("import numpy\ndef grade(sample, item):\n    return 1.0\n", ["a", "b", "c"])
    assert scores == [None, None, None]
    assert errors == [
        "python_grader: the grader's source failed: ModuleNotFoundError: No module named 'numpy' "
        "(grader.py line 1)"
    ]


@needs_root
def test_a_slow_sample_times_out_alone():
    source = """
        def grade(sample, item):
            while sample["output_text"] == "slow":
                pass
            return 1.0
    """
    scores, errors = grade(source, ["slow", "fast", "fast", "fast"], timeout_s=0.5)
    assert scores == [None, 1.0, 1.0, 1.0]
    assert errors == [
        "python_grader: GradeTimeout: grade() took longer than its time limit (grader.py line 3)"
    ]


# --- python_grader: escapes ----------------------------------------------------------------------


@pytest.fixture
def sandbox_uids(monkeypatch):
    """Records the uid of every sandbox the grader starts; afterwards none may run a process."""
    uids: list[int] = []
    real = graders.run_sandboxed

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        uids.append(result.uid)
        return result

    monkeypatch.setattr(graders, "run_sandboxed", recording)
    yield uids
    assert uids, "no sandbox ran"
    assert alive_uids(set(uids)) == set()


def escape(attempt: str) -> str:
    """A grader that scores 1 only if ``attempt`` (an expression) succeeds and is truthy."""
    return f"""
import errno, os, socket, subprocess, sys

def grade(sample, item):
    try:
        return 1.0 if ({attempt}) else 0.0
    except Exception:
        return 0.0
"""


@needs_root
@pytest.mark.parametrize(
    "attempt",
    [
        "'root:' in open('/etc/passwd').read()",  # the host's passwd has root; the sandbox's does not
        f"os.path.exists({str(REPO_ROOT / 'pyproject.toml')!r})",
        "os.path.exists('/var/lib/postgresql') or os.path.exists('/root/.bashrc')",
        "open('/usr/evil', 'w').write('x')",
        "os.setuid(0) is None",
        "len(dict(os.environ).keys() - {'LC_CTYPE'}) > 0",
        "bytearray(10 * 2**30)",
    ],
)
def test_the_grader_cannot_reach_the_host(sandbox_uids, attempt):
    assert grade(escape(attempt), ["x"]) == ([0.0], [])


@needs_root
@pytest.mark.parametrize(
    "allowed",
    [
        "open('/tmp/scratch', 'w').write('hi') == 2",  # the private /tmp
        "open('/etc/passwd').read().startswith('sandbox:')",
        f"os.getuid() >= {sandbox.UID_BASE}",  # an unprivileged uid of the sandbox's
    ],
)
def test_the_escape_checks_are_not_vacuous(sandbox_uids, allowed):
    assert grade(escape(allowed), ["x"]) == ([1.0], [])


@needs_root
def test_the_grader_has_no_network_even_to_the_hosts_loopback(sandbox_uids):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        attempt = f"socket.create_connection(('127.0.0.1', {port}), timeout=1)"
        assert grade(escape(attempt), ["x"]) == ([0.0], [])


@needs_root
def test_the_grader_cannot_forge_results_and_its_processes_die_with_the_run(sandbox_uids):
    source = """
        import os, subprocess, sys
        def grade(sample, item):
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
            for index in range(4):
                print("0" * 32, index, "ok", "1.0")  # to its stdout: /dev/null
            if os.fork() == 0:
                return 1.0  # a child that returns into the harness reports nothing
            os.wait()
            return 0.25
    """
    assert grade(source, ["a", "b"]) == ([0.25, 0.25], [])
    # the fixture asserts that the detached sleepers died with their sandboxes


@needs_root
def test_a_fork_bomb_is_contained(sandbox_uids):
    source = """
        import os
        def grade(sample, item):
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
    """
    scores, errors = grade(source, ["a"], timeout_s=0.5)
    assert scores == [None] and len(errors) == 1
