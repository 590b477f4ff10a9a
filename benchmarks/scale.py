"""Peak memory and time of a streamed allocation against model size.

For each size, a random bf16 Llama checkpoint (one shard per layer, written by
:func:`bitalloc.streaming.synthetic.write_random_llama` under ``--workdir``, deleted after) is
allocated end to end with :func:`bitalloc.streaming.allocate.allocate_streamed` in a child
process run under ``/usr/bin/time -v``: its peak resident set (file-backed pages of the shards
included) is what is reported, beside the checkpoint's bf16 size. Calibration is random token
windows (the synthetic checkpoints have no tokenizer); the palette is small, so that the time
is mostly the per-layer work every palette pays.

    .venv/bin/python benchmarks/scale.py [--sizes 135m,0.5b,1b] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import cpu_description, write_section

START, END = "<!-- scale:start -->", "<!-- scale:end -->"
PALETTE = "int2-g128,int3-g128,int4-g128,int8-g128,fp16"
#: name -> (hidden, layers, intermediate, heads, kv heads, vocab)
SIZES = {
    "135m": (576, 30, 1536, 9, 3, 49152),
    "0.5b": (1024, 32, 4096, 16, 4, 32000),
    "1b": (2048, 22, 5632, 32, 8, 32000),
    "3b": (3072, 28, 8192, 24, 8, 32000),
}

CHILD = """
import json, sys, time, torch
from bitalloc.streaming.allocate import allocate_streamed
from bitalloc.streaming.resources import plan_streamed
path, tokens, palette = sys.argv[1], int(sys.argv[2]), sys.argv[3]
plan = plan_streamed(path, palette, tokens)
torch.manual_seed(0)
windows = torch.randint(0, 32000, (max(1, tokens // 512), 512))
start = time.perf_counter()
alloc = allocate_streamed(path, 3.25, formats=palette, windows=windows, tokens=tokens,
                          progress=False)
total = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": total, "avg_bits": alloc.avg_bits,
      "estimated_mib": plan.peak_bytes / 2**20, "estimated_s": plan.total_seconds}))
"""


def measure(path: Path, tokens: int) -> dict:
    """Run the child under /usr/bin/time -v; its result and peak resident set (MiB)."""
    command = ["/usr/bin/time", "-v", sys.executable, "-c", CHILD, str(path), str(tokens), PALETTE]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result["peak_mib"] = int(peak.group(1)) / 1024 if peak else float("nan")
    return result


def main() -> int:
    from bitalloc.streaming.synthetic import llama_config, parameter_count, write_random_llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,0.5b,1b")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    rows = []
    began = time.perf_counter()
    for name in args.sizes.split(","):
        hidden, layers, inter, heads, kv, vocab = SIZES[name]
        config = llama_config(hidden, layers, inter, heads=heads, kv_heads=kv, vocab=vocab)
        directory = Path(tempfile.mkdtemp(prefix=f"bitalloc-scale-{name}-", dir=args.workdir))
        try:
            start = time.perf_counter()
            write_random_llama(directory, config)
            written = time.perf_counter() - start
            size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
            result = measure(directory, args.tokens)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        layer = max(0, (parameter_count(config) - 2 * vocab * hidden - hidden) // layers)
        row = {
            "name": name,
            "params": parameter_count(config),
            "layers": layers,
            "bf16_mib": size / 2**20,
            "layer_fp32_mib": layer * 4 / 2**20,
            "written_s": written,
            **result,
        }
        rows.append(row)
        print(row, flush=True)
    lines = [
        START,
        "## Streamed allocation: peak memory against model size",
        "",
        f"`.venv/bin/python benchmarks/scale.py --sizes {args.sizes} --tokens {args.tokens}` on "
        f"{cpu_description()}, {(time.perf_counter() - began) / 60:.0f} min. Random bf16 Llama "
        "checkpoints (one shard per layer), allocated at 3.25 bits by `allocate_streamed` "
        f"(streamed `output` profile over {args.tokens} calibration tokens, palette "
        f"`{PALETTE}`, Lagrangian solve) in a child process; peak = its maximum resident set "
        "from `/usr/bin/time -v`, file-backed pages of the shards included; estimated: "
        "`bitalloc plan-resources` (`plan_streamed`) in the same child before the run. The "
        "machine was shared with other benchmarks and CI, so times are high and noisy.",
        "",
        "| model | parameters | layers | checkpoint (bf16) | one layer (fp32) | peak resident "
        "| estimated peak | peak / checkpoint | time | estimated time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e9:.2f} B | {r['layers']} | {r['bf16_mib']:.0f} MiB "
            f"| {r['layer_fp32_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB "
            f"| {r['estimated_mib']:.0f} MiB | {r['peak_mib'] / r['bf16_mib']:.2f} "
            f"| {r['seconds']:.0f} s | {r['estimated_s']:.0f} s |"
        )
    lines.append(END)
    write_section(args.out, START, END, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
