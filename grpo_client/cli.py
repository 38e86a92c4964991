"""The user's half of ``grpo``: ``datasets``, ``jobs`` and ``rewards`` commands and ``chat`` over the
Python client (``api/cli.py`` adds them beside ``serve``, ``worker``, ``migrate`` and ``keys``).

The server and key come from ``--url``/``--api-key`` or ``GRPO_API_URL``/``GRPO_API_KEY``. A
refused request prints the server's message and exits 1; a file that cannot be read or written
here, its path and the reason, exit 2; never a traceback."""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from grpo_client.client import TERMINAL, Client
from grpo_client.errors import GrpoError

EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 2, "paused": 3}
F = TypeVar("F", bound=Callable[..., Any])

datasets = typer.Typer(help="Upload and list JSONL datasets.", no_args_is_help=True)
jobs = typer.Typer(help="Create, follow, cancel and download GRPO jobs.", no_args_is_help=True)
rewards = typer.Typer(help="Try a reward spec on completions before a job runs.", no_args_is_help=True)

Url = Annotated[
    str | None, typer.Option("--url", envvar="GRPO_API_URL", help="The service, e.g. http://host:8000.")
]
Key = Annotated[
    str | None,
    typer.Option("--api-key", envvar="GRPO_API_KEY", help="An API key (grpo_…).", show_default=False),
]
JobId = Annotated[str, typer.Argument(help="A job id (job_…).")]


def _connect(ctx: typer.Context, url: Url = None, api_key: Key = None) -> None:
    ctx.obj = {"url": url, "api_key": api_key}


COMMANDS = {"datasets": datasets, "jobs": jobs, "rewards": rewards}
for group in COMMANDS.values():
    group.callback()(_connect)


def client(ctx: typer.Context) -> Client:
    return Client(ctx.obj["url"], ctx.obj["api_key"])


def console() -> Console:
    # Made per command (tests capture stdout by replacing it); no markup: job names, completions
    # and server messages are shown as written, "[INST]" and all.
    return Console(highlight=False, markup=False)


def notes() -> Console:
    """What a person reads but a script capturing stdout should not get: stderr."""
    return Console(stderr=True, highlight=False, markup=False)


def reports_errors(command: F) -> F:
    """The server's message (and the offending field) on stderr and exit 1; a file this machine
    cannot read or write (``--dest`` not writable, a full disk), its path and the reason, and exit
    2 as for a bad option. Never a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        # one line, which the terminal wraps if it must: a path or an id in it is never broken
        except GrpoError as exc:
            notes().print(f"error: {exc}", style="red", soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            notes().print(f"error: {file_error(exc)}", style="red", soft_wrap=True)
            raise typer.Exit(2) from None

    return run  # type: ignore[return-value]


def file_error(exc: OSError) -> str:
    """``/proc/nope: No such file or directory``, not ``[Errno 2] No such file ...: '/proc/nope'``."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    moved = f" -> {exc.filename2}" if exc.filename2 is not None else ""
    return f"{exc.filename}{moved}: {reason}"


def id_column() -> Column:
    return Column("id", no_wrap=True, min_width=28)  # ids are copied from here: never cut them short


def when(timestamp: str) -> str:
    return timestamp[:16].replace("T", " ")


class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 (and JSON) do: PyYAML follows YAML 1.1,
    where a float needs a decimal point and a signed exponent, so ``learning_rate: 1e-4`` would
    reach the server as the string '1e-4'. A quoted '1e-4' stays a string."""


# After YAML 1.1's own resolvers, so what they read (ints, 1.5, .5, .inf, dates, "08" a string)
# keeps its type; this one adds only the floats they miss, those with an exponent: 1e-4, -1E+3, 1.5e3.
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_spec(path: Path) -> Any:
    """A JSON or YAML file (YAML is a superset of JSON, so either parses)."""
    try:
        return yaml.load(path.read_text(), Loader=SpecLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise GrpoError(f"cannot read {path}: {exc}", code="invalid_file") from None


# ---- datasets ----


@datasets.command("upload")
@reports_errors
def upload_dataset(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    name: Annotated[str | None, typer.Option(help="Defaults to the file's name.")] = None,
) -> None:
    """Upload a JSONL file; prints the dataset's id (alone on stdout: `DS=$(grpo datasets upload f)`)."""
    dataset = client(ctx).datasets.upload(file, name=name)
    console().print(dataset["id"])
    notes().print(f"{dataset['rows']} rows  fields: {', '.join(dataset['fields'])}")


