"""Hugging Face model directories for tests: a tiny random Llama with a byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_tiny_llama


def save_byte_tokenizer(directory: Path) -> None:
    """A byte-level fast tokenizer (token id = UTF-8 byte, as tests.conftest.ByteTokenizer) that
    AutoTokenizer loads from ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-in for each byte, which the ByteLevel pre-tokenizer emits.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    char = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in char.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(directory)


def tiny_model_dir(directory: Path, **kwargs) -> Path:
    """Save :func:`make_tiny_llama` (safetensors) and the byte tokenizer in ``directory``."""
    make_tiny_llama(**kwargs).save_pretrained(directory, safe_serialization=True)
    save_byte_tokenizer(directory)
    return directory
