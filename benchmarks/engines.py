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

    .venv/bin/python benchmarks/engines.py [--chunks 16] [--presets Q4_K_M,Q3_K_M]
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
MIB = 1024 * 1024
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ3_S", "IQ4_XS")


def unit_bits(path: Path, model, units) -> float:
    """Bits per weight of the decoder's weight matrices (the allocated units) in a GGUF file."""
    from bitalloc.export.gguf import _hf_names

    reader = gguf.GGUFReader(path)
    to_param = _hf_names(model, "llama", 1 + max(u.layer for u in units))
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
    args = parser.parse_args()
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

    rows = []
    for preset in [p for p in args.presets.split(",") if p]:
        made = tools.quantize(source, work / f"{preset}.gguf", preset, imatrix=imatrix)
        size = made.stat().st_size
        ppl = tools.perplexity(made, text, chunks=args.chunks, threads=args.threads)
        try:
            alloc = allocate(None, target="gguf", max_file_bytes=size, progress=False)
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

    # transformers reads an exported file back as the weights the allocation measured.
    done = [row for row in rows if len(row) > 5]
    middle = done[len(done) // 2]
    check_alloc = middle[7]
    exported = work / f"bitalloc-{middle[0]}.gguf"
    from transformers import AutoModelForCausalLM

    windows = prep.evaluation_windows(4096)
    own = perplexity(check_alloc.apply(prep.model, progress=False), windows).perplexity
    reread = AutoModelForCausalLM.from_pretrained(
        exported.parent, gguf_file=exported.name, dtype=torch.float32
    )
    read_ppl = perplexity(reread, windows).perplexity
    print(f"transformers on the export: {read_ppl:.4f} vs allocation {own:.4f}")

    speed = decode_speeds(args, tools, prep, exported, work / f"{middle[0]}.gguf")
    section = render(args, rows, (own, read_ppl, exported.name), speed, time.time() - started)
    write_section(args.out, START, END, section)
    print(section)


def decode_speeds(args, tools, prep, exported: Path, preset: Path) -> list[tuple[str, float]]:
    """Batch-1 decode tokens/s: llama.cpp on two GGUF files, PyTorch float32 and bitalloc's
    packed path (an int allocation at the exported file's unit bits, auto CPU kernels)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from kernels import decode_tokens_per_s

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


def render(args, rows, check, speed, seconds: float) -> str:
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
        f"transformers reading `{name}` back (`from_pretrained(gguf_file=...)`) measures "
        f"perplexity {read_ppl:.4f} on 4,096 evaluation tokens (bitalloc's windows); the "
        f"allocation itself, fake-quantized in bitalloc, {own:.4f} "
        f"(difference {abs(read_ppl / own - 1) * 100:.3f}%).",
        "",
        f"Batch-1 decode on this CPU ({args.threads} threads, {args.new_tokens} new tokens):",
        "",
        "| runtime | tokens/s | × float32 |",
        "|---|---:|---:|",
    ]
    ref = dict(speed)["PyTorch float32"]
    for name, tps in speed:
        lines.append(f"| {name} | {tps:.1f} | {tps / ref:.2f} |")
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
