"""One job on several processes: ``torchrun`` starts them, ``torch.distributed`` joins them, FSDP2
shards the model over them.

Who does what. Every process generates and scores whole groups, its share of the step's prompts
(the b-th prompt drawn goes to process b mod N), each group sampling from a seed of its own
(``trainer.loop.group_seed``), so that a group's completions do not depend on which process drew
it. The scored groups are then exchanged: every process holds the whole step, and computes from it
what one process would (advantages with batch-level scaling, dynamic sampling's decisions, the
loss's normalising counts, the metrics), with the same numbers. The groups to train are then
dealt to the processes by the token positions each scores (``World.sequences``), whoever generated
them; the gradients are summed. Rank 0 alone reports (metrics, progress, checkpoints, the stop
check, whose answer it broadcasts).

The model. ``fully_shard`` (FSDP2) on every decoder layer and on the root (the embeddings, the
final norm and the LM head), for the policy and for a separate reference. Between steps a process
holds its shard of the weights, of the gradients and of the optimizer's state. ``Sharding`` moves
the policy between these states:

- gathered (``gather``): the full weights on every process, for generation and the forwards with
  no gradient (the reference, pi_old, the evaluation). FSDP's per-layer collectives must pair up
  across processes, and generation runs as many forwards as each process's longest completion
  needs, so the weights are gathered once, explicitly, and every forward runs locally.
- training (``training``): each decoder layer's weights gathered for its forward and again for its
  backward, freed after each, its gradient summed into the shards in its backward (FSDP's own
  hooks, per layer), so a process holds one layer's full weights and gradients at a time. For the
  collectives to pair, every process runs the same forwards in the same order: each micro-batch is
  one padded forward (``Scoring.one_forward``), and a process with fewer micro-batches than
  another runs empty ones (``idle_pass``). The root's weights stay gathered for the phase (the
  scorer reads the LM head's weight directly, outside any forward FSDP sees); its gradients are
  summed into its shards at the end of each backward.
- or training gathered for the step: the full weights from the gathered state, every forward and
  backward local with the leanest scoring (the prompt's KV cache shared across its group), the
  gradients accumulated whole, then summed into the shards by one forward/backward every process
  runs alike. It holds every layer's full weights and gradients while the step trains, but no
  padding: on a small model, or short completions of long prompts, that is less memory (and far
  less communication) than layer by layer. ``choose`` picks per step (``fsdp_reshard``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainer.batch import ScoredGroups
from trainer.errors import ModelLoadError

# How long a process waits in a collective for the others. A dead process ends the job at once
# (torchrun stops the others, a closed connection fails theirs); this bounds a *stuck* one. It must
# outlast the longest phase one process can run while the others wait: its share of the step's
# generation and rewards.
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the job's processes (one process alone: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None  # the process's device; None: the run's default

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports, writes and decides."""
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """Which of ``count`` prompts this process generates: the b-th with b mod size == rank."""
        return list(range(self.rank, count, self.size))

    def sequences(self, num_groups: int, group_size: int, costs: Sequence[int] | None = None) -> torch.Tensor:
        """[B*G] bool: the completions of the groups this process trains on. With ``costs`` (each
        group's work, [B]), the groups are dealt longest first, each to the process with the least
        work so far (the lower rank on a tie), so that no process waits long for another at the
        gradients' sum: every process holds the whole step, so any split sums to the same gradient.
        Without, its ``share``."""
        if costs is None or self.size == 1:
            owned = torch.arange(num_groups).remainder(self.size) == self.rank  # [B]
        else:
            load, owner = [0] * self.size, [0] * num_groups
            for b in sorted(range(num_groups), key=lambda b: (-costs[b], b)):
                owner[b] = min(range(self.size), key=lambda r: (load[r], r))
                load[owner[b]] += costs[b]
            owned = torch.tensor(owner) == self.rank  # [B]
        return owned.repeat_interleave(group_size)  # [B*G]

    def gather_groups(self, part: ScoredGroups | None, count: int, group_size: int) -> ScoredGroups:
        """Every process's scored groups (``part``: this one's ``share(count)``, None for none), in
        the order their prompts were drawn."""
        if self.size == 1:
            assert part is not None
            return part
        parts: list[ScoredGroups | None] = [None] * self.size
        dist.all_gather_object(parts, part)
        drawn = [b for rank, p in enumerate(parts) if p is not None for b in range(rank, count, self.size)]
        position = {b: i for i, b in enumerate(drawn)}
        joined = ScoredGroups.concat([p for p in parts if p is not None])
        return joined.select([position[b] for b in range(count)], group_size)

    def reduce(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        """``values`` summed (``op`` "sum"), or their max or min, over the processes."""
        if self.size == 1 or not values:
            return dict(values)
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        names = sorted(values)
        tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=ops[op])
        return dict(zip(names, tensor.tolist(), strict=True))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every process."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


