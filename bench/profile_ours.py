"""Where our trainer's step time goes on a bench config: phase times from the step metrics, then
the top operators under torch.profiler (steps after the first only).

    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_ours.py realistic [--steps 4] [--rows 25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_common import CONFIGS, quiet
from trainer_bench import DEFAULT_WORKDIR, prepare, spec_for


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from trainer import loop
    from trainer.config import RunConfig
    from trainer.progress import Progress

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    quiet()

    config = CONFIGS[args.config]
    spec = spec_for(config, prepare(config, args.workdir), args.steps)
    # Label the phases inside optimize() for the profiler, without touching trainer/.
    for name in ("generate", "token_logprobs", "clipped_token_loss", "aggregate_loss"):
        original = getattr(loop, name)

        def labelled(*a, _original=original, _name=name, **k):
            with record_function(f"trainer.{_name}"):
                return _original(*a, **k)

        setattr(loop, name, labelled)

    steps: list[dict] = []
    profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)

    class Recorder(Progress):
        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            steps.append(metrics)
            print(
                f"step {step}: {metrics['step_seconds']:.2f} s (generate {metrics['time/generate']:.2f}, "
                f"train {metrics['time/train']:.2f}), completion length {metrics['completion_length']:.1f}",
                flush=True,
            )
            if step == 1:
                profiler.start()  # step 1 is warm-up
            elif step == args.steps:
                profiler.stop()  # before the final checkpoint is written

    print(f"torch threads: {torch.get_num_threads()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        loop.train(RunConfig.from_spec(spec), out, Recorder())
    print(f"total {time.perf_counter() - started:.1f} s")
    timed = steps[1:]
    for key in ("step_seconds", "time/generate", "time/reward", "time/train"):
        print(f"median {key}: {statistics.median(m[key] for m in timed):.3f}")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
