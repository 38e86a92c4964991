"""Reward functions on hand-written completions: scores, error paths, spec validation."""

import json
import math
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.trainer.factories import LOADED_MACHINE_SLACK_S
from trainer import net
from trainer.config import ConfigError, OperatorPolicy
from trainer.errors import ModelLoadError
from trainer.rewards import (
    REWARD_TYPES,
    RewardSuite,
    check_operator_policy,
    code_tests,
    required_fields,
    sandbox,
    validate_reward_specs,
)
from trainer.rewards.base import RewardType

REPO_ROOT = Path(__file__).resolve().parents[2]


def score(
    spec: dict, completions: list[str], rows: list[dict] | None = None, policy: OperatorPolicy | None = None
):
    """Run one reward spec over completions (empty prompts; rows default to empty objects)."""
    rows = rows if rows is not None else [{} for _ in completions]
    with RewardSuite([spec], policy=policy) as suite:
        return suite(["" for _ in completions], completions, rows)


def parts(
    spec: dict, completions: list[str], rows: list[dict] | None = None, policy: OperatorPolicy | None = None
) -> list[float | None]:
    """The one reward's unweighted scores."""
    (scores,) = score(spec, completions, rows, policy).parts.values()
    return scores


def answers(*values) -> list[dict]:
    return [{"answer": value} for value in values]


# --- exact_match -------------------------------------------------------------------------------


def test_exact_match_last_number_normalises_numbers():
    completions = [
        "so the total is 1,234.",
        "It is 1234.0 dollars",
        "x = -3",
        "no number here",
        "5-3 = 2",
        "7 then 8",
    ]
    rows = answers("1234", "1,234", "-3", "7", 2, "7")
    assert parts({"type": "exact_match"}, completions, rows) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def test_exact_match_boxed_takes_the_last_complete_box_with_nested_braces():
    completions = [
        "first \\boxed{3} then \\boxed{\\frac{1}{2}}",
        "\\boxed{\\frac{1}{2}} and \\boxed{\\frac{1}{",
        "\\boxed{ 2 }",
        "no box: \\frac{1}{2}",
    ]
    rows = answers("\\frac{1}{2}", "\\frac{1}{2}", "2", "\\frac{1}{2}")
    assert parts({"type": "exact_match", "extract": "boxed"}, completions, rows) == [1.0, 1.0, 1.0, 0.0]


def test_exact_match_after_marker():
    completions = ["4 + 6 = 10\n#### 1,000\n", "#### 12 apples\n#### 13", "Answer: 42", "#### "]
    rows = answers("1000", "13", "42", "0")
    assert parts({"type": "exact_match", "extract": "after_marker"}, completions, rows) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert parts(
        {"type": "exact_match", "extract": "after_marker", "marker": "Answer:"}, completions[2:3], rows[2:3]
    ) == [1.0]


def test_exact_match_regex_group_and_case():
    spec = {"type": "exact_match", "extract": "regex", "pattern": r"answer: (\w+)", "flags": "i"}
    completions = ["Answer: Lyon. No wait, answer: PARIS", "answer: Rome", "I don't know"]
    rows = answers("paris", "paris", "paris")
    assert parts(spec, completions, rows) == [1.0, 0.0, 0.0]
    assert parts({**spec, "case_sensitive": True}, completions[:1], rows[:1]) == [0.0]


def test_exact_match_boxed_is_linear_in_a_completion_that_repeats_boxes():
    completion = "\\boxed{" * 20_000 + "\\boxed{7}"  # quadratic scanning took ~8 s at a quarter of this
    started = time.monotonic()
    assert parts({"type": "exact_match", "extract": "boxed"}, [completion], answers("7")) == [1.0]
    # Not a timing test: only a bound a loaded 2-core CI keeps easily, where quadratic scanning
    # (16x the ~8 s measured at a quarter of this length) cannot.
    assert time.monotonic() - started < LOADED_MACHINE_SLACK_S


def test_exact_match_full_collapses_whitespace():
    completions = ["  Hello \n  World ", "hello world!"]
    assert parts(
        {"type": "exact_match", "extract": "full"}, completions, answers("hello world", "hello world")
    ) == [1.0, 0.0]


def test_a_completion_that_raises_is_a_counted_error_and_the_total_still_adds_up():
    suite = RewardSuite(
        [{"type": "exact_match", "weight": 2.0}, {"type": "length", "target": 4, "weight": 0.5}]
    )
    output = suite(
        ["p", "p", "p"], ["1234", "5678", "42"], [{"answer": 1234}, {"question": "?"}, {"answer": 1}]
    )
    assert output.parts["exact_match"] == [1.0, None, 0.0]
    assert output.errors == {"exact_match": 1, "length": 0}
    assert output.parts["length"] == [1.0, 1.0, 0.5]
    assert output.total == [2.0 + 0.5, 0.5, 0.25]
    assert output.error_messages == [
        "exact_match: the dataset row has no 'answer' field (its fields: question)"
    ]


# --- math --------------------------------------------------------------------------------------


MATH_COMPLETIONS = [
    "so the answer is $\\boxed{0.5}$",
    "We get $(x+1)^2$",
    "the answer is $\\frac{1}{3}$",
    "I am not sure",
]
MATH_ROWS = answers("\\frac{1}{2}", "x^2+2x+1", "1/2", "4")


def test_math_checks_symbolic_equivalence():
    assert parts({"type": "math"}, MATH_COMPLETIONS, MATH_ROWS) == [1.0, 1.0, 0.0, 0.0]


def test_math_runs_off_the_main_thread():
    results = []
    thread = threading.Thread(
        target=lambda: results.append(parts({"type": "math"}, MATH_COMPLETIONS, MATH_ROWS))
    )
    thread.start()
    thread.join()
    assert results == [[1.0, 1.0, 0.0, 0.0]]