@datasets.command("list")
@reports_errors
def list_datasets(ctx: typer.Context) -> None:
    """Your datasets, newest first."""
    table = Table(id_column(), "name", "rows", "fields", "created")
    for d in client(ctx).datasets.list():
        table.add_row(d["id"], d["name"], str(d["rows"]), ", ".join(d["fields"]), when(d["created_at"]))
    console().print(table)


# ---- jobs ----


@jobs.command("create")
@reports_errors
def create_job(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The job spec, JSON or YAML.")],
    follow: Annotated[bool, typer.Option(help="Then follow it to the end.")] = False,
    estimate: Annotated[
        bool,
        typer.Option(
            help=(
                "Create nothing: print what the job would need (tokens per step, memory, time per step and "
                "in all) and any warning, e.g. lengths beyond the model's context."
            )
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --estimate: the estimate as JSON.")] = False,
) -> None:
    """Queue a job; prints its id (alone on stdout: `JOB=$(grpo jobs create spec.yaml)`)."""
    if estimate:
        print_estimate(client(ctx).jobs.estimate(read_spec(spec)), as_json=as_json)
        return
    job = client(ctx).jobs.create(read_spec(spec))
    console().print(job["id"])
    notes().print(job["status"])
    if follow:
        follow_job(ctx, job["id"])


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def print_estimate(estimate: dict[str, Any], *, as_json: bool) -> None:
    """An estimate as a few lines (warnings in red, to stderr too), or as JSON."""
    if as_json:
        typer.echo(json.dumps(estimate, indent=2))
        return
    out, tokens, time_, memory = console(), estimate["tokens"], estimate["time"], estimate["memory"]
    out.print(
        f"tokens per step  {tokens['per_step']:,}  (prompt ~{tokens['prompt_tokens_mean']:g} by "
        f"{tokens['prompt_tokens_from']} + completion <= {tokens['completion_tokens_max']}); "
        f"{tokens['total']:,} in all"
    )
    out.print(
        f"time             {duration(time_['seconds_per_step'])} a step, "
        f"{duration(time_['total_seconds'])} in all "
        f"at {time_['tokens_per_second']:,.0f} tokens/s ({time_['tokens_per_second_from']})"
    )
    gpus = estimate.get("gpus", 1)  # absent from a server older than multi-device jobs
    out.print(f"devices          {gpus}" + (" (memory is each one's, time the job's)" if gpus > 1 else ""))
    if memory is None:
        out.print("memory           unknown (see the notes)")
    else:
        # what a device gathers beside its shards: 0, and left out, on one device
        gathered = "".join(
            f", {label} {gib(memory[key])}"
            for key, label in (
                ("gathered_bytes", "gathered to generate"),
                ("training_gathered_bytes", "gathered to train"),
            )
            if memory.get(key)
        )
        out.print(
            f"memory           {gib(memory['total_bytes'])}: weights {gib(memory['weights_bytes'])} "
            f"({memory['parameters']:,} parameters, {memory['dtype']}), reference "
            f"{gib(memory['reference_model_bytes'])}, gradients {gib(memory['gradients_bytes'])}, optimizer "
            f"{gib(memory['optimizer_bytes'])}, activations {gib(memory['activations_bytes'])}, generation "
            f"cache {gib(memory['generation_cache_bytes'])}{gathered}"
        )
    for warning in estimate["warnings"]:
        out.print(f"warning: {warning}", style="red")
    for note in estimate["notes"]:
        out.print(f"note: {note}", style="dim")


@jobs.command("list")
@reports_errors
def list_jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="The job objects as a JSON list.")] = False,
) -> None:
    """Your jobs, newest first, with their step and latest reward. A narrow terminal leaves out
    the creation time, then the step; piped, every column, values whole."""
    listed = list(itertools.islice(client(ctx).jobs.list(status=status), limit))
    if as_json:
        console().print_json(json.dumps(listed))
        return
    out = console()
    table = jobs_table(listed, out.width if out.is_terminal else None)
    if not out.is_terminal:  # a pipe or a file: nothing cut to fit 80 columns
        out.width = max(out.width, out.measure(table, options=out.options.update_width(10**6)).maximum)
    out.print(table)


