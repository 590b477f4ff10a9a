"""Scale folding: move activation outliers into weights before quantization, function unchanged.

RAMP (Reinforcement Adaptive Mixed Precision, 2026) conditions a model for quantization with a
step it calls Scale Folding; the per-channel algebra is that of SmoothQuant (Xiao et al., 2023,
"SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models").
For an input channel ``c`` of a Linear layer whose input is produced by an operation that is
linear per channel, the activation is divided by

    s_c = max|X_c| ** alpha / max|W[:, c]| ** (1 - alpha)

inside that producer and the Linear's weight column is multiplied by ``s_c``. The product is
the same in real arithmetic, so the model computes the same function (up to float rounding),
while the activations feeding the Linear are flatter and channels with large activations get
larger weights, which group-wise weight quantization then represents more precisely.

Folds for Llama-family decoder blocks (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``):

``norm-qkv``
    ``input_layernorm`` (weight and bias) / s; q, k, v columns * s. One ``s`` serves the three
    consumers: its weight term is the largest column maximum over them.
``norm-gateup``
    ``post_attention_layernorm`` / s; gate and up columns * s.
``v-o``
    v_proj output row ``r`` (and bias) / s_r; o_proj column ``j`` * s_kv(j), where ``kv(j)`` is
    the v channel that feeds o's input ``j`` through grouped-query repetition (query head ``h``
    reads kv head ``h // (n_heads // n_kv_heads)`` at the same offset within the head).
    Attention output is a convex combination of value rows, hence linear per channel.
``up-down``
    up_proj row ``r`` (and bias) / s_r; down_proj column ``r`` * s_r, since down's input is
    ``act(gate) * up``, linear in up.

All statistics come from one calibration pass before any weight changes: each fold changes only
the inputs of its own consumers, and every fold is exact, so the other inputs are unaffected.
A second pass measures the outlier ratio afterwards. Scales are clamped to [1e-4, 1e4]; a
channel whose activation or weight maximum is zero keeps s = 1. They are rounded to float16
(any positive scale keeps the function), so a record of them (:mod:`bitalloc.folding_record`)
holds exactly the values that :func:`apply_fold_scales_` folds, bit for bit on any machine.

Norms of the Gemma kind (``x * (1 + w)``) cannot absorb a scale by dividing ``w`` and are
refused; architectures that transform values or the MLP product differently than Llama (output
gating, value norms) would break exactness and are out of scope.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bitalloc.calibration import observe_inputs
from bitalloc.config.messages import ALPHA_NOT_NUMBER, ALPHA_RANGE
from bitalloc.errors import BitallocError
from bitalloc.models import decoder_blocks, get_linear

DEFAULT_PAIRS = ("norm-qkv", "norm-gateup", "v-o", "up-down")

SCALE_MIN = 1e-4
SCALE_MAX = 1e4
BATCH_WINDOWS = 4

_SUPPORTED = (
    "scale folding supports Llama-family blocks (input_layernorm, self_attn.{q,k,v,o}_proj, "
    "post_attention_layernorm, mlp.{gate,up,down}_proj)"
)
# Attribute paths inside a block that each pair needs.
_NEEDS = {
    "norm-qkv": ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "norm-gateup": ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj"),
    "v-o": ("self_attn.v_proj", "self_attn.o_proj"),
    "up-down": ("mlp.up_proj", "mlp.down_proj"),
}
# The Linear whose input each pair flattens (q/k/v and gate/up share one input each).
_MEASURED = {
    "norm-qkv": "self_attn.q_proj",
    "norm-gateup": "mlp.gate_proj",
    "v-o": "self_attn.o_proj",
    "up-down": "mlp.down_proj",
}


@dataclass(frozen=True)
class FoldReport:
    """What :func:`scale_fold_` did; JSON-able via ``dataclasses.asdict``.

    The outlier ratio of one Linear input is max_c(max|X_c|) / median_c(max|X_c|); the reported
    value is its mean over the distinct inputs the chosen pairs flatten (q/k/v count once, as do
    gate/up, since they read the same tensor).
    """

    alpha: float
    pairs: tuple[str, ...]
    tokens: int
    layers: int
    outlier_ratio_before: float
    outlier_ratio_after: float
    seconds: float


def activation_maxima(
    model: nn.Module, windows: torch.Tensor, modules: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Per-input-channel max|x| (float32) of each named Linear's input over ``windows``.

    Forward pre-hooks record the inputs while the model runs on batches of 4 windows under
    ``torch.no_grad`` (in eval mode; the previous mode is restored).
    """
    windows = _check_windows(windows)
    names = list(dict.fromkeys(modules))
    linears = {name: get_linear(model, name) for name in names}
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str, in_features: int):
        def hook(x: torch.Tensor) -> None:
            m = x.reshape(-1, in_features).abs().amax(dim=0).float()
            prev = maxima.get(name)
            maxima[name] = m if prev is None else torch.maximum(prev, m)

        return hook

    hooks = {name: record(name, lin.in_features) for name, lin in linears.items()}
    observe_inputs(model, linears, hooks, windows, BATCH_WINDOWS)
    missing = [name for name in names if name not in maxima]
    if missing:
        raise BitallocError(
            f"{missing[0]!r} was not called during the forward pass, so its input could not be "
            "measured; name Linear layers that the model uses"
        )
    return {name: maxima[name] for name in names}


