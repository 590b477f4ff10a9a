"""Distance of every weight format to the Gaussian distortion-rate limit.

For each format of the registered families at 2-8 bits per weight, its mean squared error on
i.i.d. standard Gaussian weights divided by the distortion-rate bound of a unit-variance
Gaussian source, D(R) = 2^(-2R), at the format's *exact* rate R (every stored bit counted:
codes, scales, zeros, codebooks). A ratio of 1 is the limit; reference points from the
literature: round-to-nearest at 3 bits about 2.9x, Lloyd-Max about 2.2x, trellis-coded
quantization about 1.2x (Q-Palette, Lee et al. 2025; QTIP, Tseng et al. 2024), which the
``trellis`` family (``tcq{k}-l{L}``) implements.

The same ratio on the default model's weights (every unit, each weight matrix normalised by its
own variance so that D(R) applies to it as to a unit Gaussian), with and without a randomized
Hadamard rotation of the input dimension where the ``rht`` family is registered. The default
model's weights are the shipped Q4_1 GGUF dequantized: they lie on a 4-bit grid in blocks of
32 along the input dimension, which favours 32-aligned formats at 4 bits and more (a grid that
also holds 0, as ``int`` grids do, does not reproduce them exactly); rotation destroys that
alignment. Read the model columns with that in mind.

    .venv/bin/python benchmarks/quantizers.py [--rows 256] [--cols 4096] [--model-units 14]
        [--model-rows 128]

``--model-rows`` keeps that many rows of each model unit, evenly spaced (every format sees the
same rows; rotation acts along the rows): the trellis search costs up to 70 µs per weight.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from _report import cpu_description, write_section

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, format_families, parse_format

START, END = "<!-- quantizers:start -->", "<!-- quantizers:end -->"
#: Families whose members are listed (wrapping families are asked for explicitly below).
SCALAR_FAMILIES = ("int", "fp", "codebook", "trellis")


def candidates() -> list[Format]:
    """Every listed member of the scalar and vector families (not fp16), cheapest first."""
    registered = {f.name: f for f in format_families()}
    formats: list[Format] = []
    for name in SCALAR_FAMILIES:
        if name in registered:
            formats += [f for f in registered[name].members() if not f.is_float]
    return sorted(formats, key=lambda f: (f.nominal_bits, f.name))


def rotated(fmt: Format) -> Format | None:
    """``fmt`` with a randomized Hadamard rotation, when the rht family is registered."""
    try:
        return parse_format(f"{fmt.name}+rht")
    except BitallocError:
        return None


def ratio(fmt: Format, weight: torch.Tensor) -> tuple[float, float]:
    """(exact rate in bits per weight, MSE / (variance x 2^(-2R)))."""
    rate = fmt.bits_per_weight(tuple(weight.shape))
    error = float(((fmt.fake_quantize(weight) - weight) ** 2).mean())
    variance = float(weight.var())
    return rate, error / (variance * 2.0 ** (-2 * rate))


def model_weights(count: int, rows: int | None = None) -> list[torch.Tensor]:
    """``count`` unit weights of the default model, spread over its layers and roles; with
    ``rows``, that many of each one's rows, evenly spaced."""
    from bitalloc.models import discover_units, get_linear, load_model

    model = load_model().model
    units = discover_units(model)
    # Evenly spread over the layers, the role moving on by one each time (q, k, v, o, ...).
    roles = len({u.role for u in units})
    picks = [
        min(len(units) - 1, (i * len(units)) // count // roles * roles + i % roles)
        for i in range(count)
    ]
    weights = [get_linear(model, units[i].name).weight.detach().float() for i in picks]
    if rows is None:
        return weights
    return [w[torch.linspace(0, w.shape[0] - 1, min(rows, w.shape[0])).long()] for w in weights]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--model-units", type=int, default=14)
    parser.add_argument("--model-rows", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    start = time.perf_counter()
    gaussian = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    weights = model_weights(args.model_units, args.model_rows)
    rows = []
    for fmt in candidates():
        if not (2.0 <= fmt.nominal_bits <= 8.6) or not fmt.allows(tuple(gaussian.shape)):
            continue
        rate, on_gaussian = ratio(fmt, gaussian)
        fitting = [w for w in weights if fmt.allows(tuple(w.shape))]
        on_model = _mean(ratio(fmt, w)[1] for w in fitting)
        turned = rotated(fmt)
        on_rotated = None
        if turned is not None:
            fitting_r = [w for w in fitting if turned.allows(tuple(w.shape))]
            on_rotated = _mean(ratio(turned, w)[1] for w in fitting_r)
        rows.append((fmt.name, fmt.family, rate, on_gaussian, on_model, on_rotated))
        print(rows[-1], flush=True)
    lines = [
        START,
        "## Quantizers against the Gaussian distortion-rate limit",
        "",
        f"`.venv/bin/python benchmarks/quantizers.py --rows {args.rows} --cols {args.cols} "
        f"--model-units {args.model_units}"
        + (f" --model-rows {args.model_rows}" if args.model_rows else "")
        + f"` on {cpu_description()}, "
        f"{(time.perf_counter() - start) / 60:.0f} min. Ratio = MSE / (variance x 2^(-2R)) at "
        "the format's exact rate R (all stored bits); 1.0 is the limit. Gaussian: a "
        f"{args.rows} x {args.cols} matrix of i.i.d. N(0, 1). Model: the mean ratio over "
        f"{len(weights)} units of the default model, every role"
        + (f" ({args.model_rows} evenly spaced rows of each)" if args.model_rows else "")
        + " (Q4_1-dequantized weights, which favour 32-aligned formats at 4+ bits); rotated: "
        "the same with `+rht`.",
        "",
        "| format | family | rate (bits) | Gaussian ratio | model ratio | model ratio, rotated |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, family, rate, g, m, r in rows:
        lines.append(f"| {name} | {family} | {rate:.3f} | {g:.2f} | {_fmt(m)} | {_fmt(r)} |")
    lines += ["", "Best Gaussian ratio per whole rate band:", ""]
    for low in range(2, 9):
        band = [row for row in rows if low <= row[2] < low + 1]
        if band:
            best = min(band, key=lambda row: row[3])
            verdict = "within" if best[3] <= 1.5 else "not within"
            lines.append(
                f"- {low}-{low + 1} bits: {best[0]} at {best[2]:.3f} bits, {best[3]:.2f}x "
                f"({verdict} the 1.5x target)"
            )
    lines.append(END)
    write_section(args.out, START, END, "\n".join(lines))
    print("\n".join(lines))
    return 0


def _mean(values) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
