"""One job on several processes (``python -m trainer run --nproc N``: torchrun's launcher, gloo on
the CPU, FSDP2): the same result as one process, checkpoints that resume with another number of
processes, a dead process that ends the job, and two "machines" on loopback joined into one job.

Each run is a real ``python -m trainer`` subprocess (the launcher and its workers), 3 steps of the
tiny model; runs that several tests compare against are made once per module."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.factories import LOADED_MACHINE_SLACK_S, letter_dataset
from trainer.generation import HFSampler, takes_group_seeds
from trainer.loop import group_seed
from trainer.model import load_causal_lm

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
TIMING = ("time/", "step_seconds", "tokens_per_second")  # wall-clock figures differ between any two runs

# Full fine-tuning with every cross-process quantity in play: a KL reference, rewards scaled over
# the whole batch, dynamic sampling's redraws, the token-count normaliser (dapo); two groups per
# process, a checkpoint at step 2 to resume from.
FULL = {
    "group_size": 4,
    "prompts_per_step": 4,
    "max_steps": 3,
    "learning_rate": 1e-3,
    "max_completion_length": 8,
    "max_prompt_length": 32,
    "beta": 0.04,
    "scale_rewards": "batch",
    "dynamic_sampling": True,
    "loss_type": "dapo",
    "checkpoint_every": 2,
    "seed": 0,
    "fsdp_reshard": "layer",  # each layer gathered for its forward and backward, one padded forward each
}
# The same with the whole model gathered for each step's training (the leanest scoring, one reduce).
FULL_STEP = {**FULL, "fsdp_reshard": "step"}
# Layer by layer with gradient checkpointing, as large models train: each layer's forward runs again
# in its backward, inside the gather FSDP's pre-backward hook made for it (no extra collective).
FULL_CHECKPOINTING = {**FULL, "gradient_checkpointing": True}
# LoRA (peft model sharded whole, reference = adapters off), the per-sequence normaliser (grpo),
# and two optimizer passes over each batch (pi_old, a weight gather after each update).
LORA = {
    **FULL,
    "lora": {"r": 4, "alpha": 8},
    "learning_rate": 1e-2,
    "scale_rewards": "group",
    "dynamic_sampling": False,
    "loss_type": "grpo",
    "num_iterations": 2,
    "fsdp_reshard": "layer",  # each layer gathered for its forward and backward, one padded forward each
}
LORA_STEP = {**LORA, "fsdp_reshard": "step"}

# Full fine-tuning of a bfloat16 model (float32 masters in the optimizer's sharded state) at a
# learning rate whose updates are far below bfloat16's spacing.
BF16 = {**FULL_STEP, "dtype": "bfloat16", "learning_rate": 2e-5}

# No KL term (beta 0): completions whose advantage is 0 are not scored at all, so a process may
# have nothing to train on while the other has; rewards unscaled; Dr. GRPO's normaliser. (bnpo is
# dapo's normaliser, FULL's.)
# Layer by layer, so that a process with nothing to train runs empty micro-batches.
NO_KL = {
    **FULL,
    "beta": 0.0,
    "scale_rewards": "none",
    "dynamic_sampling": False,
    "loss_type": "dr_grpo",
    "fsdp_reshard": "layer",
}


def write_spec(directory: Path, model_dir: Path, hyperparameters: dict) -> Path:
    spec = {
        "base_model": str(model_dir),
        "dataset": str(letter_dataset(directory / "data.jsonl")),
        "reward": [{"type": "regex", "pattern": "a", "score": "fraction"}],
        "hyperparameters": hyperparameters,
    }
    path = directory / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def trainer_command(spec: Path, output: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "run", str(spec), "--output", str(output), *options]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # every process alike: same kernels, same sums


def trainer_ran(spec: Path, output: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        trainer_command(spec, output, *options),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_trainer(spec: Path, output: Path, *options: str) -> Path:
    done = trainer_ran(spec, output, *options)
    assert done.returncode == 0, done.stderr[-4000:]
    return output


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    (path,) = [p for p in checkpoint.glob("*.safetensors")]  # model or adapter
    return load_file(path)


def assert_same_run(one: Path, other: Path) -> None:
    """The same per-step metrics and final weights, within TOLERANCE."""
    mine, theirs = metrics(one), metrics(other)
    assert [m["step"] for m in mine] == [m["step"] for m in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            if not name.startswith(TIMING):
                assert math.isclose(a[name], b[name], rel_tol=TOLERANCE, abs_tol=TOLERANCE) or (
                    math.isnan(a[name]) and math.isnan(b[name])
                ), (a["step"], name, a[name], b[name])
    final = f"checkpoints/step-{mine[-1]['step']:06d}"
    mine_w, theirs_w = weights(one / final), weights(other / final)
    assert mine_w.keys() == theirs_w.keys()
    for name, tensor in mine_w.items():
        torch.testing.assert_close(tensor, theirs_w[name], atol=TOLERANCE, rtol=0, msg=name)


class Runs:
    """Runs by (config, processes), made on first use and shared by the module's tests."""

    CONFIGS = {
        "full": FULL,
        "full_step": FULL_STEP,
        "full_checkpointing": FULL_CHECKPOINTING,
        "lora": LORA,
        "lora_step": LORA_STEP,
        "no_kl": NO_KL,
        "bf16": BF16,
    }

    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model_dir = root, model_dir
        self.made: dict[tuple[str, int], Path] = {}

    def spec(self, config: str) -> Path:
        directory = self.root / config
        if not directory.is_dir():
            directory.mkdir()
            write_spec(directory, self.model_dir, self.CONFIGS[config])
        return directory / "spec.json"

    def __call__(self, config: str, nproc: int) -> Path:
        if (config, nproc) not in self.made:
            output = self.root / config / f"nproc{nproc}"
            self.made[config, nproc] = run_trainer(self.spec(config), output, "--nproc", str(nproc))
        return self.made[config, nproc]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"), tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["full", "full_step"])
