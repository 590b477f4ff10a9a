"""A tiny GGUF model file written from scratch: a 2-layer Llama (or Qwen2) with random weights
and a byte-level GPT-2-style tokenizer, small enough that transformers loads it in a second.

Widths are multiples of 256 so that every llama.cpp type fits every matrix; ``hidden=96``
gives 32-block-only widths. Weights are stored as llama.cpp's converter would store them
(q/k rows permuted for a Llama), in ``weight_type`` (F32, F16 or a quantized type).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from bitalloc.export.gguf import llama_permute

#: The tokenizer's size: 256 byte tokens, merged tokens, special tokens.
VOCAB = 300
_MERGES = ["Ġ t", "t h", "h e", "Ġ a", "i n"]


def _byte_tokens() -> list[str]:
    # GPT-2's printable stand-in for each byte, as its byte-level BPE spells tokens.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    hidden: int = 256,
    ff: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    weight_type: str = "F32",
    seed: int = 0,
) -> Path:
    """Write the model to ``path`` and return it."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    tokens = _byte_tokens() + [m.replace(" ", "") for m in _MERGES]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += special + [f"<unused{i}>" for i in range(VOCAB - len(tokens) - len(special))]
    types = [gguf.TokenType.NORMAL] * (256 + len(_MERGES))
    types += [gguf.TokenType.CONTROL] * (VOCAB - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)

    def add(name: str, shape: tuple[int, ...], scale: float = 0.05) -> None:
        if len(shape) == 1:
            writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        value = (scale * rng.standard_normal(shape)).astype(np.float32)
        if weight_type == "F32":
            writer.add_tensor(name, value)
        elif weight_type == "F16":
            writer.add_tensor(name, value.astype(np.float16))
        else:
            import libgguf

            qtype = gguf.GGMLQuantizationType[weight_type]
            raw = libgguf.quantize_rows(value, libgguf.GGMLQuantizationType[weight_type])
            writer.add_tensor(name, np.asarray(raw, dtype=np.uint8), raw_dtype=qtype)

    head_dim = hidden // heads
    add("token_embd.weight", (VOCAB, hidden), 0.02)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"blk.{i}.attn_q.weight", (hidden, hidden))
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, hidden))
        add(f"blk.{i}.ffn_norm.weight", (hidden,))
        add(f"blk.{i}.ffn_gate.weight", (ff, hidden))
        add(f"blk.{i}.ffn_up.weight", (ff, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ff))
    add("output_norm.weight", (hidden,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


__all__ = ["VOCAB", "llama_permute", "write_tiny_gguf"]


def bpe_tokenizer():
    """A byte-level BPE tokenizer with a few merges and a start token, as real ones have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = _byte_tokens() + [m.replace(" ", "") for m in _MERGES] + ["<bos>", "<eos>"]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ")) for m in _MERGES],
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = tokens.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
