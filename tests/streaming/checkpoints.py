"""Small checkpoints and allocations the streamed-export tests share."""

from __future__ import annotations

from pathlib import Path

import torch

from bitalloc.streaming.allocate import allocate_streamed
from tests.conftest import make_tiny_llama, random_windows
from tests.export.tiny_gguf import bpe_tokenizer
from tests.families import VOCAB


def write_tiny_checkpoint(path: Path, *, tied: bool = False) -> Path:
    """A 2-layer tiny Llama in bf16 shards with a byte-level BPE tokenizer; its head untied, or
    tied to the embedding (then not stored)."""
    model = make_tiny_llama(layers=2, vocab=VOCAB, tie_word_embeddings=tied)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    bpe_tokenizer().save_pretrained(path)
    return path


def calibration() -> torch.Tensor:
    """The windows the tests allocate with: 4 of 32 tokens."""
    return random_windows(seed=0, n=4, seq_len=32)


def allocate_tiny(path: Path, avg_bits: float, formats: str):
    """A streamed allocation of the checkpoint at ``path`` over :func:`calibration`."""
    return allocate_streamed(
        path, avg_bits, formats=formats, windows=calibration(), tokens=128, progress=False
    )
