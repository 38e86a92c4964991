"""What both sides of the trainer benchmark share: the configs, the model and data they train on,
the reward, and the result record each side writes.

Imports torch, transformers and ``trainer.tiny`` only, so it loads in ``.venv`` (ours, no trl)
and in ``.venv-bench`` (TRL).
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the package is not installed in either venv; run from a checkout
    sys.path.insert(0, str(REPO))

EOS_CALIBRATION_SEED = 1234
NEVER_EOS_SCALE = 200.0  # eos_probability 0: EOS logit = -200 x a projection that is about 1 on average


@dataclass(frozen=True)
class BenchConfig:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int | None  # None: the character vocabulary of trainer.tiny (101 tokens)
    prompt_chars: tuple[int, int]  # prompt length range in characters (= tokens: char tokenizer)
    group_size: int
    prompts_per_step: int
    max_completion_length: int
    reward_pattern: str  # regex "match" reward: 1.0 if the completion contains it
    eos_probability: float | None  # edit the LM head so EOS comes with about this chance per token (0: never)
    beta: float = 0.04
    learning_rate: float = 1e-5
    epsilon: float = 0.2
    loss_type: str = "dapo"
    num_rows: int = 64
    seed: int = 0
    steps: int = 6  # optimizer steps per run (the first is warm-up)

    @property
    def reward_spec(self) -> list[dict]:
        return [{"type": "regex", "pattern": self.reward_pattern}]


CONFIGS = {
    # trainer.tiny's default model, unedited: completions mostly run to the 16-token cap
    "toy": BenchConfig(
        name="toy",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        vocab_size=None,
        prompt_chars=(8, 16),
        group_size=4,
        prompts_per_step=2,
        max_completion_length=16,
        reward_pattern="a",
        eos_probability=None,
        steps=20,
    ),
    # ~24M parameters, 32k vocabulary; extra tokens decode as "<extra_N>", and the reward pays for
    # one of the 199 tokens <extra_101>..<extra_299>: rare enough that some groups never see one
    "realistic": BenchConfig(
        name="realistic",
        hidden_size=256,
        num_layers=8,
        num_heads=8,
        vocab_size=32000,
        prompt_chars=(90, 110),
        group_size=8,
        prompts_per_step=4,
        max_completion_length=64,
        reward_pattern=r"<extra_[12]\d\d>",
        eos_probability=0.04,
    ),
    # the realistic config 4x wider (~160M parameters): the weights, gradients and optimizer state
    # dominate a process's memory, as they do at the sizes sharding is for (bench/distributed_bench.py)
    "realistic-wide": BenchConfig(
        name="realistic-wide",
        hidden_size=1024,
        num_layers=8,
        num_heads=16,
        vocab_size=32000,
        prompt_chars=(90, 110),
        group_size=8,
        prompts_per_step=4,
        max_completion_length=64,
        reward_pattern=r"<extra_[12]\d\d>",
        eos_probability=0.04,
    ),
    # the same shape with the 101-token character vocabulary (~8M parameters)
    "realistic-small": BenchConfig(
        name="realistic-small",
        hidden_size=256,
        num_layers=8,
        num_heads=8,
        vocab_size=None,
        prompt_chars=(90, 110),
        group_size=8,
        prompts_per_step=4,
        max_completion_length=64,
        reward_pattern="Q",
        eos_probability=0.04,
    ),
}
# Long completions: the realistic model with its EOS row pointed away from the hidden states
# (eos_probability 0: EOS never comes), so every completion runs to the length; 2 prompts x G=8
# a step. The reward pays for one of a set of extra tokens sized so that about half of the
# completions contain one at that length (n tokens of 32k over L draws: 1 - exp(-n L / 32k)).
for _length, _pattern in ((256, r"<extra_1[0-8]\d>"), (1024, r"<extra_1[01]\d>"), (2048, r"<extra_10\d>")):
    CONFIGS[f"long-{_length}"] = BenchConfig(
        name=f"long-{_length}",
        hidden_size=256,
        num_layers=8,
        num_heads=8,
        vocab_size=32000,
        prompt_chars=(90, 110),
        group_size=8,
        prompts_per_step=2,
        max_completion_length=_length,
        reward_pattern=_pattern,
        eos_probability=0.0,
        steps=2,
    )  # a warm-up step and one timed


def regex_match_rewards(pattern: str, completions: list[str]) -> list[float]:
    """The trainer's ``{"type": "regex", "pattern": p}`` reward (score "match"): re.search, no flags."""
    compiled = re.compile(pattern)
    return [1.0 if compiled.search(c) else 0.0 for c in completions]