@contextlib.contextmanager
def joined(timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT) -> Iterator[World]:
    """This process's ``World``: under torchrun (``WORLD_SIZE`` > 1) the job's processes joined into
    one process group for the duration (gloo on CPUs, NCCL on GPUs, each process on the GPU of its
    ``LOCAL_RANK``), collectives failing after ``timeout``; else one process alone. A group the
    caller already initialised is used as it is, and left open."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and not dist.is_initialized():
        yield World()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    try:
        yield World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)
        if created:  # every process's collectives done before the group goes (gloo aborts a
            dist.barrier()  # process whose pair is torn down mid-transfer); not after a failure
    finally:
        if created:
            dist.destroy_process_group()


class Sharding:
    """The policy (and a reference of its own, under full fine-tuning with beta > 0) sharded with
    FSDP2 over ``world``'s processes; with one process nothing is sharded and every method does
    nothing. See the module docstring for the two states."""

    def __init__(
        self, world: World, policy: torch.nn.Module | None = None, reference: torch.nn.Module | None = None
    ):
        self.world = world
        sharded = world.size > 1 and policy is not None
        self.policy = policy if sharded else None
        # what training gathered for the step holds that layer by layer does not: the decoder
        # layers' full weights and their gradients (counted before fully_shard splits them)
        self.layer_bytes = (
            sum(
                p.numel() * p.element_size() * (2 if p.requires_grad else 1)
                for layer in decoder_layers(policy)
                for p in layer.parameters()
            )
            if sharded
            else 0
        )
        self.policy_units = shard(policy, world) if sharded else []
        self.reference_units = shard(reference, world) if sharded and reference is not None else []
        self.gathered = False
        self.by_layer = False  # this step's training state (``choose``)

    @property
    def sharded(self) -> bool:
        return self.policy is not None

    def gather(self) -> None:
        """The policy's full weights on every process, until ``reshard`` or ``training``
        (collective: every process calls it at the same point of the step)."""
        if self.gathered or not self.policy_units:
            return
        for unit in self.policy_units:
            unit.unshard()
        drop_shards(self.policy_units)
        self.gathered = True

    def reshard(self) -> None:
        """Back to each process's shard of the weights (what the optimizer and a checkpoint use)."""
        if self.gathered:
            restore_shards(self.policy_units, self.world)
        for unit in self.policy_units:
            unit.reshard()
        self.gathered = False

    @contextlib.contextmanager
    def gathered_reference(self) -> Iterator[None]:
        """The reference's full weights for the duration (collective): a separate reference's; else
        the policy's (under LoRA the reference is the policy with its adapters off). Layer by layer
        the policy's are freed meanwhile; a step that trains gathered keeps them, as its training will
        hold them with their gradients, rather than gather them again (0.3 s a step saved at 24M
        parameters on gloo, for ~4% more peak memory: bench/RESULTS.md)."""
        if not self.reference_units:
            self.gather()
            yield
            return
        if self.by_layer:
            self.reshard()
        for unit in self.reference_units:
            unit.unshard()
        drop_shards(self.reference_units)
        try:
            yield
        finally:
            restore_shards(self.reference_units, self.world)
            # FSDP records every forward's order for the backward's prefetching, and clears it in
            # a backward, which the reference never runs: clear it here (this reshards it too)
            self.reference_units[0].reset_iter_state()

    def choose(self, setting: str, padded_positions: int, lean_positions: int, position_bytes: int) -> bool:
        """Whether this step trains layer by layer (module docstring): ``setting`` "layer" or
        "step", or "auto": layer by layer where that holds less memory, i.e. where the activations
        of the positions its padding adds to the largest micro-batch of any process (this one's
        largest holds ``padded_positions`` padded, ``lean_positions`` on the leanest scoring),
        ``position_bytes`` each, weigh less than every decoder layer's full weights and gradients.
        The same answer on every process (collective)."""
        if not self.sharded:
            self.by_layer = False
        elif setting == "auto":
            largest = self.world.reduce({"padded": padded_positions, "lean": lean_positions}, "max")
            self.by_layer = (largest["padded"] - largest["lean"]) * position_bytes < self.layer_bytes
        else:
            self.by_layer = setting == "layer"
        return self.by_layer

    def micro_batch_gap(self, count: int) -> int:
        """How many empty micro-batches (``idle_pass``) this process runs after its ``count``
        real ones so that, layer by layer, every process runs as many as the busiest (collective)."""
        if not self.by_layer:
            return 0
        return int(self.world.reduce({"n": count}, "max")["n"]) - count

    @contextlib.contextmanager
    def training(self, *, reduce: bool = True) -> Iterator[None]:
        """This step's training state (``choose``) for an optimizer step's forwards and backwards,
        after which every process's gradients are summed into the shards (collective). ``reduce``
        False: no process has a gradient (nothing was scored anywhere), and none is made."""
        if not self.sharded:
            yield
            return
        if not self.by_layer:
            self.gather()
            try:
                yield
                # the shards back before FSDP's reduce, which reshards (frees the full weights)
                restore_shards(self.policy_units, self.world)
                self.gathered = False
                if reduce:
                    self._reduce_gathered_gradients()
            finally:
                self.reshard()
            return
        root, layers = self.policy_units[0], self.policy_units[1:]
        self.reshard()
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
        for unit in self.policy_units:
            unit.set_requires_gradient_sync(True, recurse=False)
            unit.set_reshard_after_backward(unit is not root, recurse=False)
        root.unshard()
        drop_shards([root])  # gathered for the phase: its own shard meanwhile freed
        try:
            yield
        finally:
            restore_shards([root], self.world)  # before the reshard frees its full weights
            for unit in self.policy_units:
                unit.set_reshard_after_forward(False, recurse=False)
                unit.set_requires_gradient_sync(False, recurse=False)
                unit.set_reshard_after_backward(False, recurse=False)
            self.reshard()

    def _reduce_gathered_gradients(self) -> None:
        """Sum every process's accumulated gradients into each one's shard. Each process's loss is
        its own groups' share of the step's loss, normalised by the whole step's counts, so the sum
        is the one-process gradient. FSDP reduces in a backward: one forward/backward of a single
        token through the root, run alike on every process whatever its micro-batches were, whose
        zero loss adds nothing; in eval mode, so that no dropout draws random numbers."""
        policy, was_training = self.policy, self.policy.training
        policy.eval()
        policy.set_requires_gradient_sync(True)
        policy.set_reshard_after_backward(True)
        try:
            logits = policy(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.world.device)).logits
            (logits.float().sum() * 0.0).backward()
        finally:
            policy.set_requires_gradient_sync(False)
            policy.set_reshard_after_backward(False)
            policy.train(was_training)

    def idle_pass(self, scoring) -> None:
        """An empty micro-batch: the forward and backward of one token through the policy, run as a
        real micro-batch runs (``Scoring.one_forward``), whose zero loss adds nothing to the
        gradients; in eval mode, so that no dropout draws random numbers."""
        from trainer.logprobs import token_logprobs

        policy, was_training = self.policy, self.policy.training
        token = torch.zeros(1, dtype=torch.long, device=self.world.device)
        policy.eval()
        try:
            logps = token_logprobs(policy, [token], [[token]], scoring=scoring)[0][0]  # [1]
            (logps.sum() * 0.0).backward()
        finally:
            policy.train(was_training)


