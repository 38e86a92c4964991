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

A user's mistake (a spec that is not a JSON object of SPEC_FILE_KEYS, a bad value, an --output that
is a file, a path that is no LoRA checkpoint) is one ``error:`` line and exit status 2, never a
traceback; Ctrl-C is one line and 130. ``--overwrite`` deletes the earlier run only once the new
one trains (``EarlierRun``).

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
import signal
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

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


class CtrlC:
    """Ctrl-C in a run on this process. SIGINT raises ``KeyboardInterrupt`` wherever Python is, as
    it always did; but raised inside a callback Python runs for itself (a weakref's or a
    finalizer's, in the middle of an import), it is printed as "Exception ignored" and lost, and
    the run went on. So the signal is also noted: the run stops at its next step boundary when the
    exception was lost (``PrintProgress.should_stop``), and a lost one prints nothing."""

    def __init__(self) -> None:
        self.seen = False

    def install(self) -> None:
        default_hook = sys.unraisablehook

        def on_sigint(signum: int, frame: object) -> None:
            self.seen = True
            raise KeyboardInterrupt

        def unraisable(info: Any) -> None:
            if not (self.seen and isinstance(info.exc_value, KeyboardInterrupt)):
                default_hook(info)

        signal.signal(signal.SIGINT, on_sigint)
        sys.unraisablehook = unraisable


CTRL_C = CtrlC()


class PrintProgress(Progress):
    def __init__(self, on_training: Callable[[], None] | None = None) -> None:
        """``on_training``: called once the run starts training (models loaded, data checked)."""
        self.max_steps = 0
        self.on_training, self.training = on_training, False

    def on_start(self, *, start_step: int, max_steps: int) -> None:
        self.max_steps, self.training = max_steps, True
        if self.on_training is not None:
            self.on_training()
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

    def should_stop(self) -> bool:
        if CTRL_C.seen:  # a Ctrl-C whose KeyboardInterrupt was lost (CtrlC)
            raise KeyboardInterrupt
        return False


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


# How a YAML spec (what `grpo jobs create` takes) becomes JSON, reading its floats as that command
# does (grpo_client's loader: YAML 1.2's 1e-4 is a number, not a string)
YAML_TO_JSON = (
    'python -c "import json, pathlib, sys; from grpo_client.cli import read_spec; '
    'print(json.dumps(read_spec(pathlib.Path(sys.argv[1])), indent=2))"'
)


