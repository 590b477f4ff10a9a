import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from bitalloc.errors import BitallocError
from bitalloc.formats import parse_palette
from bitalloc.models import discover_units, get_linear
from bitalloc.sensitivity.hessian import HessianProfiler, rademacher
from tests.conftest import make_tiny_llama, random_windows

PALETTE = parse_palette("int2-g32,int3-g32,int4-g32,int8-g32,int2-g64,int4-g64,fp16")


def _calibration(seed=0, n=6, seq_len=32):
    return random_windows(seed=seed, n=n, seq_len=seq_len)


def _loss_fn(model, names, window):
    """The window's mean next-token loss as a function of the named weights alone."""
    ids = window.reshape(1, -1)

    def loss(*weights):
        params = dict(zip(names, weights))
        return functional_call(model, params, kwargs={"input_ids": ids, "labels": ids}).loss

    return loss


def test_trace_matches_exact_hessian_of_a_small_unit():
    model = make_tiny_llama(hidden=16, intermediate=24, layers=1)
    unit = next(u for u in discover_units(model) if u.role == "v")  # 8 x 16 = 128 weights
    cal = _calibration(n=1, seq_len=8)
    n_probes = 256
    prof = HessianProfiler(
        tokens=8, progress=False, max_probes=n_probes, tol=1e-12, min_probes=1, seed=3
    ).profile(model, [unit], PALETTE[:1], cal)
    assert prof.metadata["probes"] == n_probes and not prof.metadata["converged"]

    # Exact Hessian of the (only) window's loss over this unit's weight, others fixed. SDPA has
    # no double backward on CPU, so the reference runs the model with eager attention.
    w = get_linear(model, unit.name).weight.detach().clone()
    model.set_attn_implementation("eager")
    loss = _loss_fn(model, [f"{unit.name}.weight"], cal[0])
    hess = torch.autograd.functional.hessian(loss, w).reshape(w.numel(), w.numel()).double()
    exact = float(hess.diagonal().sum())
    # One Rademacher probe v^T H v has mean Tr(H) and variance 2 * sum_{i != j} H_ij^2; the
    # probes are independent (one window), so the mean of n is within 5 standard errors of the
    # trace except with probability < 1e-6.
    off_diag = float(hess.square().sum() - hess.diagonal().square().sum())
    stderr = math.sqrt(2 * off_diag / n_probes)
    assert stderr < 0.1 * abs(exact)  # the check below is tight enough to mean something
    assert abs(prof.metadata["traces"][0] - exact) < 5 * stderr


def test_probes_equal_independent_hessian_vector_products(tiny_model):
    """Every unit's trace is the mean over probes of v_u^T (H v)_u with H the joint Hessian of
    the probe's window, v drawn from the seed, windows cycling over the picks."""
    units = discover_units(tiny_model)
    cal = _calibration(n=2)  # tokens=64 picks windows 0 and 1; probes use 0, 1, 0
    prof = HessianProfiler(
        tokens=64, progress=False, max_probes=3, min_probes=3, tol=1e-12, seed=7
    ).profile(tiny_model, units, PALETTE, cal)
    assert tiny_model.config._attn_implementation == "sdpa"

    weights = tuple(get_linear(tiny_model, u.name).weight.detach().clone() for u in units)
    names = [f"{u.name}.weight" for u in units]
    gen = torch.Generator().manual_seed(7)
    tiny_model.set_attn_implementation("eager")
    per_probe = []
    for window in (cal[0], cal[1], cal[0]):
        vectors = tuple(rademacher(weights, gen))
        assert all(set(v.unique().tolist()) == {-1.0, 1.0} for v in vectors)
        _, hv = torch.autograd.functional.hvp(_loss_fn(tiny_model, names, window), weights, vectors)
        per_probe.append([float((v.double() * h.double()).sum()) for v, h in zip(vectors, hv)])
    expected = np.mean(per_probe, axis=0)
    traces = np.array(prof.metadata["traces"])
    np.testing.assert_allclose(traces, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())

    # The table is 0.5 * max(trace, 0) / n * ||Q(W) - W||^2.
    for i, (w, tr) in enumerate(zip(weights, traces)):
        for j, fmt in enumerate(PALETTE):
            err = float((fmt.fake_quantize(w).double() - w.double()).square().sum())
            assert prof.loss[i, j] == pytest.approx(0.5 * max(tr, 0.0) / w.numel() * err, rel=1e-9)
    assert prof.metadata["negative_traces"] == int((traces < 0).sum())


@pytest.mark.parametrize("min_probes", [1, 4])
def test_huge_tol_stops_at_min_probes_and_values_are_sane(tiny_model, min_probes):
    units = discover_units(tiny_model)
    prof = HessianProfiler(tokens=128, progress=False, tol=1e9, min_probes=min_probes).profile(
        tiny_model, units, PALETTE, _calibration()
    )
    meta = prof.metadata
    assert meta["probes"] == min_probes and meta["converged"] is True
    assert meta["relative_change"] < 1e9 and meta["skipped_probes"] == 0
    assert meta["method"] == "hessian" and meta["seq_len"] == 32 and meta["seconds"] > 0
    # 128 tokens pick 4 windows; only the first min_probes of them were probed.
    assert meta["windows"] == min(min_probes, 4) and meta["tokens"] == 32 * meta["windows"]
    assert len(meta["traces"]) == len(units) and meta["skipped_batches"] == 0
    assert prof.units == tuple(u.name for u in units)
    assert prof.formats == tuple(f.name for f in PALETTE)
    assert np.isfinite(prof.loss).all() and (prof.loss >= 0).all()
    # Same group size: predicted loss never rises with bits.
    cols = [prof.column(f"int{b}-g32") for b in (2, 3, 4, 8)]
    for a, b in zip(cols, cols[1:]):
        assert (a >= b).all()
    positive = np.array(meta["traces"]) > 0
    assert (prof.column("int2-g64")[positive] > prof.column("fp16")[positive]).all()
    assert (prof.loss[~positive] == 0).all()


