"""Evaluation that chooses: pass@k, greedy decoding, the best checkpoint kept through pruning
and resume, and the warning when training and eval rewards part ways."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer.factories import letter_dataset, tiny_run, write_rows
from trainer.checkpoint import checkpoints_on_disk, load_training_state
from trainer.config import ConfigError, GRPOConfig, RunConfig
from trainer.evaluation import BestCheckpoint, DivergenceWatch, pass_at_k
from trainer.loop import train
from trainer.progress import Progress
from trainer.rollout import generate


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw of 3 holds a pass
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_the_divergence_warning_fires_once_per_occurrence() -> None:
    watch = DivergenceWatch(window=3)

    def evaluation(step: int, eval_reward: float, training: list[float]) -> str | None:
        for reward in training:
            watch.add_training_reward(reward)
        return watch.observe(step, eval_reward)

    assert evaluation(10, 0.50, [0.1, 0.3]) is None  # training mean 0.2
    assert evaluation(20, 0.40, [0.3]) is None  # two evaluations are no trend yet
    warning = evaluation(30, 0.30, [0.4, 0.6])  # eval 0.5 > 0.4 > 0.3 while training 0.2 -> 0.5
    assert (
        warning is not None and "reward hacking or overfitting" in warning and "steps 10, 20, 30" in warning
    )
    assert evaluation(40, 0.20, [0.7]) is None  # still the same occurrence: no second warning
    assert evaluation(50, 0.25, [0.8]) is None  # the eval reward rose: the pattern broke, re-armed
    assert evaluation(60, 0.20, [0.9]) is None
    assert evaluation(70, 0.10, [1.0]) is not None  # 0.25 > 0.20 > 0.10 again: a new occurrence

    resumed = DivergenceWatch(window=3)
    resumed.load_state_dict(json.loads(json.dumps(watch.state_dict())))  # through a checkpoint's state.json
    resumed.add_training_reward(1.0)
    assert resumed.observe(80, 0.05) is None  # it remembers that it already warned

    flat = DivergenceWatch(window=3)
    for step, (eval_reward, train_reward) in enumerate([(0.5, 0.4), (0.4, 0.3), (0.3, 0.2)]):
        flat.add_training_reward(train_reward)
        assert flat.observe(step, eval_reward) is None  # both fell: no divergence


def test_the_best_checkpoint_is_the_highest_and_the_earliest_on_a_tie() -> None:
    best = BestCheckpoint("eval/pass@4")
    assert best.consider(1, {"eval/reward": 0.9, "eval/pass@4": 0.5})
    assert not best.consider(2, {"eval/pass@4": 0.5})
    assert best.consider(3, {"eval/pass@4": 0.75})
    assert not best.consider(4, {"eval/pass@4": float("nan")})
    assert (best.step, best.value) == (3, 0.75)
    assert not BestCheckpoint(None).consider(1, {"eval/reward": 1.0})


def test_keep_best_by_names_its_choices_and_needs_an_eval_set() -> None:
    with pytest.raises(ConfigError) as caught:
        GRPOConfig.from_dict({"keep_best_by": "eval/rewards"})
    assert caught.value.param == "hyperparameters.keep_best_by"
    assert "'eval/reward'" in caught.value.message and "did you mean" in caught.value.message
    with pytest.raises(ConfigError, match="pass@k figures need eval_pass_k > 0"):
        GRPOConfig.from_dict({"keep_best_by": "eval/pass@4"})
    assert GRPOConfig.from_dict({"keep_best_by": "eval/pass@4", "eval_pass_k": 4}).best_metric_choices == (
        "eval/reward",
        "eval/pass@1",
        "eval/pass@4",
    )
    with pytest.raises(ConfigError) as caught:
        GRPOConfig.from_dict({"eval_pass_k": 10_000})
    assert caught.value.param == "hyperparameters.eval_pass_k"
    spec = {
        "base_model": "m",
        "dataset": "d.jsonl",
        "reward": [{"type": "exact_match"}],
        "hyperparameters": {"keep_best_by": "eval/reward"},
    }
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_spec(spec)
    assert caught.value.param == "hyperparameters.keep_best_by" and "eval dataset" in caught.value.message
    assert (
        RunConfig.from_spec({**spec, "eval_dataset": "e.jsonl"}).hyperparameters.keep_best_by == "eval/reward"
    )


@pytest.mark.slow
def test_greedy_decoding_is_deterministic_and_equals_hf_generate(tiny_model_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["Say a0:", "What is 12 + 30? Answer:", "b"]  # different lengths: left padding in one batch
    prompts = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    eos = tokenizer.eos_token_id

    def ours(seed: int) -> list[list[int]]:
        rollout = generate(
            model,
            prompts,
            group_size=1,
            max_new_tokens=12,
            eos_token_ids=[eos],
            pad_id=tokenizer.pad_token_id,
            temperature=0.0,
            top_p=1.0,
            generator=torch.Generator().manual_seed(seed),
        )
        return [c.tolist() for c in rollout.completion_ids]

    first = ours(0)
    assert ours(1) == first  # greedy draws nothing from the generator
    for prompt, completion in zip(prompts, first, strict=True):
        with torch.no_grad():
            hf = model.generate(
                prompt[None],
                attention_mask=torch.ones_like(prompt[None]),
                do_sample=False,
                max_new_tokens=12,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        expected = hf[0, prompt.shape[0] :].tolist()
        if eos in expected:
            expected = expected[: expected.index(eos) + 1]
        assert completion == expected
    sampled = generate(
        model,
        prompts,
        group_size=4,
        max_new_tokens=12,
        eos_token_ids=[eos],
        pad_id=tokenizer.pad_token_id,
        temperature=1.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert len({tuple(c.tolist()) for c in sampled.completion_ids}) > 1  # sampling still samples


@pytest.mark.slow
def test_the_eval_reward_scores_the_greedy_completions_and_draws_nothing(tiny_model_dir) -> None:
    """eval/reward is each row's argmax completion scored (the same text HF generate(do_sample=False)
    gives), decoded without drawing a random number: not a low-temperature sample."""
    from trainer.evaluation import Evaluator
    from trainer.loop import Rollouts
    from trainer.model import load_models
    from trainer.rewards import RewardSuite

    cfg = GRPOConfig(
        beta=0.0, max_completion_length=10, group_size=2, prompts_per_step=2, eval_max_rows=3, seed=5
    )
    models = load_models(tiny_model_dir, cfg, torch.device("cpu"))
    texts = ["Say a0:", "What is 12 + 30? Answer:", "b"]
    rows = []
    for text in texts:
        prompt = torch.tensor(models.tokenizer(text, add_special_tokens=False)["input_ids"])[None]
        with torch.no_grad():
            hf = models.policy.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=10,
                eos_token_id=models.tokenizer.eos_token_id,
                pad_token_id=models.tokenizer.pad_token_id,
            )
        rows.append(
            {
                "prompt": text,
                "answer": models.tokenizer.decode(hf[0, prompt.shape[1] :], skip_special_tokens=True),
            }
        )
    reward = [{"type": "string_check", "reference": "{{item.answer}}", "operation": "eq"}]
    generator = torch.Generator()
    with RewardSuite(reward) as rewards:
        figures = Evaluator(Rollouts(models, rewards, cfg), rows, cfg, generator)(step=2)
    assert figures["eval/reward"] == 1.0 and figures["eval/rows"] == 3.0  # every row: HF's greedy text
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(cfg.seed + 2).get_state())


class Recorder(Progress):
    def __init__(self, stop_after: int | None = None):
        self.steps, self.checkpoints, self.evaluations, self.logs, self.removed = [], [], [], [], []
        self.stop_after = stop_after

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_checkpoint(self, step, path):
        self.checkpoints.append(step)

    def on_checkpoint_removed(self, step):
        self.removed.append(step)

    def on_evaluation(self, step, figures, *, best_step):
        self.evaluations.append((step, figures, best_step))

    def on_log(self, level, message):
        self.logs.append((level, message))

    def should_stop(self):
        return self.stop_after is not None and len(self.steps) >= self.stop_after


@pytest.mark.slow
def test_every_checkpoint_is_evaluated_and_greedy_eval_is_deterministic(tiny_model_dir, tmp_path) -> None:
    data = letter_dataset(tmp_path / "data.jsonl")
    evals = letter_dataset(tmp_path / "eval.jsonl", n=5)

    def run_once(out: str) -> Recorder:
        run = tiny_run(
            tiny_model_dir,
            data,
            max_steps=3,
            checkpoint_every=2,
            eval_pass_k=3,
            eval_pass_threshold=0.2,
            eval_max_rows=4,
        )
        run.eval_dataset = str(evals)
        progress = Recorder()
        train(run, tmp_path / out, progress)
        return progress

    progress = run_once("a")
    assert progress.checkpoints == [2, 3]
    assert [step for step, _, _ in progress.evaluations] == [2, 3]  # every checkpoint, none between
    for step, figures, best_step in progress.evaluations:
        assert {"reward", "rewards/regex", "pass@1", "pass@3", "completion_length"} <= set(figures)
        assert figures["rows"] == 4.0 and 0.0 <= figures["pass@1"] <= figures["pass@3"] <= 1.0
        assert best_step is None  # keep_best_by not set
        metrics = dict(progress.steps)[step]
        assert metrics["eval/reward"] == figures["reward"]  # also on the step's metrics
        saved = load_training_state(tmp_path / "a" / "checkpoints" / f"step-{step:06d}").extra["eval"]
        assert saved == pytest.approx(figures)
    assert "eval/reward" not in dict(progress.steps)[1]
    again = run_once("b")  # the same spec and seed: the same greedy figures
    assert [f["reward"] for _, f, _ in again.evaluations] == [f["reward"] for _, f, _ in progress.evaluations]


@pytest.mark.slow
def test_keep_best_by_keeps_the_best_through_pruning_and_resume(tiny_model_dir, tmp_path) -> None:
    # learning_rate 0: every checkpoint holds the same weights and scores the same, and a tie
    # keeps the earlier checkpoint, so the best is step 1 while keep_last_checkpoints keeps 1.
    data = letter_dataset(tmp_path / "data.jsonl")
    evals = write_rows(tmp_path / "eval.jsonl", [{"prompt": f"Say a{i}:"} for i in range(3)])
    run = tiny_run(
        tiny_model_dir,
        data,
        max_steps=5,
        checkpoint_every=1,
        keep_last_checkpoints=1,
        learning_rate=0.0,
        keep_best_by="eval/reward",
    )
    run.eval_dataset = str(evals)
    out = tmp_path / "out"

    first = Recorder(stop_after=3)
    result = train(run, out, first)
    assert result.stopped and result.final_step == 3
    assert [s for s, _ in checkpoints_on_disk(out)] == [1, 3]  # the best outlives keep_last_checkpoints=1
    assert [best for _, _, best in first.evaluations] == [1, 1, 1]
    assert first.removed == [2]  # the pruning it reported leaves what is on disk

    second = Recorder()
    result = train(run, out, second, resume=True)
    assert result.final_step == 5
    assert [s for s, _ in checkpoints_on_disk(out)] == [1, 5]  # the resumed run still knows step 1 is best
    assert second.removed == [3, 4]
    reported = set(first.checkpoints + second.checkpoints) - set(first.removed + second.removed)
    assert sorted(reported) == [1, 5]
    assert [best for _, _, best in second.evaluations] == [1, 1]
    assert result.best_checkpoint == out / "checkpoints" / "step-000001"
    assert load_training_state(result.checkpoint).extra["best"] == {
        "metric": "eval/reward",
        "step": 1,
        "value": first.evaluations[0][1]["reward"],
    }

    with pytest.raises(ConfigError, match="needs an eval dataset"):
        run.eval_dataset = None
        train(run, tmp_path / "no-eval")
