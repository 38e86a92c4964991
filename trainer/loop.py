"""The GRPO training loop: sample prompts -> generate -> score -> advantages -> loss/backward/step
(num_iterations times) -> metrics -> checkpoint -> stop check.

The same loop runs in every process of a job on several (``trainer.distributed``): each process
generates and trains on its share of the step's groups, and sees every group's rewards."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer.batch import MicroBatch, ScoredGroups, group_costs, plan_micro_batches
from trainer.config import ConfigError, GRPOConfig, RunConfig
from trainer.data import PromptSampler, RowFile
from trainer.distributed import (
    DEFAULT_COLLECTIVE_TIMEOUT,
    Sharding,
    World,
    activation_bytes_per_position,
    joined,
)
from trainer.evaluation import BestCheckpoint, DivergenceWatch, Evaluator, checkpoint_figures
from trainer.failures import Failures
from trainer.generation import HFSampler, Sampler, make_sampler, takes_group_seeds
from trainer.logprobs import default_scoring, router_aux_loss_coef, token_logprobs
from trainer.loss import aggregate_loss, clipped_token_loss, group_advantages, sampler_correction
from trainer.metrics_file import MetricsFile
from trainer.model import Models, default_device, eos_token_ids, load_models
from trainer.optimizer import MasterWeightAdamW
from trainer.progress import Progress
from trainer.prompts import (
    PromptFormatter,
    check_a_prompt_fits,
    check_no_empty_prompt,
    truncated_prompts,
    warn_truncated_prompts,
)
from trainer.resume import apply_optimizer_settings, check_resumable
from trainer.rewards import RewardSuite, required_fields
from trainer.schedule import lr_lambda
from trainer.tracking import Tracker, WandbOptions

log = logging.getLogger(__name__)

FORWARD_TOKEN_BUDGET = 8192  # tokens per forward pass, padding included


@dataclass
class TrainResult:
    final_step: int
    stopped: bool  # Progress.should_stop() ended the run early
    checkpoint: Path | None  # the newest complete checkpoint
    best_checkpoint: Path | None = None  # the best by keep_best_by, when set and evaluated


def run_threads() -> int:
    """The intra-op thread count a run computes with. CPU kernels split their sums by thread, so
    the same seed gives bitwise different numbers (and, compounded over steps, different samples)
    with another count; the count a process happens to have (a forked worker child, a caller's
    torch.set_num_threads) must not decide it. OMP_NUM_THREADS where the operator sets it, else
    the CPUs this process may run on; a resume keeps the count its checkpoint recorded."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Rollouts:
    """Turns dataset rows into scored groups: each prompt formatted, ``group_size`` completions
    generated for it by ``sampler`` (by default the HF sampler on the policy), every completion
    scored by the rewards. The rows and the random generator are the caller's: training draws from
    its dataset, evaluation from the eval set with its own draws."""

    def __init__(
        self, models: Models, rewards: RewardSuite, config: GRPOConfig, sampler: Sampler | None = None
    ):
        self.models, self.rewards, self.config = models, rewards, config
        self.sampler = sampler if sampler is not None else HFSampler(models.policy)
        self.seeds_groups = takes_group_seeds(self.sampler)
        self.prompts = PromptFormatter(models.tokenizer, config.max_prompt_length)
        self.eos_token_ids = eos_token_ids(models.policy, models.tokenizer)

    def __call__(
        self,
        rows: Sequence[dict],
        row_indices: list[int],
        *,
        group_size: int,
        temperature: float,
        generator: torch.Generator,
        timings: dict,
        group_seeds: list[int] | None = None,
    ) -> ScoredGroups:
        """Scored groups for ``rows[i]`` of each ``i`` in ``row_indices``, sampled from ``generator``,
        or each from its own seed of ``group_seeds`` where the sampler takes them (see
        ``Sampler.generate``)."""
        tokenizer = self.models.tokenizer
        cfg = self.config
        raw = [rows[i]["prompt"] for i in row_indices]
        prompts = [self.prompts.text(p) for p in raw]
        full_ids = [self.prompts.ids(p, text) for p, text in zip(raw, prompts, strict=True)]
        prompt_ids = [torch.tensor(self.prompts.truncated(ids)) for ids in full_ids]
        started = time.perf_counter()
        rollout = self.sampler.generate(
            prompt_ids,
            group_size=group_size,
            max_new_tokens=cfg.max_completion_length,
            eos_token_ids=self.eos_token_ids,
            pad_id=tokenizer.pad_token_id,
            temperature=temperature,
            top_p=cfg.top_p,
            generator=generator,
            **({"group_seeds": group_seeds} if group_seeds is not None and self.seeds_groups else {}),
        )
        completions = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        timings["generate"] = timings.get("generate", 0.0) + time.perf_counter() - started

        started = time.perf_counter()
        repeated_prompts = [p for p in prompts for _ in range(group_size)]
        repeated_rows = [rows[i] for i in row_indices for _ in range(group_size)]
        scored = self.rewards(repeated_prompts, completions, repeated_rows)
        timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - started
        return ScoredGroups(
            row_indices=row_indices,
            prompt_ids=rollout.prompt_ids,
            completion_ids=rollout.completion_ids,
            prompts=prompts,
            completions=completions,
            truncated=rollout.truncated,
            rewards=torch.tensor(scored.total, dtype=torch.float32),
            parts=scored.parts,
            errors=scored.errors,
            error_messages=scored.error_messages,
            prompt_lengths=[len(ids) for ids in full_ids],
            sampler_logprobs=rollout.sampler_logprobs,
            sampler_is_policy=rollout.from_policy,
        )


