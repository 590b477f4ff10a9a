"""What a streamed allocation will need, before any of it runs: peak memory from the model's
config and the run's settings, and time from this machine's measured speed.

Memory of the streamed ``output`` profile (:mod:`bitalloc.streaming.profile`): the terms live
throughout, plus the larger of two phases (:func:`peak_of`):

- throughout: this process as it is now (Python, torch, transformers, the tokenizer and the
  calibration text: :func:`resident_bytes`); the embedding and output head in the checkpoint's
  dtype; the two activation streams (clean, reference-quantized), ``tokens x hidden`` float32;
- while a layer is processed: its float32 parameters and the shard pages read for it (its
  stored bytes); its Gram statistics, per distinct input (the attention input, the attention
  output, the MLP input, the MLP's inner width) a float32 batch sum, a float64 running sum and
  a float32 mean of ``in x in``; and the larger of a forward pass's temporaries and the copies
  made while the largest unit is scored (the weight, the quantized weight, the error, the
  error times the Gram matrix, the search's copy: about five);
- while the final loss is computed: the blocks of logits (:data:`HEAD_ROWS` rows of the head at
  a time, in float32, and their temporaries).

Time: the per-layer arithmetic (forward passes, Gram products, the error products of every
format, the rounding search per format and weight) divided by this machine's measured speed
of each kind (:func:`machine_speed`: a matrix product and one format's rounding, timed here on
small inputs). A cluster of ``workers`` divides the per-layer scoring, not the forward chain.
The export's time is every unit's rounding (see :func:`_export_seconds`) and, for GGUF, the
embedding and head in llama.cpp's convention and the file's read-back.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, GGUFFormat, GPTQFormat, fake_quantize_each, parse_palette
from bitalloc.models import Unit, discover_units
from bitalloc.sensitivity.base import allowed_mask
from bitalloc.sensitivity.output import reference_format
from bitalloc.sequential import BATCH
from bitalloc.streaming.model import HEAD_ROWS, StreamedModel, calibration_windows
from bitalloc.streaming.skeleton import meta_skeleton

#: float32 copies of the largest unit alive while it is scored.
UNIT_COPIES = 5
#: Columns of the weights the rounding speeds are measured on.
SPEED_COLUMNS = 1024
#: Memory terms live only while a decoder layer is processed, and only while the final loss is
#: computed (after the last layer); the others are live throughout.
LAYER_TERMS = ("one layer (float32)", "its shard pages", "Gram statistics", "layer temporaries")
LOSS_TERMS = ("the loss (head blocks)",)
#: float32 copies of a block of logits alive in the blockwise loss (the block, its exponent,
#: the log-sum-exp's temporaries).
LOGIT_COPIES = 6
#: Seconds per vocabulary entry that reading a written GGUF back takes (gguf-py parses each
#: token string of the metadata; measured here at about 10,000 a second).
READ_BACK_PER_TOKEN = 1e-4


@dataclass(frozen=True)
class Speed:
    """This machine's measured speeds: matrix products (FLOP/s) and each format's rounding
    (weights per second on a weight of :data:`SPEED_COLUMNS` columns, as the profile rounds:
    weighted by a Gram matrix's diagonal, ``+gptq`` with the Gram matrix itself)."""

    flops: float
    rounding: Mapping[str, float]


@dataclass(frozen=True)
class ResourcePlan:
    """Estimated peak memory (bytes, by term) and time (seconds, by stage) of a streamed
    allocation."""

    memory: dict[str, int]
    seconds: dict[str, float]
    workers: int

    @property
    def peak_bytes(self) -> int:
        """The terms live throughout, plus the larger of the two phases (see
        :func:`peak_of`)."""
        return peak_of(self.memory)

    @property
    def total_seconds(self) -> float:
        """The stages one after the other."""
        return sum(self.seconds.values())

    def table(self) -> str:
        """The plan as text, one term per line."""
        lines = ["memory (peak: the common terms and the larger phase):"]
        for k, v in self.memory.items():
            phase = " [layer]" if k in LAYER_TERMS else " [loss]" if k in LOSS_TERMS else ""
            lines.append(f"  {k + phase:<36} {v / 2**20:10.0f} MiB")
        lines.append(f"  {'peak':<36} {self.peak_bytes / 2**20:10.0f} MiB")
        lines.append(f"time ({self.workers} worker(s) scoring):")
        lines += [f"  {k:<36} {v:10.0f} s" for k, v in self.seconds.items()]
        lines.append(f"  {'total':<36} {self.total_seconds:10.0f} s")
        return "\n".join(lines)


def resident_bytes() -> int:
    """This process's resident set now (bytes), from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def available_bytes() -> int:
    """Memory this machine can give a new allocation now (``MemAvailable`` of
    ``/proc/meminfo``, bytes)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_speed(formats: Sequence[Format] = ()) -> Speed:
    """Time a 1024 x 1024 float32 matrix product and each quantized format's rounding of a
    1024 x :data:`SPEED_COLUMNS` weight on this machine (best of three each)."""
    a = torch.randn(1024, 1024)
    best = min(_timed(lambda: a @ a) for _ in range(3))
    weight = torch.randn(1024, SPEED_COLUMNS) * 0.02
    x = torch.randn(4 * SPEED_COLUMNS, SPEED_COLUMNS)
    gram = x.T @ x / len(x)
    rounding = {}
    for fmt in formats:
        if fmt.is_float or fmt.name in rounding:
            continue
        seconds = min(
            _timed(lambda f=fmt: list(fake_quantize_each(weight, [f], gram))) for _ in range(3)
        )
        rounding[fmt.name] = weight.numel() / seconds
    return Speed(flops=2 * 1024**3 / best, rounding=rounding)


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs of a model, from its checkpoint or from its config alone: the config,
    the units of one decoder layer, the number of layers, and stored sizes."""

    config: dict[str, Any]
    layer_units: tuple[Unit, ...]
    layers: int
    #: Elements of the token embedding, and of the output head (0 when tied to it).
    embedding: int
    head: int
    #: Stored bytes of the embedding and head, and of the largest decoder layer.
    shell_bytes: int
    layer_bytes: int

    @property
    def unit_numel(self) -> int:
        """Weights of every unit (every layer alike)."""
        return self.layers * sum(u.numel for u in self.layer_units)

    @classmethod
    def of_checkpoint(cls, model: StreamedModel) -> ModelShape:
        """The shape of a checkpoint, its stored sizes read from its shards' headers."""
        ckpt = model.checkpoint
        head = "lm_head.weight"
        return cls(
            config=ckpt.config_dict,
            layer_units=tuple(model.layer_units(0)),
            layers=len(model.layers),
            embedding=ckpt.info("model.embed_tokens.weight").numel,
            head=ckpt.info(head).numel if head in ckpt else 0,
            shell_bytes=sum(
                ckpt.info(n).nbytes for n in ("model.embed_tokens.weight", head) if n in ckpt
            ),
            layer_bytes=max(model.layer_bytes(i) for i in range(len(model.layers))),
        )

    @classmethod
    def of_config(cls, path: str | Path) -> ModelShape:
        """The shape of the model a ``config.json`` describes (nothing else needed), stored in
        the config's ``dtype`` / ``torch_dtype`` (bf16 when it names none)."""
        from transformers import AutoConfig

        try:
            values = json.loads(Path(path).read_text())
            config = AutoConfig.for_model(**values)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BitallocError(
                f"cannot read a model config from {path} ({exc}); pass a config.json with a "
                "model_type"
            ) from None
        skeleton = meta_skeleton(config)
        units = discover_units(skeleton)
        named = values.get("dtype") or values.get("torch_dtype") or "bfloat16"
        stored = getattr(torch, str(named), torch.bfloat16)
        size = torch.empty((), dtype=stored).element_size()
        params = dict(skeleton.named_parameters())
        embedding = params["model.embed_tokens.weight"].numel()
        head = params["lm_head.weight"].numel() if "lm_head.weight" in params else 0
        layer = sum(p.numel() for n, p in params.items() if n.startswith("model.layers.0."))
        return cls(
            config=values,
            layer_units=tuple(u for u in units if u.layer == 0),
            layers=len(skeleton.model.layers),
            embedding=embedding,
            head=head,
            shell_bytes=size * (embedding + head),
            layer_bytes=size * layer,
        )


def memory_terms(shape: ModelShape, tokens: int, seq_len: int = 512) -> dict[str, int]:
    """The peak memory of streaming a model of ``shape`` over ``tokens`` calibration tokens, by
    term (see the module docstring); the process term is this process's resident set now."""
    hidden = int(shape.config["hidden_size"])
    inner = int(shape.config["intermediate_size"])
    windows = max(1, tokens // seq_len)
    used = windows * seq_len
    batch_tokens = min(windows, BATCH) * seq_len
    shapes = [u.shape for u in shape.layer_units]
    largest = max(o * i for o, i in shapes)
    forward = 4 * batch_tokens * (3 * inner + 6 * hidden)
    return {
        "process (as now)": resident_bytes(),
        "embedding and head": shape.shell_bytes,
        "activations (two streams)": 4 * 2 * used * hidden,
        "one layer (float32)": 4 * sum(o * i for o, i in shapes),
        "its shard pages": shape.layer_bytes,
        "Gram statistics": (3 * hidden**2 + inner**2) * (4 + 8 + 4),
        # A forward pass and the scoring of a unit do not overlap.
        "layer temporaries": max(forward, 4 * UNIT_COPIES * largest),
        "the loss (head blocks)": 4 * (LOGIT_COPIES * batch_tokens + hidden) * HEAD_ROWS,
    }


def peak_of(terms: Mapping[str, int]) -> int:
    """The peak of :func:`memory_terms`: the terms live throughout, plus the larger of the
    layer phase (:data:`LAYER_TERMS`) and the loss phase (:data:`LOSS_TERMS`)."""
    common = sum(v for k, v in terms.items() if k not in LAYER_TERMS + LOSS_TERMS)
    layer = sum(v for k, v in terms.items() if k in LAYER_TERMS)
    loss = sum(v for k, v in terms.items() if k in LOSS_TERMS)
    return common + max(layer, loss)


def plan_streamed(
    path: str | Path,
    palette: str | list[Format],
    tokens: int,
    *,
    seq_len: int = 512,
    workers: int = 1,
    speed: Speed | None = None,
    avg_bits: float | None = None,
) -> ResourcePlan:
    """The :class:`ResourcePlan` of ``allocate_streamed`` on the checkpoint at ``path`` (see the
    module docstring), or, for a ``config.json`` file, on the model it describes (a model not
    at hand: what it would need here)."""
    # The meta skeleton the run builds first (no memory): its units' shapes, and the modules
    # the run imports, loaded before this process's resident set is read.
    if Path(path).suffix == ".json":
        shape = ModelShape.of_config(path)
    else:
        model = StreamedModel(path)
        shape = ModelShape.of_checkpoint(model)
        _tokenize_default_text(model, seq_len)
    # The rest of what the run imports (the solvers, the profile).
    import bitalloc.planning  # noqa: F401
    import bitalloc.solvers  # noqa: F401
    import bitalloc.streaming.profile  # noqa: F401

    formats = parse_palette(palette) if isinstance(palette, str) else list(palette)
    memory = memory_terms(shape, tokens, seq_len)
    config = shape.config
    hidden = int(config["hidden_size"])
    inner = int(config["intermediate_size"])
    layers = shape.layers
    used = max(1, tokens // seq_len) * seq_len
    layer_params = sum(u.numel for u in shape.layer_units)
    quantized = [f for f in formats if not f.is_float]
    speed = speed or machine_speed(quantized + _shell_formats(quantized))
    allowed = allowed_mask(list(shape.layer_units), formats)
    forward = 2 * 2 * layer_params * used  # two streams
    gram_flops = 2 * used * (3 * hidden**2 + inner**2)
    scoring = 0.0
    for unit, row in zip(shape.layer_units, allowed):
        (out, width), weights = unit.shape, unit.numel
        for fmt, ok in zip(formats, row):
            if not ok or fmt.is_float:
                continue
            # GPTQ's column sweep costs in^2 per row: its per-weight rate scales with width.
            slowdown = width / SPEED_COLUMNS if isinstance(fmt, GPTQFormat) else 1.0
            scoring += 2 * out * width * width / speed.flops
            scoring += weights * slowdown / speed.rounding[fmt.name]
    # The second stream runs each layer with every unit rounded to the reference format.
    reference = reference_format(formats, list(shape.layer_units))
    rate = speed.rounding[reference.name] if reference is not None else float("inf")
    reference_rounding = layer_params / rate
    head_flops = 2 * 2 * used * hidden * int(config["vocab_size"])
    seconds = {
        "forward and statistics": layers * (forward + gram_flops) / speed.flops
        + layers * reference_rounding
        + head_flops / speed.flops,
        "scoring (formats x units)": layers * scoring / max(1, workers),
        "export": _export_seconds(shape, formats, speed, avg_bits),
    }
    return ResourcePlan(memory, seconds, workers)


def _tokenize_default_text(model: StreamedModel, seq_len: int) -> None:
    """Load the checkpoint's tokenizer and tokenize the default calibration text, as the run
    does first, so that the process term counts them (nothing when it has no tokenizer)."""
    with contextlib.suppress(BitallocError):
        calibration_windows(model.checkpoint, None, seq_len)


def _export_seconds(
    shape: ModelShape, formats: Sequence[Format], speed: Speed, avg_bits: float | None
) -> float:
    """Every unit rounded once, plus the embedding and head at the GGUF convention's rates
    (Q8_0 / Q6_K) and the file's read-back when the palette is llama.cpp's.

    The formats are not chosen yet: with ``avg_bits``, a unit's time per weight is that of
    the two formats whose bits bracket the budget, mixed in the proportion that meets it (the
    solver's choice is near that mix); without it, the palette's mean."""
    quantized = [f for f in formats if not f.is_float]
    if not quantized:
        return 0.0
    per_weight = sum(1 / speed.rounding[f.name] for f in quantized) / len(quantized)
    if avg_bits is not None:
        per_weight = _bracketing_time(shape, formats, speed, avg_bits)
    seconds = shape.unit_numel * per_weight
    shell = _shell_formats(quantized)
    if shell:
        q8, q6 = (speed.rounding[f.name] for f in shell)
        seconds += shape.embedding / (q8 if shape.head else q6) + shape.head / q6
        seconds += READ_BACK_PER_TOKEN * int(shape.config["vocab_size"])
    return seconds


def _bracketing_time(
    shape: ModelShape, formats: Sequence[Format], speed: Speed, avg_bits: float
) -> float:
    """Seconds per weight of the mix of the two formats (by bits per weight of the largest
    unit) that bracket ``avg_bits``; a float format rounds nothing."""
    unit = max(shape.layer_units, key=lambda u: u.numel)
    usable = sorted((f.bits_per_weight(unit.shape), f) for f in formats if f.allows(unit.shape))

    def cost(fmt: Format) -> float:
        return 0.0 if fmt.is_float else 1 / speed.rounding[fmt.name]

    below = [(b, f) for b, f in usable if b <= avg_bits] or usable[:1]
    above = [(b, f) for b, f in usable if b >= avg_bits] or usable[-1:]
    (b_lo, lo), (b_hi, hi) = below[-1], above[0]
    share = 0.0 if b_hi == b_lo else (avg_bits - b_lo) / (b_hi - b_lo)
    return (1 - share) * cost(lo) + share * cost(hi)


def _shell_formats(quantized: Sequence[Format]) -> list[Format]:
    """Q8_0 and Q6_K (the GGUF convention's embedding and head types) for a llama.cpp palette,
    else nothing."""
    if quantized and all(isinstance(f, GGUFFormat) for f in quantized):
        return [GGUFFormat("Q8_0"), GGUFFormat("Q6_K")]
    return []