def test_math_that_never_ends_is_a_timeout_error_off_the_main_thread():
    """9^(9^(9^9)) makes sympy compute for hours; the API scores in worker threads, where
    math-verify's own signal-based timeout cannot run."""
    spec = {"type": "math", "timeout_s": 1}
    completions = ["$\\boxed{9^{9^{9^{9}}}}$", "$\\boxed{2}$"]
    parts({"type": "math"}, ["$2$"], answers("2"))  # a child process started, outside the timing
    results, elapsed = [], []

    def run() -> None:
        started = time.monotonic()
        results.append(score(spec, completions, answers("2", "2")))
        elapsed.append(time.monotonic() - started)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=1 + LOADED_MACHINE_SLACK_S)
    assert not thread.is_alive() and elapsed  # it ended (sympy alone would run for hours)
    (output,) = results
    assert output.parts["math"] == [None, 1.0] and output.errors == {"math": 1}
    assert output.error_messages == ["math: math-verify timed out after 1s on this completion"]


def test_a_math_child_that_stops_answering_is_killed_at_the_limit(tmp_path):
    """The backstop for work a signal cannot interrupt (a long computation in C)."""
    from trainer.rewards.base import RewardError
    from trainer.rewards.math_pool import KILL_GRACE_S, MathPool

    stuck = tmp_path / "stuck_child.py"
    stuck.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        "print('{\"ready\": true}', flush=True)\n"
        "sys.stdin.readline()\n"
        "print(os.getpid(), file=open(sys.argv[0] + '.pid', 'w'), flush=True)\n"
        "time.sleep(3600)\n"
    )
    pool = MathPool(size=1, script=stuck)
    try:
        started = time.monotonic()
        with pytest.raises(RewardError, match="timed out after 1s"):
            pool.check("2", "$2$", timeout_s=1)
        assert (
            time.monotonic() - started < 1 + KILL_GRACE_S + LOADED_MACHINE_SLACK_S
        )  # the child would sleep an hour
        pid = int((tmp_path / "stuck_child.py.pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
        assert pool.idle == []  # the next check starts a fresh child
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("soft", "hard"),
    [(3 << 30, 3 << 30), (5 << 29, resource.RLIM_INFINITY)],
    ids=["hard-3GiB", "soft-2.5GiB"],
)
def test_a_math_child_started_under_a_lower_memory_limit_keeps_it_and_answers(soft, hard):
    """An operator's ``ulimit -v`` below the child's own 4 GiB: a process may not raise its hard
    limit, so asking for 4 GiB failed the child at its start, and every math reward with it."""
    from trainer.rewards.math_pool import CHILD

    child = subprocess.Popen(
        [sys.executable, "-P", str(CHILD)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard)),
    )
    try:
        assert json.loads(child.stdout.readline() or "null") == {"ready": True}, child.stderr.read()
        limits = Path(f"/proc/{child.pid}/limits").read_text()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max address space")]
        assert line.split()[3:5] == [str(soft), str(soft)]  # the lower limit kept, soft and hard
        child.stdin.write(json.dumps({"gold": "1/2", "answer": "$\\frac{2}{4}$", "timeout_s": 30}) + "\n")
        child.stdin.flush()
        assert json.loads(child.stdout.readline()) == {"score": 1.0}
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        child.stdout.close()
        child.stderr.close()


def test_math_unreadable_gold_answer_is_an_error():
    output = score({"type": "math"}, ["$2$"], answers("}{"))
    assert output.errors == {"math": 1}
    assert output.parts["math"] == [None]
    assert "math-verify cannot read" in output.error_messages[0]


# --- regex and length --------------------------------------------------------------------------


def test_regex_match_full_match_and_flags():
    completions = ["<think>a\nb</think> 4", "no tags", "<THINK>x</THINK>"]
    assert parts({"type": "regex", "pattern": "<think>.*</think>"}, completions) == [0.0, 0.0, 0.0]
    assert parts({"type": "regex", "pattern": "<think>.*</think>", "flags": "si"}, completions) == [
        1.0,
        0.0,
        1.0,
    ]
    assert parts(
        {"type": "regex", "pattern": "<think>.*</think>", "flags": "si", "full_match": True}, completions
    ) == [0.0, 0.0, 1.0]


def test_regex_fraction_is_the_covered_share_of_characters():
    spec = {"type": "regex", "pattern": "a+", "score": "fraction"}
    assert parts(spec, ["aab", "bbbb", "", "aaaa", "abab"]) == [2 / 3, 0.0, 0.0, 1.0, 0.5]


# "(a|a)+$" tries 2**n ways to split n a's before it fails at the "!": no end in a lifetime at 40.
BACKTRACKING = "(a|a)+$"
BACKTRACKING_TEXT = "a" * 40 + "!"


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "regex", "pattern": BACKTRACKING},
        {"type": "regex", "pattern": BACKTRACKING, "full_match": True},
        {"type": "regex", "pattern": BACKTRACKING, "score": "fraction"},
        {"type": "exact_match", "extract": "regex", "pattern": BACKTRACKING},
    ],
    ids=["search", "full_match", "fraction", "exact_match"],
)
def test_a_backtracking_pattern_is_a_timeout_error_per_completion(spec):
    from trainer.rewards.base import PATTERN_TIMEOUT_S

    # Counted, not timed: each backtracking completion is its own error, the others still score,
    # and the call returns at all (2**40 ways to split would take a lifetime). The wall-clock bound
    # is only the generous one a loaded 2-core CI keeps.
    started = time.monotonic()
    output = score(spec, [BACKTRACKING_TEXT, "aaa", BACKTRACKING_TEXT], answers("aaa", "a", "aaa"))
    assert time.monotonic() - started < 2 * PATTERN_TIMEOUT_S + LOADED_MACHINE_SLACK_S
    (name,) = output.parts
    assert output.parts[name][0] is None and output.parts[name][2] is None
    assert output.parts[name][1] is not None  # the other completion scored
    assert output.errors == {name: 2}
    assert output.error_messages == [
        f"{name}: the pattern '(a|a)+$' timed out after {PATTERN_TIMEOUT_S:g}s on this completion; nested "
        "repetition such as (a+)+ or (a|a)+ backtracks exponentially, simplify it"
    ]  # distinct messages are listed once


