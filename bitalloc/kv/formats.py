"""KV-cache formats: a (key bits, value bits) pair per attention layer, its exact storage cost,
and the KV units that an allocation decides.

A format is a frozen object with a stable name:

- ``K8V4``: keys in 8 bits, values in 4 bits, groups of 64, no full-precision window.
- ``K8V4-g32-r128``: groups of 32 and the 128 most recent tokens kept at 16 bits. Both suffixes
  are written whenever either differs from its default; on parse either may be left out.
- ``KV8`` is accepted on parse as an alias of ``K8V8`` (the canonical name).

Bits are taken from {2, 4, 8, 16}; 16 means the tensor is kept unquantized (fp16). The layout is
KIVI's (Liu et al., 2024): keys are quantized per channel over groups of ``group_size``
consecutive tokens (key outliers live in fixed channels, so a channel's range is narrow along the
sequence), values per token over groups of ``group_size`` channels (values have no channel
outliers, and per-token error stays local to the token it belongs to). Quantization is
asymmetric min-max; every group stores an fp16 scale and an fp16 zero.

Storage rule (the one :meth:`KVFormat.cache_bits` counts and the cache simulates), for a context
of ``T`` tokens, residual window ``R`` and group size ``G``:

- the last ``min(R, T)`` tokens are kept at 16 bits (keys and values);
- of the ``T - R`` older tokens, keys are quantized in whole groups of ``G`` tokens counted from
  the first token; a trailing partial key group stays at 16 bits until it fills (KIVI keeps it
  in its full-precision buffer);
- every older value token is quantized (a value group lies within one token, so none is partial).

A sliding-window attention layer of window ``W`` (Gemma 2/3, Mistral, Qwen2/3 with
``use_sliding_window``) stores only the last ``min(T, W)`` tokens: the ones the query of the
last token read. Which of them are quantized follows the rule above on absolute positions, so
they are exactly the stored slice of what a full-attention layer would hold, and a key group
is counted (one scale and zero per channel) while any of its quantized tokens is still stored.
A group that fills after some of its tokens left the window is quantized over the tokens it
still holds (:class:`~bitalloc.kv.cache.QuantizedKVLayer` does so). ``window=None`` is full
attention.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.formats import CacheFormat, parse_format_list
from bitalloc.kv.quantize import FULL_BITS, KV_BITS, fake_quantize_kv
from bitalloc.models import Unit, decoder_blocks

DEFAULT_GROUP_SIZE = 64
DEFAULT_RESIDUAL = 0
SCALE_ZERO_BITS = 32  # fp16 scale + fp16 zero per group

_NAME = re.compile(r"^k(\d+)v(\d+)(?:-g(\d+))?(?:-r(\d+))?$")
_ALIAS = re.compile(r"^kv(\d+)(?:-g(\d+))?(?:-r(\d+))?$")


def _check_int(value: object, what: str, minimum: int) -> int:
    # bool is an int subclass; True as a group size is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BitallocError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def stored_tokens(context: int, window: int | None = None) -> int:
    """Tokens one layer's cache stores at a context of ``context`` tokens: all of them for full
    attention (``window`` None), the last ``min(context, window)`` for a sliding window."""
    _check_int(context, "context", 0)
    if window is None:
        return context
    return min(context, _check_int(window, "sliding window (tokens)", 1))


@dataclass(frozen=True)
class KVFormat(CacheFormat):
    """One KV-cache palette entry: key and value code widths, group size, residual window.

    The ``kv`` family of :class:`~bitalloc.formats.base.CacheFormat`; names parse back with
    :func:`parse_kv_format`.

    ``group_size`` is tokens per key group (per channel) and channels per value group (per
    token; a group never spans two heads, so ``group_size >= head_dim`` means one group per head).
    ``residual`` is how many of the most recent tokens stay at 16 bits.
    """

    key_bits: int
    value_bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    residual: int = DEFAULT_RESIDUAL

    def __post_init__(self) -> None:
        for what, bits in (("key", self.key_bits), ("value", self.value_bits)):
            if isinstance(bits, bool) or bits not in KV_BITS:
                raise BitallocError(
                    f"unsupported {what} width {bits!r} bits; KV formats take bits from {KV_BITS} "
                    "(16 keeps the tensor unquantized)"
                )
        _check_int(self.group_size, "KV group size", 1)
        if self.group_size % 8:
            raise BitallocError(
                f"KV group size {self.group_size} is not a positive multiple of 8; use 32, 64 "
                "or 128 (KIVI's sizes)"
            )
        _check_int(self.residual, "KV residual window (tokens kept at 16 bits)", 0)

    @property
    def name(self) -> str:
        """Stable name: ``K8V4`` with default group and residual, else ``K8V4-g32-r128``."""
        base = f"K{self.key_bits}V{self.value_bits}"
        if self.group_size == DEFAULT_GROUP_SIZE and self.residual == DEFAULT_RESIDUAL:
            return base
        return f"{base}-g{self.group_size}-r{self.residual}"

    @property
    def family(self) -> str:
        """``kv``: the one cache-format family."""
        return "kv"

    @property
    def is_lossless(self) -> bool:
        """True when neither keys nor values are quantized (K16V16)."""
        return self.key_bits == FULL_BITS and self.value_bits == FULL_BITS

    @property
    def avg_bits(self) -> float:
        """Asymptotic bits per cached element (long context), for display.

        Assumes ``head_dim`` is a multiple of ``group_size`` (value groups of ``group_size``
        channels); :meth:`bits_per_element` is the exact figure for a given model and context.
        """
        per_group = SCALE_ZERO_BITS / self.group_size
        k = FULL_BITS if self.key_bits == FULL_BITS else self.key_bits + per_group
        v = FULL_BITS if self.value_bits == FULL_BITS else self.value_bits + per_group
        return (k + v) / 2

    def value_group(self, head_dim: int) -> int:
        """Channels per value group for heads of ``head_dim`` channels (clear error if uneven)."""
        _check_int(head_dim, "head_dim", 1)
        group = min(self.group_size, head_dim)
        if head_dim % group:
            raise BitallocError(
                f"{self.name}: value groups of {self.group_size} channels do not divide "
                f"head_dim {head_dim}; choose a group size that divides {head_dim} or is >= it"
            )
        return group

    def quantized_tokens(self, context: int) -> tuple[int, int]:
        """(key tokens, value tokens) stored quantized in a context of ``context`` tokens.

        The rest are at 16 bits (see the module docstring for the rule). A 16-bit side has 0.
        """
        _check_int(context, "context", 0)
        old = max(0, context - self.residual)
        keys = 0 if self.key_bits == FULL_BITS else (old // self.group_size) * self.group_size
        values = 0 if self.value_bits == FULL_BITS else old
        return keys, values

    def cache_bits(
        self,
        context: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        window: int | None = None,
    ) -> int:
        """Exact stored bits of one layer's K and V cache: codes, fp16 scales and zeros, and the
        16-bit tokens (residual window and trailing partial key group). ``window`` is the
        layer's sliding window (None: full attention); such a layer stores the last
        ``min(context, window)`` tokens (see the module docstring).

        Every other storage figure (bits per element, unit costs) derives from this count.
        """
        _check_int(batch, "batch", 1)
        _check_int(n_kv_heads, "n_kv_heads", 1)
        v_group = self.value_group(head_dim)
        stored = stored_tokens(context, window)
        first = context - stored  # absolute position of the oldest stored token
        key_end, value_end = self.quantized_tokens(context)
        key_q = max(0, key_end - first)
        # Key groups with a stored quantized token; the oldest may have lost its first tokens.
        key_groups = key_end // self.group_size - first // self.group_size if key_q else 0
        value_q = max(0, value_end - first)
        key_bits = key_q * head_dim * self.key_bits
        key_bits += key_groups * head_dim * SCALE_ZERO_BITS
        key_bits += (stored - key_q) * head_dim * FULL_BITS
        value_bits = value_q * head_dim * self.value_bits
        value_bits += value_q * (head_dim // v_group) * SCALE_ZERO_BITS
        value_bits += (stored - value_q) * head_dim * FULL_BITS
        return batch * n_kv_heads * (key_bits + value_bits)

    def bits_per_element(
        self, head_dim: int, n_kv_heads: int, context: int, window: int | None = None
    ) -> float:
        """Stored bits per cached element (``2 * n_kv_heads * head_dim`` per stored token),
        averaged over the tokens stored at a context of ``context`` tokens (all of them, or the
        last ``min(context, window)`` for a sliding window): :meth:`cache_bits` divided by the
        element count."""
        _check_int(context, "context", 1)
        elements = 2 * n_kv_heads * head_dim * stored_tokens(context, window)
        return self.cache_bits(context, 1, n_kv_heads, head_dim, window) / elements

    def fake_quantize(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a cache in this format returns for keys and values of shape (batch, heads,
        tokens, head_dim): :func:`bitalloc.kv.quantize.fake_quantize_kv`."""
        return fake_quantize_kv(keys, values, self)

    def storage_bits(self, shape: tuple[int, int], context: int, window: int | None = None) -> int:
        """Exact cache bits of a KV unit of ``shape`` = (2 * n_kv_heads, head_dim) over
        ``context`` tokens at batch 1, with the unit's sliding ``window`` (None: full
        attention; see :func:`kv_units`)."""
        rows, head_dim = shape
        if rows <= 0 or rows % 2:
            raise BitallocError(
                f"a KV unit's shape is (2 * n_kv_heads, head_dim); got {tuple(shape)}"
            )
        return self.cache_bits(context, 1, rows // 2, head_dim, window)

    def __str__(self) -> str:
        return self.name


def parse_kv_format(name: str | KVFormat) -> KVFormat:
    """Build a format from its name (``K8V4``, ``K4V2-g32-r128``, alias ``KV8``); formats pass."""
    if isinstance(name, KVFormat):
        return name
    text = str(name).strip().lower()
    match = _NAME.match(text)
    if match:
        key, value, group, residual = match.groups()
    else:
        alias = _ALIAS.match(text)
        if not alias:
            raise BitallocError(
                f"unknown KV format {name!r}; use 'K<key bits>V<value bits>' such as 'K8V4', "
                "optionally with '-g<group>' and '-r<recent tokens kept at 16 bits>' "
                f"('K4V2-g32-r128'), bits from {KV_BITS}"
            )
        key, group, residual = alias.groups()
        value = key
    return KVFormat(
        int(key),
        int(value),
        DEFAULT_GROUP_SIZE if group is None else int(group),
        DEFAULT_RESIDUAL if residual is None else int(residual),
    )


def kv_palette(
    spec: str | Iterable[str | KVFormat] | None = None,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    residual: int = DEFAULT_RESIDUAL,
) -> tuple[KVFormat, ...]:
    """A KV palette, cheapest first: None gives all 16 (key, value) pairs with ``group_size``
    and ``residual``; otherwise a comma list of names or an iterable of names/formats."""
    if spec is None:
        palette = tuple(KVFormat(k, v, group_size, residual) for k in KV_BITS for v in KV_BITS)
    else:
        palette = parse_format_list(spec, parse_kv_format, what="KV palette", example="K8V4")
    return tuple(sorted(palette, key=lambda f: (f.avg_bits, f.key_bits, f.name)))


@dataclass(frozen=True)
class AttentionGeometry:
    """What the KV cache of a model looks like: per attention layer, its module path, index and
    sliding window (None: full attention), plus the shared head layout."""

    paths: tuple[str, ...]
    layer_indices: tuple[int, ...]
    n_kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...] | None = None

    def window_of(self, layer: int) -> int | None:
        """The sliding window of cache layer ``layer`` (None: full attention)."""
        if self.windows is None:
            return None
        return dict(zip(self.layer_indices, self.windows)).get(layer)

    @property
    def sliding(self) -> dict[int, int]:
        """Cache layer index -> window, for the sliding-window layers only."""
        windows = self.windows or (None,) * len(self.layer_indices)
        return {i: w for i, w in zip(self.layer_indices, windows) if w is not None}


@dataclass(frozen=True)
class KVUnit(Unit):
    """A KV unit (see :func:`kv_units`) with its layer's sliding ``window``: the most tokens its
    cache holds (None: full attention, every token of the context)."""

    window: int | None = None


def attention_geometry(model: nn.Module) -> AttentionGeometry:
    """Find every Llama-like attention module (``k_proj`` and ``v_proj`` Linear layers, or a
    fused ``qkv_proj``) in the decoder blocks, the KV head layout and each layer's sliding
    window from the config
    (``layer_types`` / ``sliding_window``, read as transformers' caches read them); a clear
    error otherwise, naming any attention type the cache cannot hold (chunked, linear, ...)."""
    config = getattr(model, "config", None)
    if config is None:
        raise BitallocError(
            f"{type(model).__name__} has no config; KV-cache quantization needs a Hugging Face "
            "causal LM with num_key_value_heads and head_dim (or hidden_size/num_attention_heads)"
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and n_heads and getattr(config, "hidden_size", None):
        head_dim = config.hidden_size // n_heads
    if not n_kv or not head_dim:
        raise BitallocError(
            f"the config of {type(model).__name__} gives no num_key_value_heads / head_dim; "
            "KV-cache quantization supports Llama-like attention (k_proj, v_proj, grouped heads)"
        )
    prefix, blocks = decoder_blocks(model)
    paths, indices = [], []
    for layer, block in enumerate(blocks):
        found = [(sub, module) for sub, module in block.named_modules() if _projections(module)]
        if not found:
            continue
        if len(found) > 1:
            raise BitallocError(
                f"block {prefix}.{layer} holds {len(found)} attention modules; KV-cache "
                "quantization supports one self-attention per decoder block"
            )
        sub, attn = found[0]
        n_heads = int(getattr(config, "num_attention_heads", 0) or 0)
        for proj, out, expected in _projections(attn):
            want, formula = expected(n_heads, int(n_kv), int(head_dim))
            if out != want:
                raise BitallocError(
                    f"{prefix}.{layer}.{sub}.{proj} has {out} outputs, not {formula} = {want}; "
                    "the config does not describe this model"
                )
        paths.append(f"{prefix}.{layer}.{sub}" if sub else f"{prefix}.{layer}")
        # The cache is addressed by the attention's own layer_idx (what it passes to update).
        indices.append(int(getattr(attn, "layer_idx", layer)))
    if not paths:
        raise BitallocError(
            f"{type(model).__name__} has no Llama-like attention (modules with k_proj and v_proj "
            "Linear layers, or a fused qkv_proj) in its decoder blocks; KV-cache quantization "
            "cannot wrap it"
        )
    windows = tuple(_window(config, t) for t in _attention_types(config, indices))
    return AttentionGeometry(tuple(paths), tuple(indices), int(n_kv), int(head_dim), windows)


def _projections(module: nn.Module) -> list[tuple[str, int, object]]:
    """The key/value projections of a Llama-like attention module, each with its output width
    and the width the config implies: separate ``k_proj`` and ``v_proj`` (n_kv x head_dim
    each), or one fused ``qkv_proj`` (Phi-3: queries, keys and values stacked). Empty for any
    other module. The cache itself sees keys and values after the projections, so either
    layout is quantized the same way."""
    k, v = getattr(module, "k_proj", None), getattr(module, "v_proj", None)
    if isinstance(k, nn.Linear) and isinstance(v, nn.Linear):

        def kv(_heads: int, n_kv: int, head_dim: int) -> tuple[int, str]:
            return n_kv * head_dim, f"num_key_value_heads x head_dim = {n_kv} x {head_dim}"

        return [("k_proj", k.out_features, kv), ("v_proj", v.out_features, kv)]
    fused = getattr(module, "qkv_proj", None)
    if isinstance(fused, nn.Linear):

        def qkv(heads: int, n_kv: int, head_dim: int) -> tuple[int, str]:
            formula = (
                "(num_attention_heads + 2 x num_key_value_heads) x head_dim = "
                f"({heads} + 2 x {n_kv}) x {head_dim}"
            )
            return (heads + 2 * n_kv) * head_dim, formula

        return [("qkv_proj", fused.out_features, qkv)]
    return []


#: Attention layer types the quantized cache reproduces (transformers' ``layer_types`` names).
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _declares(config: object, field: str) -> bool:
    """Whether the config's class defines ``field`` (a dataclass field / class default, or an
    ``__init__`` argument in older transformers), rather than it being set on one instance."""
    cls = type(config)
    if hasattr(cls, field):
        return True
    try:
        return field in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _attention_types(config: object, indices: Sequence[int]) -> list[str]:
    """The attention type of each cache layer in ``indices``, read from the config as
    transformers' caches read it (``layer_types``; else ``sliding_window`` or
    ``attention_chunk_size`` for every layer); a clear error for types the cache cannot hold."""
    if getattr(config, "use_bidirectional_attention", False) or not getattr(
        config, "is_causal", True
    ):
        raise BitallocError(
            "the model's attention is bidirectional (use_bidirectional_attention / is_causal), "
            "so a token's keys are read by earlier tokens too; KV-cache quantization supports "
            "causal language models"
        )
    declared = getattr(config, "layer_types", None)
    if declared is not None:
        declared = list(declared)
        outside = [i for i in indices if not 0 <= i < len(declared)]
        if outside:
            raise BitallocError(
                f"attention layers {outside} are not listed in the config's layer_types "
                f"({len(declared)} entries); the config does not describe this model"
            )
        types = [declared[i] for i in indices]
    elif getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    ):
        types = ["sliding_attention"] * len(indices)
    elif getattr(config, "attention_chunk_size", None) is not None:
        types = ["chunked_attention"] * len(indices)
    else:
        types = ["full_attention"] * len(indices)
    unsupported = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        named = ", ".join(t.replace("_", " ") for t in unsupported)
        raise BitallocError(
            f"the model has {unsupported} attention layers; KV-cache quantization supports "
            f"{' and '.join(SUPPORTED_LAYER_TYPES)} layers only, not {named}"
        )
    if "sliding_attention" in types and not _declares(config, "sliding_window"):
        # transformers would build sliding cache layers from such a config, but the model's
        # attention (and its masks) ignore a field its config class does not define.
        raise BitallocError(
            f"the config sets a sliding-window size (sliding_window="
            f"{getattr(config, 'sliding_window', None)}) that {type(config).__name__} does not "
            "define, so the model's attention does not apply it; remove it from the config, or "
            "use a model class with sliding-window attention (Mistral, Qwen2, Gemma 2/3)"
        )
    return types


def _window(config: object, layer_type: str) -> int | None:
    """The sliding window of a layer of ``layer_type`` (None for full attention)."""
    if layer_type != "sliding_attention":
        return None
    window = getattr(config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise BitallocError(
            f"the config lists sliding_attention layers but its sliding_window is {window!r}; "
            "set sliding_window to the window size in tokens"
        )
    return window


def kv_units(model: nn.Module) -> list[KVUnit]:
    """One unit per attention layer, kind ``kv``: the decision is that layer's :class:`KVFormat`.

    Name ``<attention path>.kv`` (``model.layers.3.self_attn.kv``), role ``kv``, group = name.
    ``shape`` is (2 * n_kv_heads, head_dim): one token's K and V rows in that layer, so ``numel``
    is the number of elements cached per stored token and ``head_dim`` is recoverable for the
    value grouping (:meth:`KVFormat.storage_bits` takes this shape). ``window`` is the layer's
    sliding window (None: full attention), which caps the tokens its cache stores.
    """
    geometry = attention_geometry(model)
    shape = (2 * geometry.n_kv_heads, geometry.head_dim)
    return [
        KVUnit(
            name=f"{path}.kv",
            shape=shape,
            layer=index,
            role="kv",
            group=f"{path}.kv",
            kind="kv",
            window=geometry.window_of(index),
        )
        for path, index in zip(geometry.paths, geometry.layer_indices)
    ]
