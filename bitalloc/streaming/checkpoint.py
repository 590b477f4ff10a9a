"""A Hugging Face checkpoint read tensor by tensor: its config, and every tensor's shard, dtype
and shape, without loading a weight until it is asked for.

Shards are safetensors files, memory-mapped by the ``safetensors`` package: reading one tensor
touches only its own bytes, and a tensor comes back in its stored dtype (bf16 and fp16 kept as
they are) unless a dtype is asked for. ``model.safetensors.index.json`` maps tensor names to
shards when there are several; a single ``model.safetensors`` (or any ``*.safetensors`` files
without an index) is read the same way. The index is checked against the shards on opening:
a missing shard, or a tensor the index lists but its shard does not hold, is an error that says
which.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitalloc.errors import BitallocError
from bitalloc.models import safetensors_files

INDEX = "model.safetensors.index.json"

#: safetensors dtype names -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor is and what it is, read from its shard's header."""

    name: str
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    #: Bytes on disk when they are not ``numel`` x the dtype's size (a GGUF quantized type).
    stored_bytes: int | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        """Stored bytes."""
        if self.stored_bytes is not None:
            return self.stored_bytes
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint:
    """A Hugging Face directory's config and safetensors tensors, read lazily (see the module
    docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise BitallocError(f"{self.path} is not a directory; pass a Hugging Face model folder")
        config = self.path / "config.json"
        if not config.is_file():
            raise BitallocError(f"{self.path} has no config.json; pass a Hugging Face model folder")
        try:
            self.config_dict: dict[str, Any] = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BitallocError(f"{config} is not valid JSON ({exc}); fix or replace it") from None
        self.tensors: dict[str, TensorInfo] = _read_headers(self.path)

    def hf_config(self) -> Any:
        """The transformers config of the model."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise BitallocError(f"could not read the config in {self.path}: {exc}") from None

    def tokenizer(self, alternative: str = "") -> Any:
        """The tokenizer saved with the checkpoint; a :class:`BitallocError` that says to add
        its files (or ``alternative``) when there is none."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BitallocError(
                f"{self.path} has no usable tokenizer ({exc}); add its tokenizer files "
                f"{alternative}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names starting with ``prefix``, in the shards' order."""
        return [n for n in self.tensors if n.startswith(prefix)]

    @property
    def nbytes(self) -> int:
        """Stored bytes of every tensor."""
        return sum(t.nbytes for t in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        """The tensor's shard, dtype and shape; a clear error when there is no such tensor."""
        try:
            return self.tensors[name]
        except KeyError:
            raise BitallocError(
                f"the checkpoint in {self.path} has no tensor {name!r}; it is not the model "
                "its config describes, or a shard is incomplete"
            ) from None

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name``, in its stored dtype or ``dtype``."""
        return self.read([name], dtype)[name]

    def read(
        self, names: Sequence[str], dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each shard opened once and closed after: a shard's memory map
        is not kept, so the pages read do not stay resident (they count in the resident set
        for as long as the map exists)."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.info(name).shard, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, members in by_shard.items():
            with safe_open(str(self.path / shard), framework="pt") as handle:
                for name in members:
                    value = handle.get_tensor(name)
                    # A copy either way: the map is closed when the block ends.
                    out[name] = (
                        value.to(dtype) if dtype not in (None, value.dtype) else value.clone()
                    )
        return {name: out[name] for name in names}

    def state_dict(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor under ``prefix`` (``model.layers.3.``), keyed without the prefix."""
        names = self.names(prefix)
        return {n[len(prefix) :]: t for n, t in self.read(names, dtype).items()}


def _read_headers(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's info, from the index (checked against the shards) or the shards alone."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BitallocError(
                f"{index} is not a safetensors index ({type(exc).__name__}: {exc}); fix or "
                "remove it"
            ) from None
        shards = list(dict.fromkeys(weight_map.values()))
    else:
        weight_map = {}
        shards = safetensors_files(path)
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise BitallocError(
            f"{path} lacks the shard(s) {missing} that {INDEX} lists; download or copy every "
            "shard of the checkpoint"
        )
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, (dtype, shape) in _shard_header(path / shard).items():
            if weight_map and weight_map.get(name) != shard:
                continue  # the index places it elsewhere (or not at all): the index rules
            tensors[name] = TensorInfo(name, shard, dtype, shape)
    absent = [n for n in weight_map if n not in tensors]
    if absent:
        raise BitallocError(
            f"{INDEX} in {path} lists {len(absent)} tensor(s) that their shards do not hold, "
            f"e.g. {absent[0]!r} in {weight_map[absent[0]]}; the shard is damaged or from "
            "another checkpoint"
        )
    return tensors


def _shard_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) from a safetensors file's JSON header (the weights unread)."""
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= 100 << 20:
                raise ValueError(f"header length {size}")
            header = json.loads(fh.read(size))
    except (OSError, ValueError) as exc:
        raise BitallocError(
            f"{path} is not a safetensors file ({exc}); the shard is damaged, replace it"
        ) from None
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise BitallocError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        out[name] = (dtype, tuple(int(s) for s in entry["shape"]))
    return out
