"""Peak memory and time of a streamed allocation and GGUF export against model size.

For each size, a random bf16 Llama checkpoint (one shard per layer, the default model's
tokenizer beside it, written by :func:`bitalloc.streaming.synthetic.write_random_llama` under
``--workdir``) is allocated end to end in a child process run under ``/usr/bin/time -v``:

1. plan: :func:`~bitalloc.streaming.resources.plan_streamed` (what ``bitalloc plan-resources``
   prints), before any work;
2. allocate: the streamed ``output`` profile over ``--tokens`` tokens of the default
   calibration text and the Lagrangian solve (:func:`allocate_streamed`);
3. export: the GGUF file (:func:`export_gguf_streamed`), read back and checked.

Each stage's peak resident set is read from ``VmHWM`` after the stage (reset before it through
``/proc/self/clear_refs``); the whole child's peak comes from ``/usr/bin/time -v``. Both count
the file-backed pages of the shards. Where llama.cpp's tools are built
(``bitalloc.export.llamacpp``), the exported file is loaded and decoded by ``llama-bench``.

``--workers 2`` scores the units on a local Ray cluster of two workers; with
``--allocations DIR`` each run's allocation is saved there and compared with the other worker
count's, when present (the Ray twin of a run must choose the same formats).

    .venv/bin/python benchmarks/scale.py [--sizes 135m,0.5b,1b,3b] [--tokens 1024]
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
PALETTE = "gguf:Q3_K,gguf:Q4_K,gguf:Q6_K,fp16"
AVG_BITS = 4.25
#: name -> (hidden, layers, intermediate, heads, kv heads); rows are whole 256-blocks, as
#: K-quants need. The vocabulary is the default model's tokenizer's (49,152).
SIZES = {
    "135m": (512, 30, 1536, 8, 2),
    "0.5b": (1024, 32, 4096, 16, 4),
    "1b": (2048, 22, 5632, 32, 8),
    "3b": (3072, 28, 8192, 24, 8),
}

CHILD = """
import json, sys, time, torch
from pathlib import Path
from bitalloc.streaming.allocate import allocate_streamed
from bitalloc.streaming.export_gguf import export_gguf_streamed
from bitalloc.streaming.resources import plan_streamed
from bitalloc.streaming.speed import cpu_ticks, steal_share

def peak_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")

path, tokens, palette, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
out, saved = Path(sys.argv[5]), sys.argv[6]
result = {}
start = time.perf_counter()
plan = plan_streamed(path, palette, tokens, workers=max(1, workers), avg_bits=float(sys.argv[7]))
result["plan"] = {"memory": plan.memory, "seconds": plan.seconds, "peak": plan.peak_bytes,
                  "time": time.perf_counter() - start, "steal": plan.speed.steal}
reset_peak()
start, ticks = time.perf_counter(), cpu_ticks()
alloc = allocate_streamed(path, float(sys.argv[7]), formats=palette, tokens=tokens, progress=False,
                          workers=workers)
result["allocate"] = {"seconds": time.perf_counter() - start, "peak_mib": peak_mib(),
                      "avg_bits": alloc.avg_bits, "steal": steal_share(ticks, cpu_ticks())}
if saved:
    alloc.save(saved)
reset_peak()
start, ticks = time.perf_counter(), cpu_ticks()
report = export_gguf_streamed(alloc, path, out, progress=False, force=True)
result["export"] = {"seconds": time.perf_counter() - start, "peak_mib": peak_mib(),
                    "bytes": report.file_bytes, "unit_bytes": report.unit_bytes,
                    "predicted_unit_bytes": alloc.data.total_bits / 8,
                    "steal": steal_share(ticks, cpu_ticks())}
print("RESULT " + json.dumps(result))
"""


def run_child(command: list[str]) -> tuple[dict, str]:
    """Run a child process; the JSON it printed after ``RESULT`` and its standard error."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.split("RESULT ", 1)[1]), done.stderr


def measure(path: Path, tokens: int, workers: int, out: Path, saved: str) -> dict:
    """Run the child under /usr/bin/time -v; its result and whole peak resident set (MiB)."""
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-c",
        CHILD,
        str(path),
        str(tokens),
        PALETTE,
        str(workers),
        str(out),
        saved,
        str(AVG_BITS),
    ]
    result, stderr = run_child(command)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    result["peak_mib"] = int(peak.group(1)) / 1024 if peak else float("nan")
    return result


