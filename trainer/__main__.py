"""``python -m trainer``: run a job spec with no server, or build a tiny model for tests and demos.

    python -m trainer run SPEC.json --output DIR [--resume | --overwrite] [--nproc N]
        [--nnodes M --node-rank K --rdzv-endpoint HOST:PORT]
    python -m trainer make-tiny-model DIR [--arch llama|qwen2] [--vocab-size N] ...
    python -m trainer export-merged CHECKPOINT_DIR OUTPUT_DIR

One job on several processes: ``--nproc N`` (default: the spec's ``gpus``) starts N processes
through torchrun's launcher, one per GPU (on a machine without GPUs each computes on the CPU, with
the CPUs split between them); they train as one, to the result one process would reach. On several
machines, run the same command on each with ``--nnodes M``, its own ``--node-rank`` (0 to M-1) and
the same ``--rdzv-endpoint HOST:PORT`` (a free port on node 0, reachable from the others); the
--output directory must be one they all see (a shared filesystem). If a process dies, the others
are stopped and the command exits non-zero naming it; ``--resume`` continues from the newest
checkpoint, with any number of processes.

With no server, the operator is whoever runs the command: what a run may reach beyond its spec
comes from the service's environment variables of the same names (GRPO_ALLOW_PRIVATE_HOSTS,
comma-separated; GRPO_SANDBOX_ALLOW_UNISOLATED, GRPO_SANDBOX_ALLOW_NETWORK: 1/true; W&B tracking:
GRPO_WANDB_PROJECT, GRPO_WANDB_ENTITY, GRPO_WANDB_MODE). This is the only place the trainer reads
them; under the service they come from its settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from trainer.config import ConfigError, OperatorPolicy, RunConfig, check_prompts_for_processes
from trainer.errors import TrainingError
from trainer.progress import Progress
from trainer.tracking import TENSORBOARD_DIR, WandbOptions

HEADLINE = (
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "loss",
    "kl",
    "entropy",
    "completion_length",
    "step_seconds",
)


class PrintProgress(Progress):
    def __init__(self) -> None:
        self.max_steps = 0

    def on_start(self, *, start_step: int, max_steps: int) -> None:
        self.max_steps = max_steps
        if start_step >= max_steps:
            print(f"the run already reached step {start_step} of {max_steps}: nothing to train", flush=True)
        elif start_step:
            print(f"resuming at step {start_step + 1}/{max_steps}", flush=True)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in HEADLINE if k in metrics)
        print(f"step {step}/{self.max_steps} {shown}", flush=True)

    def on_checkpoint(self, step: int, path: Path) -> None:
        print(f"checkpoint {path}", flush=True)

    def on_evaluation(self, step: int, figures: dict[str, float], *, best_step: int | None) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in figures.items() if k == "reward" or k.startswith("pass@"))
        best = "" if best_step is None else f" (best: step {best_step})"
        print(f"eval at step {step}: {shown}{best}", flush=True)

    def on_log(self, level: str, message: str) -> None:
        print(f"{level}: {message}", file=sys.stderr, flush=True)


def policy_from_environ(environ: Mapping[str, str] = os.environ) -> OperatorPolicy:
    """The operator's allowances from ``GRPO_*`` environment variables, as the service's settings
    read them."""

    def flag(name: str) -> bool:
        return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")

    hosts = environ.get("GRPO_ALLOW_PRIVATE_HOSTS", "").split(",")
    return OperatorPolicy(
        allow_private_hosts=tuple(host.strip() for host in hosts if host.strip()),
        sandbox_allow_unisolated=flag("GRPO_SANDBOX_ALLOW_UNISOLATED"),
        sandbox_allow_network=flag("GRPO_SANDBOX_ALLOW_NETWORK"),
    )


def wandb_from_environ(environ: Mapping[str, str] = os.environ) -> WandbOptions | None:
    """W&B tracking as the service's settings configure it (GRPO_WANDB_PROJECT, GRPO_WANDB_ENTITY,
    GRPO_WANDB_MODE); unset: TensorBoard files only."""
    project = environ.get("GRPO_WANDB_PROJECT", "").strip()
    if not project:
        return None
    return WandbOptions(
        project=project,
        entity=environ.get("GRPO_WANDB_ENTITY", "").strip() or None,
        mode=environ.get("GRPO_WANDB_MODE", "").strip() or "online",
    )


def load_spec(path: Path, policy: OperatorPolicy | None = None) -> RunConfig:
    """The run a spec file describes. A relative path in it is read from the spec file's folder,
    not the current directory (as docker compose reads the paths in its file)."""
    spec = json.loads(path.read_text())
    folder = path.parent
    for key in ("dataset", "eval_dataset", "base_model"):
        value = spec.get(key)
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        # base_model may be a hub id ("Qwen/Qwen2.5-0.5B"): a path only if it says so or is there
        if key != "base_model" or value.startswith(".") or (folder / value).exists():
            spec[key] = str((folder / value).resolve())
    return RunConfig.from_spec(spec, policy=policy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a job spec (JSON) with no server")
    run.add_argument("spec", type=Path)
    run.add_argument("--output", type=Path, required=True)
    start = run.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --output"
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --output that holds an earlier run (its checkpoints are replaced)",
    )
    run.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes on this machine, one per GPU (or CPU share): the job trains on all of them as "
        "one, through torchrun (default: the spec's gpus, else 1)",
    )
    run.add_argument("--nnodes", type=int, default=1, help="machines the job spans (each runs this command)")
    run.add_argument("--node-rank", type=int, default=0, help="this machine's place among --nnodes, 0 to M-1")
    run.add_argument(
        "--rdzv-endpoint",
        default=None,
        help="HOST:PORT on node 0 where the machines of a --nnodes job meet (the same on every machine)",
    )
    run.add_argument(
        "--rdzv-timeout",
        type=float,
        default=600.0,
        help="seconds a --nnodes job waits for every machine to join before it fails (default 600)",
    )
    run.add_argument(
        "--collective-timeout",
        type=float,
        default=1800.0,
        help="seconds a process waits for the others in a collective before the job fails (default 1800)",
    )
    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-init causal LM + char tokenizer")
    tiny.add_argument("output", type=Path)
    tiny.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--vocab-size", type=int, default=None)
    tiny.add_argument("--seed", type=int, default=0)
    merge = commands.add_parser("export-merged", help="merge a LoRA checkpoint into its base model")
    merge.add_argument("checkpoint", type=Path)
    merge.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "run":
        if args.nnodes < 1 or (args.nproc is not None and args.nproc < 1):
            parser.error("--nproc and --nnodes must be at least 1")
        if args.nnodes > 1 and not args.rdzv_endpoint:
            parser.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (a free port on node 0)")
        if not 0 <= args.node_rank < args.nnodes:
            parser.error(f"--node-rank must be in 0..{args.nnodes - 1}")

    if args.command == "make-tiny-model":
        from trainer.tiny import make_tiny_model

        path = make_tiny_model(
            args.output,
            arch=args.arch,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=args.heads,
            vocab_size=args.vocab_size,
            seed=args.seed,
        )
        print(path)
        return 0
    if args.command == "export-merged":
        from trainer.checkpoint import export_merged

        print(export_merged(args.checkpoint, args.output))
        return 0

    from trainer.checkpoint import checkpoints_on_disk

    earlier = checkpoints_on_disk(args.output)
    if earlier and not (args.resume or args.overwrite):
        print(
            f"error: {args.output} already holds a run (checkpoints up to step {earlier[-1][0]}); pass "
            f"--resume to continue it, --overwrite to start over there, or choose another --output",
            file=sys.stderr,
        )
        return 2
    if args.overwrite and args.node_rank == 0:
        shutil.rmtree(args.output / "checkpoints", ignore_errors=True)
        shutil.rmtree(args.output / TENSORBOARD_DIR, ignore_errors=True)
        (args.output / "metrics.jsonl").unlink(missing_ok=True)
    try:
        run_config = load_spec(args.spec, policy_from_environ())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    nproc = args.nproc or run_config.gpus
    if "LOCAL_RANK" not in os.environ and (nproc > 1 or args.nnodes > 1):  # not yet under torchrun
        try:
            asked = f"--nproc {nproc} x --nnodes {args.nnodes}" if args.nnodes > 1 else f"--nproc {nproc}"
            check_prompts_for_processes(run_config.hyperparameters, nproc * args.nnodes, asked)
        except ConfigError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        return launch_processes(args, nproc)
    return run_here(args, run_config)


def launch_processes(args: argparse.Namespace, nproc: int) -> int:
    """This command again, in ``nproc`` processes under torchrun's launcher (joined with the other
    machines' when ``--nnodes`` > 1); its exit status is theirs."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from trainer.distributed import LaunchFailed, launch

    worker = ["-m", "trainer", "run", str(args.spec.resolve()), "--output", str(args.output.resolve())]
    worker += ["--collective-timeout", str(args.collective_timeout)] + (["--resume"] if args.resume else [])
    try:
        launch(
            worker,
            nproc=nproc,
            nnodes=args.nnodes,
            rdzv_timeout=args.rdzv_timeout,
            node_rank=args.node_rank,
            rdzv_endpoint=args.rdzv_endpoint,
        )
    except LaunchFailed as exc:
        print(f"error: the job's processes failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except SignalException as exc:  # Ctrl-C or a kill: torchrun has stopped the processes
        print(
            f"stopped by {exc.sigval.name}; `--resume` continues from the newest checkpoint in {args.output}",
            file=sys.stderr,
        )
        return 128 + exc.sigval.value
    return 0


def run_here(args: argparse.Namespace, run_config: RunConfig) -> int:
    """Train in this process (one of several when torchrun started it)."""
    from trainer.distributed import die_with_launcher
    from trainer.loop import train

    die_with_launcher()
    try:
        result = train(
            run_config,
            args.output,
            PrintProgress(),
            resume=args.resume,
            wandb=wandb_from_environ(),
            collective_timeout=timedelta(seconds=args.collective_timeout),
        )
    except (ConfigError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(
            f"done at step {result.final_step}; checkpoint {result.checkpoint}"
            + (f"; best checkpoint {result.best_checkpoint}" if result.best_checkpoint else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