def test_patterns_are_checked_and_run_by_the_same_engine():
    # Variable-length lookbehind and Unicode properties: the regex engine has them, re has not.
    assert parts(
        {"type": "regex", "pattern": r"(?<=answer: +)\p{Lu}+"}, ["answer:   PARIS", "answer: paris"]
    ) == [1.0, 0.0]


def test_a_pattern_at_the_size_limits_compiles_and_scores_and_one_past_them_is_refused():
    """Each {m,n} count at most 1000, at most 10,000 elements with the minimum counts multiplied out."""
    at_limit = {"type": "regex", "pattern": "^(?:a{1000}){9}$", "full_match": True}  # 9,020 elements
    assert parts(at_limit, ["a" * 9000, "a" * 8999, "a" * 9001]) == [1.0, 0.0, 0.0]
    assert parts({"type": "regex", "pattern": "^a{0,1000}$"}, ["a" * 1000, "a" * 1001]) == [1.0, 0.0]
    for pattern, says in (
        ("(?:a{1000}){10}", "its repeats expand it to 10,022 elements, at most 10,000"),
        ("a{0,1001}", "repeat count 1001 exceeds 1000"),
        ("(?x) a{1 0 0 1}", "repeat count 1001 exceeds 1000"),  # the engine's own reading of the count
    ):
        with pytest.raises(ConfigError) as caught:
            validate_reward_specs([{"type": "regex", "pattern": pattern}])
        assert (caught.value.param, says in caught.value.message) == ("reward[0].pattern", True), caught.value