def group_seed(seed: int, step: int, index: int) -> int:
    """The seed of the group of the ``index``-th prompt drawn at ``step`` (0-based, counting dynamic
    sampling's extra draws): its sampling depends on these three alone, so that it is the same in
    whichever process, beside whichever other prompts, it is generated."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63: any generator takes it


def draw_batch(
    rollouts: Rollouts,
    rows: Sequence[dict],
    sampler: PromptSampler,
    generator: torch.Generator,
    config: GRPOConfig,
    timings: dict,
    *,
    step: int,
    world: World | None = None,
) -> tuple[ScoredGroups, int]:
    """Sample prompts_per_step prompts of ``rows`` and their groups; with dynamic sampling, replace
    groups whose rewards are all equal by groups of fresh prompts, for at most max_resample_rounds
    draws. Returns the batch and how many extra prompts were drawn. Each process of ``world``
    generates its share of the groups and returns all of them, the same batch in every process."""
    G = config.group_size
    world = world or World()
    drawn = 0  # prompts drawn so far this step

    def roll(row_indices: list[int]) -> ScoredGroups:
        nonlocal drawn
        seeds = [group_seed(config.seed, step, drawn + i) for i in range(len(row_indices))]
        drawn += len(row_indices)
        mine = world.share(len(row_indices))
        part = (
            rollouts(
                rows,
                [row_indices[i] for i in mine],
                group_size=G,
                temperature=config.temperature,
                generator=generator,
                timings=timings,
                group_seeds=[seeds[i] for i in mine],
            )
            if mine
            else None
        )
        return world.gather_groups(part, len(row_indices), G)

    batch = roll(sampler.draw(config.prompts_per_step))
    if not config.dynamic_sampling:
        return batch, 0
    draws = [batch]
    _, zero_std = group_advantages(batch.rewards, G)
    informative = [batch.select([b], G) for b in range(len(zero_std)) if not zero_std[b]]
    flat = [batch.select([b], G) for b in range(len(zero_std)) if zero_std[b]]
    extra = 0
    for _ in range(config.max_resample_rounds):
        missing = config.prompts_per_step - len(informative)
        if missing == 0:
            break
        fresh = roll(sampler.draw(missing))
        draws.append(fresh)
        extra += missing
        _, fresh_zero = group_advantages(fresh.rewards, G)
        informative += [fresh.select([b], G) for b in range(missing) if not fresh_zero[b]]
        flat += [fresh.select([b], G) for b in range(missing) if fresh_zero[b]]
    chosen = ScoredGroups.concat((informative + flat)[: config.prompts_per_step])
    # Reward errors count once each over every completion scored this step, the groups dynamic
    # sampling dropped included: an erroring reward makes flat groups, which would otherwise hide it.
    chosen.errors = {name: sum(d.errors.get(name, 0) for d in draws) for name in batch.errors}
    chosen.error_messages = list(dict.fromkeys(m for d in draws for m in d.error_messages))[:5]
    return chosen, extra


def token_values(values: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
    """Spread per-completion values [B*G] onto the micro-batch's tokens -> [N]."""
    return values[micro.sequences][micro.seq_index]


