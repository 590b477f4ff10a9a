"""Per-input-column importance of each unit: the mean squared activation entering it.

For a linear layer ``y = x W^T`` the output error of a quantized weight on one token is
``sum_j x_j (W - Q(W))_{:, j}``; averaged over the calibration tokens, and ignoring the
correlations between columns, column ``j``'s error counts with weight ``E[x_j^2]``. llama.cpp's
importance matrix holds exactly these means (its ``imatrix`` tool), and its quantizers weight
the per-block scale search by them. bitalloc's integer formats do the same
(:func:`bitalloc.formats.quantize_each` with ``importance``): the clipping that minimises the
weighted error is the one that minimises this estimate of the output error, where plain
squared error treats a column that never sees a large activation like one that always does.

The values are rounded to bfloat16 once, when gathered. That keeps every importance of a
model exactly representable in the few bytes per value an allocation records
(:class:`ImportanceRecord`), so that applying or packing a saved allocation reproduces the
scales that were profiled and measured, bit for bit; bfloat16 keeps float32's range, and its
0.4% relative precision is far below what changes a clipping choice.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.fileio import decode_two_byte_values, write_atomic
from bitalloc.models import Unit, get_linear

#: Calibration tokens the importance is gathered from (evenly spread windows; all when fewer).
IMPORTANCE_TOKENS = 8192
#: The clipping objectives a run can ask for (``--clipping``).
CLIPPING_METHODS = ("weighted", "mse")


@dataclass(frozen=True, eq=False)
class Importance:
    """Unit name -> float32 vector of mean squared input activation per input column, each
    value exactly representable in bfloat16; ``tokens`` is how many calibration tokens the
    means are over.

    ``grams``, when gathered (error-feedback formats such as ``+gptq`` in the palette), maps
    each unit to its input Gram matrix ``XᵀX / tokens`` (units reading one input share one
    tensor), whose diagonal is exactly the unit's vector: a format that weighs columns
    independently reads the same values from either. Grams are not recorded in allocations
    (megabytes per unit); applying a saved allocation gathers them again.

    ``windows`` is the hex SHA-256 of the calibration windows (token ids) the means are over,
    when known: a profiler that needs the same Gram matrices over the same windows (``output``)
    reuses them instead of gathering its own.
    """

    values: Mapping[str, torch.Tensor]
    tokens: int
    grams: Mapping[str, torch.Tensor] | None = None
    windows: str | None = None
    _fingerprints: dict[str, float] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def of(self, unit: str) -> torch.Tensor | None:
        """What the unit's formats are given: its Gram matrix when gathered, else its vector;
        None when the importance does not cover it (plain MSE)."""
        if self.grams is not None and unit in self.grams:
            return self.grams[unit]
        return self.values.get(unit)

    def vector(self, unit: str) -> torch.Tensor | None:
        """The unit's per-column vector (what llama.cpp's importance matrix holds), or None."""
        return self.values.get(unit)

    def fingerprint(self, unit: str) -> float | None:
        """A cheap number that changes with the unit's vector and Gram matrix (for caches that
        must not mix results of different importances); None when the unit has none."""
        value = self.values.get(unit)
        if value is None:
            return None
        if unit not in self._fingerprints:
            # Weighted by position, so a permutation of the same values differs too.
            ramp = torch.arange(1, value.numel() + 1, dtype=torch.float64)
            total = float((value.to(torch.float64) * ramp).sum())
            gram = None if self.grams is None else self.grams.get(unit)
            if gram is not None:
                total += float((gram.to(torch.float64).sum(dim=0) * ramp).sum()) * math.pi
            self._fingerprints[unit] = total
        return self._fingerprints[unit]

    @property
    def has_grams(self) -> bool:
        """True when the input Gram matrices were gathered."""
        return self.grams is not None

    @cached_property
    def record(self) -> ImportanceRecord:
        """The values encoded for an allocation (see :class:`ImportanceRecord`)."""
        return ImportanceRecord.encode(self)

    @property
    def digest(self) -> str:
        """Hex SHA-256 of the encoded values: equal digests, equal importances."""
        return self.record.sha256

    def restricted(self, units: Iterable[str]) -> Importance:
        """The importance of ``units`` only (those it covers)."""
        names = [u for u in units if u in self.values]
        grams = None
        if self.grams is not None:
            grams = {u: self.grams[u] for u in names if u in self.grams}
        values = {u: self.values[u] for u in names}
        return Importance(values, self.tokens, grams, self.windows)

    def without_grams(self) -> Importance:
        """The same vectors, no Gram matrices."""
        if self.grams is None:
            return self
        return Importance(self.values, self.tokens, windows=self.windows)


class ImportanceRecord(BaseModel):
    """An :class:`Importance` as an allocation stores it.

    ``vectors`` maps a key to the base64 of one vector's little-endian bfloat16 bytes; units
    whose inputs are the same tensor (q/k/v, gate/up) have equal vectors and share one key
    through ``units`` (unit -> key). ``sha256`` is the hex SHA-256 of both mappings (see
    :meth:`digest_of`), checked when the record is decoded.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "mean-squared-input"
    tokens: int
    sha256: str
    units: dict[str, str]
    vectors: dict[str, str]

    @classmethod
    def encode(cls, importance: Importance) -> ImportanceRecord:
        """The record of ``importance`` (vectors deduplicated by value)."""
        by_bytes: dict[bytes, str] = {}
        units: dict[str, str] = {}
        vectors: dict[str, str] = {}
        for name in sorted(importance.values):
            raw = _bf16_bytes(importance.values[name])
            key = by_bytes.get(raw)
            if key is None:
                key = by_bytes[raw] = str(len(by_bytes))
                vectors[key] = base64.b64encode(raw).decode("ascii")
            units[name] = key
        return cls(
            tokens=importance.tokens,
            sha256=cls.digest_of(units, vectors),
            units=units,
            vectors=vectors,
        )

    @staticmethod
    def digest_of(units: Mapping[str, str], vectors: Mapping[str, str]) -> str:
        """Hex SHA-256 of the two mappings (JSON, sorted keys, no spaces)."""
        text = json.dumps(
            {"units": dict(units), "vectors": dict(vectors)},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def decode(self) -> Importance:
        """The importance, checked against ``sha256`` (a damaged or edited record is refused)."""
        if self.digest_of(self.units, self.vectors) != self.sha256:
            raise BitallocError(
                "the allocation's importance record does not match its sha256; the file was "
                "edited or damaged, so make the allocation again"
            )
        decoded: dict[str, torch.Tensor] = {}
        for key, text in self.vectors.items():
            raw = decode_two_byte_values(text, f"importance vector {key!r}", "bfloat16")
            decoded[key] = _from_bf16_bytes(raw)
        missing = sorted(set(self.units.values()) - set(decoded))
        if missing:
            raise BitallocError(f"importance units refer to missing vectors {missing[:3]}")
        return Importance({u: decoded[k] for u, k in self.units.items()}, self.tokens)


def _bf16_bytes(value: torch.Tensor) -> bytes:
    # bfloat16 is float32's top half: the record stores those two bytes per value.
    bits = value.detach().cpu().to(torch.float32).contiguous().numpy().view(np.uint32)
    return (bits >> 16).astype("<u2").tobytes()


def _from_bf16_bytes(raw: bytes) -> torch.Tensor:
    halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return torch.from_numpy(halves.view(np.float32).copy())


def to_bfloat16_values(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest bfloat16 (ties to even), as float32."""
    return x.to(torch.float32).to(torch.bfloat16).to(torch.float32)


class ImportanceAccumulator:
    """Sums of squared inputs per input column of each unit, over calibration windows.

    :meth:`add_batch` runs one forward pass with a hook on every unit; a batch whose inputs
    are not all finite is skipped and counted, leaving no trace. Units whose Linear receives the
    very same input tensor (q/k/v, gate/up) share one sum per forward. Each batch's sums are
    float32 (a few thousand tokens each) and are added up in float64, far below the bfloat16
    rounding of the result.
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit], grams: bool = False):
        self.model = model
        self.names = [u.name for u in units]
        self.linears = [get_linear(model, u.name) for u in units]
        self.sums = [torch.zeros(lin.in_features, dtype=torch.float64) for lin in self.linears]
        # With ``grams``: XᵀX sums (float64), one per distinct input; ``self.shared[i]`` is the
        # index of the first unit reading unit i's input (found on the first batch).
        self.grams = grams
        self.gram_sums: dict[int, torch.Tensor] = {}
        self.shared: list[int] | None = None
        self.tokens = 0
        self.batches = 0
        self.skipped = 0
        self._runner = _backbone(model, self.linears)

    def add_batch(self, windows: torch.Tensor) -> bool:
        """One forward over ``windows`` (n, seq_len); False if the batch was skipped."""
        ids = windows.reshape(-1, windows.shape[-1])
        return self.add_batch_through(lambda: self._runner(input_ids=ids, use_cache=False))

    def add_batch_through(self, forward: Callable[[], object]) -> bool:
        """Record the units' inputs during ``forward()`` (any call that runs them once: the
        model, or one decoder block on its inputs); False if the batch was skipped."""
        rows: list[int] = []
        pending: list[torch.Tensor | None] = [None] * len(self.linears)
        pending_grams: list[torch.Tensor | None] = [None] * len(self.linears)
        first_reader: list[int] = list(range(len(self.linears)))
        # Inputs seen in this forward (kept alive, so their ids stay unique) -> their sums.
        seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]] = {}

        def hook(index: int):
            def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                x = args[0]
                known = seen.get(id(x))
                if known is None:
                    flat = x.detach().reshape(-1, x.shape[-1]).float()
                    rows.append(int(flat.shape[0]))
                    gram = flat.T @ flat if self.grams else None
                    known = seen[id(x)] = (x, (flat * flat).sum(dim=0), gram, index)
                square, gram = known[1], known[2]
                pending[index] = square if pending[index] is None else pending[index] + square
                first_reader[index] = known[3]
                if gram is not None:
                    previous = pending_grams[index]
                    pending_grams[index] = gram if previous is None else previous + gram

            return record

        handles = [lin.register_forward_hook(hook(i)) for i, lin in enumerate(self.linears)]
        try:
            with torch.inference_mode():
                forward()
        finally:
            for h in handles:
                h.remove()
            seen.clear()
        if any(p is None or not bool(torch.isfinite(p).all()) for p in pending):
            self.skipped += 1
            return False
        for total, square in zip(self.sums, pending):
            total += square.cpu().to(torch.float64)
        if self.grams:
            if self.shared is None:
                self.shared = first_reader
            for index, gram in enumerate(pending_grams):
                if self.shared[index] != index:
                    continue  # read through the unit that reads this input first
                total = self.gram_sums.get(index)
                gram64 = gram.cpu().to(torch.float64)
                self.gram_sums[index] = gram64 if total is None else total + gram64
        self.tokens += rows[0]
        self.batches += 1
        return True

    def result(self) -> Importance:
        """The means, rounded to bfloat16 (see the module docstring)."""
        if self.batches == 0:
            raise BitallocError(
                f"no calibration batch gave finite inputs to every unit ({self.skipped} "
                "skipped); check the model's weights (NaN/inf), use another calibration text, "
                "or pass --clipping mse"
            )
        values = {
            name: to_bfloat16_values(total / self.tokens)
            for name, total in zip(self.names, self.sums)
        }
        if not self.grams or self.shared is None:
            return Importance(values, self.tokens)
        means: dict[int, torch.Tensor] = {}
        grams = {}
        for index, name in enumerate(self.names):
            owner = self.shared[index]
            if owner not in means:
                gram = (self.gram_sums[owner] / self.tokens).to(torch.float32)
                # The diagonal is the vector, value for value: formats that read only the
                # diagonal then quantize exactly as with the vector.
                torch.diagonal(gram).copy_(values[self.names[owner]])
                means[owner] = gram
            grams[name] = means[owner]
        return Importance(values, self.tokens, grams)


def _backbone(model: nn.Module, linears: Sequence[nn.Module]) -> nn.Module:
    """The part of ``model`` to run: its decoder when that holds every unit, which skips the
    output head (a fifth of a small model's forward, and nothing a unit reads); else all."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        inside = {id(m) for m in decoder.modules()}
        if all(id(lin) in inside for lin in linears):
            return decoder
    return model


def gather_importance(
    model: nn.Module,
    units: Sequence[Unit],
    calibration: torch.Tensor,
    *,
    tokens: int = IMPORTANCE_TOKENS,
    batch_size: int = 4,
    progress: bool = True,
    use_cache: bool = False,
    grams: bool = False,
) -> Importance:
    """The importance of every unit from calibration windows (n, seq_len): evenly spread
    windows up to ``tokens`` tokens (all of them when there are fewer).

    ``use_cache`` reads and writes the result under the cache root, keyed by the units'
    weights, the windows used and ``tokens`` (as profiles are cached). ``grams`` also gathers
    each input's Gram matrix (for ``+gptq`` formats), in the same pass; those are not cached
    (hundreds of megabytes for a small model, and seconds to gather).
    """
    from bitalloc.models import cache_root, model_fingerprint
    from bitalloc.sensitivity.base import spread_windows
    from bitalloc.sensitivity.profile import cache_key

    if calibration.dim() != 2 or calibration.shape[0] == 0:
        raise BitallocError(
            "importance needs calibration windows of shape (n_windows, seq_len); the calibration "
            "text gave none: give a longer one"
        )
    picks = spread_windows(len(calibration), int(calibration.shape[1]), tokens)
    windows = calibration[picks]
    digest = windows_digest(windows)
    path = None
    if use_cache and not grams:
        key = cache_key(
            {
                "kind": "importance",
                "version": 1,
                "model": model_fingerprint(model, list(units)),
                "units": [u.name for u in units],
                "windows": digest,
            }
        )
        path = cache_root() / "importance" / f"{key}.safetensors"
        cached = _read_cached(path, [u.name for u in units])
        if cached is not None:
            return dataclasses.replace(cached, windows=digest)
    acc = ImportanceAccumulator(model, units, grams=grams)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(
            range(0, len(windows), batch_size),
            desc="importance",
            unit="batch",
            disable=not progress,
        ):
            acc.add_batch(windows[start : start + batch_size])
    finally:
        model.train(was_training)
    result = dataclasses.replace(acc.result(), windows=digest)
    if path is not None:
        _write_cached(path, result)
    return result


def windows_digest(windows: torch.Tensor) -> str:
    """Hex SHA-256 of calibration windows' token ids (int64), as :attr:`Importance.windows`."""
    ids = windows.detach().to(torch.int64).cpu().contiguous()
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def _read_cached(path: Path, names: Sequence[str]) -> Importance | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError):
        return None  # a damaged entry is computed again (and replaced)
    tokens = tensors.pop(_TOKENS_KEY, None)
    if tokens is None or sorted(tensors) != sorted(names):
        return None
    return Importance(tensors, int(tokens.item()))


def _write_cached(path: Path, importance: Importance) -> None:
    from safetensors.torch import save

    tensors = {name: value.contiguous() for name, value in importance.values.items()}
    tensors[_TOKENS_KEY] = torch.tensor(importance.tokens, dtype=torch.int64)
    data = save(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda fh: fh.write(data))


#: Key of the token count in a cached importance file (not a unit name: units hold dots).
_TOKENS_KEY = "__tokens__"