def test_huge_repeat_counts_are_refused_before_anything_is_compiled():
    """Compiled, "a{1000000000}" asks for ~21 GB: refused by its count. Checked in a child held to
    4 GB of address space, where compiling it would be a MemoryError, not this message."""
    code = (
        "import json, resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4_000_000_000, 4_000_000_000))\n"
        "from trainer.config import ConfigError\n"
        "from trainer.rewards import validate_reward_specs\n"
        "errors = []\n"
        "for spec in ({'type': 'regex', 'pattern': 'a{1000000000}'},\n"
        "             {'type': 'exact_match', 'extract': 'regex', 'pattern': '(\\\\d){1000000000}'},\n"
        "             {'type': 'regex', 'pattern': '(a{1000}){1000}'}):\n"
        "    try:\n"
        "        validate_reward_specs([spec])\n"
        "    except ConfigError as exc:\n"
        "        errors.append([exc.param, exc.message])\n"
        "print(json.dumps(errors))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    errors = json.loads(result.stdout)
    assert [param for param, _ in errors] == ["reward[0].pattern"] * 3
    assert errors[0][1].startswith("repeat count 1000000000 exceeds 1000")
    assert errors[1][1].startswith("repeat count 1000000000 exceeds 1000")
    assert "its repeats expand it to 1,003,002 elements, at most 10,000" in errors[2][1]


def test_checking_patterns_keeps_none_of_them_in_the_regex_module():
    """The regex module caches 500 compiled patterns, and remembers every pattern string it has
    compiled (its locale-sensitivity) until that cache is pruned: a server that checks users'
    patterns would keep them all."""
    import regex

    module = sys.modules[regex.compile.__module__]
    cached, remembered = len(module._cache), len(module._locale_sensitive)
    specs = [{"type": "regex", "pattern": f"a{{{900 + i}}}", "name": f"r{i}"} for i in range(50)]
    validate_reward_specs(specs)
    assert parts(specs[0], ["a" * 900, "a" * 899]) == [1.0, 0.0]  # built: compiled again
    assert (len(module._cache), len(module._locale_sensitive)) == (cached, remembered)


def test_a_pattern_nested_too_deeply_to_compile_is_refused_by_name():
    with pytest.raises(ConfigError) as caught:
        validate_reward_specs([{"type": "regex", "pattern": "(" * 900 + "a" + ")" * 900}])
    assert caught.value.param == "reward[0].pattern"
    assert "nests its groups too deeply to compile" in caught.value.message


PATTERNS = [
    "a",
    "a{1000}",
    r"\d{1,3}(,\d{3})*",
    "(?:a{10}|b{20}c){30}",
    "(?x) a { 1 0 } # a comment",
    r"(?<=answer: +)\p{Lu}{2,5}",
    "(?i)[a-z]{3}(?:x{2}){4}",
    "(a)(?(1)b{10}|c{20}){5}",
    "(?:a{3}){e<=1}",
    "(?:(?:a){7}){7}",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_text_fallback_bounds_what_the_parse_measures(pattern):
    """Where the regex package's internal parser has changed, the size is bounded from the text."""
    from trainer.rewards.base import _repeats_in_text, _repeats_parsed

    parsed_counts, parsed_elements, parsed_calls = _repeats_parsed(pattern, 0)
    text_counts, text_elements, text_calls = _repeats_in_text(pattern)
    assert max(text_counts, default=0) >= max(parsed_counts, default=0)
    assert text_elements >= parsed_elements
    assert text_calls >= parsed_calls


@pytest.mark.parametrize("pattern", ["(?R)?a", "(a(?1)?b)", "(?P<x>a(?&x)?)", "(?P<x>a(?P>x)?)", "a(?0)?"])
def test_a_pattern_that_calls_a_group_is_refused(pattern, monkeypatch):
    """(?R)?a holds ~0.6 GB for a second before the engine gives up: group calls are refused,
    from the parse and, where the parser changed, from the text."""
    from regex import _regex_core

    from trainer.rewards.base import pattern_cost_problem

    assert pattern_cost_problem(pattern, 0).startswith("calls a group")
    monkeypatch.delattr(_regex_core, "_parse_pattern")
    assert pattern_cost_problem(pattern, 0).startswith("calls a group")
    assert pattern_cost_problem(r"(a)\1(?:b)", 0) is None  # a back-reference is not a call


def test_sizes_are_still_bounded_when_the_regex_parser_is_not_the_known_one(monkeypatch):
    from regex import _regex_core

    from trainer.rewards.base import pattern_cost_problem

    monkeypatch.delattr(_regex_core, "_parse_pattern")  # as a release that renamed it
    assert pattern_cost_problem("a{1000000000}", 0).startswith("repeat count 1000000000 exceeds 1000")
    assert "its repeats expand it to" in pattern_cost_problem("(a{100}){100}", 0)
    assert pattern_cost_problem(r"\d{1,3}(,\d{3})*", 0) is None


def test_length_target_and_max_length():
    completions = ["x" * 10, "x" * 5, "x" * 25, ""]
    assert parts({"type": "length", "target": 10}, completions) == [1.0, 0.5, 0.0, 0.0]
    assert parts({"type": "length", "max_length": 10}, completions) == [0.0, 0.0, -1.0, 0.0]
    assert parts({"type": "length", "max_length": 20}, ["x" * 25]) == [-0.25]


# --- code_tests --------------------------------------------------------------------------------


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def code_rows(tests, n: int = 1) -> list[dict]:
    return [{"tests": tests} for _ in range(n)]


def test_code_tests_scores_the_share_of_tests_passed():
    completions = [
        "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
        "```python\ndef add(a, b):\n    return a * b if a == 2 else a + b + 1\n```",  # passes 1 of 3
        "```\ndef add(a, b):\n    return abs(a) + b\n```",  # untagged fence; passes 2 of 3
        "def add(a, b) return a + b",  # no fence: the whole completion, a syntax error
        "```python\nraise SystemExit(0)\n```",  # exiting early passes nothing
        "```bash\nls\n```\n```python\ndef add(a, b):\n    return a + b\n",  # a fence cut off by truncation
    ]
    output = score({"type": "code_tests"}, completions, code_rows(ADD_TESTS, len(completions)))
    assert output.parts["code_tests"] == [1.0, 1 / 3, 2 / 3, 0.0, 0.0, 1.0]
    assert output.errors == {"code_tests": 0}
    all_or_nothing = parts({"type": "code_tests", "partial": False}, completions[:3], code_rows(ADD_TESTS, 3))
    assert all_or_nothing == [1.0, 0.0, 0.0]


def test_code_tests_one_string_counts_each_top_level_assert():
    tests = "def check(x):\n    return add(x, 1)\n\nassert check(1) == 2\nassert check(2) == 99\n"
    assert parts({"type": "code_tests"}, ["def add(a, b):\n    return a + b"], code_rows(tests)) == [0.5]


def test_code_tests_an_infinite_loop_is_stopped_by_the_time_limit():
    completions = ["```python\nwhile True:\n    pass\n```", "```python\nimport time\ntime.sleep(60)\n```"]
    started = time.monotonic()
    output = score({"type": "code_tests", "timeout_s": 1}, completions, code_rows(ADD_TESTS, 2))
    assert output.parts["code_tests"] == [0.0, 0.0]
    assert output.errors == {"code_tests": 0}
    assert (
        time.monotonic() - started < 1 + code_tests.STARTUP_SLACK_S + LOADED_MACHINE_SLACK_S
    )  # a 60 s sleep was cut


def test_code_tests_keeps_the_tests_passed_before_a_timeout():
    completion = "def add(a, b):\n    while a == 2:\n        pass\n    return a + b"
    assert parts({"type": "code_tests", "timeout_s": 1}, [completion], code_rows(ADD_TESTS)) == [2 / 3]


def test_code_tests_sandbox_runs_in_a_scratch_directory_with_limits():
    program = "import os, resource\ncwd = os.getcwd()\n"
    tests = [
        f"assert cwd != {str(Path.cwd())!r} and os.listdir(cwd) == []",
        "assert resource.getrlimit(resource.RLIMIT_AS)[0] == 256 * 2**20",
        "assert 'PATH' not in os.environ and 'HOME' not in os.environ",
        "try:\n    bytearray(300 * 2**20)\nexcept MemoryError:\n    pass\n"
        "else:\n    raise AssertionError('no memory limit')",
    ]
    assert parts({"type": "code_tests", "memory_mb": 256}, [program], code_rows(tests)) == [1.0]


def test_code_tests_sandbox_that_fails_to_start_is_an_error(tmp_path, monkeypatch):
    script = tmp_path / "launcher.py"
    script.write_text("import sys\nsys.stderr.write('boom\\n')\nsys.exit(1)\n")
    monkeypatch.setattr(sandbox, "LAUNCHER", script)
    output = score({"type": "code_tests"}, ["x = 1"], code_rows(ADD_TESTS))
    assert output.errors == {"code_tests": 1}
    assert output.error_messages == ["code_tests: the sandbox failed (exit status 1): boom"]


def test_code_tests_bad_tests_in_the_row_are_errors():
    output = score({"type": "code_tests"}, ["x = 1"] * 3, [{"tests": []}, {"tests": "assert ("}, {}])
    assert output.parts["code_tests"] == [None, None, None]
    assert len(output.error_messages) == 3


# --- http --------------------------------------------------------------------------------------


class ScoringHandler(BaseHTTPRequestHandler):
    """/good scores len(completion); /short drops one; /fail is a 500; /flaky fails once; /slow sleeps."""

    hits: dict[str, int] = {}
    headers_seen: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        hits = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        self.headers_seen.append(dict(self.headers))
        rewards = [float(len(c)) for c in body["completions"]]
        assert len(body["prompts"]) == len(body["rows"]) == len(rewards)
        if self.path == "/short":
            rewards = rewards[:-1]
        elif self.path == "/text":
            rewards = ["high"] * len(rewards)
        elif self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/fail" or (self.path == "/flaky" and hits == 1):
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")
            return
        payload = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def scoring_server(monkeypatch):
    monkeypatch.setattr(net, "BACKOFF_S", 0.01)
    ScoringHandler.hits = {}
    ScoringHandler.headers_seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScoringHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


COMPLETIONS = ["a", "bb", "ccc"]
LOCAL = OperatorPolicy(allow_private_hosts=("127.0.0.1",))  # the test server listens on loopback


def test_http_good_answer(scoring_server):
    spec = {"type": "http", "url": f"{scoring_server}/good", "headers": {"Authorization": "Bearer t0ken"}}
    output = score(spec, COMPLETIONS, [{"id": i} for i in range(3)], LOCAL)
    assert output.parts["http"] == [1.0, 2.0, 3.0]
    assert output.total == [1.0, 2.0, 3.0]
    assert ScoringHandler.headers_seen[0]["Authorization"] == "Bearer t0ken"
    assert ScoringHandler.headers_seen[0]["Host"] == scoring_server.removeprefix("http://")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/short", "expected 3 rewards, one per completion, got 2"),
        ("/text", "rewards[0] is 'high', not a finite number"),
        ("/fail", "answered HTTP 500"),
    ],
)
def test_http_bad_answers_fail_the_whole_batch(scoring_server, path, expected):
    output = score({"type": "http", "url": f"{scoring_server}{path}"}, COMPLETIONS, policy=LOCAL)
    assert output.parts["http"] == [None, None, None]
    assert output.errors == {"http": 3}
    assert output.total == [0.0, 0.0, 0.0]
    (message,) = output.error_messages
    assert message.startswith(f"http: POST {scoring_server}{path}: ") and expected in message


