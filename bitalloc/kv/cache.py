"""A transformers ``Cache`` that applies a :class:`KVFormat` per attention layer, and perplexity
and greedy generation through it.

Simulation, stated plainly: the cache stores float tensors in the model's dtype, never packed
codes, so it measures the *quality* of a quantized KV cache, not its memory (the memory is
:meth:`KVFormat.cache_bits`). What it stores is exactly what a real quantized cache would hand
back to attention: tokens that have left the full-precision window are replaced by their
dequantized values, keys once a whole group of ``group_size`` tokens has left it. Each group is
quantized once, when it fills, and then frozen, so the view never changes under a token already
in it; a prefill followed by token-by-token decoding therefore stores the same cache as one
forward over the whole sequence (:func:`bitalloc.kv.quantize.fake_quantize_kv` is that view).

Every ``update`` returns the view of the whole layer, including in a single prefill forward:
there every query attends to the quantized older tokens as the cache holds them after the
forward (a key group's range is taken over all its tokens, as the stored group's is), which is
how :func:`kv_perplexity` scores a quantized cache at a stated context in one forward per batch.

Grouped-query attention needs nothing special: the cache holds the (batch, kv_heads, seq,
head_dim) states before the model repeats them for its query heads, and quantizes per KV head.

Sliding-window layers (their window read from the model's config, as transformers' own
``DynamicCache(config=...)`` reads it) keep only the last ``min(tokens, window)`` tokens after
each update, the ones the newest query read; an update still returns the stored tokens plus the
new ones, and :meth:`QuantizedKVLayer.get_mask_sizes` tells the model's mask where they start,
so the model's sliding mask hides what is out of a query's window. Which tokens are quantized
follows absolute positions, as for a full layer, so a sliding layer holds the stored slice of
what a full layer would hold (a key group that fills after losing tokens to the window is
quantized over the tokens still stored). :meth:`QuantizedKVCache.stored_bits` counts what the
layers hold, the count :meth:`KVFormat.cache_bits` predicts.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.evaluate import Perplexity, perplexity
from bitalloc.kv.formats import (
    SCALE_ZERO_BITS,
    AttentionGeometry,
    KVFormat,
    attention_geometry,
    parse_kv_format,
)
from bitalloc.kv.quantize import FULL_BITS, quantize_keys, quantize_values

try:
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
except ImportError:  # transformers before 4.56 has no per-layer cache objects
    raise BitallocError(
        "KV-cache quantization needs transformers >= 4.56 (cache layers); upgrade transformers"
    ) from None

FormatsByLayer = Mapping[int | str, KVFormat | str] | KVFormat | str


def _check_positive(value: object, what: str) -> None:
    # bool is an int subclass; True as a count is a caller's bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BitallocError(f"{what} must be a positive integer, got {value!r}")


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache under a :class:`KVFormat` (None: kept unquantized), holding
    every token (``window`` None) or the last ``window`` tokens of a sliding-window layer.

    ``keys``/``values`` hold the stored tokens as attention reads them, the oldest at absolute
    position ``cumulative_length - keys.shape[-2]``; ``frozen_keys``/``frozen_values`` are the
    absolute positions below which tokens have been replaced by their quantized version.
    """

    # A quantized token cannot be restored, so rolling tokens back (assisted decoding) is refused.
    is_croppable = False

    def __init__(self, fmt: KVFormat | None = None, window: int | None = None) -> None:
        super().__init__()
        if window is not None:
            _check_positive(window, "sliding window (tokens)")
        self.fmt = None if fmt is None or fmt.is_lossless else fmt
        self.window = window
        # Read by transformers (Cache.is_sliding) to size the sliding and the full masks.
        self.is_sliding = window is not None
        self.cumulative_length = 0
        self.frozen_keys = 0
        self.frozen_values = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states, quantize what has just left the full-precision window, and
        keep at most ``window`` tokens; returns the stored tokens and the new ones."""
        first = self.cumulative_length - self.stored_tokens
        # DynamicLayer initialises lazily and appends: keys and values are now every token from
        # absolute position ``first`` on.
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.cumulative_length += key_states.shape[-2]
        if self.fmt is not None:
            self._freeze(keys, values, first)
        if self.window is not None:
            # The last `window` tokens: what the newest query read (the mask hides the oldest of
            # them from the next one).
            self.keys, self.values = keys[:, :, -self.window :], values[:, :, -self.window :]
        return keys, values

    def _freeze(self, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
        """Quantize in place the tokens that the format quantizes at the new length and that
        are not yet; ``keys[:, :, 0]`` is absolute position ``first``."""
        fmt = self.fmt
        n_keys, n_values = fmt.quantized_tokens(self.cumulative_length)
        # ``keys``/``values`` are fresh tensors from torch.cat (never the caller's states), so the
        # newly full groups are overwritten in place: O(new tokens) per step, not O(context).
        start = max(self.frozen_keys, first)
        if n_keys > start:
            # Groups count from position 0; the oldest one may have lost tokens to the window
            # and is quantized over those it still holds.
            aligned = min(n_keys, -(-start // fmt.group_size) * fmt.group_size)
            for lo, hi in ((start, aligned), (aligned, n_keys)):
                if hi > lo:
                    span = slice(lo - first, hi - first)
                    keys[:, :, span] = quantize_keys(keys[:, :, span], fmt.key_bits, fmt.group_size)
        self.frozen_keys = max(self.frozen_keys, n_keys)
        start = max(self.frozen_values, first)
        if n_values > start:
            span = slice(start - first, n_values - first)
            values[:, :, span] = quantize_values(values[:, :, span], fmt.value_bits, fmt.group_size)
        self.frozen_values = max(self.frozen_values, n_values)

    @property
    def stored_tokens(self) -> int:
        """Tokens the layer holds now (at most ``window``)."""
        # Before the first update DynamicLayer holds a 1-D empty tensor.
        if not self.is_initialized or self.keys.dim() < 2:
            return 0
        return self.keys.shape[-2]

    def get_seq_length(self) -> int:
        """Tokens seen since the last reset (a sliding layer stores fewer)."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """(length, absolute position of the first token) of what the next update returns:
        the stored tokens and ``query_length`` new ones."""
        if isinstance(query_length, torch.Tensor):
            # transformers 4.x passes the new tokens' cache positions instead of their count.
            query_length = int(query_length.shape[0])
        stored = self.stored_tokens
        return stored + query_length, self.cumulative_length - stored

    def get_max_length(self) -> int:
        """The window of a sliding layer; -1 (no maximum) for full attention."""
        return -1 if self.window is None else self.window

    def stored_bits(self) -> int:
        """Bits a real cache in this layer's format holds for the stored tokens: codes, an fp16
        scale and zero per key group (per channel) and value group, 16 bits for the rest.

        Counted token by token from what the layer holds (its stored tokens and their absolute
        positions), independently of :meth:`KVFormat.cache_bits`, which predicts it.
        """
        if self.stored_tokens == 0:
            return 0
        batch, heads, stored, head_dim = self.keys.shape
        if self.fmt is None:
            return batch * heads * stored * head_dim * 2 * FULL_BITS
        fmt = self.fmt
        positions = range(self.cumulative_length - stored, self.cumulative_length)
        keys = [p for p in positions if p < self.frozen_keys]
        values = [p for p in positions if p < self.frozen_values]
        key_groups = {p // fmt.group_size for p in keys}
        value_groups = head_dim // fmt.value_group(head_dim)
        per_head = (
            len(keys) * head_dim * fmt.key_bits + len(key_groups) * head_dim * SCALE_ZERO_BITS
        )
        per_head += len(values) * (head_dim * fmt.value_bits + value_groups * SCALE_ZERO_BITS)
        per_head += (2 * stored - len(keys) - len(values)) * head_dim * FULL_BITS
        return batch * heads * per_head

    def reset(self) -> None:
        """Empty the layer (the next update starts a new sequence)."""
        super().reset()
        self.cumulative_length = 0
        self.frozen_keys = self.frozen_values = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Refused unless nothing is removed: quantized tokens cannot be restored."""
        if tokens_to_remove and self.get_seq_length() > 0:
            raise BitallocError(
                "the quantized KV cache cannot drop tokens (quantization is not reversible); "
                "generate without assisted or speculative decoding"
            )


class QuantizedKVCache(DynamicCache):
    """A ``DynamicCache`` whose layer ``i`` applies ``formats_by_layer[i]`` on every update;
    layers not in the map (and K16V16 layers) are kept unquantized. Layers in ``windows``
    (index -> tokens) are sliding-window layers that store at most that many tokens.

    ``num_layers`` is the number of cache slots (the model's decoder layers); use
    :func:`build_kv_cache` to build one checked against a model (windows included).
    """

    def __init__(
        self,
        formats_by_layer: Mapping[int, KVFormat | str],
        num_layers: int,
        windows: Mapping[int, int] | None = None,
    ) -> None:
        _check_positive(num_layers, "num_layers")
        formats = {int(i): parse_kv_format(f) for i, f in formats_by_layer.items()}
        windows = {int(i): w for i, w in (windows or {}).items()}
        for what, layers in (("KV formats", formats), ("sliding windows", windows)):
            outside = sorted(i for i in layers if not 0 <= i < num_layers)
            if outside:
                raise BitallocError(
                    f"{what} given for layers {outside}, but the cache has layers "
                    f"0..{num_layers - 1}; the map was made for another model"
                )
        self.formats: dict[int, KVFormat] = dict(sorted(formats.items()))
        self.windows: dict[int, int] = dict(sorted(windows.items()))
        layers = [
            QuantizedKVLayer(self.formats.get(i), self.windows.get(i)) for i in range(num_layers)
        ]
        # DynamicCache.__init__ would build its own layers (or grow them lazily); the layers are
        # fixed here instead, so Cache's constructor is called directly with them.
        Cache.__init__(self, layers=layers)

    def stored_bits(self) -> int:
        """Bits the layers hold now, as a real cache in their formats would store them
        (:meth:`QuantizedKVLayer.stored_bits`)."""
        return sum(layer.stored_bits() for layer in self.layers)


@dataclass(frozen=True)
class CachePlan:
    """A model's checked cache layout: formats per layer, cache slots, the attention layers that
    must write to the cache, the forward argument that takes it, and the sliding windows of the
    sliding-window layers (index -> tokens)."""

    formats: dict[int, KVFormat]
    num_layers: int
    attention_layers: tuple[int, ...]
    argument: str
    windows: dict[int, int] = field(default_factory=dict)

    def new_cache(self, formats: Mapping[int, KVFormat] | None = None) -> QuantizedKVCache:
        """An empty cache with this plan's formats (or ``formats``, checked by the cache) and
        the model's sliding windows."""
        chosen = self.formats if formats is None else formats
        return QuantizedKVCache(chosen, self.num_layers, self.windows)


def _text_config(model: nn.Module) -> object:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def resolve_formats(model: nn.Module, formats_by_layer: FormatsByLayer) -> dict[int, KVFormat]:
    """Normalise a formats map for ``model``: keys are layer indices or KV unit names
    (``model.layers.3.self_attn.kv``); a single format (or name) applies to every layer."""
    return _resolve(attention_geometry(model), formats_by_layer)


def _resolve(geometry: AttentionGeometry, formats_by_layer: FormatsByLayer) -> dict[int, KVFormat]:
    by_name = {f"{p}.kv": i for p, i in zip(geometry.paths, geometry.layer_indices)}
    layers = sorted(geometry.layer_indices)
    if isinstance(formats_by_layer, KVFormat | str):
        fmt = parse_kv_format(formats_by_layer)
        return {layer: fmt for layer in layers}
    if not isinstance(formats_by_layer, Mapping):
        raise BitallocError(
            "formats_by_layer must map layer indices (or KV unit names) to KV formats, or be one "
            f"format for every layer; got {type(formats_by_layer).__name__}"
        )
    resolved: dict[int, KVFormat] = {}
    for key, fmt in formats_by_layer.items():
        if isinstance(key, str):
            if key not in by_name:
                names = list(by_name)
                raise BitallocError(
                    f"{key!r} is not a KV unit of this model; its KV units are "
                    f"{names[0]} .. {names[-1]}"
                )
            layer = by_name[key]
        elif isinstance(key, int) and not isinstance(key, bool):
            layer = key
        else:
            raise BitallocError(f"KV formats map key {key!r} is neither a layer index nor a name")
        if layer not in layers:
            raise BitallocError(
                f"layer {layer} has no attention to quantize; this model's attention layers are "
                f"{layers[0]}..{layers[-1]} ({len(layers)} layers): the formats map does not "
                "match the model"
            )
        if layer in resolved:
            raise BitallocError(f"layer {layer} is given a KV format twice in the formats map")
        resolved[layer] = parse_kv_format(fmt)
    return resolved


def plan_cache(model: nn.Module, formats_by_layer: FormatsByLayer) -> CachePlan:
    """Check ``model`` and the formats map once, for many caches (:meth:`CachePlan.new_cache`)."""
    geometry = attention_geometry(model)
    formats = _resolve(geometry, formats_by_layer)
    declared = int(getattr(_text_config(model), "num_hidden_layers", 0) or 0)
    slots = max(declared, max(geometry.layer_indices) + 1)
    argument = _cache_argument(model)
    return CachePlan(formats, slots, geometry.layer_indices, argument, geometry.sliding)


def build_kv_cache(model: nn.Module, formats_by_layer: FormatsByLayer) -> QuantizedKVCache:
    """A fresh :class:`QuantizedKVCache` for ``model``, checked against its attention layers
    and against its forward taking a cache argument."""
    return plan_cache(model, formats_by_layer).new_cache()


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a cache: ``cache`` (recent transformers) or the older
    ``past_key_values``; a clear error when the forward takes neither."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise BitallocError(
        f"{type(model).__name__}.forward takes no `cache` / `past_key_values` argument, so the "
        "quantized KV cache cannot be passed to its attention; use a Hugging Face causal LM"
    )


def check_context(model: nn.Module, tokens: int) -> None:
    """Raise :class:`BitallocError` when ``tokens`` exceeds the model's maximum positions."""
    limit = getattr(_text_config(model), "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise BitallocError(
            f"a context of {tokens} tokens exceeds the model's maximum of {limit} positions "
            "(max_position_embeddings); use a shorter sequence length or fewer new tokens"
        )


def forward_with_cache(
    model: nn.Module, ids: torch.Tensor, cache: QuantizedKVCache, plan: CachePlan
) -> torch.Tensor:
    """Logits of one forward through ``cache``; checks every attention layer wrote to it."""
    before = [layer.get_seq_length() for layer in cache.layers]
    out = model(input_ids=ids, use_cache=True, **{plan.argument: cache})
    for index in plan.attention_layers:
        if cache.layers[index].get_seq_length() != before[index] + ids.shape[1]:
            raise BitallocError(
                f"layer {index}'s attention did not store its keys and values in the cache "
                f"passed as `{plan.argument}`; the quantized cache cannot wrap this model's "
                "attention"
            )
    return out.logits


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def kv_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    formats_by_layer: FormatsByLayer,
    *,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "kv perplexity",
) -> Perplexity:
    """Perplexity on (n, context) token windows with a quantized KV cache (protocol of
    :func:`bitalloc.evaluate.perplexity`): one forward per batch with a fresh
    :class:`QuantizedKVCache`, so each window is scored at the stated context length."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
        raise BitallocError("windows must be an (n, context) tensor of token ids")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise BitallocError(
            f"need at least one window of 2+ tokens to score, got shape {tuple(windows.shape)}"
        )
    _check_positive(batch_size, "batch_size")
    check_context(model, windows.shape[1])
    plan = plan_cache(model, formats_by_layer)
    device = model_device(model)

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        # A fresh cache per batch: each window is scored at its own context length.
        return forward_with_cache(model, ids.to(device), plan.new_cache(), plan)

    return perplexity(
        model, windows, batch_size=batch_size, progress=progress, desc=desc, logits_of=logits_of
    )


def generate_ids_with_kv(
    model: nn.Module,
    input_ids: torch.Tensor,
    formats_by_layer: FormatsByLayer,
    max_new_tokens: int = 32,
    *,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding through a quantized KV cache: a prefill of ``input_ids`` (batch, n)
    then one token per forward. Returns the (batch, new) generated ids; stops early once every
    row has produced ``eos_token_id`` (rows that finished first are padded with it)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise BitallocError("input_ids must be a (batch, n) tensor with at least one token")
    _check_positive(max_new_tokens, "max_new_tokens")
    # The last new token is returned, never fed back, so it takes no position.
    check_context(model, input_ids.shape[1] + max_new_tokens - 1)
    plan = plan_cache(model, formats_by_layer)
    cache = plan.new_cache()
    ids = input_ids.to(model_device(model))
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    generated = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            step = ids
            for _ in range(max_new_tokens):
                nxt = forward_with_cache(model, step, cache, plan)[:, -1].argmax(dim=-1)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done |= nxt == eos_token_id
                generated.append(nxt)
                if eos_token_id is not None and bool(done.all()):
                    break
                step = nxt[:, None]
    finally:
        model.train(was_training)
    return torch.stack(generated, dim=1)


def generate_with_kv(
    model: nn.Module,
    tokenizer: object,
    prompt: str,
    formats_by_layer: FormatsByLayer,
    max_new_tokens: int = 32,
    *,
    stop_at_eos: bool = True,
) -> str:
    """Greedy continuation of ``prompt`` (the new text only) with a quantized KV cache.

    The prompt is tokenized with the tokenizer's defaults; generation stops at the tokenizer's
    ``eos_token_id`` when ``stop_at_eos`` and the tokenizer has one.
    """
    ids = tokenizer(prompt)["input_ids"]
    if not len(ids):
        raise BitallocError("the prompt is empty after tokenization; pass some text")
    if not hasattr(tokenizer, "decode"):
        name = type(tokenizer).__name__
        raise BitallocError(f"{name} has no decode(); pass the model's Hugging Face tokenizer")
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    new = generate_ids_with_kv(
        model,
        torch.as_tensor(ids, dtype=torch.long).reshape(1, -1),
        formats_by_layer,
        max_new_tokens,
        eos_token_id=eos,
    )[0].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return tokenizer.decode(new, skip_special_tokens=True)
