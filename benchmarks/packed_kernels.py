"""Packed models and kernels: bytes, speed and quality per execution path.

CPU (always): the embedded default model in float32 against packed versions of it (the solver's
allocation at ``--avg-bits``, and uniform int4-g64 where every unit can take torch's int4 CPU
kernel), each on the CPU paths ``unpack-matmul`` and ``auto`` (measured choice). Per variant:
unit bytes against the allocation's prediction, model bytes, decode tokens/s (greedy, a fixed
number of new tokens), prefill tokens/s (one window) and perplexity on evaluation windows.
Variants are timed in interleaved rounds (median of rounds) so machine noise hits all alike.

GPU (when CUDA is available): :mod:`packed_kernels_gpu`'s GEMV/GEMM timings against fp16
matmul.

Writes its section of BENCHMARKS.md (between markers), with the command and the machine.

    .venv/bin/python benchmarks/packed_kernels.py [--avg-bits 3.25] [--rounds 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from _report import cpu_description, write_section

from bitalloc.allocator import allocate, prepare
from bitalloc.evaluate import perplexity
from bitalloc.formats import parse_format
from bitalloc.packed import last_paths, model_bytes, pack_model

START, END = "<!-- kernels:start -->", "<!-- kernels:end -->"
MIB = 1024 * 1024


@dataclass
class Variant:
    """One model under test and what was measured on it."""

    name: str
    model: torch.nn.Module
    predicted_bytes: float | None = None
    decode_paths: dict[str, int] = field(default_factory=dict)
    prefill_paths: dict[str, int] = field(default_factory=dict)
    decode: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    ppl: float | None = None


def decode_tokens_per_s(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> float:
    """Greedy generation of exactly ``new`` tokens after ``prompt``; tokens per second."""
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=0,
        )
    assert out.shape[1] == prompt.shape[1] + new
    return new / (time.perf_counter() - start)


def prefill_tokens_per_s(model: torch.nn.Module, window: torch.Tensor) -> float:
    """One forward pass over ``window`` (1, seq); tokens per second."""
    start = time.perf_counter()
    with torch.inference_mode():
        model(window)
    return window.numel() / (time.perf_counter() - start)


def cpu_section(args: argparse.Namespace, prep) -> str:
    torch.set_num_threads(args.threads)
    base = prep.model
    alloc = allocate(base, args.avg_bits, tokenizer=prep.loaded.tokenizer)
    uniform = {u.name: "int4-g64" for u in prep.units}
    predicted_uniform = sum(parse_format("int4-g64").storage_bits(u.shape) for u in prep.units) / 8

    variants = [Variant("float32 (unquantized)", base)]
    for policy in ("unpack-matmul", "auto"):
        start = time.perf_counter()
        packed = alloc.apply(base, packed=True, cpu_path=policy)
        print(f"packed {args.avg_bits} bits ({policy}) in {time.perf_counter() - start:.1f} s")
        variants.append(
            Variant(f"{args.avg_bits} bits, {policy}", packed, alloc.data.total_bits / 8)
        )
    for policy in ("unpack-matmul", "auto"):
        packed = pack_model(base, uniform, cpu_path=policy)
        variants.append(Variant(f"uniform int4-g64, {policy}", packed, predicted_uniform))

    evaluation = prep.evaluation_windows(args.eval_tokens)
    prompt = evaluation[:1, : args.prompt_tokens]
    window = evaluation[:1, : args.prefill_tokens]
    for v in variants:
        v.ppl = perplexity(v.model, evaluation).perplexity
        print(f"{v.name}: perplexity {v.ppl:.2f}")
    for r in range(args.rounds):
        for v in variants:
            v.decode.append(decode_tokens_per_s(v.model, prompt, args.new_tokens))
            v.decode_paths = last_paths(v.model)  # the last call is a one-token step
            v.prefill.append(prefill_tokens_per_s(v.model, window))
            v.prefill_paths = last_paths(v.model)
        print(f"round {r + 1}: " + ", ".join(f"{v.name} {v.decode[-1]:.2f}" for v in variants))

    ref = variants[0]
    ref_decode = statistics.median(ref.decode)
    ref_prefill = statistics.median(ref.prefill)
    ref_bytes = model_bytes(ref.model)["total"]
    lines = [
        "| model | units per path: decode / prefill | unit bytes (predicted) | model MiB (× fp32) "
        "| decode tok/s (× fp32) | prefill tok/s (× fp32) | perplexity |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        sizes = model_bytes(v.model)
        decode = statistics.median(v.decode)
        prefill = statistics.median(v.prefill)
        if v.predicted_bytes is None:
            units = "–"
        else:
            ratio = sizes["units"] / v.predicted_bytes
            units = f"{sizes['units'] / MIB:.2f} MiB ({ratio:.4f}×)"
        paths = " / ".join(
            ", ".join(f"{p} {n}" for p, n in phase.items()) or "nn.Linear"
            for phase in (v.decode_paths, v.prefill_paths)
        )
        lines.append(
            f"| {v.name} | {paths} | {units} | {sizes['total'] / MIB:.1f} "
            f"({sizes['total'] / ref_bytes:.3f}) | {decode:.2f} ({decode / ref_decode:.3f}) "
            f"| {prefill:.0f} ({prefill / ref_prefill:.3f}) | {v.ppl:.2f} |"
        )
    rest = model_bytes(variants[1].model)["other"]
    return "\n".join(
        [
            "### CPU: packed models on the default model",
            "",
            f"Allocation: `allocate(avg_bits={args.avg_bits})` (Fisher profile, Lagrangian), "
            f"{alloc.summary()}. Decode: {args.new_tokens} new tokens, greedy, after a "
            f"{args.prompt_tokens}-token prompt; prefill: one window of {args.prefill_tokens} "
            f"tokens; median of {args.rounds} interleaved rounds, {args.threads} threads. "
            f"Perplexity: {evaluation.numel()} evaluation tokens.",
            "",
            *lines,
            "",
            f"The rest of each packed model (embedding tied with lm_head, norms) stays float32: "
            f"{rest / MIB:.1f} MiB.",
        ]
    )


def gpu_section(prep) -> str:
    """Every width and group size at 4096 x 4096, Llama-8B-like shapes and the default
    model's own shapes, against fp16 ``F.linear``."""
    from packed_kernels_gpu import DEFAULT_SHAPES, gpu_markdown, gpu_rows

    own = sorted({u.shape for u in prep.units}, reverse=True)
    rows = gpu_rows(
        shapes=[*DEFAULT_SHAPES, *own], bits_list=(2, 3, 4, 5, 6, 8), groups=(32, 64, 128)
    )
    return "\n".join(["### GPU: fused kernels against fp16 matmul", "", gpu_markdown(rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avg-bits", type=float, default=3.25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-write", action="store_true", help="print, do not edit BENCHMARKS.md")
    args = parser.parse_args()

    prep = prepare()
    command = "`.venv/bin/python benchmarks/packed_kernels.py " + " ".join(sys.argv[1:]) + "`"
    machine = f"{cpu_description()}, torch {torch.__version__}, Python {platform.python_version()}"
    parts = [
        START,
        "## Packed models and kernels",
        "",
        f"Command: {command.replace(' `', '`')}  ",
        f"Machine: {machine}",
        "",
        cpu_section(args, prep),
    ]
    if torch.cuda.is_available():
        parts += ["", gpu_section(prep)]
    else:
        parts += ["", "GPU: no CUDA device on this machine; GPU timings were not taken."]
    parts.append(END)
    section = "\n".join(parts)
    print(section)
    if not args.no_write:
        write_section("BENCHMARKS.md", START, END, section)


if __name__ == "__main__":
    main()
