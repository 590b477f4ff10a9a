"""bitalloc's GGUF files against llama.cpp's own preset mixes, at the same file size.

On the embedded default model, with one importance matrix for everyone (bitalloc's, gathered
from the calibration split and saved in llama.cpp's imatrix format):

1. each llama.cpp preset (Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, IQ3_S, IQ4_XS) is
   made the llama.cpp way: ``llama-quantize --imatrix`` from the shipped GGUF;
2. bitalloc allocates over the gguf palette (``--target gguf``) with the preset's file size as
   its budget (``--file-size``), and exports the allocation (``bitalloc export``);
3. llama.cpp's ``llama-perplexity`` measures every file on the same evaluation text (the
   evaluation split, windows of 512 tokens).

Then batch-1 decode speed on this CPU: llama.cpp (``llama-bench``) running an exported file
and a preset, beside bitalloc's own packed path and float32 in PyTorch; and a check that
transformers' reading of an exported file measures the allocation's own perplexity.

The shipped default model is a Q4_1 GGUF, so every file here (preset or bitalloc's) quantizes
weights that already lie on a 4-bit grid in blocks of 32: types with 32-blocks are favoured.

Needs llama.cpp's tools (``python -m bitalloc.export.llamacpp build``). Writes its section of
BENCHMARKS.md.

    .venv/bin/python benchmarks/engines.py [--part all|gguf|ct|speed] [--chunks 16]
                                           [--presets Q4_K_M,Q3_K_M]

``--part ct`` needs no llama.cpp: uniform compressed-tensors schemes (W4A16, MXFP4A16,
NVFP4A16) against bitalloc's ``--target ct`` allocation at the same bits, each checkpoint loaded
by transformers. ``--part speed`` measures decode speed on one preset (Q4_K_M) and bitalloc's
file at its size.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gguf
import torch
from _report import cpu_description, write_section

from bitalloc.allocator import allocate, prepare
from bitalloc.errors import InfeasibleBudgetError
from bitalloc.evaluate import perplexity
from bitalloc.export.gguf import export_gguf
from bitalloc.export.llamacpp import find_llama_cpp, missing_reason
from bitalloc.imatrix import save_imatrix
from bitalloc.models import default_gguf_path

START, END = "<!-- engines:start -->", "<!-- engines:end -->"
CT_START, CT_END = "<!-- engines-ct:start -->", "<!-- engines-ct:end -->"
SPEED_START, SPEED_END = "<!-- engines-speed:start -->", "<!-- engines-speed:end -->"
#: Uniform compressed-tensors baselines: W4A16 (int4, the largest group of 128/64/32 that
#: divides each unit's width: SmolLM2's 576 is not a multiple of 128), MXFP4A16, NVFP4A16.
CT_BASELINES = ("W4A16", "ct:mxfp4", "ct:nvfp4")
MIB = 1024 * 1024
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ3_S", "IQ4_XS")


def unit_bits(path: Path, model, units) -> float:
    """Bits per weight of the decoder's weight matrices (the allocated units) in a GGUF file."""
    from bitalloc.export.gguf import gguf_param_names

    reader = gguf.GGUFReader(path)
    to_param = gguf_param_names(model, "llama", 1 + max(u.layer for u in units))
    numel = {f"{u.name}.weight": u.numel for u in units}
    bits = [
        (int(t.n_bytes) * 8, numel[to_param[t.name]])
        for t in reader.tensors
        if to_param.get(t.name) in numel
    ]
    return sum(b for b, _ in bits) / sum(n for _, n in bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--chunks", type=int, default=16, help="512-token chunks per perplexity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--part", choices=("all", "gguf", "ct", "speed"), default="all")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="allocate with --verify (measure, repair, never worse than a uniform candidate)",
    )
    args = parser.parse_args()
    if args.part in ("all", "ct"):
        ct_section(args)
    if args.part == "ct":
        return
    if args.part == "speed" and args.presets == ",".join(PRESETS):
        args.presets = "Q4_K_M"
    tools = find_llama_cpp()
    if tools is None:
        sys.exit(missing_reason())
    torch.set_num_threads(args.threads)
    started = time.time()
    source = default_gguf_path()
    prep = prepare(None, formats="gguf:Q4_K")  # the model, units, text and importance
    work = Path(tempfile.mkdtemp(prefix="bitalloc-engines-"))
    text = work / "evaluation.txt"
    text.write_text(prep.text.evaluation)
    imatrix = save_imatrix(prep.importance, prep.model, prep.units, work / "imatrix.gguf")
    print(f"work directory {work}; imatrix from {prep.importance.tokens} calibration tokens")

    shipped = (
        source.stat().st_size,
        tools.perplexity(source, text, chunks=args.chunks, threads=args.threads),
    )
    rows = []
    for preset in [p for p in args.presets.split(",") if p]:
        made = tools.quantize(source, work / f"{preset}.gguf", preset, imatrix=imatrix)
        size = made.stat().st_size
        ppl = tools.perplexity(made, text, chunks=args.chunks, threads=args.threads)
        try:
            alloc = allocate(
                None, target="gguf", max_file_bytes=size, verify=args.verify, progress=False
            )
        except InfeasibleBudgetError as exc:
            print(f"{preset}: bitalloc cannot reach {size / MIB:.2f} MiB: {exc}")
            rows.append((preset, size, unit_bits(made, prep.model, prep.units), ppl, None))
            continue
        ours = export_gguf(
            alloc, prep.model, source, work / f"bitalloc-{preset}.gguf", progress=False
        )
        ours_ppl = tools.perplexity(ours.path, text, chunks=args.chunks, threads=args.threads)
        rows.append(
            (
                preset,
                size,
                unit_bits(made, prep.model, prep.units),
                ppl,
                ours.file_bytes,
                alloc.avg_bits,
                ours_ppl,
                alloc,
            )
        )
        print(
            f"{preset}: {size / MIB:.2f} MiB ppl {ppl:.3f} | bitalloc "
            f"{ours.file_bytes / MIB:.2f} MiB ppl {ours_ppl:.3f}"
        )

    done = [row for row in rows if len(row) > 5]
    middle = done[len(done) // 2]
    exported = work / f"bitalloc-{middle[0]}.gguf"
    if args.part in ("all", "speed"):
        started_speed = time.time()
        speed = decode_speeds(args, tools, prep, exported, work / f"{middle[0]}.gguf")
        section = render_speed(args, speed, time.time() - started_speed)
        write_section(args.out, SPEED_START, SPEED_END, section)
        print(section)
    if args.part == "speed":
        return
    # transformers reads an exported file back as the weights the allocation measured.
    check_alloc = middle[7]
    from transformers import AutoModelForCausalLM

    windows = prep.evaluation_windows(4096)
    own = perplexity(check_alloc.apply(prep.model, progress=False), windows).perplexity
    reread = AutoModelForCausalLM.from_pretrained(
        exported.parent, gguf_file=exported.name, dtype=torch.float32
    )
    read_ppl = perplexity(reread, windows).perplexity
    print(f"transformers on the export: {read_ppl:.4f} vs allocation {own:.4f}")

    section = render(args, rows, (own, read_ppl, exported.name), time.time() - started, shipped)
    write_section(args.out, START, END, section)
    print(section)


def _w4a16(unit) -> str:
    group = next(g for g in (128, 64, 32) if unit.shape[1] % g == 0)
    return f"ct:int4-g{group}"


def ct_section(args: argparse.Namespace) -> None:
    """Compressed-tensors: uniform schemes against bitalloc's ct allocation at the same unit
    bits; every checkpoint exported, loaded by transformers (bfloat16, as its config says) and
    measured on bitalloc's evaluation windows."""
    from transformers import AutoModelForCausalLM

    from bitalloc.allocation import Allocation, UnitChoice
    from bitalloc.export.compressed_tensors import export_compressed_tensors
    from bitalloc.formats import parse_format
    from bitalloc.models import excluded_parameters

    started = time.time()
    torch.set_num_threads(args.threads)
    prep = prepare(None, formats="ct:int4-g64", clipping="mse")
    windows = prep.evaluation_windows(4096)
    work = Path(tempfile.mkdtemp(prefix="bitalloc-engines-ct-"))

    def measured(alloc, name: str) -> tuple[float, int, float]:
        out = export_compressed_tensors(
            alloc, prep.model, prep.loaded.tokenizer, work / name, progress=False
        )
        loaded = AutoModelForCausalLM.from_pretrained(out.path)
        ppl = perplexity(loaded, windows).perplexity
        own = perplexity(alloc.apply(prep.model, progress=False), windows).perplexity
        return ppl, out.file_bytes, own

    rows = []
    for baseline in CT_BASELINES:
        names = {u.name: _w4a16(u) if baseline == "W4A16" else baseline for u in prep.units}
        choices = [UnitChoice.of(u, parse_format(names[u.name])) for u in prep.units]
        uniform = Allocation.from_choices(
            model=prep.loaded.source,
            budget=None,
            units=choices,
            excluded=excluded_parameters(prep.model, prep.units),
        )
        base_ppl, base_bytes, _ = measured(uniform, baseline.replace(":", "-"))
        alloc = allocate(
            None, target="ct", avg_bits=uniform.avg_bits, verify=args.verify, progress=False
        )
        ours_ppl, ours_bytes, own = measured(alloc, f"bitalloc-{baseline.replace(':', '-')}")
        rows.append(
            (
                baseline,
                uniform.avg_bits,
                base_bytes,
                base_ppl,
                alloc.avg_bits,
                ours_bytes,
                ours_ppl,
                own,
            )
        )
        print(f"{baseline}: {base_ppl:.3f} vs bitalloc {ours_ppl:.3f} (fake-quant {own:.3f})")
    lines = [
        CT_START,
        "## Engines: compressed-tensors checkpoints (default model)",
        "",
        f"`{' '.join(['.venv/bin/python', *sys.argv])}` on {cpu_description()}, "
        f"{(time.time() - started) / 60:.0f} min. Each checkpoint is written by `bitalloc "
        "export`, loaded by transformers (`from_pretrained(dir)`, bfloat16 as its config says, "
        "compressed-tensors decompressing) and measured on 4,096 evaluation tokens (8 windows "
        "of 512). bitalloc: `--target ct --avg-bits` = the uniform scheme's bits (q/k/v and "
        "gate/up tied, as vLLM fuses them). W4A16 takes group 128 where the width allows "
        "(down_proj) and 64 elsewhere (576 is not a multiple of 128).",
        "",
        "| uniform scheme | bits/weight | model.safetensors MiB | ppl | bitalloc bits/weight "
        "| bitalloc MiB | bitalloc ppl (loaded) | bitalloc ppl (fake-quantized) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, bits, size, ppl, ours_bits, ours_size, ours_ppl, own in rows:
        lines.append(
            f"| {name} | {bits:.3f} | {size / MIB:.2f} | {ppl:.3f} | {ours_bits:.3f} "
            f"| {ours_size / MIB:.2f} | {ours_ppl:.3f} | {own:.3f} | {ours_ppl / ppl:.3f} |"
        )
    lines.append(CT_END)
    section = "\n".join(lines)
    write_section(args.out, CT_START, CT_END, section)
    print(section)


def decode_speeds(args, tools, prep, exported: Path, preset: Path) -> list[tuple[str, float]]:
    """Batch-1 decode tokens/s: llama.cpp on two GGUF files, PyTorch float32 and bitalloc's
    packed path (an int allocation at the exported file's unit bits, auto CPU kernels)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from packed_kernels import decode_tokens_per_s

    out = [
        (
            f"llama.cpp, bitalloc export {exported.name}",
            tools.decode_speed(exported, tokens=args.new_tokens, threads=args.threads),
        ),
        (
            f"llama.cpp, preset {preset.name}",
            tools.decode_speed(preset, tokens=args.new_tokens, threads=args.threads),
        ),
    ]
    prompt = prep.evaluation_windows(512)[:1, :32]
    base = prep.model
    alloc = allocate(base, 4.25, tokenizer=prep.loaded.tokenizer, progress=False)
    packed = alloc.apply(base, packed=True, cpu_path="auto", progress=False)
    for name, model in (("PyTorch float32", base), ("bitalloc packed int, 4.25 bits", packed)):
        runs = [decode_tokens_per_s(model, prompt, args.new_tokens) for _ in range(args.rounds)]
        out.append((name, statistics.median(runs)))
    return out


def render_speed(args, speed, seconds: float) -> str:
    """The decode-speed section."""
    lines = [
        SPEED_START,
        "### Batch-1 decode speed on this CPU",
        "",
        f"`{' '.join(['.venv/bin/python', *sys.argv])}` on {cpu_description()}, "
        f"{seconds / 60:.0f} min; {args.threads} threads, {args.new_tokens} new tokens, median "
        f"of {args.rounds} runs (llama-bench: its own mean of 3). llama.cpp runs with "
        "`--repack 0` (its AMX path crashes on these machines).",
        "",
        "| runtime | tokens/s | × float32 |",
        "|---|---:|---:|",
    ]
    ref = dict(speed)["PyTorch float32"]
    for name, tps in speed:
        lines.append(f"| {name} | {tps:.1f} | {tps / ref:.2f} |")
    lines.append(SPEED_END)
    return "\n".join(lines)


def render(args, rows, check, seconds: float, shipped: tuple[int, float]) -> str:
    lines = [
        START,
        "## Engines: GGUF files against llama.cpp's presets (default model)",
        "",
        f"`{' '.join(['.venv/bin/python', *sys.argv])}` on {cpu_description()} "
        f"({platform.python_version()}, torch {torch.__version__}), {seconds / 60:.0f} min. "
        "Every file is measured by llama.cpp's `llama-perplexity` on the evaluation split "
        f"({args.chunks} chunks of 512 tokens). Presets: `llama-quantize --imatrix` with "
        "bitalloc's importance saved as an imatrix; bitalloc: `--target gguf --file-size` = the "
        "preset's file size, same importance. The shipped model is Q4_1, so both re-quantize "
        "4-bit weights (32-block types are favoured).",
        "",
        "| preset | file MiB | decoder bits/weight | llama.cpp ppl | bitalloc file MiB "
        "| bitalloc bits/weight | bitalloc ppl | ratio (bitalloc / preset) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if len(row) == 5:
            preset, size, bits, ppl, _ = row
            lines.append(
                f"| {preset} | {size / MIB:.2f} | {bits:.3f} | {ppl:.3f} | below bitalloc's "
                "reachable sizes | | | |"
            )
            continue
        preset, size, bits, ppl, ours_size, ours_bits, ours_ppl, _ = row
        lines.append(
            f"| {preset} | {size / MIB:.2f} | {bits:.3f} | {ppl:.3f} | {ours_size / MIB:.2f} "
            f"| {ours_bits:.3f} | {ours_ppl:.3f} | {ours_ppl / ppl:.3f} |"
        )
    own, read_ppl, name = check
    lines += [
        "",
        f"The shipped file itself (Q4_1 decoder, {shipped[0] / MIB:.2f} MiB) measures "
        f"{shipped[1]:.3f}: the presets and bitalloc re-quantize its 4-bit weights, so no file "
        "can beat it, and an allocation that keeps every unit's weights on the source's grid "
        "(gguf:Q4_1 on the 32-aligned units) reproduces it.",
        "",
        f"transformers reading `{name}` back (`from_pretrained(gguf_file=...)`) measures "
        f"perplexity {read_ppl:.4f} on 4,096 evaluation tokens (bitalloc's windows); the "
        f"allocation itself, fake-quantized in bitalloc, {own:.4f} "
        f"(difference {abs(read_ppl / own - 1) * 100:.3f}%).",
        END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
