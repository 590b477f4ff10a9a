"""torch's CPU int4 weight layout, learned from torch itself, and the probe that decides whether
bitalloc may use torch's int4 kernel on this CPU.

torch documents no layout for ``_convert_weight_to_int4pack_for_cpu`` and writes a different
one per CPU capability (``default``, ``avx2`` and ``avx512`` in torch 2.13 differ). bitalloc
therefore reads no fixed layout: at first use per capability, :func:`int4pack_probe` converts
matrices whose codes spell their own position (one hexadecimal digit per conversion), reads off
where every code went, fits the layout family below and checks that it predicts every nibble of
every probe. It then runs torch's ``_weight_int4pack_mm_for_cpu`` on small known problems
against the dequantized reference. Only when both agree does the int4pack path run; otherwise
the probe says why and the layers run unpack-matmul.

Layout family (:class:`Int4PackLayout`): rows go in blocks of ``block_rows`` (the last block
may be shorter, a multiple of 16); a block of ``n`` rows takes ``n / 2`` bytes per input
``k``, inputs one after another, and nibble slot ``j`` of those bytes (byte ``j // 2``, low
nibble first) holds row ``slots[n][j]`` of the block.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError

# Row-block sizes tried when fitting the layout; torch 2.13 uses 32 or 64.
_BLOCK_CANDIDATES = (16, 32, 64, 128)
_PROBE_ROWS = 128  # two blocks of 64 rows; a 128-row block shows as one block
_PROBE_COLS = 16
_GROUPS = (32, 64, 128, 256)
# The matmul probe: rows cover a full block and a 16-row tail; 1 row (decode) and 33 rows
# (a batch) since torch's kernel may take different code paths for them.
_MM_PROBE_COLS = 256
_MM_PROBE_BATCHES = (1, 33)
# bf16 activations give ~0.3% relative error; a wrong layout gives ~100%.
PROBE_TOLERANCE = 0.02


def cpu_capability() -> str:
    """The CPU capability torch dispatches to in this process (``AVX512``, ``AVX2``, ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def int4pack_available() -> bool:
    """True when this torch build has the CPU int4 weight kernel."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


@dataclass(frozen=True)
class Int4PackLayout:
    """Where torch's converter puts each code (see the module docstring).

    ``slots`` holds one tuple per block height ``16, 32, ..., block_rows``: entry ``j`` is the
    row of the block stored in nibble slot ``j``.
    """

    block_rows: int
    slots: tuple[tuple[int, ...], ...]

    def rows_of(self, height: int) -> tuple[int, ...]:
        """Rows of a ``height``-row block, in nibble-slot order."""
        return self.slots[height // 16 - 1]

    def slot_of_row(self, height: int) -> torch.Tensor:
        """The inverse: for each row of a ``height``-row block, its nibble slot."""
        rows = torch.tensor(self.rows_of(height), dtype=torch.int64)
        return torch.argsort(rows)


@dataclass(frozen=True)
class Int4PackProbe:
    """What the first-use probe found on one CPU capability: the learned layout (None when
    torch's output fits no layout bitalloc can read), whether torch's int4 matmul agreed with
    the reference, why not when it did not, and what the probe cost."""

    capability: str
    layout: Int4PackLayout | None
    ok: bool
    reason: str
    seconds: float

    def describe(self) -> str:
        """One line for users: which path 4-bit units can take here, and why."""
        if self.ok and self.layout is not None:
            return (
                f"int4pack on {self.capability}: torch's layout learned "
                f"({self.layout.block_rows}-row blocks) and its int4 matmul matches the "
                f"reference (probe {self.seconds * 1e3:.0f} ms)"
            )
        return f"int4pack off on {self.capability}: {self.reason}; 4-bit units run unpack-matmul"


def int4pack_probe() -> Int4PackProbe:
    """The probe for the capability this process runs on (computed once per capability)."""
    return _probe_for(cpu_capability())


@functools.cache
def _probe_for(capability: str) -> Int4PackProbe:
    # ``capability`` is the cache key only: torch fixes it per process.
    start = time.perf_counter()
    if not int4pack_available():
        return Int4PackProbe(
            capability, None, False, "this torch build has no _weight_int4pack_mm_for_cpu", 0.0
        )
    try:
        layout, why = _learn_layout()
        reason = why if layout is None else _check_matmul(layout)
    except (BitallocError, RuntimeError, ValueError, TypeError) as exc:
        # torch raises RuntimeError for a kernel this CPU cannot run; anything from torch here
        # means "do not use it", never a crash of the caller.
        layout, reason = None, f"torch's int4 kernels failed: {str(exc).splitlines()[0]}"
    seconds = time.perf_counter() - start
    return Int4PackProbe(capability, layout, not reason, reason, seconds)


# --- learning the layout -----------------------------------------------------------------------
def _torch_convert(codes: torch.Tensor) -> torch.Tensor:
    """torch's converter (int32 codes ``(N, K)`` -> its uint8 layout); the one place bitalloc
    calls it, so tests can stand in a converter with another layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Flat nibble slots of packed bytes: slot 2j is byte j's low nibble, 2j+1 its high one."""
    flat = packed.reshape(-1)
    return torch.stack([flat & 15, flat >> 4], dim=1).reshape(-1)


def _positions(rows: int, cols: int) -> torch.Tensor:
    """Convert matrices whose codes spell their position ``r * cols + k`` in hexadecimal, one
    digit per conversion, and return the position held by each nibble slot of torch's output."""
    position = torch.arange(rows * cols, dtype=torch.int64).reshape(rows, cols)
    found = torch.zeros(rows * cols, dtype=torch.int64)
    shift = 0
    while shift == 0 or (rows * cols - 1) >> shift:
        digit = ((position >> shift) & 15).to(torch.int32)
        packed = _torch_convert(digit)
        if packed.numel() * 2 != rows * cols:
            raise ValueError(f"packed {tuple(packed.shape)} does not hold {rows}x{cols} nibbles")
        found |= _nibbles(packed).to(torch.int64) << shift
        shift += 4
    return found


def _predicted(layout: Int4PackLayout, rows: int, cols: int) -> torch.Tensor:
    """The position ``layout`` puts in each nibble slot of a ``rows x cols`` conversion."""
    parts = []
    for start in range(0, rows, layout.block_rows):
        height = min(layout.block_rows, rows - start)
        row = torch.tensor(layout.rows_of(height), dtype=torch.int64) + start
        k = torch.arange(cols, dtype=torch.int64)
        parts.append((row.unsqueeze(0) * cols + k.unsqueeze(1)).reshape(-1))
    return torch.cat(parts)


def _learn_layout() -> tuple[Int4PackLayout | None, str]:
    """Fit the layout family to torch's converter; (None, why) when nothing fits."""
    found = _positions(_PROBE_ROWS, _PROBE_COLS)
    for block in _BLOCK_CANDIDATES:
        full = _slot_rows(found[:block], block)
        # Shorter heights are unknown yet; a grid of whole blocks never asks for them.
        whole = Int4PackLayout(block, ((),) * (block // 16 - 1) + (full or (),))
        if full is None or not torch.equal(_predicted(whole, _PROBE_ROWS, _PROBE_COLS), found):
            continue
        # A shorter last block per height: one full block, then the tail.
        tails, slots = [], []
        base = block * _PROBE_COLS
        for height in range(16, block, 16):
            seen = _positions(block + height, _PROBE_COLS)
            rows = _slot_rows(seen[base : base + height] - base, height)
            if rows is None:
                return None, f"torch's int4 layout of a {height}-row last block is not one it reads"
            tails.append((height, seen))
            slots.append(rows)
        layout = Int4PackLayout(block, (*slots, full))
        for height, seen in tails:
            if not torch.equal(_predicted(layout, block + height, _PROBE_COLS), seen):
                return None, f"torch's int4 layout with a {height}-row last block does not fit"
        return layout, ""
    return None, "torch's int4 layout fits no row-block layout bitalloc reads"


def _slot_rows(first: torch.Tensor, height: int) -> tuple[int, ...] | None:
    """Rows held by the first ``height`` slots of a block (positions relative to the block), or
    None unless they are a permutation of the block's rows, all at input 0."""
    rows, k = first // _PROBE_COLS, first % _PROBE_COLS
    if bool((k != 0).any()) or sorted(rows.tolist()) != list(range(height)):
        return None
    return tuple(int(r) for r in rows)


# --- reading, writing and multiplying with the learned layout ---------------------------------
def probed_layout() -> Int4PackLayout:
    """The layout learned on this capability; :class:`BitallocError` when there is none."""
    probe = int4pack_probe()
    if probe.layout is None:
        raise BitallocError(f"{probe.describe()}; use the unpack-matmul CPU path")
    return probe.layout


def codes_to_int4pack(codes: torch.Tensor, layout: Int4PackLayout | None = None) -> torch.Tensor:
    """uint8 codes ``(N, K)`` in [0, 16) -> torch's packed layout ``(N, K / 2)`` uint8.

    torch packs; the result is read back with ``layout`` (the probed one by default) and
    compared, so a weight whose layout the probe did not predict is refused, never misread.
    """
    layout = layout or probed_layout()
    rows, cols = codes.shape
    packed = _torch_convert(codes.to(torch.int32))
    if tuple(packed.shape) != (rows, cols // 2) or not torch.equal(
        int4pack_to_codes(packed, rows, cols, layout), codes.to(torch.uint8)
    ):
        raise BitallocError(
            f"torch {torch.__version__} packed a {rows}x{cols} int4 weight on {cpu_capability()} "
            "in a layout its probe did not predict; use the unpack-matmul CPU path"
        )
    return packed


def int4pack_to_codes(
    packed: torch.Tensor,
    out_features: int,
    in_features: int,
    layout: Int4PackLayout | None = None,
) -> torch.Tensor:
    """Inverse of :func:`codes_to_int4pack`: uint8 codes ``(N, K)``, by reshapes and one gather
    per block height (cheap enough per call)."""
    layout = layout or probed_layout()
    nibbles = _nibbles(packed)
    if nibbles.numel() != out_features * in_features:
        raise BitallocError(
            f"int4pack weight of {packed.numel()} bytes cannot hold "
            f"{out_features}x{in_features} codes"
        )
    block = layout.block_rows
    full = out_features // block * block
    parts = []
    if full:
        blocks = nibbles[: full * in_features].view(full // block, in_features, block)
        rows = blocks[:, :, layout.slot_of_row(block)]  # (blocks, K, rows of a block)
        parts.append(rows.permute(0, 2, 1).reshape(full, in_features))
    if out_features > full:
        height = out_features - full
        tail = nibbles[full * in_features :].view(in_features, height)
        parts.append(tail[:, layout.slot_of_row(height)].t())
    return torch.cat(parts).contiguous() if len(parts) > 1 else parts[0].contiguous()


def int4pack_mm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x @ W.T`` with torch's kernel for a 4-bit weight in its layout; bf16 inside, ``x``'s
    dtype out.

    torch's kernel computes ``(q - 8) * scale + offset``; bitalloc stores ``(q - zero) * scale``,
    so ``offset = (8 - zero) * scale``. The (groups, N, 2) table is rebuilt per call from the
    fp16 scales and zeros: it is 1/64 of the weight's size and keeps the stored bytes exact.
    """
    s = scales.to(torch.float32).t()
    offset = (8.0 - zeros.to(torch.float32).t()) * s
    table = torch.stack([s, offset], dim=-1).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16).contiguous(), packed, group_size, table
    )
    return y.to(x.dtype)


def _check_matmul(layout: Int4PackLayout) -> str:
    """ "" when torch's int4 matmul, fed weights packed by torch, matches the dequantized
    reference for every group size and both batch sizes; otherwise what went wrong."""
    from bitalloc.kernels.packing import dequantize_codes

    g = torch.Generator().manual_seed(0)
    rows, cols = layout.block_rows + 16, _MM_PROBE_COLS
    for group in _GROUPS:
        codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
        scales = (torch.rand(rows, cols // group, generator=g) * 0.02 + 0.01).half()
        zeros = (torch.rand(rows, cols // group, generator=g) * 15).half()
        packed = codes_to_int4pack(codes, layout)
        weight = dequantize_codes(codes, scales, zeros, group)
        for batch in _MM_PROBE_BATCHES:
            x = torch.randn(batch, cols, generator=g)
            reference = x @ weight.t()
            y = int4pack_mm(x, packed, scales, zeros, group)
            error = float((y - reference).norm() / reference.norm())
            if not error <= PROBE_TOLERANCE:  # NaN fails too
                return (
                    f"torch's int4 matmul is off the reference by {error:.1%} "
                    f"(group {group}, {batch} rows)"
                )
    return ""
