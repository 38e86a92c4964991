"""``token_logprobs`` equals the model's own forward on every architecture family we train:
tiny random configs (2 layers, hidden <= 64, vocab 256, window 8 where the family has one),
values and every parameter's gradient against ``log_softmax(model(prompt + c).logits)``, with
prompts and completions longer than the window and groups of unequal completion lengths."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from trainer.logprobs import PLAIN, Scoring, check_scoring, default_scoring, token_logprobs

VOCAB, WINDOW = 256, 8
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# family -> (config class name, the config's arguments beyond COMMON)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2-window": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    ),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            norm_topk_prob=True,
        ),
    ),
    "mistral-window": ("MistralConfig", dict(sliding_window=WINDOW)),
    "mixtral": ("MixtralConfig", dict(sliding_window=WINDOW, **MOE)),
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            final_logit_softcapping=0.5,
            attn_logit_softcapping=5.0,
        ),
    ),
    "gemma3-text": (
        "Gemma3TextConfig",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            final_logit_softcapping=0.5,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "phi3-window": ("Phi3Config", dict(sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": (
        "Olmo3Config",
        dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    ),
    "gpt-neox": ("GPTNeoXConfig", dict(num_key_value_heads=None)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "cohere": ("CohereConfig", dict(logit_scale=4.0)),
    "granite": ("GraniteConfig", dict(logits_scaling=0.25)),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=WINDOW)),
    "gpt-oss": (
        "GptOssConfig",
        dict(
            head_dim=16,
            sliding_window=WINDOW,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "llama4-text": (
        "Llama4TextConfig",
        dict(
            head_dim=16,
            intermediate_size_mlp=96,
            attention_chunk_size=WINDOW,
            num_local_experts=2,
            num_experts_per_tok=1,
            no_rope_layers=[1, 0],
        ),
    ),
    "qwen3-next (hybrid)": (
        "Qwen3NextConfig",
        dict(
            head_dim=16,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),
    "lfm2 (hybrid)": (
        "Lfm2Config",
        dict(block_auto_adjust_ff_dim=False, layer_types=["conv", "full_attention"]),
    ),
}
HYBRIDS = {"qwen3-next (hybrid)", "lfm2 (hybrid)"}


def tiny_model(family: str, attn: str = "eager") -> torch.nn.Module:
    class_name, arguments = ARCHITECTURES[family]
    config_class = getattr(transformers, class_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    config = config_class(**{**COMMON, **arguments})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def groups():
    """Two prompts, one longer than the window, with completions of unequal lengths (one longer
    than the window, one of a single token)."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g)

    return [ids(11), ids(5)], [[ids(n) for n in (20, 3, 9, 1)], [ids(n) for n in (12, 2)]]


def plain_logprobs(model, prompts, completions, temperature):
    """The textbook computation: one forward per completion, the model's own logits."""
    out = []
    for prompt, group in zip(prompts, completions, strict=True):
        for completion in group:
            logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[
                0, prompt.shape[0] - 1 : -1
            ]
            out.append(
                torch.log_softmax(logits.float() / temperature, -1)
                .gather(-1, completion[:, None])
                .squeeze(-1)
            )
    return torch.cat(out)