# Activations a decoder layer holds for the backward per token position, in hidden-size units
# (attention's inputs and outputs, the MLP's wider intermediates, the norms), without gradient
# checkpointing; with it, a layer keeps its input alone. The figure matches what padding cost on
# the realistic benchmark model (~20 x hidden x 4 bytes per layer and position, bench/RESULTS.md).
ACTIVATIONS_PER_POSITION = 20


def activation_bytes_per_position(model: torch.nn.Module, checkpointing: bool) -> int:
    """What one more token position in a training forward holds until its backward, roughly."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    element = next(model.parameters()).element_size()
    per_layer = config.hidden_size * element * (1 if checkpointing else ACTIVATIONS_PER_POSITION)
    return per_layer * config.num_hidden_layers


def _sharded_params(units: Sequence[torch.nn.Module]) -> list[Any]:
    """FSDP2's record of each parameter of ``units`` sharded on its first dimension (FSDP's
    default), whose own shard ``drop_shards`` may free; none where this torch's FSDP2 keeps them
    otherwise."""
    params = []
    for unit in units:
        for group in getattr(unit._get_fsdp_state(), "_fsdp_param_groups", []):
            for param in group.fsdp_params:
                if (
                    getattr(param, "fsdp_placement", None) is not None
                    and param.fsdp_placement.dim == 0
                    and isinstance(getattr(param, "_sharded_param_data", None), torch.Tensor)
                    and hasattr(param, "padded_sharded_param_size")
                ):
                    params.append(param)
    return params


def drop_shards(units: Sequence[torch.nn.Module]) -> None:
    """Free this process's own shard of ``units``' weights while their full weights are gathered:
    the full weights hold the same numbers, and nothing reads the shard until ``restore_shards``
    (the optimizer and a checkpoint read it once resharded). While a process generates, it then
    holds the full weights beside its shards of the optimizer's state, not beside its shard of the
    weights too: P/N less at its peak (bench/RESULTS.md)."""
    for param in _sharded_params(units):
        full = getattr(param, "_unsharded_param", None)
        if full is not None and full.untyped_storage().size() > 0:  # gathered: the numbers are there
            param._sharded_param_data.untyped_storage().resize_(0)


def restore_shards(units: Sequence[torch.nn.Module], world: World) -> None:
    """Each shard ``drop_shards`` freed, again, copied from the full weights (before they are
    freed): this process's chunk of the first dimension, zero-padded as FSDP holds it."""
    for param in _sharded_params(units):
        data = param._sharded_param_data  # [padded shard numel]
        storage = data.untyped_storage()
        if storage.size() > 0:
            continue  # not dropped
        storage.resize_(data.numel() * data.element_size())
        padded = data.view(param.padded_sharded_param_size)  # [ceil(D0 / N), ...]
        chunks = torch.chunk(param._unsharded_param.detach(), world.size, dim=0)
        padded.zero_()
        if world.rank < len(chunks):  # a small first dimension leaves the last processes none
            mine = chunks[world.rank]  # [<= ceil(D0 / N), ...]
            padded.narrow(0, 0, mine.shape[0]).copy_(mine)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers names in ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard(model: torch.nn.Module, world: World) -> list[torch.nn.Module]:
    """``fully_shard`` each decoder layer of ``model`` and the root (a peft model whole, adapters
    and frozen weights alike), set up in ``Sharding``'s gathered state; the FSDP units, root first."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = None
    if FSDPModule is None or not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise ModelLoadError(
            f"one job on several processes needs FSDP2 as torch 2.9 or newer has it; this worker has torch "
            f"{torch.__version__}: install a newer torch on the workers, or create the job with gpus: 1"
        )
    device = world.device or next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world.size,))
    layers = decoder_layers(model)
    if not layers:
        raise ModelLoadError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by: "
            "it trains on one process only (gpus: 1)"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    # Each layer's backward prefetches the layer before it (the first: the root, always gathered
    # then), fixed here: FSDP's default follows the recorded order of forwards, which the passes
    # with no gradient (reference, pi_old) extend by a number of forwards that differs by process,
    # and an all-gather one process issues and another does not never pairs.
    for i, layer in enumerate(layers):
        layer.set_modules_to_backward_prefetch([layers[i - 1] if i else model])
    # (where measured: every process on one machine, 2 or 4 of them; and where torch has the hooks)
    one_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world.size)) == world.size
    gloo = (
        dist.get_backend(mesh.get_group()) == "gloo"
        and one_machine
        and hasattr(model, "set_custom_all_gather")
    )
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum, not average: each process's loss is its share
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        if gloo:
            unit.set_custom_all_gather(GlooAllGather())
            unit.set_custom_reduce_scatter(GlooReduceScatter())
    model.set_requires_gradient_sync(False)  # only ``Sharding.training`` reduces
    model.set_reshard_after_backward(False)
    # A parameter no forward used (an expert no token was routed to) still takes part in the sum,
    # so that every process reduces the same tensors.
    model.set_reduce_scatter_unused_params(True)
    # FSDP takes the first module it sees run forward as its root, and token_logprobs calls the
    # backbone, never the root: run the root once here.
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    for unit in units:
        unit.reshard()
    return units


# FSDP2's collectives as gloo runs them fastest (``set_custom_all_gather`` and
# ``set_custom_reduce_scatter``, whose interface is ``allocate`` and ``__call__``): gloo's own
# all-gather and reduce-scatter take 2-3x the time of one broadcast per process and of an all-reduce
# of the same bytes (24M float32, 2 or 4 processes on one machine: bench/RESULTS.md). Across machines
# (untested there: an all-reduce sends twice a reduce-scatter's bytes) and on NCCL FSDP's own stay.


class GlooAllGather:
    """Each process broadcasts its shard, which FSDP has copied into its place in the output."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False) -> None:
        chunks = output_tensor.chunk(group.size())  # [N * S] -> N x [S]
        if chunks[group.rank()].data_ptr() != input_tensor.data_ptr():  # FSDP's copy-in places it there
            chunks[group.rank()].copy_(input_tensor)
        works = [dist.broadcast(c, group=group, group_src=k, async_op=True) for k, c in enumerate(chunks)]
        for work in works:
            work.wait()  # complete on return (FSDP waits only on a Work it is given)