WORDS = (
    "the",
    "model",
    "reward",
    "group",
    "policy",
    "token",
    "answer",
    "prompt",
    "value",
    "step",
    "with",
    "every",
    "number",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "sum",
    "count",
    "letters",
    "quickly",
    "bright",
)


def write_dataset(path: Path, config: BenchConfig) -> Path:
    """``num_rows`` prompts of plain words, each ``prompt_chars`` characters long."""
    rng = random.Random(config.seed)
    rows = []
    for i in range(config.num_rows):
        target = rng.randint(*config.prompt_chars)
        words = [f"Task {i}:"]
        while len(" ".join(words)) < target:
            words.append(rng.choice(WORDS))
        rows.append({"prompt": " ".join(words)[: target - 1] + ":"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def calibrate_eos(model_dir: Path, dataset: Path, config: BenchConfig) -> dict:
    """Point the EOS row of the LM head along the direction in which the final hidden states are
    most consistently positive, scaled so that EOS has ``eos_probability`` on average.

    A random-init model gives EOS about 1/V per token and so never stops; this makes it stop at
    varied lengths. The hidden states come from the dataset's prompts followed by uniformly random
    tokens, which is what the near-uniform random model samples. The direction is Sigma^-1 mu
    (the mean over its spread): the plain mean direction gives EOS odds that swing by orders of
    magnitude between sequences, so most would either stop at once or never.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab, eos = model.config.vocab_size, model.config.eos_token_id
    generator = torch.Generator().manual_seed(EOS_CALIBRATION_SEED)
    states = []
    for line in dataset.read_text().splitlines()[:32]:
        prompt = torch.tensor(
            tokenizer(json.loads(line)["prompt"], add_special_tokens=False)["input_ids"]
        )  # [P]
        continuation = torch.randint(4, vocab, (config.max_completion_length,), generator=generator)  # [C]
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=torch.cat([prompt, continuation])[None]).last_hidden_state[
                0
            ]  # [P+C, H]
        states.append(hidden[prompt.shape[0] - 1 :])  # [C+1, H] the states that predict completion tokens
    hidden = torch.cat(states)  # [N, H]
    mean = hidden.mean(0)  # [H]
    cov = torch.cov(hidden.T) + 1e-3 * torch.eye(hidden.shape[1])  # [H, H]
    direction = torch.linalg.solve(cov, mean)  # [H]
    direction = direction / (hidden @ direction).mean()  # projection of the mean hidden state = 1
    projection = hidden @ direction  # [N]
    weight = model.get_output_embeddings().weight.data  # [V, H]
    if config.eos_probability == 0.0:  # never: the EOS logit far below every other along the direction
        weight[eos] = -NEVER_EOS_SCALE * direction
        model.save_pretrained(model_dir)
        return {
            "eos_scale": -NEVER_EOS_SCALE,
            "projection_std": projection.std().item(),
            "projection_min": projection.min().item(),
        }
    others = torch.logsumexp(hidden @ torch.cat([weight[:eos], weight[eos + 1 :]]).T, dim=-1)  # [N]
    low, high = 0.0, 100.0
    for _ in range(60):  # bisect the scale: mean P(EOS) = eos_probability
        scale = (low + high) / 2
        if torch.sigmoid(scale * projection - others).mean().item() < config.eos_probability:
            low = scale
        else:
            high = scale
    weight[eos] = scale * direction
    model.save_pretrained(model_dir)
    return {"eos_scale": scale, "projection_std": projection.std().item()}


def prepare(config: BenchConfig, workdir: Path) -> dict:
    """Model directory, dataset and spec for ``config`` under ``workdir``, built once and reused;
    absolute paths (a spec reads relative ones from its own folder)."""
    root = workdir.resolve() / config.name
    marker = root / "prepared.json"
    wanted = json.loads(json.dumps(asdict(config)))  # as it reads back from JSON (tuples become lists)
    if marker.exists():
        prepared = json.loads(marker.read_text())
        if prepared.get("config") == wanted:
            return prepared
    from trainer.tiny import make_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    model_dir = make_tiny_model(
        root / "model",
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        vocab_size=config.vocab_size,
        seed=config.seed,
    )
    dataset = write_dataset(root / "data.jsonl", config)
    eos = calibrate_eos(model_dir, dataset, config) if config.eos_probability is not None else {}
    prepared = {
        "config": wanted,
        "model_dir": str(model_dir),
        "dataset": str(dataset),
        "eos": eos,
        "sample": sample_lengths(
            model_dir, dataset, config, prompts=8 if config.max_completion_length <= 256 else 2
        ),
    }
    marker.write_text(json.dumps(prepared, indent=2))
    return prepared


def sample_lengths(model_dir: Path, dataset: Path, config: BenchConfig, prompts: int = 8) -> dict:
    """What the prepared model writes: completion lengths and reward spread over ``prompts`` x G
    samples of the first dataset rows (our rollout; TRL samples from the same distribution)."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.rollout import generate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in dataset.read_text().splitlines()[:prompts]]
    prompt_ids = [torch.tensor(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    rollout = generate(
        model,
        prompt_ids,
        group_size=config.group_size,
        max_new_tokens=config.max_completion_length,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        temperature=1.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(config.seed),
    )
    lengths = sorted(c.shape[0] for c in rollout.completion_ids)
    rewards = regex_match_rewards(
        config.reward_pattern, tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    )
    groups = [rewards[i : i + config.group_size] for i in range(0, len(rewards), config.group_size)]
    quartiles = statistics.quantiles(lengths, n=4)
    return {
        "completions": len(lengths),
        "prompt_tokens": [len(p) for p in prompt_ids],
        "length_min": lengths[0],
        "length_q1": quartiles[0],
        "length_median": quartiles[1],
        "length_q3": quartiles[2],
        "length_max": lengths[-1],
        "length_mean": statistics.mean(lengths),
        "truncated": rollout.truncated.float().mean().item(),
        "reward_mean": statistics.mean(rewards),
        "zero_std_groups": sum(len(set(g)) == 1 for g in groups) / len(groups),
    }


def parameter_count(model_dir: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return sum(p.numel() for p in model.parameters())


def quiet() -> None:
    """No progress bars or deprecation chatter from transformers/TRL in the children's output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def peak_rss_mb() -> float:
    """This process's peak resident set so far: VmHWM, in MB.

    Not ru_maxrss: Linux carries ru_maxrss across execve, so a child started by a parent that had
    loaded torch would report the parent's peak. VmHWM belongs to the process's own address space.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


@dataclass
class StepRecord:
    step: int
    seconds: float  # wall time since the previous step ended (or since training started)
    generate_seconds: float  # of which sampling the completions (model.generate / our rollout)
    cpu_seconds: float  # process CPU time (all threads) over the same interval
    tokens: int  # prompt tokens x G + completion tokens, EOS included
    loss: float
    reward: float
    frac_reward_zero_std: float
    completion_length: float
    kl: float
    peak_rss_mb: float  # ru_maxrss when the step ended


def write_result(path: Path, *, side: str, config: str, steps: list[StepRecord], extra: dict) -> None:
    path.write_text(
        json.dumps({"side": side, "config": config, "steps": [asdict(s) for s in steps], **extra})
    )
