"""What a streamed model is read from: a Hugging Face directory of safetensors shards, or a GGUF
file."""

from __future__ import annotations

from pathlib import Path

from bitalloc.streaming.checkpoint import Checkpoint
from bitalloc.streaming.gguf_checkpoint import GGUFCheckpoint


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A :class:`GGUFCheckpoint` for a file, a :class:`Checkpoint` for a directory."""
    if Path(path).is_file():
        return GGUFCheckpoint(path)
    return Checkpoint(path)
