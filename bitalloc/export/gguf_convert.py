"""A Hugging Face Llama model and its tokenizer as the source of a GGUF export.

:func:`~bitalloc.export.gguf.export_gguf` copies metadata and tokenizer from a GGUF file. For a
model loaded from a Hugging Face directory there is none, so :func:`convert_llama` builds the
same description from the model: llama.cpp's ``llama.*`` hyper-parameters from the config, the
tokenizer's vocabulary, token types, merges and pre-tokenizer name (``tokenizer.ggml.*``), and
every parameter as a
float32 tensor under its llama.cpp name (the ``gguf`` package's tensor-name map; q/k rows are
permuted by the exporter exactly as for a GGUF source).

Converted: Llama-architecture models without biases or RoPE scaling, with a byte-level BPE
tokenizer (GPT-2 style, as SmolLM2, Llama 3 and most recent models use). Anything else is
refused with the missing piece named and the way around it (llama.cpp's own
``convert_hf_to_gguf.py``, then allocate on that file). llama.cpp picks its pre-tokenizer (how
text is split before BPE) by name; the converter names the common ones from tokenizer.json
(GPT-2's regex, SmolLM's digit splitting, Llama 3's and Qwen2's patterns) and otherwise writes
``default``, which can split differently, and the export's report says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import gguf
import numpy as np
from torch import nn

from bitalloc.errors import BitallocError

_T = gguf.GGUFValueType
#: What a converted file says about its pre-tokenizer (see the module).
PRE_TOKENIZER_NOTE = (
    "the tokenizer was converted with llama.cpp's default pre-tokenizer; if llama.cpp splits "
    "text differently from the model's own tokenizer, convert with llama.cpp's "
    "convert_hf_to_gguf.py and allocate on that file"
)


@dataclass(frozen=True)
class SourceField:
    """A metadata key as the exporter reads it (the shape of gguf's ``ReaderField``)."""

    name: str
    value: object
    types: tuple[gguf.GGUFValueType, ...]

    def contents(self) -> object:
        """The value."""
        return self.value


@dataclass(frozen=True)
class SourceTensor:
    """A float32 tensor as the exporter reads it (the shape of gguf's ``ReaderTensor``)."""

    name: str
    data: np.ndarray
    tensor_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32

    @property
    def shape(self) -> np.ndarray:
        """GGUF's order: the row width first."""
        return np.array(list(reversed(self.data.shape)))

    @property
    def n_bytes(self) -> int:
        """Bytes in float32."""
        return int(self.data.nbytes)


@dataclass(frozen=True)
class ConvertedSource:
    """Metadata and tensors of a model converted for a GGUF export."""

    fields: dict[str, SourceField]
    tensors: list[SourceTensor]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def data_offset(self) -> int:
        """An upper bound of the header, metadata and tensor-info bytes the file will hold."""
        size = 64
        for f in self.fields.values():
            value = f.value if isinstance(f.value, list) else [f.value]
            size += 16 + len(f.name) + sum(12 + len(str(v).encode()) for v in value)
        return size + sum(64 + len(t.name) for t in self.tensors)


def convert_llama(model: nn.Module, tokenizer: object) -> ConvertedSource:
    """The GGUF description of a Hugging Face Llama ``model`` with its ``tokenizer``; a
    :class:`BitallocError` naming what cannot be converted otherwise."""
    source = llama_metadata(getattr(model, "config", None), tokenizer)
    return ConvertedSource(source.fields, _tensors(model), source.notes)


def llama_metadata(config: object, tokenizer: object) -> ConvertedSource:
    """The GGUF metadata (no tensors) of a Hugging Face Llama with ``config`` and
    ``tokenizer``; a :class:`BitallocError` naming what cannot be converted otherwise."""
    kind = getattr(config, "model_type", None)
    if kind != "llama":
        raise BitallocError(
            f"cannot convert a {kind!r} model to GGUF: bitalloc converts Llama-architecture "
            "models; convert it with llama.cpp's convert_hf_to_gguf.py, allocate on that .gguf "
            "file (--model FILE.gguf) and export again"
        )
    for name in ("attention_bias", "mlp_bias"):
        if getattr(config, name, False):
            raise BitallocError(f"cannot convert a Llama model with {name}=True to GGUF here")
    if getattr(config, "rope_scaling", None) and config.rope_scaling.get("rope_type") not in (
        None,
        "default",
    ):
        raise BitallocError(
            f"cannot convert a Llama model with RoPE scaling {config.rope_scaling} to GGUF "
            "here; convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    fields = _hyper_parameters(config) | _tokenizer_fields(tokenizer, config.vocab_size)
    notes = (PRE_TOKENIZER_NOTE,) if fields["tokenizer.ggml.pre"].value == "default" else ()
    return ConvertedSource(fields, [], notes)


def _field(name: str, value: object, *types: gguf.GGUFValueType) -> tuple[str, SourceField]:
    return name, SourceField(name, value, types)


def _hyper_parameters(config) -> dict[str, SourceField]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    items = [
        _field("general.architecture", "llama", _T.STRING),
        _field("general.name", str(getattr(config, "_name_or_path", "") or "model"), _T.STRING),
        _field("llama.block_count", config.num_hidden_layers, _T.UINT32),
        _field("llama.context_length", config.max_position_embeddings, _T.UINT32),
        _field("llama.embedding_length", config.hidden_size, _T.UINT32),
        _field("llama.feed_forward_length", config.intermediate_size, _T.UINT32),
        _field("llama.attention.head_count", heads, _T.UINT32),
        _field("llama.attention.head_count_kv", config.num_key_value_heads, _T.UINT32),
        _field("llama.rope.freq_base", float(theta), _T.FLOAT32),
        _field("llama.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), _T.FLOAT32),
        _field("llama.vocab_size", config.vocab_size, _T.UINT32),
        _field("llama.rope.dimension_count", head_dim, _T.UINT32),
        _field("general.quantization_version", gguf.GGML_QUANT_VERSION, _T.UINT32),
    ]
    if head_dim != config.hidden_size // heads:
        items += [
            _field("llama.attention.key_length", head_dim, _T.UINT32),
            _field("llama.attention.value_length", head_dim, _T.UINT32),
        ]
    return dict(items)


def _tokenizer_fields(tokenizer: object, vocab_size: int) -> dict[str, SourceField]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BitallocError(
            "cannot convert the tokenizer to GGUF: it is not a fast (tokenizers) tokenizer; "
            "convert the model with llama.cpp's convert_hf_to_gguf.py"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
        spec.get("decoder")
    )
    if model.get("type") != "BPE" or not byte_level:
        raise BitallocError(
            f"cannot convert a {model.get('type')} tokenizer without byte-level pre-tokenizing "
            "to GGUF: bitalloc converts byte-level BPE tokenizers; convert the model with "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    kinds = dict.fromkeys(by_id, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = (
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        )
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [int(kinds.get(i, gguf.TokenType.UNUSED)) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        # GGUF has no empty arrays, and readers take a missing list as "derive the merges
        # from token scores", which a BPE vocabulary does not have.
        raise BitallocError("cannot convert a BPE tokenizer without merges to GGUF")
    items = [
        _field("tokenizer.ggml.model", "gpt2", _T.STRING),
        _field("tokenizer.ggml.pre", _pre_tokenizer(spec.get("pre_tokenizer")), _T.STRING),
        _field("tokenizer.ggml.tokens", tokens, _T.ARRAY, _T.STRING),
        _field("tokenizer.ggml.token_type", types, _T.ARRAY, _T.INT32),
        _field("tokenizer.ggml.merges", merges, _T.ARRAY, _T.STRING),
    ]
    for key, attr in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unknown", "unk_token_id"),
        ("padding", "pad_token_id"),
    ):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            items.append(_field(f"tokenizer.ggml.{key}_token_id", int(value), _T.UINT32))
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    items.append(_field("tokenizer.ggml.add_bos_token", bool(adds_bos), _T.BOOL))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        items.append(_field("tokenizer.chat_template", template, _T.STRING))
    return dict(items)


#: Pieces of a Split pre-tokenizer's regex that identify llama.cpp's name for it.
_SPLIT_NAMES = (
    ("\\p{N}{1,3}", "llama-bpe"),  # Llama 3: numbers in runs of up to three digits
    ("\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*", "qwen2"),
)


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: ``gpt-2`` for byte-level splitting
    with GPT-2's regex alone, ``smollm`` when single digits are split first, ``llama-bpe`` /
    ``qwen2`` for their Split patterns, else ``default`` (see :data:`PRE_TOKENIZER_NOTE`)."""
    steps = (spec or {}).get("pretokenizers", [spec] if spec else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    for step in steps:
        if step.get("type") == "Split":
            pattern = json.dumps(step.get("pattern", {}))
            for piece, name in _SPLIT_NAMES:
                if piece in pattern:
                    return name
    return "default"


def _tensors(model: nn.Module) -> list[SourceTensor]:
    blocks = model.config.num_hidden_layers
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    found, unnamed = [], []
    for param, value in model.named_parameters():  # tied parameters are listed once
        name = tensor_map.get_name(param, try_suffixes=(".weight", ".bias"))
        if name is None:
            unnamed.append(param)
            continue
        found.append(SourceTensor(name, value.detach().float().cpu().numpy()))
    if unnamed:
        raise BitallocError(
            f"cannot name parameter {unnamed[0]!r} in llama.cpp's GGUF naming; convert the "
            "model with llama.cpp's convert_hf_to_gguf.py"
        )
    return found
