"""bitalloc's importance as a llama.cpp importance matrix (``llama-imatrix``) file, both ways.

llama.cpp's imatrix holds, per weight tensor, the sum over calibration tokens of the squared
activation entering each input column, and the token count: exactly bitalloc's
:class:`~bitalloc.importance.Importance` (the mean) times its ``tokens``. Saving writes the
current GGUF format, which ``llama-quantize --imatrix FILE`` reads: per tensor two F32 tensors
``<name>.in_sum2`` (shape (n_experts, n_in), n_experts = 1 here) and ``<name>.counts``, and the
metadata ``general.type = "imatrix"``, ``imatrix.datasets``, ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (llama-quantize refuses a file lacking any of the three). Loading also
reads the older binary ``.dat`` format, which has no token count (its ``tokens`` is 0).

Entries are named as llama.cpp names the model's tensors (``blk.0.attn_q.weight``), through the
``gguf`` package's map from Hugging Face module names. Importance is per input column, so the
row permutation llama.cpp's converter applies to Llama's q/k weights does not concern it.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gguf
import libgguf
import numpy as np
import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.fileio import write_atomic
from bitalloc.importance import Importance, to_bfloat16_values
from bitalloc.models import Unit

#: Hugging Face ``model_type`` -> llama.cpp architecture, where the name differs or llama.cpp's
#: converter files the model under another architecture (Mistral is converted as Llama).
_ARCHS = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
    "phi3": gguf.MODEL_ARCH.PHI3,
}
_SUMS, _COUNTS = ".in_sum2", ".counts"


def _arch(model: nn.Module, unit: str) -> gguf.MODEL_ARCH:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not model_type:
        raise BitallocError(
            f"cannot name unit {unit!r} in llama.cpp's GGUF naming: the model has no "
            "config.model_type to choose llama.cpp's architecture from"
        )
    arch = _ARCHS.get(model_type)
    if arch is None:  # architectures llama.cpp names as Hugging Face does (gemma2, phi2, ...)
        by_name = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}
        arch = by_name.get(model_type.removesuffix("_text"))
    if arch is None:
        raise BitallocError(
            f"cannot name unit {unit!r} in llama.cpp's GGUF naming: model type {model_type!r} "
            "has no llama.cpp architecture in the gguf package"
        )
    return arch


def gguf_tensor_names(model: nn.Module, units: Sequence[Unit]) -> dict[str, str]:
    """Unit name -> the name llama.cpp gives its weight in a GGUF file
    (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``), from ``model.config``.

    Raises :class:`BitallocError` naming the unit and the model type when the ``gguf``
    package's tensor map has no name for a unit, or gives two units one name.
    """
    if not units:
        return {}
    arch = _arch(model, units[0].name)
    model_type = model.config.model_type
    tensor_map = gguf.get_tensor_name_map(arch, max(u.layer for u in units) + 1)
    names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for unit in units:
        name = tensor_map.get_name(f"{unit.name}.weight", try_suffixes=(".weight",))
        if name is None:
            raise BitallocError(
                f"cannot name unit {unit.name!r} of a {model_type!r} model in llama.cpp's GGUF "
                f"naming: the gguf package's tensor map for {gguf.MODEL_ARCH_NAMES[arch]!r} has "
                f"no entry for {unit.name}.weight"
            )
        if name in owner:
            raise BitallocError(
                f"units {owner[name]!r} and {unit.name!r} of a {model_type!r} model both map "
                f"to GGUF tensor {name!r}; llama.cpp's imatrix holds one entry per tensor"
            )
        names[unit.name] = owner[name] = name
    return names


def _check_vector(vector: np.ndarray, unit: Unit, gguf_name: str, where: str) -> None:
    # Importances weight the quantizers' error sums: NaN or a negative weight would silently
    # turn the clipping search into nonsense, in bitalloc and in llama-quantize alike.
    if vector.size != unit.shape[1]:
        raise BitallocError(
            f"{where} gives unit {unit.name!r} ({gguf_name}) {vector.size} values, but its "
            f"input has {unit.shape[1]} columns; it was made for another model"
        )
    if not bool(np.isfinite(vector).all()) or bool((vector < 0).any()):
        raise BitallocError(
            f"{where} gives unit {unit.name!r} ({gguf_name}) values that are not finite and "
            "non-negative; mean squared activations never are"
        )


def save_imatrix(
    importance: Importance,
    model: nn.Module,
    units: Sequence[Unit],
    path: str | os.PathLike[str],
    *,
    dataset: str = "bitalloc calibration",
    chunk_size: int = 512,
) -> Path:
    """Write ``importance`` of ``units`` as a llama.cpp GGUF imatrix file at ``path``
    (atomically: an error leaves ``path`` as it was) and return the path.

    Each unit gets its own entry, units that read one input (q/k/v) included, as llama.cpp
    stores one per weight tensor: ``in_sum2 = mean * tokens``, ``counts = [tokens]``. An
    importance without a token count (``tokens == 0``, e.g. loaded from a ``.dat`` file) is
    written with count 1, which keeps the means llama-quantize divides out. ``chunk_count``
    is ``tokens // chunk_size``; ``dataset`` goes in ``imatrix.datasets``.
    """
    if not 1 <= chunk_size < 2**32:
        raise BitallocError(f"chunk_size must be a positive 32-bit integer, not {chunk_size}")
    if importance.tokens < 0 or importance.tokens // chunk_size >= 2**32:
        raise BitallocError(f"the importance's token count {importance.tokens} does not fit")
    if not units:
        raise BitallocError("no units to save an imatrix for; llama.cpp refuses an empty one")
    names = gguf_tensor_names(model, units)
    # Everything is checked before anything is written.
    sums: dict[str, np.ndarray] = {}
    count = max(importance.tokens, 1)
    for unit in units:
        value = importance.vector(unit.name)
        if value is None:
            raise BitallocError(
                f"the importance has no vector for unit {unit.name!r}; gather it for the "
                "same model and units"
            )
        mean = value.detach().cpu().to(torch.float64).reshape(-1).numpy()
        _check_vector(mean, unit, names[unit.name], "the importance")
        # One rounding (of the float64 product) to float32, not two.
        sums[names[unit.name]] = (mean * count).astype(np.float32).reshape(1, -1)

    arch = _arch(model, units[0].name)
    with tempfile.TemporaryDirectory(prefix="bitalloc-imatrix-") as scratch:
        # GGUFWriter opens its output by path, so it writes a scratch file that write_atomic
        # then copies into a temporary beside ``path`` and renames into place.
        scratch_path = Path(scratch) / "imatrix.gguf"
        writer = gguf.GGUFWriter(scratch_path, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, importance.tokens // chunk_size)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
        for name, total in sums.items():
            writer.add_tensor(name + _SUMS, total)
            # llama.cpp's counts are (n_experts, 1): one count per expert matrix.
            writer.add_tensor(name + _COUNTS, np.full((1, 1), count, dtype=np.float32))
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except OSError as exc:
            raise BitallocError(
                f"cannot write the imatrix for {path}: {exc.strerror or exc} (in {scratch})"
            ) from None
        finally:
            writer.close()
        with scratch_path.open("rb") as source:
            return write_atomic(path, lambda handle: shutil.copyfileobj(source, handle))


def _looks_legacy(head: bytes) -> bool:
    # The .dat format has no magic: a plausible entry count and first name length are the
    # best sign of one (random bytes have both in range about once in 10^12).
    if len(head) < 8:
        return False
    n_entries, name_len = struct.unpack("<ii", head[:8])
    return 1 <= n_entries <= 10**6 and 1 <= name_len <= 4096


def _read_entries(path: Path) -> tuple[dict[str, np.ndarray], bool]:
    """The file's averaged vectors by GGUF tensor name, and whether it is a GGUF file."""
    if not path.exists():
        raise BitallocError(f"imatrix file {path} does not exist")
    if not path.is_file():
        raise BitallocError(f"imatrix file {path} is not a file")
    is_gguf = False
    try:
        with path.open("rb") as handle:
            head = handle.read(12)
        is_gguf = head[:4] == b"GGUF"
        if not head:
            raise BitallocError(f"imatrix file {path} is empty")
        if not is_gguf and not _looks_legacy(head):
            # Refused before libgguf parses it: random sizes would make it read gigabytes.
            raise BitallocError(
                f"imatrix file {path} is not an imatrix file: neither GGUF nor llama.cpp's "
                "older .dat format"
            )
        return libgguf.load_imatrix(path), is_gguf
    except OSError as exc:
        raise BitallocError(f"cannot read imatrix file {path}: {exc.strerror or exc}") from None
    except (ValueError, OverflowError, MemoryError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        kind = "GGUF imatrix" if is_gguf else ".dat imatrix"
        if "unexpected end" in detail:
            problem = f"is truncated (it ends inside its {kind} data); write it again"
        elif is_gguf and "no usable entries" in detail:
            problem = "is a GGUF file but not an imatrix file (it holds no .in_sum2 tensors)"
        else:
            problem = f"is not a readable {kind} file ({detail})"
        raise BitallocError(f"imatrix file {path} {problem}") from None


def _token_count(path: Path, names: Sequence[str]) -> int:
    """The tokens the file's sums are over (the least of the units' counts), 0 if unknown."""
    try:
        reader = gguf.GGUFReader(path)
        counts = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
        values = [counts[name + _COUNTS].reshape(-1) for name in names]
    except (ValueError, OSError, KeyError, IndexError, OverflowError):
        return 0  # libgguf read the vectors; a count it cannot find leaves tokens unknown
    if not values or any(v.size != 1 or not v[0] > 0 or not np.isfinite(v[0]) for v in values):
        return 0
    return int(round(min(float(v[0]) for v in values)))


def load_imatrix(
    path: str | os.PathLike[str], model: nn.Module, units: Sequence[Unit]
) -> Importance:
    """The importance of ``units`` from a llama.cpp imatrix file (GGUF or the older ``.dat``).

    Vectors are the file's means (sums over counts), rounded to bfloat16 as gathered
    importances are; ``tokens`` is the file's token count (GGUF ``counts``), or 0 for a
    ``.dat`` file, which stores none. Entries for tensors that are not units are ignored. A
    missing or unreadable file, a unit without an entry, or a vector of the wrong length
    raises :class:`BitallocError` naming the file (and the unit).
    """
    path = Path(path)
    names = gguf_tensor_names(model, units)
    entries, is_gguf = _read_entries(path)
    missing = [u.name for u in units if names[u.name] not in entries]
    if missing:
        more = f" and {len(missing) - 1} other units" if len(missing) > 1 else ""
        raise BitallocError(
            f"imatrix file {path} has no entry for unit {missing[0]!r} ({names[missing[0]]})"
            f"{more}; it was made for another model"
        )
    values: dict[str, torch.Tensor] = {}
    for unit in units:
        vector = np.asarray(entries[names[unit.name]], dtype=np.float32).reshape(-1)
        _check_vector(vector, unit, names[unit.name], f"imatrix file {path}")
        values[unit.name] = to_bfloat16_values(torch.from_numpy(vector.copy()))
    tokens = _token_count(path, [names[u.name] for u in units]) if is_gguf else 0
    return Importance(values, tokens)