def test_http_retries_server_errors_and_counts_the_retries(scoring_server):
    with RewardSuite([{"type": "http", "url": f"{scoring_server}/flaky"}], policy=LOCAL) as suite:
        assert suite([""] * 3, COMPLETIONS, [{}] * 3).parts["http"] == [1.0, 2.0, 3.0]
        assert suite._functions[0].retried == 1
    with RewardSuite([{"type": "http", "url": f"{scoring_server}/fail"}], policy=LOCAL) as suite:
        assert (
            "answered HTTP 500: 'internal error' after 3 tries" in suite([""], ["a"], [{}]).error_messages[0]
        )
        assert suite._functions[0].retried == 2
    assert ScoringHandler.hits == {"/flaky": 2, "/fail": 3}  # the first try and two retries


def test_http_backoff_doubles_up_to_a_bound(scoring_server, monkeypatch):
    monkeypatch.setattr(net, "BACKOFF_S", 1.0)
    monkeypatch.setattr(net, "MAX_BACKOFF_S", 3.0)
    delays: list[float] = []
    with pytest.raises(net.OutboundError, match="after 6 tries"):
        net.post_json(
            f"{scoring_server}/fail",
            {"completions": []},
            allowed_hosts=["127.0.0.1"],
            retries=99,
            sleep=delays.append,
        )
    assert delays == [1.0, 2.0, 3.0, 3.0, 3.0]  # retries capped at MAX_RETRIES, delays at MAX_BACKOFF_S
    assert ScoringHandler.hits == {"/fail": 6}


def test_http_timeout_and_refused_connection_are_errors(scoring_server):
    output = score(
        {"type": "http", "url": f"{scoring_server}/slow", "timeout_s": 0.2}, COMPLETIONS, policy=LOCAL
    )
    assert output.errors == {"http": 3}
    assert "no answer within 0.2 s" in output.error_messages[0]
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    output = score({"type": "http", "url": f"http://127.0.0.1:{closed_port}/"}, COMPLETIONS, policy=LOCAL)
    assert output.errors == {"http": 3}
    assert "cannot connect" in output.error_messages[0] and "after 3 tries" in output.error_messages[0]


def test_http_refuses_a_host_name_that_resolves_to_loopback_and_calls_it_once_listed(scoring_server):
    url = scoring_server.replace("127.0.0.1", "localhost") + "/good"
    output = score({"type": "http", "url": url}, COMPLETIONS)
    assert output.errors == {"http": 3}
    assert output.error_messages == [
        f"http: refusing to call {url}: localhost (resolved to 127.0.0.1) is a "
        "loopback address; the operator may allow it by listing 'localhost' in "
        "GRPO_ALLOW_PRIVATE_HOSTS"
    ]
    assert ScoringHandler.hits == {}  # nothing was sent
    by_name = OperatorPolicy(allow_private_hosts=("localhost",))
    assert parts({"type": "http", "url": url}, COMPLETIONS, policy=by_name) == [1.0, 2.0, 3.0]
    with RewardSuite([{"type": "http", "url": url}], policy=LOCAL) as suite:  # by address
        assert suite([""] * 3, COMPLETIONS, [{}] * 3).parts["http"] == [1.0, 2.0, 3.0]
    assert ScoringHandler.headers_seen[0]["Host"] == url.split("/")[2]