def test_two_processes_train_full_finetuning_as_one_process_would(runs, config):
    one, two = runs("full", 1), runs(config, 2)  # (one process ignores fsdp_reshard)
    assert_same_run(one, two)
    steps = metrics(two)
    assert any(m["dynamic_sampling/extra_prompts"] > 0 for m in steps)  # groups were redrawn
    assert any(m["kl"] > 0 for m in steps)
    # the optimizer state: one shard per process, in torch.distributed.checkpoint's layout
    state = two / "checkpoints" / "step-000003" / "trainer_state" / "optimizer"
    assert sorted(p.name for p in state.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_two_processes_with_gradient_checkpointing_train_as_one_process_without_would(runs):
    # recomputing a layer's activations in its backward changes no number
    assert_same_run(runs("full", 1), runs("full_checkpointing", 2))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["lora", "lora_step"])
def test_two_processes_train_lora_as_one_process_would(runs, config):
    assert_same_run(runs("lora", 1), runs(config, 2))
    assert (runs(config, 2) / "checkpoints" / "step-000003" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_train_without_a_kl_term_as_one_process_would(runs):
    assert_same_run(runs("no_kl", 1), runs("no_kl", 2))


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process_as_if_never_stopped(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs("full", 2), resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")  # as if killed during step 3
    run_trainer(runs.spec("full"), resumed, "--resume")
    assert_same_run(runs("full", 1), resumed)


@pytest.mark.slow
def test_a_bfloat16_job_resumes_its_float32_masters_from_the_sharded_checkpoint(runs, tmp_path):
    """Each process's shard of the masters goes into the checkpoint and comes back in float32:
    the resumed run ends on the very weights of the uninterrupted one (masters rounded to
    bfloat16 on the way would move the later updates' starting points)."""
    straight = runs("bf16", 2)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    run_trainer(runs.spec("bf16"), resumed, "--resume", "--nproc", "2")
    final = weights(straight / "checkpoints" / "step-000003")
    assert final["lm_head.weight"].dtype == torch.bfloat16
    again = weights(resumed / "checkpoints" / "step-000003")
    assert all(torch.equal(final[name], again[name]) for name in final)
    base = load_file(runs.model_dir / "model.safetensors")
    moved = [
        (final[n] != base[n].to(torch.bfloat16)).float().mean().item() for n in final if final[n].dim() == 2
    ]
    assert min(moved) > 0.34, moved  # measured 0.39-0.44 (stepping bfloat16 itself: 0.25-0.30)


@pytest.mark.slow
def test_two_machines_joined_on_loopback_train_as_one_process_would(runs, tmp_path):
    with socket.socket() as probe:  # a free port for node 0's rendezvous store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "out"  # one directory both "machines" see, as a shared filesystem
    nodes = [
        subprocess.Popen(
            trainer_command(
                runs.spec("full"),
                output,
                "--nproc",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
            ),
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    finished = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, finished, strict=True):
        assert node.returncode == 0, stderr[-4000:]
    assert_same_run(runs("full", 1), output)


def test_more_processes_than_prompts_a_step_is_refused_before_any_starts(tiny_model_dir, tmp_path):
    """A process with no prompt would only wait: refused, as the service refuses gpus past
    prompts_per_step."""
    spec = write_spec(tmp_path, tiny_model_dir, FULL)  # 4 prompts a step
    done = trainer_ran(spec, tmp_path / "out", "--nproc", "5")
    assert done.returncode == 2
    assert "prompts_per_step is 4, fewer than --nproc 5" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_machine_left_waiting_for_the_others_fails_saying_so(tiny_model_dir, tmp_path):
    """Node 0 of 2, the other never started: it says what it waits for, and after --rdzv-timeout
    fails saying what to do, not a hang."""
    spec = write_spec(tmp_path, tiny_model_dir, FULL)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = ("--nproc", "1", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", f"127.0.0.1:{port}")
    done = trainer_ran(spec, tmp_path / "out", *options, "--rdzv-timeout", "3")
    assert done.returncode == 1
    assert f"node 0 of 2: waiting up to 3 s for every machine to join at 127.0.0.1:{port}" in done.stderr
    assert f"the 2 machines did not all join at 127.0.0.1:{port} within 3 s" in done.stderr, done.stderr[
        -3000:
    ]


@pytest.mark.slow
def test_a_process_that_dies_ends_the_job_naming_its_rank(tiny_model_dir, tmp_path):
    spec = write_spec(tmp_path, tiny_model_dir, {**FULL, "max_steps": 10_000, "checkpoint_every": 0})
    launcher = subprocess.Popen(
        trainer_command(spec, tmp_path / "out", "--nproc", "2"),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics_file = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics_file.is_file() and metrics_file.read_text().strip()):  # a step went through
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-4000:]
            time.sleep(0.2)
        (victim,) = [p for p in psutil.Process(launcher.pid).children(recursive=True) if rank_of(p) == "1"]
        victim.kill()
        _, stderr = launcher.communicate(timeout=LOADED_MACHINE_SLACK_S * 4)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert f"rank 1 (local rank 1, pid {victim.pid}) was killed by SIGKILL" in stderr, stderr[-4000:]
    assert len(metrics(tmp_path / "out")) < 10_000


@pytest.mark.slow
def test_the_processes_die_with_a_launcher_killed_outright(tiny_model_dir, tmp_path):
    """SIGKILL on the launcher (as the out-of-memory killer takes a worker) leaves no process
    training on: each asked the kernel to kill it with its launcher."""
    spec = write_spec(tmp_path, tiny_model_dir, {**FULL, "max_steps": 10_000, "checkpoint_every": 0})
    log = tmp_path / "launcher.log"  # a file, not a pipe: ranks that outlived it would hold a pipe open
    with log.open("w") as stderr:
        launcher = subprocess.Popen(
            trainer_command(spec, tmp_path / "out", "--nproc", "2"),
            cwd=REPO,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    ranks: list[psutil.Process] = []
    try:
        metrics_file = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics_file.is_file() and metrics_file.read_text().strip()):  # a step went through
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if rank_of(p) is not None]
        assert sorted(rank_of(p) for p in ranks) == ["0", "1"]
        launcher.kill()
        launcher.wait(timeout=60)
        gone, alive = psutil.wait_procs(ranks, timeout=LOADED_MACHINE_SLACK_S * 4)
    finally:
        for process in ranks:
            with contextlib.suppress(psutil.Error):
                process.kill()
    assert not alive, f"still running after their launcher died: {alive}"
    assert {p.pid for p in gone} == {p.pid for p in ranks}


# Run by every process under torchrun: rank 0's progress asks to stop after step 1 (a pause or a
# cancel from the job record); the other ranks' progress would never ask.
STOPPING_ENTRY = """
import json, os, sys
from trainer.config import RunConfig
from trainer.loop import train
from trainer.progress import Progress

class StopAfterFirstStep(Progress):
    def __init__(self):
        self.steps = []
    def on_step(self, step, metrics):
        self.steps.append(step)
    def should_stop(self):
        return os.environ["RANK"] == "0" and bool(self.steps)

spec, output = sys.argv[1], sys.argv[2]
progress = StopAfterFirstStep()
result = train(RunConfig.from_spec(json.load(open(spec))), output, progress)
json.dump({"stopped": result.stopped, "final_step": result.final_step, "reported": progress.steps},
          open(f"{output}/result-{os.environ['RANK']}.json", "w"))
"""


@pytest.mark.slow
def test_rank_0_decides_when_every_process_stops(tiny_model_dir, tmp_path):
    spec = write_spec(tmp_path, tiny_model_dir, {**FULL, "max_steps": 3, "checkpoint_every": 0})
    (tmp_path / "entry.py").write_text(STOPPING_ENTRY)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + [str(tmp_path / "entry.py"), str(spec), str(tmp_path / "out")],
        cwd=REPO,
        env={**ENV, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((tmp_path / "out" / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == {"stopped": True, "final_step": 1, "reported": [1]}
    assert results[1] == {"stopped": True, "final_step": 1, "reported": []}  # rank 0 alone reports
    assert [m["step"] for m in metrics(tmp_path / "out")] == [1]
    assert (tmp_path / "out" / "checkpoints" / "step-000001").is_dir()  # the pause's checkpoint


def rank_of(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("RANK")
    except psutil.Error:  # gone, or not ours to read
        return None


def test_a_group_samples_the_same_whichever_prompts_share_its_batch(tiny_model_dir):
    """What lets processes split a step's prompts: a group's completions depend on its own seed,
    not on the other prompts generated beside it (nor where in the batch it sits)."""
    model = load_causal_lm(tiny_model_dir, torch.float32, torch.device("cpu"))
    sampler = HFSampler(model)
    prompts = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11]), torch.tensor([12, 13, 14])]
    seeds = [group_seed(0, 1, index) for index in range(3)]

    def sample(indices: list[int], seeds: list[int]) -> list[list[int]]:
        rollout = sampler.generate(
            [prompts[i] for i in indices],
            group_size=3,
            max_new_tokens=12,
            eos_token_ids=[2],
            pad_id=0,
            temperature=1.0,
            top_p=0.9,
            generator=torch.Generator(),  # not drawn from when group seeds are given
            group_seeds=seeds,
        )
        return [c.tolist() for c in rollout.completion_ids]

    together = sample([0, 1, 2], seeds)
    assert sample([1], seeds[1:2]) == together[3:6]
    assert sample([2, 0], [seeds[2], seeds[0]]) == together[6:9] + together[0:3]
    assert sample([1], seeds[0:1]) != together[3:6]  # another seed, other draws
    # a seed per (run seed, step, prompt drawn)
    assert len({group_seed(0, 1, 0), group_seed(0, 2, 0), group_seed(1, 1, 0), group_seed(0, 1, 1)}) == 4


def test_a_sampler_written_before_group_seeds_is_told_apart():
    class SeedlessSampler:  # a backend written before group seeds (vLLM's, until it takes them)
        def generate(
            self,
            prompt_ids,
            *,
            group_size,
            max_new_tokens,
            eos_token_ids,
            pad_id,
            temperature,
            top_p,
            generator,
        ):
            raise AssertionError("not called here")

    assert takes_group_seeds(HFSampler(torch.nn.Linear(1, 1)))
    assert not takes_group_seeds(SeedlessSampler())