# jobs_table's columns, most needed first: a narrow terminal drops the last ones first
JOB_COLUMNS = ("id", "status", "name", "reward", "step", "created")
NAME_MIN_WIDTH = 12  # a longer name wraps to this width before a column is dropped


def jobs_table(listed: list[dict[str, Any]], width: int | None) -> Table:
    """The jobs as a table ``width`` columns wide at most (None: every column): id and status are
    never cut short (ids are copied from here), the name wraps, and while they do not fit the
    columns least needed (created, then step) are left out."""
    cells: dict[str, list[str]] = {
        "id": [job["id"] for job in listed],
        "name": [job["name"] or "" for job in listed],
        "status": [job["status"] for job in listed],
        "step": [f"{job['step']}/{job['max_steps']}" for job in listed],
        "reward": [reward_cell((job["latest_metrics"] or {}).get("reward")) for job in listed],
        "created": [when(job["created_at"]) for job in listed],
    }
    widths = {name: max([len(name), *map(len, values)]) for name, values in cells.items()}
    widths["name"] = min(widths["name"], NAME_MIN_WIDTH)
    shown = list(JOB_COLUMNS)

    def overflow() -> int:  # columns beyond the width: each column's content, padding and rule
        return 0 if width is None else sum(widths[n] for n in shown) + 3 * len(shown) + 1 - width

    while len(shown) > 4 and overflow() > 0:
        shown.pop()
    widths["name"] = max(4, widths["name"] - max(0, overflow()))  # a narrower name, wrapped
    order = [name for name in ("id", "name", "status", "step", "reward", "created") if name in shown]
    table = Table(
        *(
            Column(name, overflow="fold", min_width=widths[name])
            if name == "name"
            else Column(
                name, no_wrap=True, min_width=widths[name], justify="right" if name == "reward" else "left"
            )
            for name in order
        )
    )
    for row in zip(*(cells[name] for name in order), strict=True):
        table.add_row(*row)
    return table


def reward_cell(reward: float | None) -> str:
    return "" if reward is None else f"{reward:.3f}"


@jobs.command("show")
@reports_errors
def show_job(
    ctx: typer.Context,
    job_id: JobId,
    as_json: Annotated[bool, typer.Option("--json", help="The job object as JSON.")] = False,
) -> None:
    """A job's state, its failure reason if any, and its latest metrics."""
    job = client(ctx).jobs.get(job_id)
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    out = console()
    out.print(
        f"{job['id']}  {job['name'] or ''}  {job['status']}  step {job['step']}/{job['max_steps']}"
        f"  attempts {job['attempts']}"
    )
    out.print(f"model {job['base_model']}  dataset {job['dataset_id']}  group size {job['group_size']}")
    ran_on = f" (ran on {', '.join(job['devices'])})" if job.get("devices") else ""
    out.print(f"gpus {job.get('gpus', 1)}{ran_on}")
    if job["failure_reason"]:
        out.print(job["failure_reason"], style="red")
    if job.get("best_checkpoint_step") is not None:
        best_by = (job["hyperparameters"] or {}).get("keep_best_by")
        out.print(
            f"best checkpoint: step {job['best_checkpoint_step']} "
            f"(by {best_by}; `grpo jobs checkpoints` lists all)"
        )
    for name, value in sorted((job["latest_metrics"] or {}).items()):
        out.print(f"  {name:<28} {value if value is None else f'{value:.4g}'}")