def test_only_the_operator_may_allow_private_hosts(scoring_server, monkeypatch):
    spec = {"type": "http", "url": f"{scoring_server}/good"}
    # The trainer reads no environment: the operator's list comes from the caller (the service's settings).
    monkeypatch.setenv(net.ALLOW_PRIVATE_HOSTS_ENV, "127.0.0.1")
    for policy in (None, OperatorPolicy(allow_private_hosts=("scorer.internal",))):
        with pytest.raises(ConfigError, match="is a loopback address") as refused:
            RewardSuite([spec], policy=policy)
        assert refused.value.param == "reward[0].url" and "GRPO_ALLOW_PRIVATE_HOSTS" in refused.value.message
    assert parts(
        spec, COMPLETIONS, policy=OperatorPolicy(allow_private_hosts=("scorer.internal", "127.0.0.1"))
    ) == [1.0, 2.0, 3.0]
    # A spec cannot allow a host itself: its former allowed_hosts option points to the operator's setting.
    for allowed in (["127.0.0.1"], []):
        with pytest.raises(ConfigError) as caught:
            validate_reward_specs([{**spec, "allowed_hosts": allowed}])
        assert caught.value.param == "reward[0].allowed_hosts"
        assert (
            "operator setting" in caught.value.message and "GRPO_ALLOW_PRIVATE_HOSTS" in caught.value.message
        )
    assert "allowed_hosts" not in validate_reward_specs([spec])[0]
    assert ScoringHandler.hits == {"/good": 1}


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.1", "a loopback address"),
        ("2130706433", "a loopback address"),  # decimal
        ("0177.0.0.1", "a loopback address"),  # octal
        ("0x7f.0.0.1", "a loopback address"),  # hexadecimal
        ("[::1]", "a loopback address"),
        ("[::ffff:127.0.0.1]", "a loopback address (embedded in ::ffff:7f00:1)"),  # IPv4-mapped
        ("[::ffff:169.254.169.254]", "a link-local address"),
        ("[2002:7f00:1::]", "a loopback address (embedded in 2002:7f00:1::)"),  # 6to4
        ("[64:ff9b::a9fe:a9fe]", "a link-local address"),  # NAT64 of the metadata address
        ("169.254.169.254", "a link-local address (where cloud metadata services live)"),
        ("[fe80::1]", "a link-local address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("[fd00::1]", "a private address"),
        ("100.64.0.1", "not a public address"),
        ("224.0.0.1", "a multicast address"),
        ("[ff02::1]", "a multicast address"),
        ("0.0.0.0", "the unspecified address"),
        ("[::]", "the unspecified address"),
        ("240.0.0.1", "a reserved address"),
    ],
)
def test_outbound_urls_to_non_public_addresses_are_refused_with_the_url(host, reason):
    url = f"http://{host}:8000/score"
    with pytest.raises(net.RefusedUrl) as caught:
        net.check_outbound_url(url)
    message = str(caught.value)
    assert message.startswith(f"refusing to call {url}: ") and reason in message
    assert "GRPO_ALLOW_PRIVATE_HOSTS" in message
    # A spec that names such an address is refused before any job runs.
    with pytest.raises(ConfigError) as invalid:
        check_operator_policy(validate_reward_specs([{"type": "http", "url": url}]), OperatorPolicy())
    assert invalid.value.param == "reward[0].url" and reason in invalid.value.message


def test_outbound_urls_to_public_addresses_and_listed_hosts_pass():
    public = net.check_outbound_url("https://user:p%40ss@8.8.8.8/score?x=1")
    assert public.addresses == ("8.8.8.8",) and public.auth == ("user", "p@ss")
    assert (
        public.connect_url("8.8.8.8") == "https://8.8.8.8:443/score?x=1" and public.host_header == "8.8.8.8"
    )
    with pytest.raises(net.OutboundError, match="is a reserved address"):  # ::/8, even around a public IPv4
        net.check_outbound_url("http://[::ffff:8.8.8.8]/")
    with pytest.raises(net.OutboundError) as caught:  # a password in the URL stays out of messages
        net.check_outbound_url("http://hook:s3cret@10.0.0.1/x")
    assert str(caught.value).startswith(
        "refusing to call http://hook:***@10.0.0.1/x: 10.0.0.1 is a private address"
    )
    listed = net.check_outbound_url("http://0177.0.0.1:81/", ["127.0.0.1"])  # listed by address
    assert listed.connect_url(listed.addresses[0]) == "http://127.0.0.1:81/"

    def rebinding(host, port, **_):  # a name that resolves to a public and a private address
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
            for address in ("8.8.8.8", "10.0.0.1")
        ]

    with pytest.raises(
        net.OutboundError, match=r"scorer.example \(resolved to 10.0.0.1\) is a private address"
    ):
        net.check_outbound_url("http://scorer.example/", resolve=rebinding)
    assert net.check_outbound_url(
        "http://scorer.example/", ["Scorer.Example"], resolve=rebinding
    ).addresses == ("8.8.8.8", "10.0.0.1")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_https_connects_to_the_checked_address_and_verifies_the_certificate_for_the_name(tmp_path):
    import httpx

    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            tmp_path / "key.pem",
            "-out",
            tmp_path / "cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScoringHandler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = server.server_address[1]
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=tmp_path / "cert.pem")) as client:
            response = net.post_json(
                f"https://localhost:{port}/good",
                {"prompts": [""], "completions": ["ab"], "rows": [{}]},
                allowed_hosts=["localhost"],
                client=client,
                retries=0,
            )
            assert response.json() == {"rewards": [2.0]}
            with pytest.raises(
                net.OutboundError, match="CERTIFICATE_VERIFY_FAILED"
            ):  # the cert names localhost
                net.post_json(
                    f"https://127.0.0.1:{port}/good",
                    {},
                    allowed_hosts=["127.0.0.1"],
                    client=client,
                    retries=0,
                )
    finally:
        server.shutdown()
        server.server_close()


