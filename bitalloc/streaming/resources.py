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

Time: the work of each stage divided by this machine's measured speed of each kind
(:mod:`bitalloc.streaming.speed`: matrix products, each format's rounding as a cost per call
plus one per weight, the conversion of stored tensors to float32; medians of repeated samples,
so that a short quiet moment on a shared machine does not set them). The forward chain
(:func:`_chain_seconds`): per layer its loading, three passes over the calibration tokens (the
statistics pass with its Gram products, the clean stream, the quantized stream), the reference
rounding of its units; then the losses through the head. The scoring (:func:`_layer_scoring`):
every unit rounded to every format it allows and its error product. A cluster of ``workers``
divides the scoring, not the forward chain. The export (:func:`_export_seconds`): every tensor
read to float32, every unit's rounding and, for GGUF, the embedding and head in llama.cpp's
convention and the file's read-back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, GGUFFormat, GPTQFormat, parse_palette
from bitalloc.models import Unit, discover_units
from bitalloc.sensitivity.base import allowed_mask
from bitalloc.sensitivity.output import reference_format
from bitalloc.sequential import BATCH
from bitalloc.streaming.model import HEAD_ROWS, StreamedModel, calibration_windows
from bitalloc.streaming.skeleton import meta_skeleton
from bitalloc.streaming.speed import SPEED_COLUMNS, Speed, machine_speed

#: float32 copies of the largest unit alive while it is scored.
UNIT_COPIES = 5
#: Memory terms live only while a decoder layer is processed, and only while the final loss is
#: computed (after the last layer); the others are live throughout.
LAYER_TERMS = (
    "one layer (float32)",
    "its shard pages",
    "Gram statistics",
    "gradients and squared sums",
    "layer temporaries",
)
LOSS_TERMS = ("the loss (head blocks)",)
#: float32 copies of a block of logits alive in the blockwise loss (the block, its exponent,
#: the log-sum-exp's temporaries).
LOGIT_COPIES = 6
#: The share of the available memory the streamed Fisher profile's kept layer inputs may take
#: before they are spilled to disk.
SPILL_SHARE = 0.25
#: Seconds per vocabulary entry that reading a written GGUF back takes (gguf-py parses each
#: token string of the metadata; measured here at about 10,000 a second).
READ_BACK_PER_TOKEN = 1e-4


@dataclass(frozen=True)
class ResourcePlan:
    """Estimated peak memory (bytes, by term) and time (seconds, by stage) of a streamed
    allocation."""

    memory: dict[str, int]
    seconds: dict[str, float]
    workers: int
    #: The speeds the times were computed from.
    speed: Speed | None = None

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
        if self.speed is not None:
            rates = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in self.speed.rounding.items())
            lines.append(
                f"measured here: matrix products {self.speed.flops / 1e9:.0f} GFLOP/s; "
                f"rounding (M weights/s) {rates or 'none'}; CPU taken by the hypervisor while "
                f"timing {100 * self.speed.steal:.0f}% (times scale with it)"
            )
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


