"""The child process behind the ``math`` reward (``math_pool.py`` starts it): one JSON request a
line on stdin, one JSON answer a line on stdout, until stdin closes.

It runs math-verify on its own main thread, the one thread where a SIGALRM can interrupt it:
math-verify's own timeouts are switched off and one alarm bounds the whole request (both parses
and the comparison). The parent kills the process if even that does not answer in time (a
computation in C, e.g. a huge integer power, runs on through a Python signal handler).

Standard library and math-verify only: it is started with ``python -P`` (its own directory is
not put on ``sys.path``) and imports nothing of the trainer.

    request: {"gold": str, "answer": str, "timeout_s": float}
    answer:  {"score": 0.0 | 1.0} | {"gold_unreadable": true} | {"timeout": true} | {"error": str}
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import sys
from functools import lru_cache
from typing import Any, TextIO

MEMORY_LIMIT = 4 << 30  # bytes of address space: sympy on a hostile expression stops with a MemoryError


def memory_limit() -> int:
    """MEMORY_LIMIT, or the lower limit this process was started under (an operator's ``ulimit -v``):
    a process may not raise its hard limit, and need not raise its soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    return min(limit for limit in (MEMORY_LIMIT, soft, hard) if limit != resource.RLIM_INFINITY)


class OutOfTime(BaseException):
    """Raised by the alarm. A BaseException: math-verify catches Exception (and turns it into
    "nothing parsed"), which would hide the timeout."""


def main() -> None:
    limit = memory_limit()
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning: known

    @lru_cache(maxsize=256)  # a group's completions share one gold answer
    def parse_gold(text: str) -> list[Any]:
        # Plain "x^2+1" reads only as LaTeX; a string fallback there would hide an unreadable gold.
        return parse(text, parsing_timeout=None) or parse(
            f"${text}$", parsing_timeout=None, fallback_mode="no_fallback"
        )

    def score(request: dict[str, Any]) -> dict[str, Any]:
        gold = parse_gold(request["gold"])
        if not gold:
            return {"gold_unreadable": True}
        answer = parse(request["answer"], parsing_timeout=None)
        if not answer:
            return {"score": 0.0}
        return {"score": float(verify(gold, answer, timeout_seconds=None))}

    armed = False

    def on_alarm(signum: int, frame: Any) -> None:
        if armed:  # an alarm that lands just after a request finished is ignored
            raise OutOfTime

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    answers = sys.stdout
    sys.stdout = sys.stderr  # whatever a library prints must not garble the answers
    reply(answers, {"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            armed = True
            signal.setitimer(signal.ITIMER_REAL, request["timeout_s"])
            try:
                answer = score(request)
            finally:
                armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        except OutOfTime:
            answer = {"timeout": True}
        except MemoryError:
            answer = {"error": f"math-verify ran out of memory ({limit / 2**30:.3g} GiB) on this completion"}
        except Exception as exc:  # one bad completion must not end the process
            answer = {"error": f"math-verify failed: {type(exc).__name__}: {exc}"[:300]}
        reply(answers, answer)


def reply(stream: TextIO, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


if __name__ == "__main__":
    main()