# --- reward_model ------------------------------------------------------------------------------


def write_reward_model(path: Path, *, arch: str = "llama", num_labels: int = 1) -> Path:
    """A tiny random sequence-classification model with a character-level tokenizer."""
    import string

    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForSequenceClassification,
        LlamaConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *string.printable])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_scores_prompt_plus_completion(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = write_reward_model(tmp_path / "rm")
    prompts = ["Q: 2+2?\nA:", "Q: 2+2?\nA:", "Say hi:", "Say hi:"]
    completions = [" 4", " 5, I think", " hi", " hello there, friend"]
    rows = [{} for _ in prompts]
    with RewardSuite([{"type": "reward_model", "model": str(model_dir), "batch_size": 3}]) as suite:
        first = suite(prompts, completions, rows).parts["reward_model"]
        again = suite(prompts, completions, rows).parts["reward_model"]
    assert all(math.isfinite(value) for value in first)
    assert first == again
    assert len(set(first)) == len(first)  # each completion gets its own score

    # Padding in a batch does not change a score: compare with the model run on each text alone.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        alone = [
            model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item()
            for p, c in zip(prompts, completions, strict=True)
        ]
    torch.testing.assert_close(torch.tensor(first), torch.tensor(alone), rtol=1e-4, atol=1e-5)


def test_reward_model_with_several_labels_gives_the_probability_of_label_index(tmp_path):
    import torch

    model_dir = write_reward_model(tmp_path / "rm3", arch="qwen2", num_labels=3)
    completions = ["good", "bad", "fine answer"]
    by_label = [
        parts({"type": "reward_model", "model": str(model_dir), "label_index": label}, completions)
        for label in range(3)
    ]
    probabilities = torch.tensor(by_label)  # [label, completion]
    assert ((probabilities > 0) & (probabilities < 1)).all()
    torch.testing.assert_close(probabilities.sum(dim=0), torch.ones(3))
    with pytest.raises(ModelLoadError, match=r"reward\[0\]\.label_index"):
        RewardSuite([{"type": "reward_model", "model": str(model_dir), "label_index": 3}])


def test_reward_model_that_cannot_load_names_the_model(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load the reward model"):
        RewardSuite([{"type": "reward_model", "model": str(tmp_path / "missing")}])


# --- the suite ---------------------------------------------------------------------------------


def test_suite_counts_batch_failures_wrong_lengths_and_non_finite_scores(monkeypatch):
    class Broken:
        """Fails in the way its spec's ``field`` names."""

        def __init__(self, mode):
            self.mode = mode

        def __call__(self, prompts, completions, rows):
            if self.mode == "raise":
                raise ConnectionError("scorer down")
            if self.mode == "short":
                return [1.0]
            return [float("nan") if completion == "b" else 1.0 for completion in completions]

        def close(self):
            pass

    options = {"field": REWARD_TYPES["exact_match"].options["field"]}
    broken = RewardType(options=options, build=lambda spec, **_: Broken(spec["field"]))
    monkeypatch.setitem(REWARD_TYPES, "broken", broken)
    suite = RewardSuite(
        [
            {"type": "broken", "field": "raise"},
            {"type": "broken", "field": "nan", "weight": 3.0},
            {"type": "broken", "field": "short"},
            {"type": "length", "target": 1},
        ]
    )
    output = suite(["", ""], ["a", "b"], [{}, {}])
    assert suite.names == ["broken", "broken_2", "broken_3", "length"]
    assert output.parts == {
        "broken": [None, None],
        "broken_2": [1.0, None],
        "broken_3": [None, None],
        "length": [1.0, 1.0],
    }
    assert output.errors == {"broken": 2, "broken_2": 1, "broken_3": 2, "length": 0}
    assert output.total == [4.0, 1.0]
    assert output.error_messages == [
        "broken: ConnectionError: scorer down",
        "broken_2: gave a non-finite score (nan)",
        "broken_3: returned 1 scores for 2 completions",
    ]


def test_suite_keeps_at_most_five_distinct_error_messages():
    rows = [{f"question_{i}": "?"} for i in range(8)] + [{"question_0": "?"}]
    output = score({"type": "exact_match"}, ["1"] * 9, rows)
    assert output.errors == {"exact_match": 9}
    assert len(output.error_messages) == 5 and len(set(output.error_messages)) == 5


def test_suite_names_are_unique():
    specs = [
        {"type": "regex", "pattern": "a"},
        {"type": "regex", "pattern": "b", "name": "regex"},
        {"type": "regex", "pattern": "c"},
        {"type": "length", "target": 3, "name": "short"},
        {"type": "exact_match"},
    ]
    assert RewardSuite(specs).names == ["regex_2", "regex", "regex_3", "short", "exact_match"]


def test_suite_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="one prompt and one row per completion"):
        RewardSuite([{"type": "exact_match"}])(["p"], ["a", "b"], [{}, {}])


# --- spec validation ---------------------------------------------------------------------------