def memory_terms(
    shape: ModelShape, tokens: int, seq_len: int = 512, profiler: str = "output"
) -> dict[str, int]:
    """The peak memory of streaming a model of ``shape`` over ``tokens`` calibration tokens, by
    term (see the module docstring); the process term is this process's resident set now.

    ``fisher`` (and ``kfac``) keeps every layer's input for the backward pass instead of a
    second stream, and holds a layer's gradients and squared sums (``kfac``: its input Gram
    matrices)."""
    hidden = int(shape.config["hidden_size"])
    inner = int(shape.config["intermediate_size"])
    windows = max(1, tokens // seq_len)
    used = windows * seq_len
    batch_tokens = min(windows, BATCH) * seq_len
    shapes = [u.shape for u in shape.layer_units]
    largest = max(o * i for o, i in shapes)
    forward = 4 * batch_tokens * (3 * inner + 6 * hidden)
    if profiler in ("fisher", "kfac"):
        # One window at a time, with autograd's saved activations (about twice a forward's).
        window = 2 * 4 * seq_len * (3 * inner + 6 * hidden)
        kept = 4 * shape.layers * used * hidden
        return {
            "process (as now)": resident_bytes(),
            "embedding and head": shape.shell_bytes,
            # Spilled to disk when larger than its share of the memory: one layer's then.
            "kept layer inputs": kept if not spills(kept) else 4 * used * hidden,
            "one layer (float32)": 4 * sum(o * i for o, i in shapes),
            "its shard pages": shape.layer_bytes,
            # Fisher: weight gradients and their squared sums; K-FAC: float32 input Grams.
            **(
                {"gradients and squared sums": 2 * 4 * sum(o * i for o, i in shapes)}
                if profiler == "fisher"
                else {"Gram statistics": 4 * (3 * hidden**2 + inner**2)}
            ),
            "layer temporaries": max(window, 4 * UNIT_COPIES * largest),
            "the loss (head blocks)": 4 * (LOGIT_COPIES * seq_len + hidden) * HEAD_ROWS,
        }
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


def spills(kept: int) -> bool:
    """Whether the streamed Fisher profile keeps ``kept`` bytes of layer inputs on disk: when
    they exceed :data:`SPILL_SHARE` of the memory available now."""
    return kept > available_bytes() * SPILL_SHARE


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
    profiler: str = "output",
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
    # The process term first: timing the machine allocates memory of its own.
    memory = memory_terms(shape, tokens, seq_len, profiler)
    quantized = [f for f in formats if not f.is_float]
    speed = speed or machine_speed(quantized + _shell_formats(quantized))
    scoring = shape.layers * _layer_scoring(shape, formats, speed, products=profiler != "fisher")
    chain = _chain_seconds if profiler == "output" else _fisher_chain_seconds
    seconds = {
        "forward and statistics": chain(shape, formats, speed, tokens, seq_len),
        "scoring (formats x units)": scoring / max(1, workers),
        "export": _export_seconds(shape, formats, speed, avg_bits),
    }
    return ResourcePlan(memory, seconds, workers, speed)


def _chain_seconds(
    shape: ModelShape, formats: Sequence[Format], speed: Speed, tokens: int, seq_len: int
) -> float:
    """The serial part of the profile: per layer, its loading (the stored tensors turned to
    float32), the statistics pass (a forward with the Gram products), the clean stream's
    forward and, when the palette has a reference format, the reference rounding of every
    unit and the quantized stream's forward; then the two streams' losses through the head."""
    config = shape.config
    hidden = int(config["hidden_size"])
    inner = int(config["intermediate_size"])
    used = max(1, tokens // seq_len) * seq_len
    layer_params = sum(u.numel for u in shape.layer_units)
    units = list(shape.layer_units)
    reference = reference_format(formats, units)
    passes = 3 if reference is not None else 2
    # Per token: two FLOPs per weight, and the attention's scores and weighted sum over the
    # window (the mask is applied to full products: no causal saving).
    forward = used * (2 * layer_params + 4 * seq_len * hidden)
    gram = 2 * used * (3 * hidden**2 + inner**2)
    per_layer = 4 * layer_params / speed.convert + (passes * forward + gram) / speed.flops
    if reference is not None:
        per_layer += sum(speed.rounding_seconds(reference.name, u.numel) for u in units)
    streams = 2 if reference is not None else 1
    head = streams * 2 * used * hidden * int(config["vocab_size"])
    return shape.layers * per_layer + head / speed.flops


def _fisher_chain_seconds(
    shape: ModelShape, formats: Sequence[Format], speed: Speed, tokens: int, seq_len: int
) -> float:
    """The serial part of the streamed Fisher profile: per layer, two loadings and the
    equivalent of five forward passes (the statistics pass and the stream forward; the
    recomputed forward and its backward, about twice a forward, on the way back); the head
    read twice for each window's gradient."""
    config = shape.config
    hidden = int(config["hidden_size"])
    used = max(1, tokens // seq_len) * seq_len
    layer_params = sum(u.numel for u in shape.layer_units)
    forward = used * (2 * layer_params + 4 * seq_len * hidden)
    per_layer = 2 * 4 * layer_params / speed.convert + 5 * forward / speed.flops
    head = 2 * 2 * used * hidden * int(config["vocab_size"])
    return shape.layers * per_layer + head / speed.flops


def _layer_scoring(
    shape: ModelShape, formats: Sequence[Format], speed: Speed, products: bool = True
) -> float:
    """One layer's scoring: every unit rounded to every format it allows and, with
    ``products``, its error product ``trace(dW G dWᵀ)`` (a matrix product of ``out x in x
    in``; the Fisher score is elementwise instead)."""
    allowed = allowed_mask(list(shape.layer_units), formats)
    seconds = 0.0
    for unit, row in zip(shape.layer_units, allowed):
        (out, width), weights = unit.shape, unit.numel
        for fmt, ok in zip(formats, row):
            if not ok or fmt.is_float:
                continue
            # GPTQ's column sweep costs in^2 per row: its per-weight rate scales with width.
            slowdown = width / SPEED_COLUMNS if isinstance(fmt, GPTQFormat) else 1.0
            seconds += speed.rounding_seconds(fmt.name, weights * slowdown)
            if products:
                seconds += 2 * out * width * width / speed.flops
    return seconds


def _tokenize_default_text(model: StreamedModel, seq_len: int) -> None:
    """Load the checkpoint's tokenizer and tokenize the default calibration text, as the run
    does first, so that the process term counts them (nothing when it has no tokenizer)."""
    with contextlib.suppress(BitallocError):
        calibration_windows(model.checkpoint, None, seq_len)


def _export_seconds(
    shape: ModelShape, formats: Sequence[Format], speed: Speed, avg_bits: float | None
) -> float:
    """Every tensor read to float32 and every unit rounded once, plus the embedding and head
    at the GGUF convention's rates (Q8_0 / Q6_K) and the file's read-back when the palette is
    llama.cpp's.

    The formats are not chosen yet: with ``avg_bits``, a unit's time is that of the two
    formats whose bits bracket the budget, mixed in the proportion that meets it (the solver's
    choice is near that mix); without it, the palette's mean."""
    quantized = [f for f in formats if not f.is_float]
    if not quantized:
        return 0.0
    mix = [(1 / len(quantized), f) for f in quantized]
    if avg_bits is not None:
        mix = _bracketing_mix(shape, formats, avg_bits)
    per_layer = sum(
        share * speed.rounding_seconds(fmt.name, unit.numel)
        for unit in shape.layer_units
        for share, fmt in mix
        if not fmt.is_float
    )
    read = 4 * (shape.unit_numel + shape.embedding + shape.head) / speed.convert
    seconds = shape.layers * per_layer + read
    shell = _shell_formats(quantized)
    if shell:
        q8, q6 = (f.name for f in shell)
        seconds += speed.rounding_seconds(q8 if shape.head else q6, shape.embedding)
        seconds += speed.rounding_seconds(q6, shape.head) if shape.head else 0.0
        seconds += READ_BACK_PER_TOKEN * int(shape.config["vocab_size"])
    return seconds


def _bracketing_mix(
    shape: ModelShape, formats: Sequence[Format], avg_bits: float
) -> list[tuple[float, Format]]:
    """The two formats (by bits per weight of the largest unit) that bracket ``avg_bits``,
    each with the share of weights that meets it."""
    unit = max(shape.layer_units, key=lambda u: u.numel)
    usable = sorted(
        ((f.bits_per_weight(unit.shape), f) for f in formats if f.allows(unit.shape)),
        key=lambda bf: bf[0],
    )
    below = [(b, f) for b, f in usable if b <= avg_bits] or usable[:1]
    above = [(b, f) for b, f in usable if b >= avg_bits] or usable[-1:]
    (b_lo, lo), (b_hi, hi) = below[-1], above[0]
    share = 0.0 if b_hi == b_lo else (avg_bits - b_lo) / (b_hi - b_lo)
    return [(1 - share, lo), (share, hi)]


def _shell_formats(quantized: Sequence[Format]) -> list[Format]:
    """Q8_0 and Q6_K (the GGUF convention's embedding and head types) for a llama.cpp palette,
    else nothing."""
    if quantized and all(isinstance(f, GGUFFormat) for f in quantized):
        return [GGUFFormat("Q8_0"), GGUFFormat("Q6_K")]
    return []