def fold_scales(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    alpha: float = 0.5,
    pairs: Sequence[str] | str = DEFAULT_PAIRS,
) -> dict[str, torch.Tensor]:
    """The per-channel scales that :func:`scale_fold_` would fold, without changing the model.

    One calibration pass over ``windows`` (an (n, seq_len) tensor of token ids). The result maps
    ``"{layer}.{pair}"`` (e.g. ``"3.norm-qkv"``) to a float32 vector whose values are exactly
    representable in float16, so that a record of them reproduces the folded weights bit for
    bit wherever :func:`apply_fold_scales_` applies them. For ``v-o`` the vector has one entry
    per v_proj output row (n_kv_heads * head_dim); o_proj's columns take its grouped-query
    expansion.
    """
    alpha, pairs, windows = check_alpha(alpha), _check_pairs(pairs), _check_windows(windows)
    return _measure_and_scale(model, windows, alpha, pairs)[0]


def apply_fold_scales_(model: nn.Module, scales: Mapping[str, torch.Tensor]) -> None:
    """Fold ``scales`` (as returned by :func:`fold_scales`) into ``model`` in place.

    Every key must name an existing decoder block and a supported pair, and every vector must
    have the length that pair needs with finite, positive values; all of this is checked before
    the first weight changes, so bad scales leave the model untouched. Any positive scales keep
    the model's function (up to float rounding).
    """
    prefix, blocks = _llama_blocks(model)
    if not scales:
        raise BitallocError("no fold scales given; pass the mapping that fold_scales returned")
    by_block: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in scales.items():
        index, pair = _parse_key(key, len(blocks))
        block = blocks[index]
        _check_block(block, f"{prefix}.{index}", (pair,))
        by_block.setdefault(index, {})[pair] = _check_scale(key, value, _scale_length(block, pair))
    with torch.no_grad():
        for index, block_scales in by_block.items():
            _apply_block_(blocks[index], block_scales)


def scale_fold_(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    alpha: float = 0.5,
    pairs: Sequence[str] | str = DEFAULT_PAIRS,
) -> FoldReport:
    """Fold per-channel scales into the model's decoder blocks in place (under ``no_grad``).

    ``windows`` is an (n, seq_len) tensor of token ids used for calibration. Everything is
    validated before the first weight changes, so a bad model or argument leaves it untouched.
    """
    return fold_with_scales_(model, windows, alpha=alpha, pairs=pairs)[0]


