"""What a streamed allocation will need, before any of it runs: peak memory from the model's
config and the run's settings, and time from this machine's measured speed.

Memory of the streamed ``output`` profile (:mod:`bitalloc.streaming.profile`), the terms that
are live together at the peak:

- this process as it is now (Python, torch, transformers loaded: :func:`resident_bytes`);
- the shell: embedding and output head in the checkpoint's dtype;
- one decoder layer: its float32 parameters, and the shard pages read for it (its stored
  bytes), mapped while the layer is read;
- the layer's Gram statistics: per distinct input, a float64 sum and a float32 mean of
  ``in x in`` (the attention input, the attention output, the MLP input, the MLP's inner
  width);
- activations: two streams (clean, reference-quantized) of ``tokens x hidden`` float32, and
  one batch's inner MLP activations;
- scoring the largest unit: its float32 copies (the weight, the quantized weight, the error,
  the error times the Gram matrix, the search's copy), about five.

Time: the per-layer arithmetic (forward passes, Gram products, the error products of every
format, the rounding search per format and weight) divided by this machine's measured speed
of each kind (:func:`machine_speed`: a matrix product and one format's rounding, timed here on
small inputs). A cluster of ``workers`` divides the per-layer scoring, not the forward chain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bitalloc.formats import Format, parse_palette
from bitalloc.sequential import BATCH
from bitalloc.streaming.model import StreamedModel

#: float32 copies of the largest unit alive while it is scored.
UNIT_COPIES = 5


@dataclass(frozen=True)
class Speed:
    """This machine's measured speeds: matrix products (FLOP/s) and rounding (weights x
    formats per second)."""

    flops: float
    rounding: float


@dataclass(frozen=True)
class ResourcePlan:
    """Estimated peak memory (bytes, by term) and time (seconds, by stage) of a streamed
    allocation."""

    memory: dict[str, int]
    seconds: dict[str, float]
    workers: int

    @property
    def peak_bytes(self) -> int:
        """The sum of the memory terms live together at the peak."""
        return sum(self.memory.values())

    @property
    def total_seconds(self) -> float:
        """The stages one after the other."""
        return sum(self.seconds.values())

    def table(self) -> str:
        """The plan as text, one term per line."""
        lines = ["memory (peak, the terms live together):"]
        lines += [f"  {k:<28} {v / 2**20:10.0f} MiB" for k, v in self.memory.items()]
        lines.append(f"  {'total':<28} {self.peak_bytes / 2**20:10.0f} MiB")
        lines.append(f"time ({self.workers} worker(s) scoring):")
        lines += [f"  {k:<28} {v:10.0f} s" for k, v in self.seconds.items()]
        lines.append(f"  {'total':<28} {self.total_seconds:10.0f} s")
        return "\n".join(lines)


def resident_bytes() -> int:
    """This process's resident set now (bytes), from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_speed() -> Speed:
    """Time a 1024 x 1024 float32 matrix product and one 4-bit format's rounding of a
    1024 x 1024 weight on this machine (best of three each)."""
    a = torch.randn(1024, 1024)
    best = min(_timed(lambda: a @ a) for _ in range(3))
    fmt = parse_palette("int4-g128")[0]
    rounding = min(_timed(lambda: fmt.fake_quantize(a)) for _ in range(3))
    return Speed(flops=2 * 1024**3 / best, rounding=1024 * 1024 / rounding)


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def memory_terms(model: StreamedModel, tokens: int, seq_len: int = 512) -> dict[str, int]:
    """The peak memory of streaming ``model`` over ``tokens`` calibration tokens, by term (see
    the module docstring); the process term is this process's resident set now."""
    checkpoint = model.checkpoint
    config = checkpoint.config_dict
    hidden = int(config["hidden_size"])
    inner = int(config["intermediate_size"])
    windows = max(1, tokens // seq_len)
    used = windows * seq_len
    batch_tokens = min(windows, BATCH) * seq_len
    shell = sum(
        checkpoint.info(n).nbytes
        for n in ("model.embed_tokens.weight", "lm_head.weight")
        if n in checkpoint
    )
    layer_stored = max(model.layer_bytes(i) for i in range(len(model.layers)))
    shapes = [u.shape for u in model.layer_units(0)]
    largest = max(o * i for o, i in shapes)
    return {
        "process (as now)": resident_bytes(),
        "embedding and head": shell,
        "one layer (float32)": 4 * sum(o * i for o, i in shapes),
        "its shard pages": layer_stored,
        "Gram statistics": (3 * hidden**2 + inner**2) * (8 + 4),
        "activations": 4 * (2 * used * hidden + 3 * batch_tokens * inner),
        "scoring the largest unit": 4 * UNIT_COPIES * largest,
    }


def plan_streamed(
    path: str | Path,
    palette: str | list[Format],
    tokens: int,
    *,
    seq_len: int = 512,
    workers: int = 1,
    speed: Speed | None = None,
) -> ResourcePlan:
    """The :class:`ResourcePlan` of ``allocate_streamed`` on the checkpoint at ``path`` (see the
    module docstring)."""
    # The meta skeleton the run builds first (no memory): its units' shapes, and the modules
    # the run imports, loaded before this process's resident set is read.
    model = StreamedModel(path)
    # The rest of what the run imports (the solvers, the profile).
    import bitalloc.planning  # noqa: F401
    import bitalloc.solvers  # noqa: F401
    import bitalloc.streaming.profile  # noqa: F401

    formats = parse_palette(palette) if isinstance(palette, str) else list(palette)
    memory = memory_terms(model, tokens, seq_len)
    config = model.checkpoint.config_dict
    hidden = int(config["hidden_size"])
    inner = int(config["intermediate_size"])
    layers = len(model.layers)
    used = max(1, tokens // seq_len) * seq_len
    shapes = [u.shape for u in model.layer_units(0)]
    layer_params = sum(o * i for o, i in shapes)
    speed = speed or machine_speed()
    quantized = [f for f in formats if not f.is_float]
    forward = 2 * 2 * layer_params * used  # two streams
    gram_flops = 2 * used * (3 * hidden**2 + inner**2)
    error_flops = sum(2 * o * i * i for o, i in shapes) * len(quantized)

    rounding = layer_params * len(quantized) / speed.rounding
    per_layer_forward = (forward + gram_flops) / speed.flops
    per_layer_scoring = (error_flops / speed.flops + rounding) / max(1, workers)
    head_flops = 2 * 2 * used * hidden * int(config["vocab_size"])
    seconds = {
        "forward and statistics": layers * per_layer_forward + head_flops / speed.flops,
        "scoring (formats x units)": layers * per_layer_scoring,
    }
    return ResourcePlan(memory, seconds, workers)