def test_max_probes_caps_without_convergence(tiny_model):
    units = discover_units(tiny_model)[:3]
    prof = HessianProfiler(
        tokens=64, progress=False, max_probes=5, min_probes=1, tol=1e-12
    ).profile(tiny_model, units, PALETTE, _calibration(n=2))
    meta = prof.metadata
    assert meta["probes"] == 5 and meta["converged"] is False
    assert 1e-12 <= meta["relative_change"] < 1
    assert meta["windows"] == 2 and meta["tokens"] == 64


def test_seed_determines_the_result(tiny_model):
    units = discover_units(tiny_model)
    cal = _calibration(n=2)

    def run(seed):
        return HessianProfiler(
            tokens=64, progress=False, max_probes=2, min_probes=2, seed=seed
        ).profile(tiny_model, units, PALETTE, cal)

    a, b, c = run(0), run(0), run(1)
    assert np.array_equal(a.loss, b.loss) and a.metadata["traces"] == b.metadata["traces"]
    assert not np.allclose(a.metadata["traces"], c.metadata["traces"])
    opts = HessianProfiler(seed=1).options()
    assert opts != HessianProfiler().options()
    assert {"tokens", "max_probes", "min_probes", "tol", "seed"} <= set(opts)


def test_non_finite_probes_are_skipped_and_counted(tiny_model):
    units = discover_units(tiny_model)

    def overflow_on_255(module, args, output):
        # Windows holding token 255 overflow in the embedding output, as an fp16 model might.
        return output.masked_fill((args[0] == 255)[..., None], float("inf"))

    tiny_model.model.embed_tokens.register_forward_hook(overflow_on_255)
    cal = _calibration(n=4)
    cal[cal == 255] = 0
    cal[1, 5] = 255  # only window 1 overflows; 8 probes visit it twice
    prof = HessianProfiler(
        tokens=128, progress=False, max_probes=8, min_probes=8, tol=1e-12
    ).profile(tiny_model, units, PALETTE, cal)
    meta = prof.metadata
    assert meta["skipped_batches"] == 2 and meta["skipped_probes"] == 2
    assert meta["probes"] == 6 and meta["windows"] == 3 and meta["tokens"] == 96
    assert np.isfinite(prof.loss).all() and np.isfinite(meta["traces"]).all()


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        model.training,
        model.config._attn_implementation,
    )


def _assert_restored(model, snapshot):
    state, flags, training, attn = snapshot
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training == training
    assert model.config._attn_implementation == attn == "sdpa"


def test_model_is_restored(tiny_model):
    tiny_model.model.embed_tokens.weight.requires_grad_(False)
    tiny_model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    tiny_model.train()
    snapshot = _snapshot(tiny_model)
    HessianProfiler(tokens=64, progress=False, max_probes=2, min_probes=2).profile(
        tiny_model, discover_units(tiny_model), PALETTE, _calibration(n=2)
    )
    _assert_restored(tiny_model, snapshot)


def test_all_probes_bad_fails_clearly_and_restores(tiny_model):
    units = discover_units(tiny_model)
    with torch.no_grad():
        tiny_model.model.norm.weight.fill_(float("nan"))
    snapshot = _snapshot(tiny_model)
    with pytest.raises(BitallocError, match="non-finite Hessian-vector products"):
        HessianProfiler(tokens=64, progress=False, max_probes=3, min_probes=1).profile(
            tiny_model, units, PALETTE, _calibration(n=2)
        )
    # NaN weights compare unequal to themselves; compare the rest of the state.
    state, *rest = snapshot
    state = {k: v for k, v in state.items() if k != "model.norm.weight"}
    for k, v in state.items():
        assert torch.equal(tiny_model.state_dict()[k], v), k
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == rest[0]
    assert all(p.grad is None for p in tiny_model.parameters())
    assert tiny_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokens": 0}, "tokens must be positive"),
        ({"max_probes": 0}, "max_probes must be an integer >= 1"),
        ({"max_probes": 2.5}, "max_probes must be an integer"),
        ({"min_probes": 0}, "min_probes must be an integer >= 1"),
        ({"min_probes": 10, "max_probes": 5}, "must not exceed max_probes"),
        ({"tol": 0}, "tol must be a positive number"),
        ({"tol": -0.1}, "tol must be a positive number"),
        ({"tol": float("nan")}, "tol must be a positive number"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(BitallocError, match=match):
        HessianProfiler(**kwargs)


def test_no_units_raises(tiny_model):
    with pytest.raises(BitallocError, match="no units"):
        HessianProfiler(progress=False).profile(tiny_model, [], PALETTE, _calibration(n=1))