def fold_with_scales_(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    alpha: float = 0.5,
    pairs: Sequence[str] | str = DEFAULT_PAIRS,
) -> tuple[FoldReport, dict[str, torch.Tensor]]:
    """:func:`scale_fold_` that also returns the scales it folded (see :func:`fold_scales`):
    compute them, apply them, and measure the outlier ratio again afterwards."""
    started = time.perf_counter()
    alpha, pairs, windows = check_alpha(alpha), _check_pairs(pairs), _check_windows(windows)
    scales, before = _measure_and_scale(model, windows, alpha, pairs)
    apply_fold_scales_(model, scales)
    after = activation_maxima(model, windows, list(before))
    report = FoldReport(
        alpha=alpha,
        pairs=pairs,
        tokens=int(windows.numel()),
        layers=len(_llama_blocks(model)[1]),
        outlier_ratio_before=_mean_outlier_ratio(before.values()),
        outlier_ratio_after=_mean_outlier_ratio(after.values()),
        seconds=time.perf_counter() - started,
    )
    return report, scales


def _measure_and_scale(
    model: nn.Module, windows: torch.Tensor, alpha: float, pairs: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(scales, input maxima of the measured Linears) from one calibration pass; the model
    is checked first and not changed."""
    prefix, blocks = _llama_blocks(model)
    for index, block in enumerate(blocks):
        _check_block(block, f"{prefix}.{index}", pairs)

    measured = [f"{prefix}.{i}.{_MEASURED[p]}" for i in range(len(blocks)) for p in pairs]
    before = activation_maxima(model, windows, measured)
    scales = {}
    for index, block in enumerate(blocks):
        for pair in pairs:
            act = before[f"{prefix}.{index}.{_MEASURED[pair]}"]
            # Rounded to float16 so that a stored record holds exactly the applied scales.
            s = _pair_scales(block, pair, act, alpha)
            scales[f"{index}.{pair}"] = s.to(torch.float16).to(torch.float32).cpu()
    return scales, before


def outlier_ratio(maxima: torch.Tensor) -> float:
    """max_c / median_c of per-channel activation maxima (inf if the median is zero)."""
    m = maxima.float()
    median = float(m.median())
    return float(m.max()) / median if median > 0 else math.inf


def _mean_outlier_ratio(maxima: Iterable[torch.Tensor]) -> float:
    ratios = [outlier_ratio(m) for m in maxima]
    return sum(ratios) / len(ratios)


# ---------------------------------------------------------------- folding


def _pair_scales(block: nn.Module, pair: str, act: torch.Tensor, alpha: float) -> torch.Tensor:
    """The scale vector of one pair of one block from its consumers' input maxima ``act``."""
    # Only the modules of the chosen pairs were checked to exist.
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if pair == "norm-qkv":
        return _scales(act, _consumers_max([attn.q_proj, attn.k_proj, attn.v_proj]), alpha)
    if pair == "norm-gateup":
        return _scales(act, _consumers_max([mlp.gate_proj, mlp.up_proj]), alpha)
    if pair == "v-o":
        n_kv, groups, head_dim = _gqa_shape(attn)
        # o's input j = (kv * groups + g) * head_dim + d  reads v's output r = kv * head_dim + d;
        # one scale per v row must serve every o column that reads it, so take the group max.
        x = act.reshape(n_kv, groups, head_dim).amax(dim=1).reshape(-1)
        w = _column_max(attn.o_proj.weight).reshape(n_kv, groups, head_dim).amax(dim=1)
        return _scales(x, w.reshape(-1), alpha)
    return _scales(act, _column_max(mlp.down_proj.weight), alpha)  # up-down


def _apply_block_(block: nn.Module, scales: Mapping[str, torch.Tensor]) -> None:
    # Only the modules of the chosen pairs were checked to exist.
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if "norm-qkv" in scales:
        _fold_norm(
            block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], scales["norm-qkv"]
        )
    if "norm-gateup" in scales:
        _fold_norm(
            block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], scales["norm-gateup"]
        )
    if "v-o" in scales:
        s = scales["v-o"]
        n_kv, groups, head_dim = _gqa_shape(attn)
        _scale_rows_(attn.v_proj, s)
        s_o = s.reshape(n_kv, 1, head_dim).expand(n_kv, groups, head_dim).reshape(-1)
        _scale_columns_(attn.o_proj, s_o)
    if "up-down" in scales:
        _scale_rows_(mlp.up_proj, scales["up-down"])
        _scale_columns_(mlp.down_proj, scales["up-down"])


