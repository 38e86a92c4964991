"""MasterWeightAdamW: half-precision weights take AdamW's updates as float32 weights do."""

import pytest
import torch

from trainer.model import resolve_dtype, training_dtype
from trainer.optimizer import MASTER, MasterWeightAdamW

SETTINGS = dict(lr=1e-6, betas=(0.9, 0.99), weight_decay=0.01)


def _grads(shape, steps, seed=0, drift=0.0):
    """``steps`` gradients: noise, plus ``drift`` times one fixed direction (a steady signal)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(shape, generator=generator)
    return [(torch.randn(shape, generator=generator) + drift * direction) * 1e-3 for _ in range(steps)]


def _run(optimizer_class, weight, grads):
    param = torch.nn.Parameter(weight.clone())
    optimizer = optimizer_class([param], **SETTINGS)
    for grad in grads:
        param.grad = grad.to(param.dtype)
        optimizer.step()
    return param, optimizer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_follow_the_float32_run(dtype):
    weight = (torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    # a steady signal under noise, as training gives: 40 steps of ~1e-6 add up to ~4e-5
    grads = [g.to(dtype).float() for g in _grads((64, 64), 40, drift=3.0)]  # as a half-precision model yields
    reference, _ = _run(torch.optim.AdamW, weight.float(), grads)
    plain, _ = _run(torch.optim.AdamW, weight, grads)
    ours, optimizer = _run(MasterWeightAdamW, weight, grads)

    # plain AdamW on the half-precision weights loses the updates (1e-6 against a spacing ~1e-4);
    # in float16 its second moment (~1e-12) underflows too, and weights jump to inf
    lost = ((plain != weight) & plain.isfinite()).float().mean()
    assert lost < 0.2
    # the master is the float32 run to the bit, and the weight is the master rounded
    master = optimizer.state[ours][MASTER]
    assert master.dtype == torch.float32 and torch.equal(master, reference.detach())
    assert torch.equal(ours.detach(), reference.detach().to(dtype))
    moved = (ours != weight).float().mean()
    assert ours.isfinite().all() and moved > 2 * lost and moved > 0.2, (
        moved,
        lost,
    )  # the rounded weights move as updates add up
    assert all(optimizer.state[ours][k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq"))


def test_float32_weights_are_plain_adamw():
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    grads = _grads((16, 8), 5)
    plain, plain_optimizer = _run(torch.optim.AdamW, weight, grads)
    ours, optimizer = _run(MasterWeightAdamW, weight, grads)
    assert torch.equal(ours, plain) and MASTER not in optimizer.state[ours]
    assert torch.equal(optimizer.state[ours]["exp_avg"], plain_optimizer.state[plain]["exp_avg"])


def test_a_mixed_model_and_a_saved_state_resume_exactly():
    """bf16 weights beside float32 ones (a model with float32 norms, LoRA's adapters), saved and
    loaded mid-run: the resumed run ends where the uninterrupted one does, masters in float32."""
    weights = [
        torch.randn(8, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16),
        torch.ones(8),
    ]
    grads = [_grads((8, 8), 6, seed=4), _grads((8,), 6, seed=5)]

    def make(values):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        return params, MasterWeightAdamW(params, **SETTINGS)

    def steps(params, optimizer, indices):
        for i in indices:
            for p, g in zip(params, grads, strict=True):
                p.grad = g[i].to(p.dtype)
            optimizer.step()

    whole, whole_optimizer = make(weights)
    steps(whole, whole_optimizer, range(6))

    first, first_optimizer = make(weights)
    steps(first, first_optimizer, range(3))
    saved = first_optimizer.state_dict()
    resumed, resumed_optimizer = make([p.detach() for p in first])
    resumed_optimizer.load_state_dict(saved)
    master = resumed_optimizer.state[resumed[0]][MASTER]
    assert master.dtype == torch.float32 and torch.equal(master, first_optimizer.state[first[0]][MASTER])
    steps(resumed, resumed_optimizer, range(3, 6))
    for a, b in zip(resumed, whole, strict=True):
        assert torch.equal(a, b)


def test_a_state_without_masters_gets_them_from_the_weights():
    """A checkpoint written by plain AdamW (moments in bf16, no master) resumes: the master starts
    from the weight and the moments are carried over in float32."""
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    grads = _grads((8, 8), 4)
    old, old_optimizer = _run(torch.optim.AdamW, weight, grads[:2])
    param = torch.nn.Parameter(old.detach().clone())
    optimizer = MasterWeightAdamW([param], **SETTINGS)
    optimizer.load_state_dict(old_optimizer.state_dict())
    for grad in grads[2:]:
        param.grad = grad.to(torch.bfloat16)
        optimizer.step()
    state = optimizer.state[param]
    assert state[MASTER].dtype == state["exp_avg"].dtype == torch.float32 and float(state["step"]) == 4


def test_auto_never_trains_in_float16(monkeypatch):
    """Without a loss scale, float16's small gradients underflow: ``auto`` on a GPU without
    bfloat16 trains in float32 (and serves in float16); float16 only when a spec asks."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype("auto", cuda) == torch.float16
    assert training_dtype("auto", cuda) == torch.float32
    assert training_dtype("float16", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert training_dtype("auto", cuda) == torch.bfloat16
    # a V100 or T4: torch says bf16 is supported when it only emulates it (slowly; vLLM refuses it)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("auto", cuda) == torch.float16
    assert training_dtype("auto", cuda) == torch.float32
    assert training_dtype("auto", torch.device("cpu")) == torch.float32


def test_stepped_a_few_at_a_time_as_all_at_once(monkeypatch):
    import trainer.optimizer

    weights = [
        torch.randn(n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16) for n in (5, 30, 7)
    ]
    grads = [_grads((n,), 3, seed=n) for n in (5, 30, 7)]

    def run():
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = MasterWeightAdamW(params, **SETTINGS)
        for i in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g[i].to(torch.bfloat16)
            optimizer.step()
        return [optimizer.state[p][MASTER] for p in params]

    whole = run()
    monkeypatch.setattr(trainer.optimizer, "CHUNK_ELEMENTS", 10)  # runs [5], [30], [7]
    assert [
        [p.numel() for p in run]
        for run in trainer.optimizer._chunks([torch.zeros(n) for n in (5, 4, 30, 7)], 10)
    ] == [
        [5, 4],
        [30],
        [7],
    ]
    for a, b in zip(run(), whole, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["one process (optimizer.pt)", "several (torch.distributed.checkpoint)"])
def test_a_checkpoint_written_before_masters_resumes(tmp_path, layout):
    """A bfloat16 job's optimizer state written by plain AdamW (no masters, moments in bfloat16),
    in either checkpoint layout, loads: the moments carry over (in float32), each master is made
    from the loaded weights at the next step."""
    import torch.distributed.checkpoint as dcp

    from trainer import checkpoint as ckpt
    from trainer.layout import STATE_DIR

    def model():
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)

    torch.manual_seed(0)
    old = model()
    old_optimizer = torch.optim.AdamW(old.parameters(), **SETTINGS)
    for _ in range(2):
        old(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
        old_optimizer.step()
        old_optimizer.zero_grad()
    state_dir = tmp_path / STATE_DIR
    state_dir.mkdir()
    if layout.startswith("one"):
        torch.save(ckpt.optimizer_state(old, old_optimizer), state_dir / ckpt.OPTIMIZER_FILE)
    else:
        dcp.save(
            {"optimizer": ckpt.optimizer_state(old, old_optimizer)},
            checkpoint_id=state_dir / ckpt.OPTIMIZER_DIR,
        )

    new = model()
    new.load_state_dict(old.state_dict())
    optimizer = MasterWeightAdamW(new.parameters(), **SETTINGS)
    ckpt.load_optimizer_state(new, optimizer, tmp_path)
    weight, old_weight = new[0].weight, old[0].weight
    state = optimizer.state[weight]
    assert torch.equal(state["exp_avg"].float(), old_optimizer.state[old_weight]["exp_avg"].float())
    new(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    before = weight.detach().float().clone()
    optimizer.step()
    assert state[MASTER].dtype == state["exp_avg"].dtype == torch.float32 and float(state["step"]) == 3
    assert (state[MASTER] - before).abs().max() < 1e-4  # one step of ~lr from the loaded weights


def test_a_checkpoint_with_masters_loads_them_as_saved_in_either_layout(tmp_path):
    import torch.distributed.checkpoint as dcp

    from trainer import checkpoint as ckpt
    from trainer.layout import STATE_DIR

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).to(torch.bfloat16)
    model[1].float()  # a float32 parameter beside the bfloat16 ones
    optimizer = MasterWeightAdamW(model.parameters(), **SETTINGS)
    for _ in range(2):
        model(torch.randn(3, 8, dtype=torch.bfloat16).float().to(torch.bfloat16)).float().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    for layout in ("whole", "dcp"):
        directory = tmp_path / layout
        (directory / STATE_DIR).mkdir(parents=True)
        if layout == "whole":
            torch.save(ckpt.optimizer_state(model, optimizer), directory / STATE_DIR / ckpt.OPTIMIZER_FILE)
        else:
            dcp.save(
                {"optimizer": ckpt.optimizer_state(model, optimizer)},
                checkpoint_id=directory / STATE_DIR / ckpt.OPTIMIZER_DIR,
            )
        again = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).to(torch.bfloat16)
        again[1].float()
        again.load_state_dict(model.state_dict())
        loaded = MasterWeightAdamW(again.parameters(), **SETTINGS)
        ckpt.load_optimizer_state(again, loaded, directory)
        for p, q in zip(model.parameters(), again.parameters(), strict=True):
            mine, theirs = optimizer.state[p], loaded.state[q]
            assert mine.keys() == theirs.keys(), layout
            for key in mine:
                assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), (
                    layout,
                    key,
                )


def test_a_float16_run_is_warned_of_its_underflowing_gradients(tiny_model_dir):
    from trainer.config import GRPOConfig
    from trainer.model import load_models

    logged = []
    load_models(
        tiny_model_dir,
        GRPOConfig(dtype="float16", beta=0.0),
        torch.device("cpu"),
        on_log=lambda *e: logged.append(e),
    )
    assert any(
        level == "warning" and "float16" in message and "loss scale" in message for level, message in logged
    )
    logged.clear()
    load_models(
        tiny_model_dir,
        GRPOConfig(dtype="bfloat16", beta=0.0),
        torch.device("cpu"),
        on_log=lambda *e: logged.append(e),
    )
    assert not any(level == "warning" for level, _ in logged)
