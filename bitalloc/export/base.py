"""What every exporter shares: the weights an allocation quantizes, the output-path rule and the
read-back report.

An exporter turns an :class:`~bitalloc.allocation.Allocation` and the model it was made for into
a file an engine loads. Three rules hold for all of them:

- the weights quantized are the ones the allocation measured: :func:`weights_to_export` repeats
  the allocation's scale folding on a copy of the model (norms included, since a fold moves
  scale into them) and hands back the allocation's importance, which the quantizers take;
- nothing half-written is left: a file is written to a temporary name and renamed, a directory
  is filled under a temporary name and renamed (:func:`check_export_path` refuses an existing
  path unless ``force``);
- the export checks itself: it reads the written file back and compares each tensor's type and
  bytes with what the allocation says (:class:`ExportReport`); a mismatch is an error.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.importance import Importance


@dataclass(frozen=True)
class ExportedTensor:
    """One tensor of an exported file: its name in the file, its stored type, its bytes, and
    the allocation unit it stores (None for a tensor outside the allocation)."""

    name: str
    type: str
    nbytes: int
    unit: str | None = None


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: the path, the file format, every tensor, and the file's bytes."""

    path: Path
    format: str
    tensors: tuple[ExportedTensor, ...]
    file_bytes: int
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def unit_bytes(self) -> int:
        """Bytes of the tensors that store allocation units."""
        return sum(t.nbytes for t in self.tensors if t.unit is not None)

    @property
    def other_bytes(self) -> int:
        """Bytes of the tensors outside the allocation (embeddings, norms, output head)."""
        return sum(t.nbytes for t in self.tensors if t.unit is None)

    def summary(self) -> str:
        """A few lines: path, format, sizes, warnings."""
        mib = 1024 * 1024
        lines = [
            f"wrote {self.path} ({self.format}): {self.file_bytes / mib:.2f} MiB, "
            f"{len(self.tensors)} tensors",
            f"  allocated units: {self.unit_bytes / mib:.2f} MiB; other tensors: "
            f"{self.other_bytes / mib:.2f} MiB",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def check_export_path(path: str | os.PathLike[str], *, force: bool, directory: bool) -> Path:
    """``path`` as a Path, unless it exists and ``force`` is false (or it is the wrong kind:
    a directory where a file goes, or the reverse), which raises :class:`BitallocError`."""
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise BitallocError(f"--out {path} is a file; give a directory for this export")
        if not directory and path.is_dir():
            raise BitallocError(f"--out {path} is a directory; give a file name such as model.gguf")
        if not force:
            raise BitallocError(
                f"--out {path} exists; pass --force to replace it or choose another path "
                "(nothing was written)"
            )
    from bitalloc.outputs import check_output_dir, check_output_file

    if directory:
        check_output_dir(path, "--out", must_be_empty=False)
    else:
        check_output_file(path, "--out", example="model.gguf")
    return path


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path`` (an
    old one is removed only after the new one is complete), on error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        # mkdtemp (and safetensors' writer) create owner-only modes; an export is read by
        # other users and containers (a vLLM server), so it gets the usual 0755 / 0644.
        tmp.chmod(0o755)
        for item in tmp.rglob("*"):
            item.chmod(0o755 if item.is_dir() else 0o644)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "dir")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weights_to_export(allocation, model: nn.Module) -> tuple[nn.Module, Importance | None]:
    """A copy of ``model`` with the allocation's scale folding applied, and the allocation's
    importance (:meth:`Importance.of` gives a unit's per-column values; None without one).

    Raises :class:`BitallocError` when the allocation was made for another model (a unit is
    missing or its shape differs), before anything is copied.
    """
    from bitalloc.folding_record import apply_recorded_

    allocation.check_model(model)
    target = copy.deepcopy(model)
    record = allocation.data.scale_folding
    if record is not None:
        apply_recorded_(target, record)
    return target, allocation.importance()


def importance_of(importance: Importance | None, unit: str) -> torch.Tensor | None:
    """The per-input-column importance of ``unit`` (None without one)."""
    return None if importance is None else importance.vector(unit)


def progress_iter(
    items: Iterable, description: str, progress: bool, total: int | None = None
) -> Iterator:
    """``items`` with a tqdm bar when ``progress`` (``total``: their count, for an iterator)."""
    if not progress:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=description, unit="tensor", leave=False, total=total))
