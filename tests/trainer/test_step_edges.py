"""Edge cases of a training step on real (tiny) models: BOS as the tokenizer adds it, prompts cut
to max_prompt_length, the MoE router's load-balancing loss, reward errors under dynamic
sampling, zero-length and all-truncated completions, micro-batch sizing, reproducible runs."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer.factories import letter_dataset, tiny_run, write_rows
from trainer.batch import ScoredGroups, group_cost, group_costs, plan_micro_batches
from trainer.config import GRPOConfig
from trainer.data import PromptSampler
from trainer.logprobs import PLAIN, Scoring, token_logprobs
from trainer.loop import draw_batch, optimize, train
from trainer.loss import group_advantages
from trainer.model import Models
from trainer.progress import Progress
from trainer.prompts import MAX_TRUNCATION_WARNINGS, PromptFormatter
from trainer.tiny import char_tokenizer, make_tiny_model

G = 4


class Recorder(Progress):
    def __init__(self):
        self.steps, self.logs = [], []

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_log(self, level, message):
        self.logs.append((level, message))


# --- BOS -------------------------------------------------------------------------------------


def _tokenizer(*, adds_bos: bool, template_bos: bool = False):
    from tokenizers import processors

    tokenizer = char_tokenizer()
    if adds_bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)]
        )
    if template_bos:
        tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    return tokenizer


def _prompts(tokenizer, **config) -> PromptFormatter:
    return PromptFormatter(tokenizer, GRPOConfig(**config).max_prompt_length)


def _ids(prompts: PromptFormatter, prompt) -> list[int]:
    return prompts.ids(prompt, prompts.text(prompt))


CHAT = [{"role": "user", "content": "hi"}]


def test_a_plain_prompt_gets_the_bos_its_tokenizer_adds_and_a_chat_prompt_never_a_second():
    bos_adding = _tokenizer(adds_bos=True)
    bos = bos_adding.bos_token_id
    assert bos_adding("hi")["input_ids"][0] == bos  # the tokenizer itself adds it
    plain = _ids(_prompts(bos_adding), "hi")
    assert plain == [bos, *bos_adding("hi", add_special_tokens=False)["input_ids"]]
    # a chat template's text is tokenized as written: its own BOS once, none where it writes none
    assert _ids(_prompts(_tokenizer(adds_bos=True, template_bos=True)), CHAT).count(bos) == 1
    assert _ids(_prompts(_tokenizer(adds_bos=True, template_bos=True)), CHAT)[0] == bos
    assert bos not in _ids(_prompts(bos_adding), CHAT)
    # a tokenizer that adds no BOS: none anywhere
    plain_tokenizer = _tokenizer(adds_bos=False)
    assert bos not in _ids(_prompts(plain_tokenizer), "hi")
    assert bos not in _ids(_prompts(plain_tokenizer), CHAT)


def test_chat_serving_tokenizes_a_prompt_exactly_as_training_does():
    from trainer.chat import chat_prompt_ids

    no_template = _tokenizer(adds_bos=True)
    no_template.chat_template = None  # the plain fallback: the messages' contents, a line each
    cases = [no_template, _tokenizer(adds_bos=True), _tokenizer(adds_bos=True, template_bos=True)]
    cases.append(_tokenizer(adds_bos=False))
    for tokenizer in cases:
        assert chat_prompt_ids(tokenizer, CHAT) == _ids(_prompts(tokenizer), CHAT)
    # where the tokenizer adds a BOS and no template writes the prompt, both paths start with it
    assert chat_prompt_ids(no_template, CHAT)[0] == no_template.bos_token_id


def test_left_truncation_keeps_the_end_of_the_prompt_and_its_bos():
    prompts = _prompts(_tokenizer(adds_bos=True), max_prompt_length=4)
    bos = prompts.bos_token_id
    assert prompts.truncated([bos, 10, 11, 12, 13, 14]) == [bos, 12, 13, 14]
    assert prompts.truncated([10, 11, 12, 13, 14]) == [11, 12, 13, 14]
    assert prompts.truncated([bos, 10, 11]) == [bos, 10, 11]


@pytest.mark.slow
def test_a_prompt_longer_than_max_prompt_length_is_counted_and_named_in_a_warning(tiny_model_dir, tmp_path):
    # row i is 6 + i characters (tokens); a blank line after the first: line numbers are not row numbers
    rows = [{"prompt": f"Say a{i}" + "!" * i, "answer": "a"} for i in range(8)]
    data = write_rows(tmp_path / "data.jsonl", rows)
    data.write_text(data.read_text().replace("\n", "\n\n", 1))
    progress = Recorder()
    train(
        tiny_run(tiny_model_dir, data, max_prompt_length=8, max_steps=3, prompts_per_step=8),
        tmp_path / "out",
        progress,
    )
    for _, metrics in progress.steps:  # every row drawn each step: rows 3..7 are too long
        assert metrics["prompts_truncated"] == 5 and metrics["prompt_truncated_ratio"] == 5 / 8
    warnings = [m for level, m in progress.logs if level == "warning" and "max_prompt_length" in m]
    assert len(warnings) == MAX_TRUNCATION_WARNINGS  # not one per step and row
    for message in warnings:
        line = int(message.split("dataset line ")[1].split(" ")[0])
        row = line - 2  # row i >= 1 sits on line i + 2
        assert f"is {6 + row} tokens, more than max_prompt_length 8" in message
        assert f"its first {6 + row - 8} tokens were cut (left truncation" in message


def test_a_dataset_whose_every_prompt_is_too_long_stops_the_cli_before_training(
    tiny_model_dir, tmp_path, capsys
):
    """Counted as the model gets the prompt: the chat row's 2 characters of content are 20 tokens
    once templated ("user: hi\nassistant: "), the shortest of the two rows."""
    from trainer.__main__ import main

    rows = [
        {"prompt": "Say a" + "!" * 20, "answer": "a"},
        {"prompt": [{"role": "user", "content": "hi"}], "answer": "a"},
    ]
    data = write_rows(tmp_path / "data.jsonl", rows)
    spec = {
        "base_model": str(tiny_model_dir),
        "dataset": str(data),
        "group_size": 2,
        "reward": [{"type": "regex", "pattern": "a", "score": "fraction"}],
        "hyperparameters": {"max_steps": 1, "max_prompt_length": 16, "max_completion_length": 4},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert main(["run", str(tmp_path / "spec.json"), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert (
        "error: hyperparameters.max_prompt_length: every prompt of the dataset is longer than "
        "max_prompt_length (16 tokens): the shortest is 20 tokens" in error
    )
    assert "Raise max_prompt_length to at least 20" in error
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no step ran
    # one prompt that fits is enough: the others are cut and counted, step by step
    spec["hyperparameters"]["max_prompt_length"] = 20
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code = main(["run", str(tmp_path / "spec.json"), "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err


# --- the MoE router's load-balancing loss -------------------------------------------------------

MOE = dict(arch="MixtralConfig", num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-mixtral"), output_router_logits=True, **MOE)


def test_the_router_aux_loss_is_the_models_own_on_the_scored_tokens(moe_dir):
    model = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 90, (5,), generator=g)
    completions = [torch.randint(4, 90, (n,), generator=g) for n in (6, 3, 1)]
    (logps, aux) = token_logprobs(model, [prompt], [completions], scoring=PLAIN, router_aux_loss=True)
    width = 5 + 5
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, c in enumerate(completions):
        row = torch.cat([prompt, c[:-1]])
        ids[r, : row.shape[0]], mask[r, : row.shape[0]] = row, 1
    want = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(aux, want.float(), atol=1e-6, rtol=1e-5)
    # the same loss on every path: the prompt computed once counts once per completion
    for scoring in (Scoring(), Scoring(one_forward=True)):
        other = token_logprobs(model, [prompt], [completions], scoring=scoring, router_aux_loss=True)[1]
        torch.testing.assert_close(other, want.float(), atol=1e-6, rtol=1e-5)
    gate = next(p for name, p in model.named_parameters() if "gate" in name and "proj" not in name)
    assert torch.autograd.grad(other, gate)[0].abs().sum() > 0


def _batch(rewards, lengths=None):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 90, (n,), generator=g) for n in (6, 3, 5)]
    lengths = lengths if lengths is not None else [int(n) for n in torch.randint(1, 7, (3 * G,), generator=g)]
    completions = [torch.randint(4, 90, (n,), generator=g) for n in lengths]
    return ScoredGroups(
        row_indices=[0, 1, 2],
        prompt_ids=prompts,
        completion_ids=completions,
        prompts=["", "", ""],
        completions=[""] * (3 * G),
        truncated=torch.zeros(3 * G, dtype=torch.bool),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        parts={},
        errors={},
        error_messages=[],
    )


def _step(model_dir, batch, cfg, *, scoring=None, output_router_logits=None):
    torch.manual_seed(0)
    extra = {} if output_router_logits is None else {"output_router_logits": output_router_logits}
    policy = AutoModelForCausalLM.from_pretrained(model_dir, **extra)
    models = Models(
        policy=policy,
        reference=None,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        uses_lora=False,
        scoring=scoring,
    )
    advantages, _ = group_advantages(batch.rewards, G)
    micro = plan_micro_batches(batch, torch.ones(len(advantages), dtype=torch.bool), G, 8192)
    lengths = [c.shape[0] for c in batch.completion_ids]
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimize(
        models,
        micro,
        advantages,
        cfg,
        num_sequences=len(lengths),
        num_tokens=sum(lengths),
        params=list(policy.parameters()),
        optimizer=optimizer,
        scheduler=scheduler,
    )


def test_the_router_aux_loss_is_added_where_the_config_asks_for_it(moe_dir):
    """All rewards equal: the GRPO loss has no gradient, so what moves the weights is the aux loss."""
    batch = _batch([1.0] * (3 * G))
    cfg = GRPOConfig(group_size=G, beta=0.0, max_grad_norm=None, max_completion_length=6)
    on = _step(moe_dir, batch, cfg)
    off = _step(moe_dir, batch, cfg, output_router_logits=False)
    assert on["aux_loss"] > 0 and on["grad_norm"] > 0
    assert "aux_loss" not in off and off["grad_norm"] == 0.0
    assert on["loss"] == pytest.approx(0.5 * on["aux_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_moe_run_reports_aux_loss(moe_dir, tmp_path):
    progress = Recorder()
    train(tiny_run(moe_dir, letter_dataset(tmp_path / "data.jsonl"), max_steps=2), tmp_path / "out", progress)
    assert [step for step, _ in progress.steps] == [1, 2]
    assert all(m["aux_loss"] > 0 for _, m in progress.steps)


# --- reward errors under dynamic sampling ----------------------------------------------------------


class ScriptedRollouts:
    """Stands in for generation only: hands out prepared scored groups in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __call__(self, rows, row_indices, *, group_size, temperature, generator, timings, group_seeds):
        return self.batches.pop(0)