def train(
    run: RunConfig,
    output_dir: str | Path,
    progress: Progress | None = None,
    *,
    resume: bool = False,
    device: torch.device | None = None,
    wandb: WandbOptions | None = None,
    collective_timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT,
) -> TrainResult:
    """Run GRPO as ``run`` says, writing ``output_dir/metrics.jsonl``, ``output_dir/checkpoints/`` and
    TensorBoard event files in ``output_dir/tensorboard/`` (and to W&B, given ``wandb``).
    With ``resume``, continue from the newest complete checkpoint there (none: start fresh).
    Raises ``TrainingError`` subclasses whose message is meant for the user.

    Under torchrun every process of the job calls it and they train as one (``trainer.distributed``;
    collectives give up after ``collective_timeout``): rank 0 alone reports to ``progress`` and W&B
    and writes the output directory, which every process must see."""
    cfg = run.hyperparameters
    run.check_eval_settings()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # Rows are read from disk when drawn (the file's line offsets stay in memory, not the rows).
    rows = RowFile(run.dataset, required=required_fields(run.reward))
    eval_rows = RowFile(run.eval_dataset) if run.eval_dataset else []
    with joined(collective_timeout) as world:
        if world.size > 1 and cfg.generation != "hf":
            raise ConfigError(
                "hyperparameters.generation",
                f"a job on {world.size} processes generates with its own model ('hf'); "
                f"generation {cfg.generation!r} runs on one process (gpus: 1)",
            )
        if not world.is_main:  # rank 0 alone reports
            progress, wandb = None, None
        progress = progress or Progress()
        with (
            # a reward model runs where the policy does (each process on its own device)
            RewardSuite(
                run.reward, device=device or world.device or default_device(), policy=run.policy
            ) as rewards,
            Tracker(output_dir, config=run.to_spec(), wandb=wandb, on_log=progress.on_log) as tracker,
            contextlib.ExitStack() as cleanup,  # closes what _train opens once the models are loaded
        ):
            return _train(
                run,
                rows,
                eval_rows,
                rewards,
                output_dir,
                progress,
                tracker,
                cleanup,
                resume=resume,
                device=device or world.device,
                world=world,
            )