@jobs.command("follow")
@reports_errors
def follow_job(
    ctx: typer.Context,
    job_id: JobId,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 2.0,
) -> None:
    """A live progress bar (step, reward, time left) and the job's warnings, until it ends; without
    a terminal (CI, nohup, a pipe), a line per step instead of the bar, in order with the events.
    Exit code: 0 succeeded, 1 failed, 2 cancelled, 3 paused."""
    grpo, out = client(ctx), console()
    job, last_event, last_step = grpo.jobs.get(job_id), 0, 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[reward]}"),
        TimeRemainingColumn(),
    )
    # without a terminal there is no bar to redraw, and none is printed (not even its last frame)
    with Progress(*columns, console=out, disable=not out.is_terminal) as progress:
        bar = progress.add_task(job_id, total=job["max_steps"], completed=job["step"], reward="")
        while True:
            # ``job`` was fetched before these: when it has ended, every event and step line of it
            # was written by then, so the lines below are all of them, in the order they happened.
            lines: list[tuple[datetime, int, str]] = []  # at one moment, a step's line before an event
            for event in grpo.jobs.events(job_id, after=last_event):
                last_event = event["id"]
                if event["level"] != "info" or event["kind"] == "status":
                    text = f"{event['created_at'][11:19]} {event['message']}"
                    lines.append((moment(event["created_at"]), 1, text))
            if not out.is_terminal:  # no bar to redraw: one line per step, for logs
                for row in grpo.jobs.metrics(job_id, after_step=last_step):
                    last_step = row["step"]
                    lines.append((moment(row["created_at"]), 0, step_line(row, job["max_steps"])))
            for *_, line in sorted(lines, key=lambda line: line[:2]):
                progress.console.print(line, soft_wrap=not out.is_terminal)  # a log's line is one line
            reward = (job["latest_metrics"] or {}).get("reward")
            progress.update(
                bar,
                completed=job["step"],
                description=f"{job_id} {job['status']}",
                reward="" if reward is None else f"reward {reward:.3f}",
            )
            if job["status"] in TERMINAL or job["status"] == "paused":
                break
            time.sleep(interval)
            job = grpo.jobs.get(job_id)
    out.print(
        f"{job_id} {job['status']} at step {job['step']}/{job['max_steps']}"
        + (f": {job['failure_reason']}" if job["failure_reason"] else "")
    )
    raise typer.Exit(EXIT_CODES[job["status"]])


def moment(timestamp: str) -> datetime:
    """An API timestamp (ISO 8601, ``Z`` or an offset) as an aware datetime, to order lines by."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def step_line(row: dict[str, Any], max_steps: int) -> str:
    shown = ("reward", "reward_std", "kl", "loss", "completion_length", "time/step")
    figures = "  ".join(
        f"{name} {row['metrics'][name]:.4g}" for name in shown if row["metrics"].get(name) is not None
    )
    return f"{row['created_at'][11:19]} step {row['step']}/{max_steps}  {figures}"


def _job_action(action: str) -> Callable[..., None]:
    @reports_errors
    def act(ctx: typer.Context, job_id: JobId) -> None:
        job = getattr(client(ctx).jobs, action)(job_id)
        asked = {"cancel": job["cancel_requested"], "pause": job.get("pause_requested")}.get(action)
        console().print(f"{job['id']}  {job['status']}" + (f" ({action} requested)" if asked else ""))

    act.__doc__ = {
        "cancel": "Cancel a job (a running one stops after its current step).",
        "pause": "Pause a job at its next step boundary, with a checkpoint.",
        "resume": "Queue a paused job again, from its checkpoint.",
    }[action]
    return act


for _action in ("cancel", "pause", "resume"):
    jobs.command(_action)(_job_action(_action))


@jobs.command("checkpoints")
@reports_errors
def list_checkpoints(
    ctx: typer.Context,
    job_id: JobId,
    as_json: Annotated[bool, typer.Option("--json", help="The checkpoint objects as JSON.")] = False,
) -> None:
    """A job's checkpoints: size, figures on the eval set, and the best one (what download fetches)."""
    listed = client(ctx).jobs.checkpoints(job_id)
    if as_json:
        typer.echo(json.dumps(listed, indent=2))
        return
    shown = sorted(
        {
            name
            for c in listed
            for name in (c.get("eval") or {})
            if name == "reward" or name.startswith("pass@")
        },
        key=lambda n: (n != "reward", len(n), n),
    )
    table = Table(
        Column("step", justify="right"),
        "kind",
        Column("size", justify="right"),
        *(Column(f"eval {name}", justify="right") for name in shown),
        "best",
    )
    for c in listed:
        figures = c.get("eval") or {}
        table.add_row(
            str(c["step"]),
            c["kind"],
            f"{c['bytes'] / 1e6:.1f} MB",
            *("" if figures.get(name) is None else f"{figures[name]:.3f}" for name in shown),
            "best" if c.get("best") else "",
        )
    console().print(table)