PLAN_CHILD = """
import json, sys
from bitalloc.streaming.resources import plan_streamed
path, tokens, palette = sys.argv[1], int(sys.argv[2]), sys.argv[3]
workers, bits = int(sys.argv[4]), float(sys.argv[5])
plan = plan_streamed(path, palette, tokens, workers=max(1, workers), avg_bits=bits)
print("RESULT " + json.dumps({"memory": plan.memory, "seconds": plan.seconds,
                              "peak": plan.peak_bytes, "steal": plan.speed.steal}))
"""


def replan(row: dict, workdir: Path, tokens: int) -> dict:
    """The row's plan made again (in a fresh child, as the run makes it) on its kept
    checkpoint: the estimates of the current model beside the measurements already made."""
    directory = workdir / f"bitalloc-scale-{row['name']}"
    command = [sys.executable, "-c", PLAN_CHILD, str(directory), str(tokens), PALETTE]
    command += [str(row["workers"]), str(AVG_BITS)]
    plan, _ = run_child(command)
    return {**row, "plan": {**row["plan"], **plan}}


def checkpoint(name: str, workdir: Path, tokenizer) -> tuple[Path, dict, float]:
    """The size's random checkpoint under ``workdir`` (written unless already there), its
    config and the seconds writing it took."""
    from bitalloc.streaming.synthetic import llama_config, write_random_llama

    hidden, layers, inter, heads, kv = SIZES[name]
    config = llama_config(hidden, layers, inter, heads=heads, kv_heads=kv, vocab=len(tokenizer))
    directory = workdir / f"bitalloc-scale-{name}"
    done = directory / "config.json"
    if done.is_file() and json.loads(done.read_text()) == config:
        return directory, config, 0.0
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    write_random_llama(directory, config, tokenizer=tokenizer)
    return directory, config, time.perf_counter() - start


def llama_cpp_decode(path: Path) -> float | None:
    """Tokens per second llama.cpp decodes the exported file at, None where it is not built."""
    from bitalloc.export.llamacpp import find_llama_cpp

    tools = find_llama_cpp()
    return None if tools is None else tools.decode_speed(path, tokens=8)


def compare(saved: Path, name: str, workers: int) -> str:
    """Whether this run's allocation equals the other worker count's (when one is saved)."""
    from bitalloc.allocation import Allocation

    mine = Allocation.load(saved / f"{name}-workers{workers}.json")
    others = sorted(
        p for p in saved.glob(f"{name}-workers*.json") if p.name != f"{name}-workers{workers}.json"
    )
    if not others:
        return ""
    other = Allocation.load(others[0])
    same = mine.formats == other.formats
    return f"{'same' if same else 'DIFFERENT'} formats as {others[0].stem}"


