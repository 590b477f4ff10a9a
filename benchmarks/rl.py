"""The RL allocator (RAMP's SAC) against the exact optimum on the same profile.

1. The default model at ``--avg-bits``: Fisher profile, unit embeddings, SAC trained for
   ``--steps`` steps; predicted loss of the RL allocation beside the ILP optimum and the
   Lagrangian solver, and measured perplexity of each beside uniform formats.
2. Zero-shot transfer: the trained policy applied without training to other budgets of the
   same model, and to a second, differently sized Llama (random weights, built from a config;
   only predicted loss is meaningful there), each against that problem's ILP optimum.

Writes its section of BENCHMARKS.md (between markers), with the command and the machine.

    .venv/bin/python benchmarks/rl.py [--avg-bits 3.25] [--steps 21000] [--eval-tokens 2048]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from _report import cpu_description, write_section

from bitalloc.allocator import measure_assignment, prepare, profile_model, uniform_assignment
from bitalloc.planning import build_problem
from bitalloc.rl.embedding import unit_embeddings
from bitalloc.solvers import solve

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "rl"
START, END = "<!-- rl:start -->", "<!-- rl:end -->"


def second_model(vocab: int) -> torch.nn.Module:
    """A differently sized Llama (12 layers of 384, 6 heads, 2 KV heads), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=12,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avg-bits", type=float, default=3.25)
    parser.add_argument("--steps", type=int, default=None, help="SAC steps (default 100 episodes)")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--transfer-budgets", default="3.0,3.5,4.0")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    policy = WORK / "policy.zip"

    prep = prepare()
    prof = profile_model(prep, "fisher", progress=False)
    start = time.perf_counter()
    emb = unit_embeddings(prep.model, prep.units, prep.calibration_windows()[:4])
    emb_s = time.perf_counter() - start
    weights = sum(u.numel for u in prep.units)

    def problem_at(budget, units=prep.units, palette=prep.palette, table=prof):
        return build_problem(units, palette, table, budget)

    problem = problem_at(args.avg_bits)
    ilp = solve(problem, method="ilp")
    lag = solve(problem, method="lagrangian")
    rl = solve(
        problem,
        method="rl",
        embeddings=emb,
        steps=args.steps,
        save_policy=str(policy),
        progress=True,
    )
    ev = prep.evaluation_windows(args.eval_tokens)
    names = problem.option_names

    def ppl(choice) -> float:
        formats = {u.name: names[j] for u, j in zip(prep.units, choice)}
        return measure_assignment(prep, formats, ev).perplexity

    fp16 = measure_assignment(prep, uniform_assignment(prep.units, "fp16"), ev).perplexity
    uniform = {
        f: measure_assignment(prep, uniform_assignment(prep.units, f), ev).perplexity
        for f in ("int3-g128", "int3-g64", "int4-g128")
    }
    lines = [
        "| allocation | avg bits | predicted loss | × ILP optimum | perplexity | solve time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, sol in (("ILP (optimum)", ilp), ("Lagrangian", lag), ("RL (SAC)", rl)):
        avg = sol.resources["bits"] / weights
        lines.append(
            f"| {name} | {avg:.4f} | {sol.objective:.4f} | {sol.objective / ilp.objective:.3f} "
            f"| {ppl(sol.choice):.2f} | {sol.wall_time_s:.1f} s |"
        )
    info = rl.info
    lines.append("")
    lines.append(
        f"RL: {info['steps']} SAC steps ({info['episodes']} episodes of {problem.n_units} units) "
        f"in {info['train_seconds']:.0f} s on one torch thread; the policy's own allocation "
        f"predicts {info['policy_objective']:.4f}, the best training episode "
        f"{info['best_episode_objective']:.4f} (the solver returns the better: "
        f"{info['source']}). Embeddings: {emb_s:.1f} s. Unquantized perplexity {fp16:.2f}; "
        "uniform " + ", ".join(f"{f} {p:.2f}" for f, p in uniform.items()) + "."
    )

    transfer = [
        "| model | budget | RL policy, zero-shot | ILP optimum | × optimum |",
        "|---|---:|---:|---:|---:|",
    ]
    for budget in [float(b) for b in args.transfer_budgets.split(",") if b]:
        p = problem_at(budget)
        zs = solve(p, method="rl", embeddings=emb, policy=str(policy))
        best = solve(p, method="ilp")
        transfer.append(
            f"| default | {budget:g} | {zs.objective:.4f} | {best.objective:.4f} "
            f"| {zs.objective / best.objective:.3f} |"
        )
    other = second_model(len(prep.loaded.tokenizer))
    prep2 = prepare(other, tokenizer=prep.loaded.tokenizer)
    prof2 = profile_model(prep2, "fisher", progress=False, use_cache=False)
    emb2 = unit_embeddings(prep2.model, prep2.units, prep2.calibration_windows()[:4])
    for budget in (args.avg_bits, 4.0):
        p = problem_at(budget, prep2.units, prep2.palette, prof2)
        zs = solve(p, method="rl", embeddings=emb2, policy=str(policy))
        best = solve(p, method="ilp")
        transfer.append(
            f"| random Llama 12x384 ({len(prep2.units)} units) | {budget:g} | {zs.objective:.4f} "
            f"| {best.objective:.4f} | {zs.objective / best.objective:.3f} |"
        )

    command = "`.venv/bin/python benchmarks/rl.py" + "".join(f" {a}" for a in sys.argv[1:]) + "`"
    machine = f"{cpu_description()}, torch {torch.__version__}, Python {platform.python_version()}"
    section = "\n".join(
        [
            START,
            "## RL allocator (SAC over unit embeddings)",
            "",
            f"Command: {command}  ",
            f"Machine: {machine}",
            "",
            f"Default model, Fisher profile, {args.avg_bits} bits; perplexity on "
            f"{ev.numel()} evaluation tokens.",
            "",
            *lines,
            "",
            "### Zero-shot transfer of the trained policy (predicted loss)",
            "",
            *transfer,
            END,
        ]
    )
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", START, END, section)


if __name__ == "__main__":
    main()
