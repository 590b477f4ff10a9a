"""Scale folding: exact in function, flatter activations, lower int4 fake-quantization error."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.apply import fake_quantized
from bitalloc.errors import BitallocError
from bitalloc.folding import (
    DEFAULT_PAIRS,
    FoldReport,
    activation_maxima,
    apply_fold_scales_,
    fold_scales,
    scale_fold_,
)
from bitalloc.models import discover_units
from tests.conftest import make_tiny_llama, random_windows

CAL = random_windows(n=6, seq_len=32, seed=1)  # 6 windows: one full batch of 4 and one of 2
EVAL = random_windows(n=4, seq_len=32, seed=2)


def _logits(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=windows).logits.float()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _max_change(model: nn.Module, original: dict[str, torch.Tensor]) -> float:
    return max(float((p - original[n]).abs().max()) for n, p in model.state_dict().items())


def _quant_error(model: nn.Module, windows: torch.Tensor) -> tuple[float, float]:
    """(KL(fp || int4-g32), logits MSE) of the model with every unit fake-quantized."""
    ref = _logits(model, windows)
    with fake_quantized(model, {u.name: "int4-g32" for u in discover_units(model)}):
        q = _logits(model, windows)
    kl = F.kl_div(
        F.log_softmax(q, -1), F.log_softmax(ref, -1), log_target=True, reduction="none"
    ).sum(-1)
    return float(kl.mean()), float((q - ref).square().mean())


def _add_outliers(model: nn.Module, factor: float, seed: int, channels: int = 3) -> None:
    """Make a few hidden channels feeding q/k/v and gate/up `factor` times larger."""
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for block in model.model.layers:
            idx = torch.randperm(hidden, generator=g)[:channels]
            block.input_layernorm.weight[idx] *= factor
            block.post_attention_layernorm.weight[idx] *= factor


@pytest.mark.parametrize("pairs", [(p,) for p in DEFAULT_PAIRS] + [DEFAULT_PAIRS])
def test_fold_keeps_logits_and_changes_weights(tiny_model, pairs):
    ref = _logits(tiny_model, EVAL)
    original = {n: p.clone() for n, p in tiny_model.state_dict().items()}
    report = scale_fold_(tiny_model, CAL, pairs=pairs)
    assert _rel_err(_logits(tiny_model, EVAL), ref) < 1e-5
    assert _max_change(tiny_model, original) > 1e-3  # not a no-op
    assert report.pairs == tuple(pairs)
    assert report.outlier_ratio_after < report.outlier_ratio_before


def test_fold_exact_with_biases_mqa_and_layernorm():
    """Biases on v/up and on a LayerNorm are divided too; one kv head serves all query heads."""
    model = make_tiny_llama(
        3, kv_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=False
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
        norm = nn.LayerNorm(64)
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_(0, 0.5)
        model.model.layers[0].input_layernorm = norm
    ref = _logits(model, EVAL)
    report = scale_fold_(model, CAL)
    assert _rel_err(_logits(model, EVAL), ref) < 1e-5
    assert report.layers == 2


def test_outliers_fall_and_int4_error_falls():
    model = make_tiny_llama(seed=0)
    _add_outliers(model, factor=30.0, seed=0)
    ref = _logits(model, EVAL)
    kl_before, mse_before = _quant_error(model, EVAL)
    report = scale_fold_(model, CAL)
    assert _rel_err(_logits(model, EVAL), ref) < 1e-5
    kl_after, mse_after = _quant_error(model, EVAL)
    assert report.outlier_ratio_before > 10.0  # the injected outliers are seen
    assert report.outlier_ratio_after < 0.5 * report.outlier_ratio_before
    assert kl_after < 0.8 * kl_before
    assert mse_after < 0.8 * mse_before


def test_fold_twice_stays_exact(tiny_model):
    _add_outliers(tiny_model, factor=30.0, seed=1)
    ref = _logits(tiny_model, EVAL)
    first = scale_fold_(tiny_model, CAL)
    second = scale_fold_(tiny_model, CAL)
    assert _rel_err(_logits(tiny_model, EVAL), ref) < 1e-5
    # The second pass starts from what the first left behind.
    assert second.outlier_ratio_before == pytest.approx(first.outlier_ratio_after, rel=1e-4)


def test_report_fields_and_json(tiny_model):
    report = scale_fold_(tiny_model, CAL, alpha=0.3, pairs=["up-down", "norm-qkv"])
    assert isinstance(report, FoldReport)
    assert report.alpha == 0.3
    assert report.pairs == ("norm-qkv", "up-down")  # canonical order
    assert report.tokens == CAL.numel()
    assert report.layers == 2
    assert report.seconds > 0
    assert math.isfinite(report.outlier_ratio_before) and report.outlier_ratio_before >= 1.0
    data = json.loads(json.dumps(asdict(report)))
    assert data["pairs"] == ["norm-qkv", "up-down"]


def test_zero_activation_channel_keeps_scale_one(tiny_model):
    block = tiny_model.model.layers[0]
    with torch.no_grad():
        block.input_layernorm.weight[5] = 0.0
    q_col = block.self_attn.q_proj.weight[:, 5].clone()
    q_before = block.self_attn.q_proj.weight.clone()
    scale_fold_(tiny_model, CAL, pairs="norm-qkv")
    q = block.self_attn.q_proj.weight
    assert torch.equal(q[:, 5], q_col)
    assert not torch.equal(q, q_before)
    assert torch.isfinite(block.input_layernorm.weight).all()


def test_activation_maxima_match_norm_output(tiny_model):
    block = tiny_model.model.layers[1]
    seen = []
    handle = block.post_attention_layernorm.register_forward_hook(
        lambda _m, _a, out: seen.append(out.detach().abs().reshape(-1, 64).amax(0))
    )
    names = ["model.layers.1.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
    try:
        maxima = activation_maxima(tiny_model, CAL, names)
    finally:
        handle.remove()
    assert list(maxima) == names
    assert len(seen) == 2  # batches of 4 windows: 4 + 2
    torch.testing.assert_close(maxima[names[0]], torch.stack(seen).amax(0))
    assert maxima[names[1]].shape == (96,) and maxima[names[1]].dtype == torch.float32
    with pytest.raises(BitallocError, match="does not exist"):
        activation_maxima(tiny_model, CAL, ["model.layers.9.mlp.up_proj"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, r"alpha must be in \(0, 1\)"),
        ({"alpha": 1.0}, r"alpha must be in \(0, 1\)"),
        ({"alpha": -0.5}, r"alpha must be in \(0, 1\)"),
        ({"alpha": "0.5"}, "alpha must be a number"),
        ({"pairs": ()}, "no fold pairs given"),
        ({"pairs": ("norm-qkv", "q-k")}, "unknown fold pair 'q-k'"),
        ({"windows": torch.arange(32)}, "non-empty 2-D"),
        ({"windows": torch.zeros(0, 32, dtype=torch.long)}, "non-empty 2-D"),
        ({"windows": torch.zeros(2, 8)}, "integer token ids"),
        ({"windows": [[1, 2, 3]]}, "must be an .n, seq_len. tensor"),
    ],
)
def test_bad_arguments(tiny_model, kwargs, message):
    windows = kwargs.pop("windows", CAL)
    original = {n: p.clone() for n, p in tiny_model.state_dict().items()}
    with pytest.raises(BitallocError, match=message):
        scale_fold_(tiny_model, windows, **kwargs)
    assert _max_change(tiny_model, original) == 0.0


def test_not_a_llama_model():
    with pytest.raises(BitallocError, match="no ModuleList of decoder blocks.*Llama-family"):
        scale_fold_(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), CAL)


def test_block_without_input_layernorm_is_refused_untouched(tiny_model):
    original = {n: p.clone() for n, p in tiny_model.state_dict().items()}
    del tiny_model.model.layers[1].input_layernorm
    with pytest.raises(
        BitallocError, match=r"model\.layers\.1 .*no `input_layernorm`.*Llama-family"
    ):
        scale_fold_(tiny_model, CAL)
    state = tiny_model.state_dict()
    assert all(torch.equal(state[n], p) for n, p in original.items() if n in state)


def test_norm_without_weight(tiny_model):
    tiny_model.model.layers[0].post_attention_layernorm = nn.LayerNorm(64, elementwise_affine=False)
    with pytest.raises(BitallocError, match=r"post_attention_layernorm .*has no weight"):
        scale_fold_(tiny_model, CAL)


def test_mlp_without_up_proj(tiny_model):
    del tiny_model.model.layers[0].mlp.up_proj
    with pytest.raises(BitallocError, match=r"no `mlp\.up_proj`; scale folding supports Llama"):
        scale_fold_(tiny_model, CAL, pairs="up-down")


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stored_scales_reproduce_scale_fold_bit_for_bit(tiny_model):
    _add_outliers(tiny_model, factor=30.0, seed=2)
    original = copy.deepcopy(tiny_model)
    scales = fold_scales(tiny_model, CAL)
    assert _same_state(tiny_model, original)  # computing scales changes nothing
    # One vector per layer and pair: hidden for the norms, n_kv * head_dim for v-o (2 kv heads
    # of 16), intermediate for up-down.
    sizes = {"norm-qkv": 64, "norm-gateup": 64, "v-o": 32, "up-down": 96}
    assert {k: tuple(v.shape) for k, v in scales.items()} == {
        f"{i}.{p}": (sizes[p],) for i in range(2) for p in DEFAULT_PAIRS
    }
    for s in scales.values():
        assert s.dtype == torch.float32 and torch.equal(s.half().float(), s)  # float16 exact
        assert bool((s > 0).all()) and not torch.equal(s, torch.ones_like(s))

    folded = copy.deepcopy(original)
    scale_fold_(folded, CAL)
    apply_fold_scales_(tiny_model, scales)
    assert _same_state(tiny_model, folded)
    assert not _same_state(tiny_model, original)


def test_apply_subset_of_scales_folds_only_those(tiny_model):
    ref = _logits(tiny_model, EVAL)
    scales = fold_scales(tiny_model, CAL, pairs="v-o")
    layer0 = {"0.v-o": scales["0.v-o"]}
    before = {n: p.clone() for n, p in tiny_model.state_dict().items()}
    apply_fold_scales_(tiny_model, layer0)
    changed = {n for n, p in tiny_model.state_dict().items() if not torch.equal(p, before[n])}
    assert changed == {
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    }
    assert _rel_err(_logits(tiny_model, EVAL), ref) < 1e-5


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"2.norm-qkv": torch.ones(64)}, "names layer 2, but the model has 2 decoder blocks"),
        ({"0.q-k": torch.ones(64)}, "is not '<layer>.<pair>'"),
        ({"norm-qkv": torch.ones(64)}, "is not '<layer>.<pair>'"),
        ({"\u00b9.v-o": torch.ones(32)}, "is not '<layer>.<pair>'"),  # a non-ASCII digit
        ({"1.up-down": torch.ones(64)}, r"shape \(64,\) but this model needs \(96,\)"),
        ({"1.v-o": torch.ones(2, 16)}, r"shape \(2, 16\) but this model needs \(32,\)"),
        ({"1.norm-qkv": torch.ones(64, dtype=torch.long)}, "floating-point tensor"),
        ({"1.norm-qkv": [1.0] * 64}, "floating-point tensor, got list"),
        ({"1.norm-gateup": torch.ones(64).index_fill(0, torch.tensor([7]), 0.0)}, "entry 7 is 0.0"),
        ({"1.norm-gateup": -torch.ones(64)}, "finite and positive"),
        ({"1.up-down": torch.full((96,), float("nan"))}, "finite and positive"),
        ({"1.up-down": torch.full((96,), float("inf"))}, "finite and positive"),
    ],
)
def test_apply_bad_scales_raises_and_changes_nothing(tiny_model, bad, message):
    good = fold_scales(tiny_model, CAL)
    original = copy.deepcopy(tiny_model)
    # Valid keys first: the bad one must be caught before any of them is folded.
    with pytest.raises(BitallocError, match=message):
        apply_fold_scales_(tiny_model, {**good, **bad})
    assert _same_state(tiny_model, original)


def test_apply_needs_scales_and_a_llama_model(tiny_model):
    with pytest.raises(BitallocError, match="no fold scales given"):
        apply_fold_scales_(tiny_model, {})
    with pytest.raises(BitallocError, match="Llama-family"):
        apply_fold_scales_(nn.Sequential(nn.Linear(4, 4)), {"0.v-o": torch.ones(4)})
    del tiny_model.model.layers[1].mlp.up_proj
    with pytest.raises(BitallocError, match=r"model\.layers\.1 .*no `mlp\.up_proj`"):
        apply_fold_scales_(tiny_model, {"1.up-down": torch.ones(96)})
    # Only the modules of the given pairs are needed: v-o folds without the MLP.
    o_before = tiny_model.model.layers[1].self_attn.o_proj.weight.clone()
    apply_fold_scales_(tiny_model, {"1.v-o": torch.full((32,), 2.0)})
    assert torch.equal(tiny_model.model.layers[1].self_attn.o_proj.weight, 2.0 * o_before)


@pytest.mark.slow
def test_default_model_fold_exact(default_model):
    from bitalloc.data import default_text, tokenize, windows

    model = copy.deepcopy(default_model.model)
    splits = default_text()
    cal = windows(tokenize(default_model.tokenizer, splits.calibration), 64, 8 * 64)
    ev = windows(tokenize(default_model.tokenizer, splits.evaluation), 64, 2 * 64)
    assert ev.shape == (2, 64)
    ref = _logits(model, ev)
    report = scale_fold_(model, cal)
    assert _rel_err(_logits(model, ev), ref) < 1e-4
    n_layers = len(model.model.layers)
    assert report.layers == n_layers and report.tokens == cal.numel()
    assert report.pairs == DEFAULT_PAIRS and report.alpha == 0.5
    assert math.isfinite(report.outlier_ratio_before)
    assert 1.0 <= report.outlier_ratio_after < report.outlier_ratio_before
    assert 0 < report.seconds < 600
    json.dumps(asdict(report))