def _train(
    run: RunConfig,
    rows: Sequence[dict],
    eval_rows: Sequence[dict],
    rewards: RewardSuite,
    output_dir: Path,
    progress: Progress,
    tracker: Tracker,
    cleanup: contextlib.ExitStack,
    *,
    resume: bool,
    device: torch.device | None,
    world: World,
) -> TrainResult:
    cfg = run.hyperparameters
    G = cfg.group_size
    start_step, latest = 0, ckpt.latest_checkpoint(output_dir) if resume else None
    state = ckpt.load_training_state(latest) if latest is not None else None
    if latest is not None and state is not None:  # before anything loads: a run that cannot go on stops
        changed = check_resumable(state.extra, run, len(rows), latest.name)
        if changed:
            progress.on_log(
                "warning",
                f"resuming with settings changed since checkpoint {latest.name}: {'; '.join(changed)}; "
                f"the run trains with the new values from step {state.step + 1} on",
            )
    models = load_models(run.base_model, cfg, device, on_log=progress.on_log)
    policy, tokenizer = models.policy, models.tokenizer
    if latest is not None:  # every process reads the whole weights, before they are sharded
        ckpt.load_policy_weights(policy, latest, models.uses_lora)
    sharding = Sharding(world, policy, models.reference)  # with several processes: FSDP2
    # each process's shards of them: read before any gather (a gathered model lists its full weights)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = MasterWeightAdamW(  # AdamW; float32 masters of half-precision weights
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    sampler = PromptSampler(len(rows), cfg.seed)
    generator = torch.Generator(next(policy.parameters()).device).manual_seed(cfg.seed)
    check_a_prompt_fits(PromptFormatter(tokenizer, cfg.max_prompt_length), rows)
    if eval_rows:
        check_no_empty_prompt(PromptFormatter(tokenizer, cfg.max_prompt_length), eval_rows, "eval dataset")
    # The sampler is made once the data is known to fit (a vLLM engine takes a while to start) and
    # closed when the run ends, however it ends.
    generation = cleanup.enter_context(contextlib.closing(make_sampler(cfg, policy)))
    rollouts = Rollouts(models, rewards, cfg, generation)
    failures = Failures(cfg, output_dir, policy, progress)
    # Evaluation has its own generator (reseeded per evaluation): it never moves the training draws.
    evaluator = Evaluator(rollouts, eval_rows, cfg, torch.Generator(generator.device)) if eval_rows else None
    best, divergence = BestCheckpoint(cfg.keep_best_by), DivergenceWatch()

    num_tokens_seen = 0  # prompt and completion tokens of every step so far (TRL's num_tokens)
    threads = run_threads()
    if latest is not None and state is not None:
        ckpt.load_optimizer_state(policy, optimizer, latest)
        scheduler.load_state_dict(state.scheduler)
        # the spec's learning rate, betas and weight decay, not the ones the checkpoint's states carry
        apply_optimizer_settings(optimizer, scheduler, cfg)
        sampler.load_state_dict(state.extra["sampler"])
        generator.set_state(state.rng["generator"])
        torch.set_rng_state(state.rng["torch"])
        if state.rng.get("cuda") is not None and torch.cuda.is_available() and world.size == 1:
            # dropout's draws on the GPU (rank 0 writes rng.pt: its state is no other rank's)
            torch.cuda.set_rng_state(state.rng["cuda"])
        random.setstate(state.rng["python"])
        start_step = state.step
        num_tokens_seen = int(state.extra.get("num_tokens", 0))
        threads = int(state.extra.get("torch_threads") or threads)  # a resume elsewhere reduces alike
        best.load_state_dict(state.extra.get("best"))
        divergence.load_state_dict(state.extra.get("divergence"))
        generation.sync(policy)  # the checkpoint's weights, not the base's
        progress.on_log("info", f"resumed from checkpoint {latest.name} (step {start_step})")
    metrics_file = (
        MetricsFile(output_dir / "metrics.jsonl", keep_through=start_step, on_log=progress.on_log)
        if world.is_main
        else None
    )
    torch.set_num_threads(threads)

    def run_evaluation(step: int) -> dict[str, float]:
        assert evaluator is not None
        sharding.gather()  # rank 0 evaluates with the full weights; the others wait for its figures
        evaluation = None
        if world.is_main:
            with failures.during(step, "evaluation"):
                evaluation = evaluator(step)
        evaluation = world.broadcast(evaluation)
        warning = divergence.observe(step, evaluation["eval/reward"])
        if warning:
            progress.on_log("warning", f"step {step}: {warning}")
        return evaluation

    def save(step: int, evaluation: dict[str, float] | None) -> Path:
        if evaluation is not None:
            best.consider(step, evaluation)
        state = ckpt.TrainingState(
            step=step,
            scheduler=scheduler.state_dict(),
            rng={
                "generator": generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "python": random.getstate(),
            },
            extra={
                "sampler": sampler.state_dict(),
                "config": run.to_spec(),
                "dataset_rows": len(rows),  # a resume on other data is refused (trainer.resume)
                "num_tokens": num_tokens_seen,
                "torch_threads": threads,
                "eval": checkpoint_figures(evaluation or {}) or None,
                "best": best.state_dict(),
                "divergence": divergence.state_dict(),
                "processes": world.size,
            },
        )
        sharding.reshard()  # the checkpoint reads each process's shards
        with failures.saving(step):
            path = ckpt.save_checkpoint(output_dir, policy, tokenizer, optimizer, state, world)
        progress.on_checkpoint(step, path)
        if world.is_main:
            ckpt.prune_checkpoints(
                output_dir,
                keep_last=cfg.keep_last_checkpoints,
                keep_steps=() if best.step is None else (best.step,),
                on_removed=progress.on_checkpoint_removed,
            )
        if evaluation is not None:
            progress.on_evaluation(step, checkpoint_figures(evaluation), best_step=best.step)
        return path

    progress.on_start(start_step=start_step, max_steps=cfg.max_steps)
    step, stopped = start_step, False
    truncation_warnings: set[int] = set()  # rows a warning event named
    for step in range(start_step + 1, cfg.max_steps + 1):
        step_started = time.perf_counter()
        timings: dict[str, float] = {}

        # 1-2. sample prompts, generate G completions each, score them (each process its share of
        # the groups, with the full weights; every process then holds every group)
        with failures.during(step, "generation and scoring"):
            sharding.gather()
            batch, extra_prompts = draw_batch(
                rollouts, rows, sampler, generator, cfg, timings, step=step, world=world
            )
        truncation_warnings = warn_truncated_prompts(
            step, batch, rows, cfg.max_prompt_length, progress, truncation_warnings
        )

        # 3. advantages; which completions need a forward/backward at all
        started = time.perf_counter()
        advantages, zero_std = group_advantages(batch.rewards, G, cfg.scale_rewards)  # [B*G], [B]
        lengths = torch.tensor([c.shape[0] for c in batch.completion_ids])  # [B*G]
        loss_mask = (
            ~batch.truncated if cfg.mask_truncated_completions else torch.ones_like(batch.truncated)
        )  # [B*G]
        # With beta = 0 a zero-advantage completion has zero loss and zero gradient: skip its pass,
        # but keep it in the normalising counts below (not where the router's aux loss needs its tokens).
        skip_zero = cfg.beta == 0 and not router_aux_loss_coef(policy)
        active = loss_mask & ((advantages != 0) if skip_zero else torch.ones_like(loss_mask))  # [B*G]
        num_sequences, num_tokens = len(batch.completion_ids), int(lengths[loss_mask].sum())
        # this process's groups (the counts above are the step's), dealt so that every process has
        # about as many token positions to score, and cut as this step trains them
        mine = world.sequences(len(batch.prompt_ids), G, training_costs(batch, active, models, cfg))  # [B*G]
        micro_batches, step_models = plan_training(batch, active & mine, models, cfg, sharding)

        # 4. loss / backward / optimizer step, num_iterations times over the same batch
        with failures.during(step, "the forward and backward passes"):
            stats = optimize(
                step_models,
                micro_batches,
                advantages,
                cfg,
                num_sequences=num_sequences,
                num_tokens=num_tokens,
                params=params,
                optimizer=optimizer,
                scheduler=scheduler,
                sharding=sharding,
            )
        if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
            raise failures.non_finite_loss(step, stats["loss"], stats["grad_norm"])
        timings["train"] = time.perf_counter() - started
        started = time.perf_counter()
        with failures.during(step, "the weight sync to the sampler"):
            generation.sync(policy)  # the next rollout samples from the updated policy
        timings["sync"] = time.perf_counter() - started

        # 5. metrics
        metrics = step_metrics(batch, advantages, zero_std, lengths, stats, timings, cfg)
        metrics["learning_rate"] = stats["learning_rate"]
        if cfg.dynamic_sampling:
            metrics["dynamic_sampling/extra_prompts"] = float(extra_prompts)
        metrics["step_seconds"] = time.perf_counter() - step_started
        step_tokens = sum(p.shape[0] for p in batch.prompt_ids) * G + int(lengths.sum())
        num_tokens_seen += step_tokens
        metrics["tokens_per_second"] = step_tokens / metrics["step_seconds"]
        metrics["num_tokens"] = float(num_tokens_seen)
        # every checkpoint is evaluated (and every eval_every steps); its figures join the step's metrics
        checkpoint_due = step == cfg.max_steps or bool(
            cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        )
        divergence.add_training_reward(metrics["reward"])
        evaluation = None
        if evaluator is not None and (checkpoint_due or (cfg.eval_every and step % cfg.eval_every == 0)):
            evaluation = run_evaluation(step)
            metrics.update(evaluation)
        if metrics_file is not None:  # rank 0
            metrics_file.append(step, metrics)
            tracker.log(step, metrics)
        progress.on_step(step, metrics)
        progress.on_samples(step, samples(batch, advantages, cfg))
        if sum(batch.errors.values()):
            progress.on_log(
                "warning",
                f"step {step}: {sum(batch.errors.values())} reward errors: "
                + "; ".join(batch.error_messages),
            )
        failures.check_rewards(step, batch)

        # 6-7. checkpoint, stop check (rank 0's answer)
        stopped = world.broadcast(progress.should_stop()) and step < cfg.max_steps
        if stopped or checkpoint_due:
            if evaluator is not None and evaluation is None:  # a pause or cancel's checkpoint
                evaluation = run_evaluation(step)
            save(step, evaluation)
        if stopped:
            break

    best_path = (
        output_dir / "checkpoints" / ckpt.checkpoint_name(best.step) if best.step is not None else None
    )
    return TrainResult(
        final_step=step,
        stopped=stopped,
        checkpoint=ckpt.latest_checkpoint(output_dir),
        best_checkpoint=best_path,
    )