def test_validate_fills_defaults_and_copies():
    specs = [{"type": "exact_match"}, {"type": "code_tests", "weight": 2}]
    normalised = validate_reward_specs(specs)
    assert specs == [{"type": "exact_match"}, {"type": "code_tests", "weight": 2}]
    assert normalised[0] == {
        "type": "exact_match",
        "weight": 1.0,
        "name": "exact_match",
        "field": "answer",
        "extract": "last_number",
        "marker": "####",
        "pattern": None,
        "flags": "",
        "case_sensitive": False,
    }
    assert (
        normalised[1]["weight"] == 2.0
        and normalised[1]["timeout_s"] == 5.0
        and normalised[1]["memory_mb"] == 512
    )
    assert validate_reward_specs(normalised) == normalised


@pytest.mark.parametrize(
    ("specs", "param", "words"),
    [
        (
            [{"type": "bleu"}],
            "reward[0].type",
            "known types: code_tests, exact_match, http, length, math, "
            "python_grader, regex, reward_model, string_check, text_similarity",
        ),
        ([{"weight": 1}], "reward[0].type", "is required"),
        ([{"type": "exact_match"}, {"type": "regex"}], "reward[1].pattern", "is required for a regex reward"),
        ([{"type": "regex", "pattern": "(unclosed"}], "reward[0].pattern", "not a valid regular expression"),
        (
            [{"type": "regex", "pattern": r"\p{Nonsense}"}],
            "reward[0].pattern",
            "not a valid regular expression",
        ),
        ([{"type": "math", "timeout_s": 61}], "reward[0].timeout_s", "must be <= 60 s"),
        ([{"type": "regex", "pattern": "a", "flags": "q"}], "reward[0].flags", "unknown regex flag 'q'"),
        ([{"type": "regex", "pattern": "a{1001}"}], "reward[0].pattern", "repeat count 1001 exceeds 1000"),
        (
            [{"type": "exact_match", "extract": "regex", "pattern": "(\\d){1001}"}],
            "reward[0].pattern",
            "repeat count 1001 exceeds 1000",
        ),
        (
            [{"type": "regex", "pattern": "x" * 2001}],
            "reward[0].pattern",
            "2001 characters long; at most 2000",
        ),
        ([{"type": "regex", "pattern": "a", "weight": "high"}], "reward[0].weight", "must be a number"),
        ([{"type": "regex", "pattern": "a", "weight": True}], "reward[0].weight", "must be a number"),
        (
            [{"type": "regex", "pattern": "a", "score": "dense"}],
            "reward[0].score",
            "expected one of match, fraction",
        ),
        ([{"type": "regex", "pattern": "a", "patern": "b"}], "reward[0].patern", "its options: "),
        (
            [{"type": "exact_match", "extract": "regex"}],
            "reward[0].pattern",
            "is required when extract is 'regex'",
        ),
        ([{"type": "exact_match", "pattern": "(x)"}], "reward[0].pattern", "only used with extract: 'regex'"),
        ([{"type": "exact_match", "extract": "first_number"}], "reward[0].extract", "last_number, boxed"),
        ([{"type": "length"}], "reward[0].target", "exactly one of target"),
        ([{"type": "length", "target": 10, "max_length": 20}], "reward[0].target", "exactly one of target"),
        ([{"type": "length", "target": 0}], "reward[0].target", "must be >= 1"),
        ([{"type": "code_tests", "timeout_s": 0}], "reward[0].timeout_s", "must be > 0"),
        ([{"type": "code_tests", "allow_network": "yes"}], "reward[0].allow_network", "true or false"),
        ([{"type": "code_tests", "timeout_s": 61}], "reward[0].timeout_s", "must be <= 60 s"),
        ([{"type": "code_tests", "memory_mb": 8192}], "reward[0].memory_mb", "must be <= 4096"),
        ([{"type": "http"}], "reward[0].url", "is required for a http reward"),
        ([{"type": "http", "url": "ftp://x"}], "reward[0].url", "http:// or https://"),
        (
            [{"type": "http", "url": "http://x", "headers": {"a": 1}}],
            "reward[0].headers",
            "object of strings",
        ),
        (
            [{"type": "http", "url": "http://x", "allowed_hosts": "x"}],
            "reward[0].allowed_hosts",
            "list of strings",
        ),
        (
            [{"type": "http", "url": "http://x", "allowed_hosts": ["x"]}],
            "reward[0].allowed_hosts",
            "GRPO_ALLOW_PRIVATE_HOSTS",
        ),
        ([{"type": "http", "url": "http://x", "retries": 9}], "reward[0].retries", "must be <= 5"),
        ([{"type": "reward_model"}], "reward[0].model", "is required"),
        (
            [{"type": "math", "name": "m"}, {"type": "length", "target": 3, "name": "m"}],
            "reward[1].name",
            "used by an earlier reward",
        ),
        ([{"type": "math", "name": ""}], "reward[0].name", "1 to 64 characters"),
        (["exact_match"], "reward[0]", "must be an object"),
        ([], "reward", "give a list"),
    ],
)
def test_validation_errors_name_the_param(specs, param, words):
    with pytest.raises(ConfigError) as caught:
        validate_reward_specs(specs)
    assert caught.value.param == param
    assert words in caught.value.message


def test_required_fields():
    specs = [
        {"type": "exact_match"},
        {"type": "math", "field": "solution"},
        {"type": "code_tests"},
        {"type": "regex", "pattern": "x"},
        {"type": "http", "url": "http://localhost/score"},
    ]
    assert required_fields(specs) == {"answer", "solution", "tests"}
    assert required_fields([{"type": "length", "target": 5}]) == set()


def test_importing_the_rewards_loads_no_torch():
    code = (
        "import json, sys, trainer.rewards\n"
        "print(json.dumps([m for m in ('torch', 'transformers', 'math_verify', 'httpx') "
        "if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []
