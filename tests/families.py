"""Tiny config-built models of several architecture families, each with an offline tokenizer.

Every builder returns ``(model, tokenizer)``: a causal LM with seeded random weights, 2 decoder
layers, hidden size 64 and a vocabulary of :data:`VOCAB` ids, and a byte-level fast tokenizer
(token id = UTF-8 byte, special tokens after the bytes) that fits that vocabulary. Nothing is
downloaded. The families differ where bitalloc's path could break:

- ``gemma3``: tied embeddings, sliding and global layers with a window shorter than the test
  windows, a final logit soft cap, q/k norms, a tokenizer that adds ``<bos>``. The config also
  sets ``attn_logit_softcapping``, which transformers' Gemma 3 attention (5.x) stores but does
  not apply;
- ``qwen2``: biases on q/k/v, untied output head;
- ``qwen3``: q/k norms;
- ``phi3``: fused ``qkv_proj`` and ``gate_up_proj`` projections, a tokenizer that adds ``<s>``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: The models' vocabulary: 256 bytes, the special tokens, and unused ids up to this size.
VOCAB = 300
#: Special token ids, right after the 256 byte ids.
PAD, EOS, BOS = 256, 257, 258
#: A window shorter than the tests' 64-token windows, so sliding layers really slide.
SLIDING_WINDOW = 16

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": PAD,
    "eos_token_id": EOS,
    "bos_token_id": BOS,
}


def byte_fast_tokenizer(bos: str | None = None):
    """A ``PreTrainedTokenizerFast`` over bytes (id = byte) with ``<pad>``, ``<eos>`` and
    ``<bos>`` at :data:`PAD`, :data:`EOS` and :data:`BOS`.

    ``bos`` names the start token that ``tokenizer(text)`` puts before every text (through a
    ``TemplateProcessing`` post-processor, as Gemma's and Llama's tokenizers do); None adds
    nothing (as Qwen's tokenizers).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-in for each byte, which the ByteLevel pre-tokenizer emits.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    char = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    vocab = {c: b for b, c in char.items()}
    specials = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS}
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def _finish(model: nn.Module) -> nn.Module:
    model.eval()
    return model


def gemma3(seed: int = 0, **config_fields):
    """Gemma 3 text model: layer 0 sliding (window :data:`SLIDING_WINDOW`), layer 1 global,
    tied embeddings, a final logit soft cap, ``<bos>`` before every text; ``config_fields`` override
    Gemma3TextConfig fields (e.g. ``final_logit_softcapping=None``)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    fields = {
        **_COMMON,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": SLIDING_WINDOW,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "tie_word_embeddings": True,
    }
    config = Gemma3TextConfig(**{**fields, **config_fields})
    return _finish(Gemma3ForCausalLM(config)), byte_fast_tokenizer("<bos>")


def qwen2(seed: int = 0):
    """Qwen2: biases on q/k/v (not on o), untied output head, no start token."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**_COMMON, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    # Random init leaves biases at zero; non-zero ones make a dropped bias visible.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5, generator=generator)
    return _finish(model), byte_fast_tokenizer()


def qwen3(seed: int = 0):
    """Qwen3: q/k RMS norms over each head, tied embeddings, no start token."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**_COMMON, head_dim=16, tie_word_embeddings=True)
    return _finish(Qwen3ForCausalLM(config)), byte_fast_tokenizer()


def phi3(seed: int = 0):
    """Phi-3: fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``, ``<bos>`` before every
    text."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(**_COMMON, tie_word_embeddings=False)
    return _finish(Phi3ForCausalLM(config)), byte_fast_tokenizer("<bos>")


#: Family name -> builder.
FAMILIES: dict[str, Callable[..., tuple[nn.Module, object]]] = {
    "gemma3": gemma3,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "phi3": phi3,
}


def decoder_linears(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` inside the model's decoder layers (``model.layers``), found
    independently of bitalloc's discovery."""
    return [
        f"model.layers.{i}.{sub}"
        for i, layer in enumerate(model.model.layers)
        for sub, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    ]