def training_costs(batch: ScoredGroups, active: torch.Tensor, models: Models, cfg: GRPOConfig) -> list[int]:
    """[B] the token positions each group's training scores (``group_costs``): as one padded forward
    where the step trains layer by layer for certain (``fsdp_reshard`` "layer"), else on the leanest
    scoring."""
    lean = models.scoring or default_scoring(models.policy)
    return group_costs(
        batch,
        active,
        cfg.group_size,
        share_prompt=lean.share_prompt,
        token_budget=FORWARD_TOKEN_BUDGET,
        one_forward=cfg.fsdp_reshard == "layer",
    )


def plan_training(
    batch: ScoredGroups, mine: torch.Tensor, models: Models, cfg: GRPOConfig, sharding: Sharding
) -> tuple[list[MicroBatch], Models]:
    """This process's ``mine`` [B*G] completions cut into micro-batches, and the models with the
    scoring they train with: the leanest, or, where several processes train layer by layer this
    step (``Sharding.choose``), one padded forward per micro-batch."""
    lean = models.scoring or default_scoring(models.policy)
    plan = plan_micro_batches(
        batch, mine, cfg.group_size, FORWARD_TOKEN_BUDGET, share_prompt=lean.share_prompt
    )
    if not sharding.sharded:
        return plan, models
    padded = plan_micro_batches(batch, mine, cfg.group_size, FORWARD_TOKEN_BUDGET, one_forward=True)
    largest = [max((m.positions for m in cut), default=0) for cut in (padded, plan)]
    position = activation_bytes_per_position(models.policy, cfg.gradient_checkpointing)
    if not sharding.choose(cfg.fsdp_reshard, *largest, position):
        return plan, models
    return padded, dataclasses.replace(models, scoring=dataclasses.replace(lean, one_forward=True))


def micro_logprobs(
    model: torch.nn.Module,
    micro: MicroBatch,
    models: Models,
    cfg: GRPOConfig,
    *,
    with_entropy: bool = False,
    router_aux_loss: bool = False,
):
    """Per-token log-probs [N] of a micro-batch's completions, in its order (and entropies [N], and
    the router's load-balancing loss [] with ``router_aux_loss``)."""
    scored = token_logprobs(
        model,
        [g.prompt for g in micro.groups],
        [g.completions for g in micro.groups],
        temperature=cfg.temperature,
        scoring=models.scoring,
        with_entropy=with_entropy,
        chunk_size=cfg.logprob_chunk_size,
        token_budget=FORWARD_TOKEN_BUDGET,
        router_aux_loss=router_aux_loss,
    )
    scored, aux = scored if router_aux_loss else (scored, None)
    flat = (
        torch.cat([t for group in scored for t in group])
        if not with_entropy
        else tuple(torch.cat([t for group in nested for t in group]) for nested in scored)
    )
    return (flat, aux) if router_aux_loss else flat


def optimize(
    models: Models,
    micro_batches: list[MicroBatch],
    advantages: torch.Tensor,
    cfg: GRPOConfig,
    *,
    num_sequences: int,
    num_tokens: int,
    params,
    optimizer,
    scheduler,
    sharding: Sharding | None = None,
) -> dict[str, float]:
    """``num_iterations`` optimizer steps over ``micro_batches`` (this process's, when ``sharding``
    spreads the job over several: then the returned figures are every process's together)."""
    policy = models.policy
    sharding = sharding or Sharding(World())
    world = sharding.world
    with torch.no_grad():  # the reference, and pi_old when the batch is reused (mu > 1)
        if cfg.beta > 0:
            with models.reference_model() as reference, sharding.gathered_reference():
                reference.eval()
                for micro in micro_batches:
                    micro.ref_logps = micro_logprobs(reference, micro, models, cfg)
        if cfg.num_iterations > 1:
            sharding.gather()
            policy.eval()
            for micro in micro_batches:
                micro.old_logps = micro_logprobs(policy, micro, models, cfg)

    totals = {
        "loss": 0.0,
        "kl": 0.0,
        "entropy": 0.0,
        "low": 0.0,
        "high": 0.0,
        "tokens": 0.0,
        "grad_norm": 0.0,
    }
    # How far the sampler's log-probs are from the trainer's, over the tokens scored: for the
    # sampler/* metrics, every backend (the correction uses them only where cfg asks for it).
    mismatch = {"tokens": 0.0, "ratio": 0.0, "ratio_max": 0.0, "ratio_min": math.inf, "cut": 0.0, "diff": 0.0}
    # A mixture-of-experts config that asks for router logits gets its load-balancing loss added,
    # coef * aux_loss, as TRL and the model's own forward do; each micro-batch's aux loss weighs by
    # its share of the step's scored completions (TRL: by gradient-accumulation step).
    aux_coef = router_aux_loss_coef(policy)
    scored_sequences = world.reduce({"n": sum(len(micro.sequences) for micro in micro_batches)})["n"]
    if aux_coef:
        totals["aux_loss"] = 0.0
    policy.train()
    idle_passes = sharding.micro_batch_gap(len(micro_batches))  # as many passes as the busiest process's
    rates: list[float] = []  # the learning rate of each of the step's updates
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        iteration_loss = 0.0
        with sharding.training(reduce=scored_sequences > 0):  # several processes: summed into the shards
            for micro in micro_batches:
                if aux_coef:
                    (logps, entropy), aux = micro_logprobs(
                        policy, micro, models, cfg, with_entropy=True, router_aux_loss=True
                    )  # [N], [N], []
                else:
                    logps, entropy = micro_logprobs(policy, micro, models, cfg, with_entropy=True)  # [N], [N]
                # pi_old: the policy that sampled; with mu = 1 that is this very forward, detached
                old_logps = micro.old_logps if micro.old_logps is not None else logps.detach()  # [N]
                # the batch is planned on the CPU; the loss is computed where the policy runs
                seq_index = micro.seq_index.to(logps.device)  # [N]
                token_advantages = token_values(advantages, micro).to(logps.device)  # [N]
                correction = None
                if micro.sampler_logps is not None:
                    correction = sampler_correction(
                        old_logps,
                        micro.sampler_logps.to(old_logps.device),
                        seq_index,
                        len(micro.sequences),
                        # the policy module sampled: the two differ by rounding, not reweighted
                        None if micro.sampler_is_policy else cfg.sampler_correction,
                        cfg.sampler_correction_cap,
                    )
                    if iteration == 0 and logps.shape[0]:  # pi_old is fixed: the same figures every pass
                        diff = (old_logps - micro.sampler_logps.to(old_logps.device)).abs()  # [N]
                        mismatch["tokens"] += logps.shape[0]
                        mismatch["ratio"] += correction.ratio.sum().item()
                        mismatch["ratio_max"] = max(mismatch["ratio_max"], correction.ratio.max().item())
                        mismatch["ratio_min"] = min(mismatch["ratio_min"], correction.ratio.min().item())
                        mismatch["cut"] += correction.cut.sum().item()
                        mismatch["diff"] += diff.sum().item()
                terms = clipped_token_loss(
                    logps,
                    old_logps,
                    token_advantages,
                    seq_index,
                    len(micro.sequences),
                    epsilon=cfg.epsilon,
                    epsilon_high=cfg.epsilon_upper,
                    delta=cfg.delta,
                    beta=cfg.beta,
                    ref_logps=micro.ref_logps,
                    importance_sampling_level=cfg.importance_sampling_level,
                    sampler_weights=correction.weights if correction is not None else None,
                )
                loss = aggregate_loss(
                    terms.loss,
                    seq_index,
                    len(micro.sequences),
                    cfg.loss_type,
                    num_sequences=num_sequences,
                    num_tokens=num_tokens,
                    max_completion_length=cfg.max_completion_length,
                )
                if aux_coef:
                    share = len(micro.sequences) / scored_sequences
                    loss = loss + aux_coef * aux * share
                    totals["aux_loss"] += aux.item() * share / cfg.num_iterations
                loss.backward()
                iteration_loss += loss.item()
                totals["tokens"] += logps.shape[0]
                totals["entropy"] += entropy.sum().item()
                totals["low"] += terms.low_clipped.sum().item()
                totals["high"] += terms.high_clipped.sum().item()
                if terms.kl is not None:
                    totals["kl"] += terms.kl.detach().sum().item()
            for _ in range(idle_passes):
                sharding.idle_pass(models.scoring)
        totals["loss"] += world.reduce({"loss": iteration_loss})["loss"] / cfg.num_iterations
        # No process scored anything: no gradient anywhere and no update, as in one process.
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, max_norm) if scored_sequences else torch.tensor(0.0)
        )
        totals["grad_norm"] += grad_norm.item() / cfg.num_iterations
        if not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm.item())):
            return totals  # the caller fails the run before any bad update lands
        rates.append(optimizer.param_groups[0]["lr"])  # this update's rate, before the schedule moves
        optimizer.step()
        scheduler.step()
    # The step's figures: every process's sums together (the loss and grad norm are already).
    totals.update(world.reduce({k: v for k, v in totals.items() if k not in ("loss", "grad_norm")}))
    # What the step trained at (as TRL logs it: read before the scheduler steps), the same in every
    # process; with num_iterations > 1, the mean of its updates' rates.
    totals["learning_rate"] = sum(rates) / len(rates)
    mismatch.update(world.reduce({k: mismatch[k] for k in ("tokens", "ratio", "cut", "diff")}))
    mismatch.update(world.reduce({"ratio_max": mismatch["ratio_max"]}, "max"))
    mismatch.update(world.reduce({"ratio_min": mismatch["ratio_min"]}, "min"))
    if mismatch["tokens"]:
        tokens = mismatch["tokens"]
        totals["sampler/ratio_mean"] = mismatch["ratio"] / tokens
        totals["sampler/ratio_max"] = mismatch["ratio_max"]
        totals["sampler/ratio_min"] = mismatch["ratio_min"]
        totals["sampler/clipped_fraction"] = mismatch["cut"] / tokens
        totals["sampler/logprob_diff_mean_abs"] = mismatch["diff"] / tokens
    return totals


