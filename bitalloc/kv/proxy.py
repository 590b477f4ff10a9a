"""The ``proxy`` measure of :class:`~bitalloc.kv.profiler.KVProfiler`: queries captured in
forward pre-hooks and causal attention recomputed offline under each KV format (the module
docstring of :mod:`bitalloc.kv.profiler` explains the capture and its self-check)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.kv.formats import FULL_BITS, KVFormat
from bitalloc.kv.quantize import fake_quantize_kv


def quantizes(fmt: KVFormat, seq_len: int) -> bool:
    """Whether ``fmt`` changes any cached token in a context of ``seq_len`` tokens."""
    return not fmt.is_lossless and any(fmt.quantized_tokens(seq_len))


def _side(bits: int, fmt: KVFormat) -> tuple[int, ...]:
    """What determines one side's (keys' or values') quantized view: 16 bits is the same view
    under every layout."""
    return (FULL_BITS,) if bits == FULL_BITS else (bits, fmt.group_size, fmt.residual)


class QueryCapture:
    """Pre-hooks recording, per attention layer, the rotated queries and the ``o_proj`` input."""

    def __init__(self, modules: dict[int, nn.Module], head_dim: int) -> None:
        self.head_dim = head_dim
        self.queries: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = []
        for layer, attn in modules.items():
            if not isinstance(getattr(attn, "q_proj", None), nn.Linear) or not isinstance(
                getattr(attn, "o_proj", None), nn.Linear
            ):
                raise BitallocError(
                    f"attention layer {layer} ({type(attn).__name__}) has no q_proj/o_proj "
                    "Linear layers; the KV proxy needs Llama-like attention, use method='loss'"
                )
            self.handles.append(
                attn.register_forward_pre_hook(self._query_hook(layer), with_kwargs=True)
            )
            self.handles.append(attn.o_proj.register_forward_pre_hook(self._output_hook(layer)))

    def _query_hook(self, layer: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rotary = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, self.head_dim)
            if isinstance(getattr(module, "q_norm", None), nn.Module):
                q = module.q_norm(q)  # QK-norm models (Qwen3) normalise before RoPE
            q = q.transpose(1, 2)
            if rotary is not None:
                q = _rotate(module, q, *rotary)
            self.queries[layer] = q

        return record

    def _output_hook(self, layer: int):
        def record(module: nn.Module, args: tuple) -> None:
            self.outputs[layer] = args[0]

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _rotate(attn: nn.Module, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on queries with the attention's own modelling function (the standard rotate-half
    form when its module has none); the reconstruction check catches any mismatch."""
    apply = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if apply is not None:
        try:
            return apply(q, q, cos, sin)[0]
        except TypeError:  # another signature: fall back to the standard form below
            pass
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def attention_errors(
    capture: QueryCapture,
    layer: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    formats: Sequence[KVFormat],
    attn: nn.Module,
) -> tuple[np.ndarray, float, float]:
    """Squared attention-output error of every format, the output's energy, and the relative
    difference between the offline attention and the model's own output."""
    if layer not in capture.queries or layer not in capture.outputs:
        raise BitallocError(
            f"attention layer {layer} was not called with its q_proj/o_proj in the forward; "
            "the KV proxy cannot capture its queries, use method='loss'"
        )
    q = capture.queries.pop(layer).float()
    batch, heads, seq, dim = q.shape
    reference = capture.outputs.pop(layer).float().reshape(batch, seq, heads, dim).transpose(1, 2)
    repeat = heads // keys.shape[1]
    scaling = float(getattr(attn, "scaling", dim**-0.5))
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)

    def probabilities(k: torch.Tensor) -> torch.Tensor:
        k = k.float().repeat_interleave(repeat, dim=1)  # GQA: query head h reads KV head h // r
        scores = (q @ k.transpose(-1, -2)) * scaling
        return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)

    def attend(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return p @ v.float().repeat_interleave(repeat, dim=1)

    exact = attend(probabilities(keys), values)
    check = float((exact - reference).norm() / reference.norm().clamp(min=1e-30))
    tolerance = 1e-3 if keys.dtype == torch.float32 else 3e-2
    if not check <= tolerance:
        raise BitallocError(
            f"the KV proxy could not reproduce attention layer {layer}'s output (relative "
            f"difference {check:.2g}); this attention is not plain causal softmax attention "
            "over rotary queries (soft-capping, sinks?): use method='loss' or method='kl'"
        )
    # Formats sharing a key quantization share the attention probabilities, the expensive
    # (batch, heads, seq, seq) part: one key variant at a time keeps one of them in memory.
    by_keys: dict[tuple[int, ...], list[int]] = {}
    for j, fmt in enumerate(formats):
        if quantizes(fmt, seq):
            by_keys.setdefault(_side(fmt.key_bits, fmt), []).append(j)
    quantized_values: dict[tuple[int, ...], torch.Tensor] = {(FULL_BITS,): values}
    errors = np.zeros(len(formats))
    for columns in by_keys.values():
        fmt = formats[columns[0]]
        k_only = KVFormat(fmt.key_bits, FULL_BITS, fmt.group_size, fmt.residual)
        p = probabilities(fake_quantize_kv(keys, values, k_only)[0])
        for j in columns:
            fmt = formats[j]
            value_id = _side(fmt.value_bits, fmt)
            if value_id not in quantized_values:
                v_only = KVFormat(FULL_BITS, fmt.value_bits, fmt.group_size, fmt.residual)
                quantized_values[value_id] = fake_quantize_kv(keys, values, v_only)[1]
            errors[j] = float(((attend(p, quantized_values[value_id]) - exact) ** 2).sum())
    return errors, float((exact**2).sum()), check