@jobs.command("download")
@reports_errors
def download_checkpoint(
    ctx: typer.Context,
    job_id: JobId,
    step: Annotated[
        int | None, typer.Option(help=("Defaults to the best checkpoint (keep_best_by), else the newest."))
    ] = None,
    dest: Annotated[Path, typer.Option(help="Where to put it.")] = Path("."),
    tar: Annotated[bool, typer.Option(help="Keep the tar, do not extract it.")] = False,
    merged: Annotated[
        bool,
        typer.Option(
            "--merged",
            help="A LoRA job: the adapter merged into its base model (a full fine-tune: its checkpoint).",
        ),
    ] = False,
    adapter: Annotated[
        bool, typer.Option("--adapter", help="A LoRA job: the adapter alone (the default).")
    ] = False,
) -> None:
    """Download a checkpoint: prints the directory `from_pretrained` loads (with --tar, the tar),
    as the archive names it. A destination it cannot write exits 2, naming the path."""
    if merged and adapter:
        raise GrpoError("give --merged or --adapter, not both", code="invalid_request", param="--merged")
    format = "merged" if merged else "adapter" if adapter else None
    path = client(ctx).jobs.download(job_id, step, dest, extract=not tar, format=format)
    typer.echo(str(path))  # as it is, for P=$(grpo jobs download …): a console would wrap a long path


# ---- chat ----


@reports_errors
def chat(
    model: Annotated[
        str,
        typer.Argument(
            metavar="JOB_OR_MODEL",
            help=(
                "A job id (its best checkpoint, else its newest), JOB_ID:STEP, "
                "or a fine_tuned_model name (ft:…)."
            ),
        ),
    ],
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    system: Annotated[str | None, typer.Option(help="A system message before the prompt.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Tokens to generate at most (default: the server's cap).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0: greedy, the same answer every time.")] = 0.0,
    n: Annotated[int, typer.Option(help="Answers to generate.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Makes sampling repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The chat completion object as JSON.")] = False,
    url: Url = None,
    api_key: Key = None,
) -> None:
    """Ask a job's checkpoint: prints its answer (each of --n on its own line, on stdout); which
    checkpoint answered and the token counts go to stderr."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    completion = Client(url, api_key).chat(
        model, messages, max_tokens=max_tokens, temperature=temperature, n=n if n != 1 else None, seed=seed
    )
    if as_json:
        typer.echo(json.dumps(completion, indent=2))
        return
    out = console()
    for choice in completion["choices"]:
        out.print(choice["message"]["content"])
    usage = completion["usage"]
    finished = ", ".join(choice["finish_reason"] for choice in completion["choices"])
    notes().print(
        f"{completion['model']}  {usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
        f"completion tokens  finish: {finished}"
    )


# ---- rewards ----


@rewards.command("run")
@reports_errors
def run_rewards(
    ctx: typer.Context,
    spec: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="A reward list, or a job spec with a `reward`; JSON or YAML."
        ),
    ],
    samples: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help='JSONL: {"completion", "prompt"?, "row"?} a line.'),
    ],
) -> None:
    """Score completions with a reward spec: each sample's total and parts, and the errors."""
    reward = read_spec(spec)
    reward = reward["reward"] if isinstance(reward, dict) and "reward" in reward else reward
    try:
        lines = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise GrpoError(f"{samples}: not JSONL ({exc})", code="invalid_file") from None
    result = client(ctx).rewards.run(reward, lines)
    names = [spec["name"] for spec in result["reward"]]
    table = Table("#", "total", *names, "completion")
    for index, (score, line) in enumerate(zip(result["data"], lines, strict=True)):
        parts = ["error" if score["parts"][n] is None else f"{score['parts'][n]:.3g}" for n in names]
        table.add_row(str(index), f"{score['total']:.3g}", *parts, str(line.get("completion", ""))[:60])
    out = console()
    out.print(table)
    for message in result["error_messages"]:
        out.print(message, style="yellow")