def _consumers_max(consumers: list[nn.Linear]) -> torch.Tensor:
    """Largest column maximum over Linears reading one input: one ``s`` serves them all."""
    return torch.stack([_column_max(lin.weight) for lin in consumers]).amax(dim=0)


def _fold_norm(norm: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.device, norm.weight.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.device, bias.dtype))
    for lin in consumers:
        _scale_columns_(lin, s)


def _gqa_shape(attn: nn.Module) -> tuple[int, int, int]:
    """(n_kv_heads, query heads per kv head, head_dim) from the projections' shapes."""
    v, o = attn.v_proj, attn.o_proj
    config = getattr(attn, "config", None)
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    if not head_dim and config is not None:
        head_dim = config.hidden_size // config.num_attention_heads
    if not head_dim or v.out_features % head_dim or o.in_features % head_dim:
        raise BitallocError(
            f"cannot infer the attention head size (head_dim={head_dim}, v_proj out "
            f"{v.out_features}, o_proj in {o.in_features}); the v-o fold needs whole heads"
        )
    n_kv, n_heads = v.out_features // head_dim, o.in_features // head_dim
    if n_heads % n_kv:
        raise BitallocError(
            f"{n_heads} query heads are not a multiple of {n_kv} key/value heads; "
            "the v-o fold needs grouped-query attention with equal groups"
        )
    return int(n_kv), int(n_heads // n_kv), int(head_dim)


def _scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    x = x_max.to(w_max.device, torch.float32)
    w = w_max.to(torch.float32)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    ok = (x > 0) & (w > 0) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s))
    return s.clamp(SCALE_MIN, SCALE_MAX)