def read_spec_file(path: Path) -> dict:
    """A spec file's JSON object; ConfigError (its param the file) for a file that is missing,
    unreadable, not JSON (line and column; a YAML spec: how to convert it) or not an object."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(where, "no such spec file") from None
    except IsADirectoryError:
        raise ConfigError(where, "is a directory; give the spec's JSON file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"not UTF-8 text (byte {exc.start}); a spec is a JSON file") from None
    except OSError as exc:
        raise ConfigError(where, f"cannot read the spec: {exc.strerror or exc}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        if path.suffix.lower() in (".yaml", ".yml") or text.lstrip()[:1] not in ("{", "[", ""):
            raise ConfigError(
                where,
                "python -m trainer reads a JSON spec, and this is not JSON (YAML, as `grpo jobs create` "
                f"takes?); convert it: {YAML_TO_JSON} {path} > spec.json, with dataset (a local JSONL "
                "file) in place of dataset_id",
            ) from None
        raise ConfigError(
            where, f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(spec, dict):
        kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
            type(spec), "a number"
        )
        raise ConfigError(
            where,
            f'a spec is a JSON object ({{"base_model": ..., "dataset": ..., "reward": [...]}}); '
            f"this is {kind}",
        )
    return spec


def load_spec(path: Path, policy: OperatorPolicy | None = None) -> RunConfig:
    """The run a spec file describes. A relative path in it is read from the spec file's folder,
    not the current directory (as docker compose reads the paths in its file). A key other than
    SPEC_FILE_KEYS is refused (``RunConfig.from_spec``'s strict mode), as the API refuses one."""
    spec = read_spec_file(path)
    folder = path.parent
    for key in ("dataset", "eval_dataset", "base_model"):
        value = spec.get(key)
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        # base_model may be a hub id ("Qwen/Qwen2.5-0.5B"): a path only if it says so or is there
        if key != "base_model" or value.startswith(".") or (folder / value).exists():
            spec[key] = str((folder / value).resolve())
    return RunConfig.from_spec(spec, policy=policy, strict=True)


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
    if "LOCAL_RANK" not in os.environ:  # under torchrun, the launcher hears Ctrl-C
        CTRL_C.install()
    try:
        return command(commands.choices[args.command], args)
    except KeyboardInterrupt:  # Ctrl-C: one line, as torchrun's launcher gets it (launch_processes)
        if "LOCAL_RANK" not in os.environ:  # under torchrun, the launcher says it
            resume = (
                f"; `--resume` continues from the newest checkpoint in {args.output}"
                if args.command == "run"
                else ""
            )
            print(f"stopped by SIGINT{resume}", file=sys.stderr)
        return 128 + signal.SIGINT


def command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "run":
        if args.nnodes < 1 or (args.nproc is not None and args.nproc < 1):
            parser.error("--nproc and --nnodes must be at least 1")
        if args.nnodes > 1 and not args.rdzv_endpoint:
            parser.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (a free port on node 0)")
        if not 0 <= args.node_rank < args.nnodes:
            parser.error(f"--node-rank must be in 0..{args.nnodes - 1}")

    if args.command == "make-tiny-model":
        return make_tiny_model_command(parser, args)
    if args.command == "export-merged":
        return export_merged_command(args)

    from trainer.checkpoint import checkpoints_on_disk

    if args.output.exists() and not args.output.is_dir():
        return error(f"--output {args.output} is a file; give a directory (made if missing)")
    if "LOCAL_RANK" not in os.environ and args.node_rank == 0 and not args.overwrite:
        if EarlierRun(args.output).restore():
            print(
                f"note: put back the earlier run in {args.output}, which an --overwrite stopped before its "
                "first step had set aside",
                file=sys.stderr,
            )
    earlier = checkpoints_on_disk(args.output)
    if earlier and not (args.resume or args.overwrite):
        return error(
            f"{args.output} already holds a run (checkpoints up to step {earlier[-1][0]}); pass "
            f"--resume to continue it, --overwrite to start over there, or choose another --output"
        )
    try:
        run_config = load_spec(args.spec, policy_from_environ())
    except ConfigError as exc:
        return error(str(exc))
    nproc = args.nproc or run_config.gpus
    if "LOCAL_RANK" not in os.environ and (nproc > 1 or args.nnodes > 1):  # not yet under torchrun
        try:
            asked = f"--nproc {nproc} x --nnodes {args.nnodes}" if args.nnodes > 1 else f"--nproc {nproc}"
            check_prompts_for_processes(run_config.hyperparameters, nproc * args.nnodes, asked)
        except ConfigError as exc:
            return error(exc.message)
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return error(f"cannot make --output {args.output}: {exc.strerror or exc}")
    if not os.access(args.output, os.W_OK | os.X_OK):
        return error(f"--output {args.output} is not writable")
    if "LOCAL_RANK" not in os.environ and (nproc > 1 or args.nnodes > 1):
        return launch_processes(args, nproc)
    return run_here(args, run_config)


def error(message: str) -> int:
    """A mistake the user can fix: one line on stderr, exit status 2 (as argparse's own)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def make_tiny_model_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from trainer.tiny import char_tokenizer, make_tiny_model

    for option in ("hidden_size", "layers", "heads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    least = len(char_tokenizer())
    if args.vocab_size is not None and args.vocab_size < least:
        parser.error(
            f"--vocab-size must be at least {least} (the tokenizer's special tokens and printable ASCII)"
        )
    if args.hidden_size % args.heads or (args.hidden_size // args.heads) % 2:
        parser.error(
            f"--hidden-size ({args.hidden_size}) must be a multiple of --heads ({args.heads}) with an even "
            "quotient (each head's size; rotary embeddings pair its dimensions)"
        )
    try:
        path = make_tiny_model(
            args.output,
            arch=args.arch,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=args.heads,
            vocab_size=args.vocab_size,
            seed=args.seed,
        )
    except ValueError as exc:  # the tokenizer's or the config's own check: --vocab-size too small
        parser.error(str(exc).strip().splitlines()[-1].strip())
    print(path)
    return 0


def export_merged_command(args: argparse.Namespace) -> int:
    """Merge a LoRA checkpoint; a path that is no LoRA checkpoint is one line, not peft's traceback."""
    checkpoint, output = args.checkpoint, args.output
    if not checkpoint.is_dir():
        return error(f"{checkpoint}: no such checkpoint directory")
    if not (checkpoint / "adapter_config.json").is_file():
        if (checkpoint / "checkpoints").is_dir():
            return error(
                f"{checkpoint} is a run's output directory; give one of its checkpoints "
                f"({checkpoint / 'checkpoints'}/step-N)"
            )
        if (checkpoint / "config.json").is_file():
            return error(
                f"{checkpoint} is a full fine-tune's checkpoint, a whole model already (no LoRA adapter to "
                "merge): from_pretrained loads it as it is"
            )
        return error(f"{checkpoint} holds no LoRA adapter (adapter_config.json): not a LoRA checkpoint")
    if output.exists() and not output.is_dir():
        return error(f"{output} is a file; give a directory to write the merged model to")
    from trainer.checkpoint import export_merged

    print(export_merged(checkpoint, output))
    return 0


class EarlierRun:
    """``--overwrite``: the run already in --output (its checkpoints, TensorBoard files and
    metrics.jsonl) waits in ``--output/.overwritten/`` until the new run starts training, then is
    deleted. A new run that stops before (a model that does not load, a dataset refused, Ctrl-C)
    puts it back, and so does the next command on that --output where the process was killed."""

    PARTS = ("checkpoints", TENSORBOARD_DIR, "metrics.jsonl")

    def __init__(self, output: Path):
        self.output = output
        self.aside, self.deleting = output / ".overwritten", output / ".overwritten-deleting"

    def set_aside(self) -> None:
        self.restore()  # left by an --overwrite killed before its first step: the earlier run
        self.aside.mkdir(parents=True)
        for part in self.PARTS:
            if os.path.lexists(self.output / part):
                (self.output / part).rename(self.aside / part)

    def discard(self) -> None:
        """The new run trains: the earlier one goes, renamed first (a kill midway leaves nothing
        that restore would take for a whole run)."""
        if self.aside.is_dir():
            remove(self.deleting)
            self.aside.rename(self.deleting)
            remove(self.deleting)

    def restore(self) -> bool:
        """Put back what set_aside moved, in place of what a run wrote since; whether there was any."""
        remove(self.deleting)
        if not self.aside.is_dir():
            return False
        for part in self.PARTS:
            remove(self.output / part)
            if os.path.lexists(self.aside / part):
                (self.aside / part).rename(self.output / part)
        self.aside.rmdir()
        return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def launch_processes(args: argparse.Namespace, nproc: int) -> int:
    """This command again, in ``nproc`` processes under torchrun's launcher (joined with the other
    machines' when ``--nnodes`` > 1); its exit status is theirs."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from trainer.distributed import LaunchFailed, launch

    worker = ["-m", "trainer", "run", str(args.spec.resolve()), "--output", str(args.output.resolve())]
    worker += ["--collective-timeout", str(args.collective_timeout)]
    worker += ["--resume"] if args.resume else ["--overwrite"] if args.overwrite else []
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
    # --overwrite: rank 0 (the one that writes --output) sets the earlier run aside, deletes it
    # once this one trains, and puts it back if this one stops before
    earlier = EarlierRun(args.output) if args.overwrite and os.environ.get("RANK", "0") == "0" else None
    progress = PrintProgress(on_training=earlier.discard if earlier is not None else None)
    if earlier is not None:
        earlier.set_aside()
    try:
        result = train(
            run_config,
            args.output,
            progress,
            resume=args.resume,
            wandb=wandb_from_environ(),
            collective_timeout=timedelta(seconds=args.collective_timeout),
        )
    except (ConfigError, TrainingError) as exc:
        return error(str(exc))
    finally:
        if earlier is not None and not progress.training:
            earlier.restore()
    if os.environ.get("RANK", "0") == "0":
        print(
            f"done at step {result.final_step}; checkpoint {result.checkpoint}"
            + (f"; best checkpoint {result.best_checkpoint}" if result.best_checkpoint else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