def assert_equal_to_plain_forward(model, scoring: Scoring):
    plain_model = copy.deepcopy(model)
    prompts, completions = groups()
    weights = torch.linspace(-1, 1, sum(c.shape[0] for group in completions for c in group))

    nested = token_logprobs(model, prompts, completions, temperature=0.9, scoring=scoring, chunk_size=7)
    assert [[lp.shape[0] for lp in group] for group in nested] == [
        [c.shape[0] for c in g] for g in completions
    ]
    logps = torch.cat([lp for group in nested for lp in group])
    (logps * weights).sum().backward()
    plain = plain_logprobs(plain_model, prompts, completions, 0.9)
    (plain * weights).sum().backward()

    assert logps.dtype == torch.float32
    assert_close(logps, plain, atol=1e-4, rtol=1e-4)
    for (name, p), p2 in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        if p2.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            assert_close(p.grad, p2.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_token_logprobs_equal_the_plain_forward(family):
    model = tiny_model(family)
    scoring = default_scoring(model)
    # every attention-only family shares the prompt; hybrids (conv / recurrent state) cannot
    assert scoring == Scoring(share_prompt=family not in HYBRIDS, own_logits=False)
    assert_equal_to_plain_forward(model, scoring)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2-window", "gemma2", "gpt-oss", "llama4-text", "lfm2 (hybrid)"])
@pytest.mark.parametrize("scoring", [Scoring(share_prompt=False), PLAIN], ids=["rows", "plain"])
def test_the_plainer_scorings_are_exact_too(family, scoring):
    assert_equal_to_plain_forward(tiny_model(family), scoring)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral-window", "gemma3-text", "cohere"])
def test_token_logprobs_equal_the_plain_forward_under_sdpa(family):
    model = tiny_model(family, attn="sdpa")
    assert_equal_to_plain_forward(model, default_scoring(model))


@pytest.mark.parametrize("family", ["mistral-window", "gemma2", "qwen3-next (hybrid)"])
def test_the_load_check_keeps_the_lean_scoring_where_it_is_exact(family):
    model = tiny_model(family)
    check = check_scoring(model)
    assert check.scoring == check.default == default_scoring(model)
    assert check.mismatches == []


def test_the_load_check_falls_back_when_the_lean_path_is_wrong(monkeypatch):
    """A transform the chunked head does not know (here: the model's cap, hidden from it) makes the
    check fall back to the model's own logits and say why."""
    import trainer.logprobs as logprobs

    model = tiny_model("gemma2")
    monkeypatch.setattr(logprobs, "logit_transform", lambda config: logprobs.LogitTransform())
    check = check_scoring(model)
    assert check.scoring == PLAIN
    assert len(check.mismatches) == 2 and "differs from the model's own forward" in check.mismatches[0]


def test_the_prompt_is_computed_once_per_group():
    model = tiny_model("mistral-window")
    seen = []
    model.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:2]))
    prompts, completions = groups()
    token_logprobs(model, prompts, completions, scoring=Scoring())
    # per group: the prompt alone once, then its completions in one batch (each without its last
    # token, which predicts nothing), right-padded to the group's longest
    assert seen == [(1, 11), (4, 19), (1, 5), (2, 11)]
    seen.clear()
    token_logprobs(model, prompts, completions, scoring=Scoring(), token_budget=30)
    assert seen == [(1, 11), (1, 19), (3, 8), (1, 5), (2, 11)]  # runs cut by the token budget, longest first


def test_entropy_and_edge_cases():
    model = tiny_model("llama")
    prompts, completions = groups()
    completions[1].append(torch.zeros(0, dtype=torch.long))  # a zero-length completion scores as empty
    logps, entropy = token_logprobs(model, prompts, completions, scoring=Scoring(), with_entropy=True)
    plain, plain_entropy = token_logprobs(model, prompts, completions, scoring=PLAIN, with_entropy=True)
    assert logps[1][2].shape == (0,) and entropy[1][2].shape == (0,)
    assert_close(
        torch.cat([e for g in entropy for e in g]),
        torch.cat([e for g in plain_entropy for e in g]),
        atol=1e-5,
        rtol=1e-5,
    )
    assert not entropy[0][0].requires_grad
    with pytest.raises(ValueError, match="at least one token"):
        token_logprobs(model, [torch.zeros(0, dtype=torch.long)], [[torch.ones(2, dtype=torch.long)]])


# --- at load, and in training ----------------------------------------------------------------------