class GlooReduceScatter:
    """The whole input summed on every process, of which each keeps its chunk."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False) -> None:
        dist.all_reduce(input_tensor, op=op, group=group)  # [N * S]
        output_tensor.copy_(input_tensor.chunk(group.size())[group.rank()])  # [S]


# --- launching -------------------------------------------------------------------------------------


LAUNCHER_PID = "GRPO_LAUNCHER_PID"  # set by ``launch`` for the processes it starts


def die_with_launcher() -> None:
    """Under ``launch``: have the kernel kill this process when its launcher dies (Linux's
    ``PR_SET_PDEATHSIG``). torchrun starts each process in a session of its own and stops them when
    it exits, but a launcher killed outright (SIGKILL, the out-of-memory killer: a worker taken down
    with its machine's job) stops nothing, and its processes would go on training, writing and
    uploading checkpoints of a job that the record hands to another worker meanwhile. Exits at once
    if the launcher is already gone. Elsewhere (not under ``launch``, not Linux) it does nothing."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(launcher):  # it died before the line above: no signal will come
        print(f"the launcher (pid {launcher}) is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)


class LaunchFailed(RuntimeError):
    """A process of the job failed; the message names it (and any other that failed), ``exit_code``
    is the first failure's (1 for a process killed by a signal), and ``signals`` names the signals
    that killed the failed ones (``SIGKILL``: from outside, the out-of-memory killer most often)."""

    def __init__(self, message: str, exit_code: int, signals: frozenset[str] = frozenset()):
        super().__init__(message)
        self.exit_code = exit_code
        self.signals = signals


def launch(
    args: Sequence[str],
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_timeout: float = 600.0,
) -> None:
    """Run ``python <args>`` as ``nproc`` processes on this machine through torchrun's launcher
    (``torch.distributed.launcher.api.elastic_launch``), which sets each one's RANK, LOCAL_RANK and
    WORLD_SIZE, and stops the others when one fails. With ``nnodes`` > 1 the job spans that many
    machines: each runs this with its own ``node_rank`` (0 to nnodes - 1) and the same
    ``rdzv_endpoint`` ``HOST:PORT``, a port on node 0 that the others reach, within ``rdzv_timeout``
    seconds of each other. Processes that set no
    OMP_NUM_THREADS split this machine's CPUs between them. Raises ``LaunchFailed``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("a job on several machines needs --rdzv-endpoint HOST:PORT (a port on node 0)")
        # static rendezvous: node_rank decides the ranks (node k's processes are k * nproc, ...)
        rendezvous = {
            "rdzv_backend": "static",
            "rdzv_endpoint": rdzv_endpoint,
            "rdzv_configs": {"rank": node_rank, "timeout": max(1, round(rdzv_timeout))},
        }
        print(
            f"node {node_rank} of {nnodes}: waiting up to {rdzv_timeout:g} s for every machine to join at "
            f"{rdzv_endpoint}",
            file=sys.stderr,
            flush=True,
        )
    else:  # torchrun --standalone: a store on a free local port
        rendezvous = {"rdzv_backend": "c10d", "rdzv_endpoint": "127.0.0.1:0", "rdzv_configs": {}}
    if "OMP_NUM_THREADS" not in os.environ:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpus // nproc))  # the workers inherit this environment
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=f"grpo-{uuid.uuid4().hex[:8]}" if nnodes == 1 else "grpo",
        max_restarts=0,  # a failed process fails the job, naming it
        **rendezvous,
    )
    os.environ[LAUNCHER_PID] = str(os.getpid())  # for ``die_with_launcher`` in each process (only)
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as exc:
        failed = failed_first(exc.failures)
        raise LaunchFailed(
            describe_failures(exc.failures),
            first_exit_code(exc.failures),
            frozenset(f.signal_name() for f in failed.values() if f.exitcode < 0),
        ) from None
    except dist.DistError as exc:  # the machines' rendezvous: no process has started
        if nnodes == 1:
            raise
        raise LaunchFailed(
            f"the {nnodes} machines did not all join at {rdzv_endpoint} within {rdzv_timeout:g} s ({exc}); "
            "run the same command on every machine, each with its --node-rank, node 0's port reachable "
            "from the others, within --rdzv-timeout of each other",
            1,
        ) from None
    finally:
        os.environ.pop(LAUNCHER_PID, None)


def failed_first(failures: dict[int, Any]) -> dict[int, Any]:
    """The processes that failed of themselves: all but those the launcher stopped (SIGTERM) because
    another had failed; all, where every one was stopped so."""
    return {rank: f for rank, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures


def describe_failures(failures: dict[int, Any]) -> str:
    """Which processes failed and how, those the launcher stopped because another had failed
    (SIGTERM) last: ``rank 1 (local rank 1, pid 123) was killed by SIGKILL; rank 0 stopped``."""
    failed = failed_first(failures)
    described = []
    for rank, failure in sorted(failed.items()):
        how = (
            f"was killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        described.append(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {how}")
    stopped = sorted(set(failures) - set(failed))
    if stopped:
        described.append(f"{'rank' if len(stopped) == 1 else 'ranks'} {', '.join(map(str, stopped))} stopped")
    return "; ".join(described)


def first_exit_code(failures: dict[int, Any]) -> int:
    """The exit status the launching command ends with: the first positive one, else 1."""
    codes = [failure.exitcode for _, failure in sorted(failures.items())]
    return next((code for code in codes if code > 0), 1)