def _scored(parts: list[float | None], rewards: list[float]) -> ScoredGroups:
    n = len(parts)
    errors = sum(p is None for p in parts)
    return ScoredGroups(
        row_indices=list(range(n // 2)),
        prompt_ids=[torch.tensor([1])] * (n // 2),
        completion_ids=[torch.tensor([2])] * n,
        prompts=["p"] * (n // 2),
        completions=["c"] * n,
        truncated=torch.zeros(n, dtype=torch.bool),
        rewards=torch.tensor(rewards),
        parts={"r": parts},
        errors={"r": errors},
        error_messages=["r: it broke"] if errors else [],
    )


def test_each_reward_error_counts_once_under_dynamic_sampling():
    cfg = GRPOConfig(group_size=2, prompts_per_step=3, dynamic_sampling=True, max_resample_rounds=1)
    first = _scored(
        [None, 1.0, 0.0, None, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    )  # 2 errors; group 2 flat
    fresh = _scored([None, 0.5, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0])  # 1 error; one group informative, one flat
    batch, extra = draw_batch(
        ScriptedRollouts([first, fresh]), [], PromptSampler(10, 0), None, cfg, {}, step=1
    )
    assert extra == 2 and len(batch.prompt_ids) == 3
    assert batch.errors == {
        "r": 3
    }  # each scored completion's error once (HEAD: once per kept group, 2 + 2 + 1)
    assert batch.error_messages == ["r: it broke"]
    one = first.select([1], 2)
    assert one.errors == {"r": 1} and first.select([2], 2).errors == {"r": 0}
    assert first.select([2], 2).error_messages == []


# --- zero-length and all-truncated completions --------------------------------------------------


@pytest.mark.parametrize(
    "scoring", [Scoring(), Scoring(share_prompt=False), PLAIN], ids=["shared", "rows", "plain"]
)
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_zero_length_completions_train(tiny_model_dir, scoring, loss_type):
    lengths = [0, 3, 0, 2, 0, 0, 0, 0, 4, 0, 1, 2]  # group 1 has no token at all
    batch = _batch([1.0, 0.0, 2.0, 1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.0], lengths)
    cfg = GRPOConfig(group_size=G, beta=0.0, loss_type=loss_type, max_grad_norm=None, max_completion_length=6)
    stats = _step(tiny_model_dir, batch, cfg, scoring=scoring)
    assert torch.isfinite(torch.tensor([stats["loss"], stats["grad_norm"]])).all()
    assert stats["tokens"] == sum(lengths) and stats["grad_norm"] > 0


@pytest.mark.slow
def test_an_all_truncated_batch_with_masking_is_a_finite_step_that_changes_nothing(tiny_model_dir, tmp_path):
    # one-token completions of a random model almost never end in EOS: every one is truncated
    run = tiny_run(
        tiny_model_dir,
        letter_dataset(tmp_path / "data.jsonl"),
        max_completion_length=1,
        max_steps=2,
        mask_truncated_completions=True,
        beta=0.04,
        checkpoint_every=1,
    )
    progress = Recorder()
    result = train(run, tmp_path / "out", progress)
    assert [m["truncated_ratio"] for _, m in progress.steps] == [1.0, 1.0]
    for _, metrics in progress.steps:
        assert all(v == v and abs(v) != float("inf") for v in metrics.values()), metrics
        assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.checkpoint).state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


# --- micro-batch sizing -----------------------------------------------------------------------


def test_micro_batches_hold_at_most_the_budget_of_padded_completions():
    """One long completion makes every completion of its group cost that long (the scorer pads a
    run to its longest); the packed width prompt + sum of lengths undercounted that G-fold."""
    lengths = [100, 1, 1, 1] * 3
    batch = _batch([0.0] * (3 * G), lengths)
    active = torch.ones(3 * G, dtype=torch.bool)
    for budget, share_prompt in ((500, True), (900, True), (2000, False)):
        plans = plan_micro_batches(batch, active, G, budget, share_prompt=share_prompt)
        assert sorted(int(i) for p in plans for i in p.sequences) == list(range(3 * G))
        for plan in plans:
            held = sum(group_cost(g, share_prompt=share_prompt) for g in plan.groups)
            assert held <= budget or len(plan.groups) == 1
            real = sum(
                (g.prompt.shape[0] + len(g.completions) * max(c.shape[0] for c in g.completions))
                if share_prompt
                else len(g.completions) * (g.prompt.shape[0] + 100)
                for g in plan.groups
            )
            assert real <= budget or len(plan.groups) == 1
    assert len(plan_micro_batches(batch, active, G, 500)) == 3


def test_a_groups_cost_counts_the_positions_its_scoring_holds_on_each_path():
    """What the step's groups are dealt to processes by: prompts 6, 3, 5; only active completions."""
    lengths = [100, 1, 1, 1] + [2, 2, 2, 2] + [7, 1, 1, 1]
    batch = _batch([0.0] * (3 * G), lengths)
    active = torch.ones(3 * G, dtype=torch.bool)
    active[8:] = False  # the third group trains nothing
    active[1:3] = False  # the first trains its completions 0 and 3
    shared = [6 + 2 * 100, 3 + 4 * 2, 0]  # the prompt once, the completions padded to their longest
    rows = [2 * (6 + 100), 4 * (3 + 2), 0]  # a row [prompt, completion] each, padded to the longest
    assert group_costs(batch, active, G) == shared
    assert group_costs(batch, active, G, share_prompt=False) == rows
    assert group_costs(batch, active, G, one_forward=True) == rows


# --- reproducibility --------------------------------------------------------------------------


TIMING = ("time/", "step_seconds", "tokens_per_second")


def _run_metrics(model_dir, data, output, *, threads=None):
    saved = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        # big enough that CPU kernels split their sums by thread (1 and 2 threads differ by step 3)
        run = tiny_run(
            model_dir,
            data,
            group_size=8,
            prompts_per_step=16,
            max_steps=3,
            max_completion_length=24,
            learning_rate=5e-3,
            beta=0.04,
        )
        result = train(run, output)
    finally:
        torch.set_num_threads(saved)
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in lines]
    return metrics, AutoModelForCausalLM.from_pretrained(result.checkpoint).state_dict()


@pytest.mark.slow
def test_the_same_spec_and_seed_give_the_same_metrics_and_weights(tmp_path):
    """The demo's step-34 divergence: the same seed reduced with another intra-op thread count
    (a forked worker child, a caller's torch.set_num_threads) gives other bits, which compound.
    The run pins its count (OMP_NUM_THREADS, else the CPUs it may use; a resume keeps its own)."""
    model = make_tiny_model(tmp_path / "model", hidden_size=128, num_layers=2, num_heads=4)
    data = letter_dataset(tmp_path / "data.jsonl")
    first, weights = _run_metrics(model, data, tmp_path / "a")
    other_threads = 1 if torch.get_num_threads() > 1 else 2
    for name, threads in (("b", None), ("c", other_threads)):
        again, weights_again = _run_metrics(model, data, tmp_path / name, threads=threads)
        assert again == first, f"threads={threads}"
        assert all(torch.equal(weights[k], weights_again[k]) for k in weights), f"threads={threads}"
