"""``allocate(..., solver="rl")``: training on one model, zero-shot transfer to another."""

import numpy as np
import pytest

import bitalloc.rl.agent as agent
from bitalloc import allocate
from bitalloc.errors import BitallocError
from tests.allocations import small_allocate, small_prepare
from tests.conftest import DEFAULT_MODEL_FORMATS, DEFAULT_MODEL_TOKENS, make_tiny_llama

FORMATS = "int2-g32,int3-g32,int4-g32,int8-g32,fp16"
# The transfer test profiles two models: a shorter palette halves the quantizing it costs.
TRANSFER_FORMATS = "int2-g32,int4-g32,fp16"


def _allocate(model, tok, files, avg_bits, formats=FORMATS, **kw):
    return small_allocate(model, tok, files, avg_bits, formats, **kw)


def test_train_on_one_model_and_transfer_to_another(
    tmp_path, byte_tokenizer, text_files, isolated_cache, monkeypatch
):
    # Nothing here depends on what the policy learned (the slow test below holds its quality
    # to the optimum), so it trains briefly: a few episodes, a few updates.
    policy = tmp_path / "policy.zip"
    small = make_tiny_llama(seed=0, layers=2, hidden=64, intermediate=96)
    trained = _allocate(
        small,
        byte_tokenizer,
        text_files,
        4.0,
        formats=TRANSFER_FORMATS,
        solver="rl",
        solver_options={"steps": 56, "learning_starts": 42, "save_policy": str(policy)},
    )
    assert trained.data.solver.method == "rl" and trained.avg_bits <= 4.0 + 1e-9
    assert policy.is_file() and agent.read_policy_info(policy).steps == 56
    optimum = _allocate(small, byte_tokenizer, text_files, 4.0, TRANSFER_FORMATS, solver="ilp")
    assert trained.data.predicted_loss >= optimum.data.predicted_loss - 1e-9

    # Another, larger model and another budget: applied without training.
    def no_training(*args, **kwargs):
        raise AssertionError("a transferred policy must not train")

    monkeypatch.setattr(agent, "train_policy", no_training)
    large = make_tiny_llama(seed=1, layers=3, hidden=128, intermediate=192)
    for budget in (3.5, 5.0):
        moved = _allocate(
            large, byte_tokenizer, text_files, budget, TRANSFER_FORMATS, solver="rl", policy=policy
        )
        assert moved.data.solver.method == "rl" and moved.avg_bits <= budget + 1e-9
        assert len(moved.data.units) == 21


def test_policy_needs_the_rl_solver(byte_tokenizer, text_files, isolated_cache, tiny_model):
    with pytest.raises(BitallocError, match="use solver='rl'"):
        _allocate(tiny_model, byte_tokenizer, text_files, 4.0, policy="p.zip")


def test_measured_reward_every_n_episodes(
    byte_tokenizer, text_files, isolated_cache, tiny_model, monkeypatch
):
    import bitalloc.rl.options as options

    calls = []
    real = options.measured_loss

    def counting(prepared, windows=options.MEASURE_WINDOWS):
        measure = real(prepared, windows)

        def wrapped(choice):
            calls.append(np.asarray(choice).copy())
            return measure(choice)

        return wrapped

    monkeypatch.setattr(options, "measured_loss", counting)
    alloc = _allocate(
        tiny_model,
        byte_tokenizer,
        text_files,
        4.0,
        solver="rl",
        ties="qkv",
        # Ten units an episode (q, k, v tied): six episodes, two of them measured.
        solver_options={"steps": 60, "learning_starts": 30, "reward": {"measure_every": 3}},
    )
    assert alloc.avg_bits <= 4.0 + 1e-9
    n_units = len(alloc.data.units)
    assert len(calls) == 2 and all(c.shape == (n_units,) for c in calls)
    # Ties are expanded before measuring: q, k and v of a layer share a format.
    roles = {u.role for u in alloc.data.units}
    assert {"q", "k", "v"} <= roles
    for c in calls:
        for layer in {u.layer for u in alloc.data.units}:
            qkv = {
                int(j)
                for u, j in zip(alloc.data.units, c)
                if u.layer == layer and u.role in ("q", "k", "v")
            }
            assert len(qkv) == 1


def test_measured_loss_is_the_loss_increase_on_calibration_windows(
    byte_tokenizer, text_files, tiny_model
):
    from bitalloc.apply import fake_quantized
    from bitalloc.evaluate import perplexity
    from bitalloc.rl.options import MEASURE_WINDOWS, measured_loss

    prep = small_prepare(tiny_model, byte_tokenizer, text_files, FORMATS)
    measure = measured_loss(prep)
    n = len(prep.units)
    ids = prep.calibration_windows()[:MEASURE_WINDOWS]
    base = perplexity(tiny_model, ids).nll
    assignment = {u.name: "int2-g32" for u in prep.units}
    with fake_quantized(tiny_model, assignment, importance=prep.importance) as q:
        direct = perplexity(q, ids).nll - base
    assert measure(np.zeros(n, dtype=int)) == pytest.approx(direct, abs=1e-6)
    assert direct != 0.0
    assert abs(measure(np.full(n, len(prep.palette) - 1))) < 1e-3  # fp16
    # The model's weights are restored after every measurement.
    assert perplexity(tiny_model, ids).nll == pytest.approx(base, abs=1e-6)


@pytest.mark.slow
def test_default_model_policy_transfers_to_a_config_built_llama(
    default_model, shared_cache, tmp_path, monkeypatch
):
    """Train on the real model at 3.25 bits; apply zero-shot to a differently sized Llama
    (built from a config, random weights) at two budgets, against that model's optimum.

    The palette and calibration are those of the other default-model tests, whose profile
    ``shared_cache`` then computes once per session."""
    common = dict(
        formats=DEFAULT_MODEL_FORMATS, calibration_tokens=DEFAULT_MODEL_TOKENS, progress=False
    )
    policy = tmp_path / "smol.zip"
    trained = allocate(
        default_model.model,
        3.25,
        tokenizer=default_model.tokenizer,
        solver="rl",
        # Five episodes of the 210 units: the policy acts on the Lagrangian anchor, and within
        # the bounds below at 700 steps already (2100 steps cost 12 s more of training).
        solver_options={"steps": 1050, "save_policy": str(policy)},
        **common,
    )
    optimum = allocate(
        default_model.model, 3.25, tokenizer=default_model.tokenizer, solver="ilp", **common
    )
    assert trained.avg_bits <= 3.25 + 1e-9 and len(trained.data.units) == 210
    assert trained.data.predicted_loss <= 1.5 * optimum.data.predicted_loss

    def no_training(*args, **kwargs):
        raise AssertionError("a transferred policy must not train")

    monkeypatch.setattr(agent, "train_policy", no_training)
    other = make_tiny_llama(
        0,
        layers=4,
        hidden=192,
        intermediate=512,
        heads=6,
        vocab=len(default_model.tokenizer),
        max_positions=1024,
        tie_word_embeddings=False,
    )
    for budget in (3.25, 4.0):
        moved = allocate(
            other, budget, tokenizer=default_model.tokenizer, solver="rl", policy=policy, **common
        )
        best = allocate(other, budget, tokenizer=default_model.tokenizer, solver="ilp", **common)
        assert len(moved.data.units) == 28 and moved.avg_bits <= budget + 1e-9
        assert moved.data.predicted_loss <= 1.5 * best.data.predicted_loss