def _column_max(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().amax(dim=0).float()


def _scale_columns_(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.mul_(s.to(lin.weight.device, lin.weight.dtype)[None, :])


def _scale_rows_(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.div_(s.to(lin.weight.device, lin.weight.dtype)[:, None])
    if lin.bias is not None:
        lin.bias.div_(s.to(lin.bias.device, lin.bias.dtype))


# ---------------------------------------------------------------- validation


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in (0, 1), the migration strength; a clear error otherwise."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise BitallocError(ALPHA_NOT_NUMBER.format(alpha=alpha))
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise BitallocError(ALPHA_RANGE.format(alpha=alpha))
    return alpha


def _check_pairs(pairs: Sequence[str] | str) -> tuple[str, ...]:
    chosen = (pairs,) if isinstance(pairs, str) else tuple(pairs)
    unknown = [p for p in chosen if p not in DEFAULT_PAIRS]
    if unknown:
        raise BitallocError(
            f"unknown fold pair {unknown[0]!r}; choose from {', '.join(DEFAULT_PAIRS)}"
        )
    if not chosen:
        raise BitallocError(f"no fold pairs given; choose at least one of {DEFAULT_PAIRS}")
    return tuple(p for p in DEFAULT_PAIRS if p in chosen)


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor):
        raise BitallocError(
            f"windows must be an (n, seq_len) tensor of token ids, got {type(windows).__name__}"
        )
    if windows.dim() != 2 or windows.numel() == 0:
        raise BitallocError(
            f"windows must be a non-empty 2-D (n, seq_len) tensor of token ids, got shape "
            f"{tuple(windows.shape)}"
        )
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise BitallocError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    return windows.long()


def _llama_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    try:
        return decoder_blocks(model)
    except BitallocError:
        raise BitallocError(
            f"{type(model).__name__} has no ModuleList of decoder blocks (such as "
            f"`model.layers`); {_SUPPORTED}"
        ) from None


def _check_block(block: nn.Module, where: str, pairs: tuple[str, ...]) -> None:
    needed = dict.fromkeys(path for p in pairs for path in _NEEDS[p])
    for path in needed:
        module = block
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                raise BitallocError(
                    f"{where} ({type(block).__name__}) has no `{path}`; {_SUPPORTED}"
                )
        if path.endswith("_proj") and not isinstance(module, nn.Linear):
            raise BitallocError(
                f"{where}.{path} is a {type(module).__name__}, not nn.Linear; {_SUPPORTED}"
            )
        if path.endswith("layernorm"):
            _check_norm(module, f"{where}.{path}")
    if "norm-qkv" in pairs:
        _check_width(block.input_layernorm, [block.self_attn.q_proj], where, "input_layernorm")
    if "norm-gateup" in pairs:
        norm = block.post_attention_layernorm
        _check_width(norm, [block.mlp.gate_proj], where, "post_attention_layernorm")
    if "v-o" in pairs:
        _gqa_shape(block.self_attn)
    if "up-down" in pairs and block.mlp.up_proj.out_features != block.mlp.down_proj.in_features:
        raise BitallocError(f"{where}: up_proj outputs do not match down_proj inputs; {_SUPPORTED}")


def _check_norm(norm: nn.Module, where: str) -> None:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise BitallocError(
            f"{where} ({type(norm).__name__}) has no weight (elementwise_affine=False?); scale "
            "folding divides the norm's per-channel weight by the scales, so it needs one"
        )
    if "gemma" in type(norm).__name__.lower():
        raise BitallocError(
            f"{where} is a {type(norm).__name__}, which multiplies by (1 + weight), so a scale "
            f"cannot be folded into it; {_SUPPORTED}"
        )


def _check_width(norm: nn.Module, consumers: list[nn.Linear], where: str, name: str) -> None:
    if norm.weight.dim() != 1 or norm.weight.numel() != consumers[0].in_features:
        raise BitallocError(
            f"{where}.{name} weight has shape {tuple(norm.weight.shape)} but its consumers read "
            f"{consumers[0].in_features} channels; {_SUPPORTED}"
        )


def _parse_key(key: object, n_blocks: int) -> tuple[int, str]:
    """``"{layer}.{pair}"`` -> (layer, pair), checked against the model's blocks."""
    layer, _, pair = key.partition(".") if isinstance(key, str) else ("", "", "")
    if not (layer.isascii() and layer.isdigit()) or pair not in DEFAULT_PAIRS:
        raise BitallocError(
            f"fold scale key {key!r} is not '<layer>.<pair>' with a pair among "
            f"{', '.join(DEFAULT_PAIRS)} (e.g. '0.norm-qkv')"
        )
    if int(layer) >= n_blocks:
        raise BitallocError(
            f"fold scale key {key!r} names layer {int(layer)}, but the model has {n_blocks} "
            "decoder blocks; the scales were computed for another model"
        )
    return int(layer), pair


def _scale_length(block: nn.Module, pair: str) -> int:
    """How many scales ``pair`` needs in ``block``: the number of channels it rescales."""
    if pair == "norm-qkv":
        return int(block.self_attn.q_proj.in_features)
    if pair == "norm-gateup":
        return int(block.mlp.gate_proj.in_features)
    if pair == "v-o":
        return int(block.self_attn.v_proj.out_features)
    return int(block.mlp.up_proj.out_features)


def _check_scale(key: str, value: object, length: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise BitallocError(
            f"fold scales {key!r} must be a floating-point tensor, got {type(value).__name__}"
            + (f" of {value.dtype}" if isinstance(value, torch.Tensor) else "")
        )
    if value.dim() != 1 or value.numel() != length:
        raise BitallocError(
            f"fold scales {key!r} have shape {tuple(value.shape)} but this model needs "
            f"({length},); the scales were computed for another model"
        )
    s = value.detach().to(torch.float32)
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise BitallocError(
            f"fold scales {key!r} must be finite and positive (a fold divides by them); entry "
            f"{first} is {float(s[first])}"
        )
    return s