def step_metrics(
    batch: ScoredGroups, advantages, zero_std, lengths, stats, timings, cfg: GRPOConfig
) -> dict[str, float]:
    G = cfg.group_size
    grouped = batch.rewards.view(-1, G)  # [B, G]
    metrics = {
        "reward": batch.rewards.mean().item(),
        "reward_std": grouped.std(dim=1).mean().item(),
        "frac_reward_zero_std": zero_std.float().mean().item(),
        "loss": stats["loss"],
        "grad_norm": stats["grad_norm"],
    }
    if cfg.beta == 0:
        metrics["kl"] = 0.0  # no reference, no KL term
    # Figures over the tokens trained on: with beta 0 a completion whose advantage is 0 is not
    # scored (it has no gradient), and masked truncated completions never are. A step that scored
    # no token has none of them, as sampler/* (an average over nothing is not 0: entropy 0 would
    # read as a collapsed policy).
    tokens = stats["tokens"]
    if tokens:
        if cfg.beta > 0:
            metrics["kl"] = stats["kl"] / tokens
        metrics["entropy"] = stats["entropy"] / tokens
        metrics["clip_ratio/low"] = stats["low"] / tokens
        metrics["clip_ratio/high"] = stats["high"] / tokens
        metrics["clip_ratio"] = (stats["low"] + stats["high"]) / tokens
    metrics |= {
        "completion_length": lengths.float().mean().item(),
        "completion_length/min": lengths.min().item(),
        "completion_length/max": lengths.max().item(),
        "truncated_ratio": batch.truncated.float().mean().item(),
        "prompts_truncated": float(len(truncated_prompts(batch))),
        "prompt_truncated_ratio": len(truncated_prompts(batch)) / max(len(batch.prompt_ids), 1),
        "reward_errors": float(sum(batch.errors.values())),
        "time/generate": timings.get("generate", 0.0),
        "time/reward": timings.get("reward", 0.0),
        "time/train": timings.get("train", 0.0),
        "time/sync": timings.get("sync", 0.0),
    }
    if "aux_loss" in stats:
        metrics["aux_loss"] = stats["aux_loss"]
    metrics.update({name: value for name, value in stats.items() if name.startswith("sampler/")})
    for name, values in batch.parts.items():
        scored = [v for v in values if v is not None]
        metrics[f"rewards/{name}"] = sum(scored) / len(scored) if scored else float("nan")
        if batch.errors.get(name):
            metrics[f"reward_errors/{name}"] = float(batch.errors[name])
    return metrics


def samples(batch: ScoredGroups, advantages: torch.Tensor, cfg: GRPOConfig) -> list[dict]:
    """The first completion of the first few groups: what the model writes, and what it earned."""
    picked = []
    for b in range(min(cfg.num_samples_logged, len(batch.prompts))):
        i = b * cfg.group_size
        picked.append(
            {
                "prompt": batch.prompts[b],
                "completion": batch.completions[i],
                "reward": batch.rewards[i].item(),
                "advantage": advantages[i].item(),
                "rewards": {k: v[i] for k, v in batch.parts.items()},
                "truncated": bool(batch.truncated[i]),
            }
        )
    return picked