def tiny_dir(tmp_path, family):
    """``family``'s tiny config from ARCHITECTURES, written with a character tokenizer (whose
    vocabulary it takes) for the trainer to load."""
    from trainer.tiny import make_tiny_model

    class_name, arguments = ARCHITECTURES[family]
    if getattr(transformers, class_name, None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    return make_tiny_model(
        tmp_path / "model",
        arch=class_name,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=96,
        **arguments,
    )


def test_a_lean_path_that_is_wrong_falls_back_at_load_with_a_warning(tmp_path, monkeypatch):
    import trainer.logprobs as logprobs
    from trainer.config import GRPOConfig
    from trainer.model import load_models

    model_dir = tiny_dir(tmp_path, "gemma2")
    events = []
    assert (
        load_models(
            model_dir, GRPOConfig(beta=0.0), torch.device("cpu"), on_log=lambda *event: events.append(event)
        ).scoring
        == Scoring()
    )
    assert events == []
    monkeypatch.setattr(logprobs, "logit_transform", lambda config: logprobs.LogitTransform())
    models = load_models(
        model_dir, GRPOConfig(beta=0.0), torch.device("cpu"), on_log=lambda *e: events.append(e)
    )
    assert models.scoring == PLAIN
    [(level, message)] = events
    assert level == "warning" and "Gemma2ForCausalLM" in message and "the model's own full logits" in message


@pytest.fixture
def one_thread(monkeypatch):
    """The run computes on one thread (``run_threads`` reads OMP_NUM_THREADS): on a loaded 2-core
    machine two threads per tiny forward wait on each other far longer than they compute. The
    test process's own count is restored after."""
    saved = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(saved)


def run_cli(tmp_path, model_dir, capsys, **hyperparameters) -> tuple[int, str, Path]:
    """``python -m trainer run`` on a spec for ``model_dir`` (two steps of G=2 on 2 prompts,
    8-token completions): its exit code, its stderr and its output directory. The entry point runs
    in this process: a subprocess per architecture would pay Python's and torch's start-up each
    time (``tests/trainer/test_train.py`` runs the module itself once)."""
    from tests.trainer.factories import letter_dataset
    from trainer.__main__ import main

    spec = {
        "base_model": str(model_dir),
        "dataset": str(letter_dataset(tmp_path / "data.jsonl", n=4)),
        "group_size": 2,
        # a random model's completions differ in their share of letters: GRPO has signal every step
        "reward": [{"type": "regex", "pattern": "[a-zA-Z]", "score": "fraction"}],
        "hyperparameters": {
            "max_steps": 2,
            "prompts_per_step": 2,
            "max_completion_length": 8,
            "learning_rate": 1e-3,
            "seed": 0,
            **hyperparameters,
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    capsys.readouterr()
    code = main(["run", str(tmp_path / "spec.json"), "--output", str(tmp_path / "out")])
    return code, capsys.readouterr().err, tmp_path / "out"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_two_training_steps_through_the_cli(family, tmp_path, capsys):
    """Every architecture of the matrix trains through ``python -m trainer run``: the reference
    (beta > 0) and old-policy (num_iterations = 2) passes included, with no warning (no fallback
    from the lean scoring), finite figures and weights that moved."""
    from safetensors.torch import load_file

    model_dir = tiny_dir(tmp_path, family)
    code, stderr, out = run_cli(tmp_path, model_dir, capsys, beta=0.04, num_iterations=2)
    assert code == 0, stderr
    assert "warning:" not in stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert all(math.isfinite(m[name]) for name in ("loss", "grad_norm", "entropy", "kl")), m
    assert any(m["grad_norm"] > 0 for m in metrics)
    before = load_file(model_dir / "model.safetensors")
    after = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.usefixtures("one_thread")
def test_a_model_whose_own_forward_fails_stops_the_cli_naming_it(tmp_path, monkeypatch, capsys):
    """An architecture the trainer cannot run is refused at load, the exit code and message saying which."""
    model_dir = tiny_dir(tmp_path, "mistral-window")

    def broken(self, *args, **kwargs):
        raise NotImplementedError("no forward here")

    monkeypatch.setattr(transformers.MistralForCausalLM, "forward", broken)
    code, stderr, out = run_cli(tmp_path, model_dir, capsys)
    assert code == 2
    assert "error: MistralForCausalLM cannot be trained: " in stderr and "no forward here" in stderr
    assert not (out / "metrics.jsonl").exists()  # stopped at load, before a step
