"""``allocate(..., solver="rl")``: training on one model, zero-shot transfer to another."""

import pytest

import bitalloc.rl.agent as agent
from bitalloc import allocate
from bitalloc.errors import BitallocError
from tests.conftest import make_tiny_llama

FORMATS = "int2-g32,int3-g32,int4-g32,int8-g32,fp16"


def _allocate(model, tok, files, avg_bits, **kw):
    cal, ev = files
    return allocate(
        model,
        avg_bits,
        tokenizer=tok,
        calibration=cal,
        evaluation=ev,
        formats=FORMATS,
        calibration_tokens=256,
        seq_len=64,
        progress=False,
        **kw,
    )


def test_train_on_one_model_and_transfer_to_another(
    tmp_path, byte_tokenizer, text_files, isolated_cache, monkeypatch
):
    policy = tmp_path / "policy.zip"
    small = make_tiny_llama(seed=0, layers=2, hidden=64, intermediate=96)
    trained = _allocate(
        small,
        byte_tokenizer,
        text_files,
        4.0,
        solver="rl",
        solver_options={"steps": 300, "learning_starts": 100, "save_policy": str(policy)},
    )
    assert trained.data.solver.method == "rl" and trained.avg_bits <= 4.0 + 1e-9
    assert policy.is_file()
    optimum = _allocate(small, byte_tokenizer, text_files, 4.0, solver="ilp")
    assert trained.data.predicted_loss >= optimum.data.predicted_loss - 1e-9

    # Another, larger model and another budget: applied without training.
    def no_training(*args, **kwargs):
        raise AssertionError("a transferred policy must not train")

    monkeypatch.setattr(agent, "train_policy", no_training)
    large = make_tiny_llama(seed=1, layers=3, hidden=128, intermediate=192)
    for budget in (3.5, 5.0):
        moved = _allocate(large, byte_tokenizer, text_files, budget, solver="rl", policy=policy)
        assert moved.data.solver.method == "rl" and moved.avg_bits <= budget + 1e-9
        assert len(moved.data.units) == 21


def test_policy_needs_the_rl_solver(byte_tokenizer, text_files, isolated_cache, tiny_model):
    with pytest.raises(BitallocError, match="use solver='rl'"):
        _allocate(tiny_model, byte_tokenizer, text_files, 4.0, policy="p.zip")