def main() -> int:
    from bitalloc.models import default_gguf_path, load_model
    from bitalloc.streaming.synthetic import parameter_count

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,0.5b,1b,3b")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--allocations", default=None, help="save and compare allocations here")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for reuse")
    parser.add_argument(
        "--rows",
        default=None,
        help="JSON file of earlier rows: this run's rows replace those of the same size and "
        "worker count, and the table shows them all",
    )
    parser.add_argument(
        "--replan",
        action="store_true",
        help="measure nothing: make the plans of the --rows again on their kept checkpoints",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.replan:
        began = time.perf_counter()
        rows = [
            replan(r, Path(args.workdir), args.tokens)
            for r in json.loads(Path(args.rows).read_text())
        ]
        rows = merged(Path(args.rows), rows)
        write_section(args.out, START, END, table(rows, args, time.perf_counter() - began))
        return 0
    tokenizer = load_model(str(default_gguf_path())).tokenizer
    saved = Path(args.allocations) if args.allocations else None
    if saved:
        saved.mkdir(parents=True, exist_ok=True)
    rows = []
    began = time.perf_counter()
    for name in args.sizes.split(","):
        directory, config, written = checkpoint(name, Path(args.workdir), tokenizer)
        gguf_out = Path(args.workdir) / f"bitalloc-scale-{name}.gguf"
        try:
            target = str(saved / f"{name}-workers{args.workers}.json") if saved else ""
            result = measure(directory, args.tokens, args.workers, gguf_out, target)
            result["decode"] = llama_cpp_decode(gguf_out)
            result["twin"] = compare(saved, name, args.workers) if saved else ""
        finally:
            gguf_out.unlink(missing_ok=True)
            if not args.keep:
                shutil.rmtree(directory, ignore_errors=True)
        row = {
            "name": name,
            "params": parameter_count(config),
            "layers": config["num_hidden_layers"],
            "bf16_mib": parameter_count(config) * 2 / 2**20,
            "written_s": written,
            **result,
        }
        row["workers"] = args.workers
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.rows:
        rows = merged(Path(args.rows), rows)
    write_section(args.out, START, END, table(rows, args, time.perf_counter() - began))
    return 0


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """The rows saved at ``path`` with ``rows`` in place of those of the same size and worker
    count, in size order; saved back."""
    from bitalloc.fileio import write_atomic

    kept = json.loads(path.read_text()) if path.is_file() else []
    new = {(r["name"], r["workers"]) for r in rows}
    order = list(SIZES)
    every = [r for r in kept if (r["name"], r["workers"]) not in new] + rows
    every.sort(key=lambda r: (order.index(r["name"]), r["workers"]))
    write_atomic(path, lambda fh: fh.write(json.dumps(every, indent=1).encode()))
    return every


def _steal(row: dict) -> str:
    """The CPU share the hypervisor took while the plan timed the machine and during each
    stage ("?" for rows measured before it was recorded)."""
    parts = [row[k].get("steal") for k in ("plan", "allocate", "export")]
    return " / ".join("?" if v is None else f"{100 * v:.0f}%" for v in parts)


def table(rows: list[dict], args, seconds: float) -> str:
    """The BENCHMARKS.md section."""
    lines = [
        START,
        "## Streamed allocation and export: peak memory and time against model size",
        "",
        f"`.venv/bin/python benchmarks/scale.py --sizes SIZES --tokens {args.tokens} "
        "[--workers 2]` on "
        f"{cpu_description()}. Random bf16 Llama "
        "checkpoints (one shard per layer, vocabulary "
        f"49,152 with the default model's tokenizer), allocated at {AVG_BITS} bits over "
        f"`{PALETTE}` (streamed `output` profile over {args.tokens} tokens of the default "
        "calibration text, Lagrangian solve; workers: units scored on that many local Ray "
        "workers, 0: in the process) and exported as GGUF, in a child process. "
        "Peak: the resident set's high-water mark (`VmHWM`, file-backed shard pages included), "
        "reset through `/proc/self/clear_refs` before each stage; the whole run's is the larger "
        "stage's (`/usr/bin/time -v` reads the same mark, so after the reset it sees the "
        "export alone). Estimated: `bitalloc plan-resources --avg-bits` (`plan_streamed`) in "
        "a fresh child; its export time is the mix of the two formats bracketing the budget"
        + (
            " (made again after the measurements, `--replan`, with this commit's plan)."
            if args.replan
            else "."
        )
        + " CPU steal: the share of the CPU time the hypervisor took (`/proc/stat`) while the "
        "plan timed the machine and during each stage; a stage's time grows as "
        "1 / (1 - steal), so a plan timed at another steal than its run is off by that much.",
        "",
        "| model | parameters | layers | workers | checkpoint (bf16) | peak (larger stage) "
        "| estimated peak "
        "| allocate: time / estimated | allocate peak | export: time / estimated | export peak "
        "| CPU steal: plan / allocate / export | llama.cpp decode |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        plan = r["plan"]["seconds"]
        allocate_est = plan["forward and statistics"] + plan["scoring (formats x units)"]
        decode = "not built" if r["decode"] is None else f"{r['decode']:.1f} tok/s"
        whole = max(r["peak_mib"], r["allocate"]["peak_mib"], r["export"]["peak_mib"])
        lines.append(
            f"| {r['name']} | {r['params'] / 1e9:.2f} B | {r['layers']} | {r['workers']} "
            f"| {r['bf16_mib']:.0f} MiB "
            f"| {whole:.0f} MiB | {r['plan']['peak'] / 2**20:.0f} MiB "
            f"| {r['allocate']['seconds']:.0f} s / {allocate_est:.0f} s "
            f"| {r['allocate']['peak_mib']:.0f} MiB "
            f"| {r['export']['seconds']:.0f} s / {plan['export']:.0f} s "
            f"| {r['export']['peak_mib']:.0f} MiB | {_steal(r)} | {decode} |"
        )
    twins = [f"{r['name']}: {r['twin']}" for r in rows if r.get("twin")]
    if twins:
        lines += ["", "Ray twin: " + "; ".join(twins) + "."]
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
