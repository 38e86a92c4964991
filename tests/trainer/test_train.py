"""Real training steps on a tiny model: learning, LoRA, exact resume, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.trainer.factories import letter_dataset, tiny_run
from trainer.checkpoint import checkpoints_on_disk
from trainer.config import LoraConfig
from trainer.loop import train
from trainer.progress import Progress

pytestmark = pytest.mark.slow


class Recorder(Progress):
    def __init__(self, stop_after: int | None = None):
        self.steps, self.checkpoints, self.samples, self.stop_after = [], [], [], stop_after
        self.removed = []

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_samples(self, step, samples):
        self.samples.append((step, samples))

    def on_checkpoint(self, step, path):
        self.checkpoints.append((step, path))

    def on_checkpoint_removed(self, step):
        self.removed.append(step)

    def should_stop(self):
        return self.stop_after is not None and len(self.steps) >= self.stop_after


def _state(path):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_reward_rises_and_every_parameter_changes(tiny_model_dir, tmp_path):
    run = tiny_run(
        tiny_model_dir,
        letter_dataset(tmp_path / "data.jsonl"),
        group_size=8,
        prompts_per_step=4,
        max_steps=30,
        learning_rate=5e-3,
        max_completion_length=12,
        beta=0.04,
    )
    progress = Recorder()
    result = train(run, tmp_path / "out", progress)
    rewards = [m["reward"] for _, m in progress.steps]
    assert result.final_step == 30 and len(rewards) == 30
    assert all(torch.isfinite(torch.tensor(m["loss"])) for _, m in progress.steps)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, f"mean reward did not rise: {first:.3f} -> {last:.3f}"
    before, after = _state(tiny_model_dir), _state(result.checkpoint)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []
    metrics = progress.steps[-1][1]
    for name in (
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio/low",
        "clip_ratio/high",
        "grad_norm",
        "learning_rate",
        "completion_length/min",
        "completion_length/max",
        "truncated_ratio",
        "entropy",
        "reward_errors",
        "time/generate",
        "time/reward",
        "time/train",
        "step_seconds",
        "tokens_per_second",
        "num_tokens",
        "rewards/regex",
    ):
        assert name in metrics
    assert metrics["kl"] > 0
    seen = [m["num_tokens"] for _, m in progress.steps]  # cumulative: prompts x G + completions, every step
    assert seen[0] >= 4 * 2 * 2 and all(
        later > earlier for earlier, later in zip(seen, seen[1:], strict=False)
    )
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 31))
    assert progress.samples[0][1][0]["completion"] is not None


def test_lora_changes_only_adapters_and_saves_a_loadable_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel

    run = tiny_run(
        tiny_model_dir,
        letter_dataset(tmp_path / "data.jsonl"),
        max_steps=2,
        beta=0.1,
        learning_rate=1e-2,
        lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        dynamic_sampling=True,  # step 1 has groups with signal, so the adapters move
    )
    progress = Recorder()
    result = train(run, tmp_path / "out", progress)
    assert (result.checkpoint / "adapter_model.safetensors").is_file()
    assert not (result.checkpoint / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = PeftModel.from_pretrained(base, result.checkpoint)
    changed_adapters = [n for n, p in tuned.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed_adapters, "the LoRA B matrices start at zero and must have moved"
    for name, value in tuned.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base_state[name.replace("base_layer.", "")]), name
    # the reference is the base with adapters off: KL starts at exactly zero on step 1
    assert progress.steps[0][1]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert progress.steps[1][1]["kl"] > 0


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"num_iterations": 2, "beta": 0.05, "lr_schedule": "cosine", "warmup_steps": 1},
        {"dtype": "bfloat16", "beta": 0.05, "learning_rate": 1e-5},  # float32 masters resume too
    ],
)
def test_resume_gives_the_same_parameters_and_metrics(tiny_model_dir, tmp_path, extra):
    data = letter_dataset(tmp_path / "data.jsonl", n=5)  # 5 rows, 2 per step: resumes across an epoch edge
    run = tiny_run(tiny_model_dir, data, max_steps=5, checkpoint_every=0, keep_last_checkpoints=0, **extra)
    straight = Recorder()
    train(run, tmp_path / "straight", straight)

    first = Recorder(stop_after=2)
    stopped = train(run, tmp_path / "resumed", first)
    assert stopped.stopped and stopped.final_step == 2
    second = Recorder()
    resumed = train(run, tmp_path / "resumed", second, resume=True)
    assert resumed.final_step == 5

    timing = ("time/", "step_seconds", "tokens_per_second")

    def strip(metrics):
        return {k: v for k, v in metrics.items() if not k.startswith(timing)}

    assert [strip(m) for _, m in first.steps + second.steps] == [strip(m) for _, m in straight.steps]
    a, b = (
        _state(tmp_path / "straight/checkpoints/step-000005"),
        _state(tmp_path / "resumed/checkpoints/step-000005"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]


def test_a_bfloat16_model_takes_small_updates(tiny_model_dir, tmp_path):
    """Full fine-tuning in bfloat16 at a GRPO learning rate: AdamW's updates (~2e-5 a step) are far
    below bfloat16's spacing at these weights (~1e-4), so stepping the bfloat16 weights themselves
    would leave nearly all of them unchanged. Stepped through float32 masters, they move."""
    run = tiny_run(
        tiny_model_dir,
        letter_dataset(tmp_path / "data.jsonl"),
        max_steps=8,
        beta=0.0,
        learning_rate=2e-5,
        dtype="bfloat16",
        dynamic_sampling=True,  # every step has groups with signal
    )
    result = train(run, tmp_path / "out", Recorder())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(result.checkpoint).state_dict()
    assert tuned["lm_head.weight"].dtype == torch.bfloat16
    matrices = [name for name, value in base.items() if value.dim() == 2]
    moved = {name: (tuned[name] != base[name]).float().mean().item() for name in matrices}
    # measured: 0.58-0.70 of each matrix's weights moved; stepping the bfloat16 weights, 0.20-0.30
    assert min(moved.values()) > 0.45, moved


def test_checkpoints_are_pruned_and_complete(tiny_model_dir, tmp_path):
    run = tiny_run(
        tiny_model_dir,
        letter_dataset(tmp_path / "data.jsonl"),
        max_steps=4,
        checkpoint_every=1,
        keep_last_checkpoints=2,
    )
    progress = Recorder()
    train(run, tmp_path / "out", progress)
    assert [step for step, _ in progress.checkpoints] == [1, 2, 3, 4]
    assert [step for step, _ in checkpoints_on_disk(tmp_path / "out")] == [3, 4]
    assert progress.removed == [1, 2]  # told of each pruned checkpoint: a watcher's list needs no rescan
    # training runs without a KV cache; the checkpoint's config says what the base's does
    base = json.loads((tiny_model_dir / "config.json").read_text()).get("use_cache", True)
    for _, path in checkpoints_on_disk(tmp_path / "out"):
        assert json.loads((path / "config.json").read_text())["use_cache"] == base is True
    assert not list((tmp_path / "out" / "checkpoints").glob(".tmp-*"))


def test_dynamic_sampling_and_all_loss_types_run(tiny_model_dir, tmp_path):
    data = letter_dataset(tmp_path / "data.jsonl")
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        run = tiny_run(
            tiny_model_dir,
            data,
            max_steps=1,
            loss_type=loss_type,
            dynamic_sampling=True,
            importance_sampling_level="sequence",
            mask_truncated_completions=True,
            scale_rewards="batch",
        )
        progress = Recorder()
        train(run, tmp_path / loss_type, progress)
        metrics = progress.steps[0][1]
        assert "dynamic_sampling/extra_prompts" in metrics and torch.isfinite(torch.tensor(metrics["loss"]))


def test_cli_runs_a_spec_and_resumes(tiny_model_dir, tmp_path):
    data = letter_dataset(tmp_path / "data.jsonl")
    spec = {
        "base_model": str(tiny_model_dir),
        "dataset": str(data),
        "group_size": 2,
        "reward": [{"type": "regex", "pattern": "a", "score": "fraction"}],
        "hyperparameters": {"max_steps": 2, "prompts_per_step": 2, "max_completion_length": 4, "beta": 0.0},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cmd = [
        sys.executable,
        "-m",
        "trainer",
        "run",
        str(tmp_path / "spec.json"),
        "--output",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 1/2" in done.stdout and "step 2/2" in done.stdout
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    spec["hyperparameters"]["max_steps"] = 3
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    again = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300
    )  # neither --resume nor --overwrite
    assert again.returncode == 2 and "already holds a run (checkpoints up to step 2)" in again.stderr
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2  # nothing was started over
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming at step 3/3" in done.stdout
    finished = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0 and "already reached step 3 of 3: nothing to train" in finished.stdout
    over = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert over.returncode == 0 and "resuming" not in over.stdout and "step 1/3" in over.stdout, over.stderr
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 3
    bad = dict(spec, group_size=1)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    done = subprocess.run(
        cmd[:4] + [str(tmp_path / "bad.json"), "--output", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "group_size: must be >= 2" in done.stderr


def test_a_specs_relative_paths_are_read_from_its_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`dataset` and a local `base_model` written relative to the spec file are found from any
    current directory; a `base_model` that names nothing beside the spec is a hub id, left as is."""
    from trainer.__main__ import load_spec, main

    folder = tmp_path / "job"
    folder.mkdir()
    letter_dataset(folder / "train.jsonl", n=4)
    (folder / "model").symlink_to(tiny_model_dir)
    spec = {
        "base_model": "model",
        "dataset": "train.jsonl",
        "group_size": 2,
        "reward": [{"type": "regex", "pattern": "a", "score": "fraction"}],
        "hyperparameters": {"max_steps": 1, "prompts_per_step": 2, "max_completion_length": 4, "beta": 0.0},
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    capsys.readouterr()
    assert main(["run", "../job/spec.json", "--output", "out"]) == 0, capsys.readouterr().err
    assert "step 1/1" in capsys.readouterr().out
    assert len((tmp_path / "elsewhere" / "out" / "metrics.jsonl").read_text().splitlines()) == 1
    (folder / "hub.json").write_text(json.dumps({**spec, "base_model": "Qwen/Qwen2.5-0.5B"}))
    run = load_spec(Path("../job/hub.json"))
    assert (run.base_model, run.dataset) == ("Qwen/Qwen2.5-0.5B", str(folder.resolve() / "train.jsonl"))


def test_trainer_imports_no_web_database_or_queue_module():
    code = (
        "import sys, trainer.loop, trainer.__main__, trainer.rewards;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'starlette', 'sqlalchemy', 'alembic', 'celery', 'kombu', 'redis', 'psycopg', "
        "'jobs', 'api', 'worker')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_trainer_source_names_no_web_database_or_queue_module():
    import ast
    from pathlib import Path

    import trainer

    forbidden = {
        "fastapi",
        "starlette",
        "sqlalchemy",
        "alembic",
        "celery",
        "kombu",
        "redis",
        "psycopg",
        "pydantic",
        "jobs",
        "api",
        "worker",
    }
    offenders = []
    for path in Path(trainer.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []


def test_eval_metrics_and_merged_export(tiny_model_dir, tmp_path):
    from trainer.checkpoint import export_merged

    data = letter_dataset(tmp_path / "data.jsonl")
    run = tiny_run(
        tiny_model_dir,
        data,
        max_steps=2,
        eval_every=1,
        lora=LoraConfig(r=2, alpha=4, target_modules="all-linear"),
    )
    run.eval_dataset = str(letter_dataset(tmp_path / "eval.jsonl", n=3))
    progress = Recorder()
    result = train(run, tmp_path / "out", progress)
    assert all("eval/reward" in m and "eval/rewards/regex" in m for _, m in progress.steps)
    merged = export_merged(result.checkpoint, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name in model.state_dict())


def test_bad_inputs_fail_with_reasons_a_user_can_act_on(tiny_model_dir, tmp_path):
    from trainer.errors import DatasetError, ModelLoadError

    data = letter_dataset(tmp_path / "data.jsonl")
    with pytest.raises(ModelLoadError, match="could not load the tokenizer of base_model"):
        train(tiny_run(tmp_path / "no-such-model", data), tmp_path / "a")
    exact = [{"type": "exact_match", "field": "solution"}]
    with pytest.raises(DatasetError, match="line 1: the rewards need the field 'solution'"):
        train(tiny_run(tiny_model_dir, data, reward=exact), tmp_path / "b")
