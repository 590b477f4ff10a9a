"""The RL allocator (RAMP's SAC) against the exact optimum on the same profile.

1. The default model at ``--avg-bits``, without and with Scale Folding: Fisher profile, unit
   embeddings, SAC trained for ``--steps`` steps on the ``lagrangian`` anchor (and, unfolded,
   on the ``share`` anchor, which knows nothing of the losses, as RAMP's actions do). Beside
   them the ILP optimum, the Lagrangian solver and the anchor alone (all actions zero, no
   learning); predicted loss, measured loss increase (log perplexity ratio to the unquantized
   model) and perplexity, with uniform formats on the same weights.
2. Zero-shot transfer: the trained policy applied without training to other budgets of the
   same model, and to a second, differently sized Llama (random weights, built from a config;
   only predicted loss is meaningful there), each against that problem's ILP optimum.

Writes its section of BENCHMARKS.md (between markers), with the command and the machine.

    .venv/bin/python benchmarks/rl.py [--avg-bits 3.25] [--steps N] [--eval-tokens 2048]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _report import cpu_description, write_section

from bitalloc.allocator import (
    measure_assignment,
    prepare,
    prepare_and_profile,
    profile_model,
    uniform_assignment,
)
from bitalloc.config import AllocateConfig
from bitalloc.planning import build_problem
from bitalloc.rl.embedding import unit_embeddings
from bitalloc.rl.env import AllocationEnv
from bitalloc.solvers import solve

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "rl"
START, END = "<!-- rl:start -->", "<!-- rl:end -->"
UNIFORM = ("int3-g128", "int4-g128")


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


def anchor_alone(problem, emb) -> tuple[np.ndarray, float]:
    """The ``lagrangian`` anchor with every action zero (what the policy starts from)."""
    env = AllocationEnv(problem, emb)
    env.reset(seed=0)
    started, done, info = time.perf_counter(), False, {}
    while not done:
        _, _, done, _, info = env.step(np.zeros(1, dtype=np.float32))
    return info["choice"], time.perf_counter() - started


def case(label, prep, prof, emb, args, policy=None, share=False):
    """Rows for one model state (unfolded or folded) and the trained policy's info."""
    problem = build_problem(prep.units, prep.palette, prof, args.avg_bits)
    weights = sum(u.numel for u in prep.units)
    ev = prep.evaluation_windows(args.eval_tokens)
    names = problem.option_names

    def ppl_of(formats) -> float:
        return measure_assignment(prep, formats, ev).perplexity

    fp16 = ppl_of(uniform_assignment(prep.units, "fp16"))
    ilp = solve(problem, method="ilp")
    entries = [("ILP (optimum)", ilp.choice, ilp.objective, ilp.wall_time_s)]
    lag = solve(problem, method="lagrangian")
    entries.append(("Lagrangian", lag.choice, lag.objective, lag.wall_time_s))
    choice, seconds = anchor_alone(problem, emb)
    entries.append(("anchor alone (actions 0)", choice, problem.objective_of(choice), seconds))
    rl = solve(
        problem,
        method="rl",
        embeddings=emb,
        steps=args.steps,
        save_policy=None if policy is None else str(policy),
        progress=True,
    )
    entries.append(("RL, lagrangian anchor", rl.choice, rl.objective, rl.wall_time_s))
    infos = {"RL, lagrangian anchor": rl.info}
    if share:
        rs = solve(problem, method="rl", embeddings=emb, steps=args.steps, anchor="share")
        entries.append(("RL, share anchor (RAMP-like)", rs.choice, rs.objective, rs.wall_time_s))
        infos["RL, share anchor (RAMP-like)"] = rs.info
    lines = []
    for name, choice, objective, seconds in entries:
        formats = {u.name: names[j] for u, j in zip(prep.units, choice)}
        bits = problem.costs["bits"][np.arange(problem.n_units), choice].sum() / weights
        ppl = ppl_of(formats)
        lines.append(
            f"| {label} | {name} | {bits:.4f} | {objective:.4f} | {objective / ilp.objective:.3f} "
            f"| {math.log(ppl / fp16):.4f} | {ppl:.2f} | {seconds:.1f} s |"
        )
    for fmt in UNIFORM:
        formats = uniform_assignment(prep.units, fmt)
        j = names.index(fmt)
        objective = float(problem.objective[:, j].sum())
        bits = problem.costs["bits"][:, j].sum() / weights
        ppl = ppl_of(formats)
        lines.append(
            f"| {label} | uniform {fmt} | {bits:.4f} | {objective:.4f} | "
            f"{objective / ilp.objective:.3f} | {math.log(ppl / fp16):.4f} | {ppl:.2f} | – |"
        )
    lines.append(f"| {label} | unquantized | 16 | 0 | – | 0 | {fp16:.2f} | – |")
    return lines, infos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avg-bits", type=float, default=3.25)
    parser.add_argument("--steps", type=int, default=None, help="SAC steps (default 100 episodes)")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--alpha", type=float, default=0.5, help="Scale Folding strength")
    parser.add_argument("--transfer-budgets", default="3.0,3.5,4.0")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    policy = WORK / "policy.zip"

    prep = prepare()
    prof = profile_model(prep, "fisher", progress=False)
    started = time.perf_counter()
    emb = unit_embeddings(prep.model, prep.units, prep.calibration_windows()[:4])
    emb_s = time.perf_counter() - started
    rows, infos = case("no", prep, prof, emb, args, policy=policy, share=True)

    prep_f, prof_f = prepare_and_profile(
        None,
        AllocateConfig.from_flat(avg_bits=args.avg_bits, scale_folding=args.alpha, progress=False),
    )
    fold = prep_f.scale_folding
    emb_f = unit_embeddings(prep_f.model, prep_f.units, prep_f.calibration_windows()[:4])
    rows_f, _ = case(f"α {args.alpha:g}", prep_f, prof_f, emb_f, args)

    transfer = [
        "| model | budget | RL policy, zero-shot | anchor alone | ILP optimum | RL × optimum |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def transfer_row(label, budget, problem, features):
        zs = solve(problem, method="rl", embeddings=features, policy=str(policy))
        best = solve(problem, method="ilp")
        alone = problem.objective_of(anchor_alone(problem, features)[0])
        transfer.append(
            f"| {label} | {budget:g} "
            f"| {zs.objective:.4f} | {alone:.4f} | {best.objective:.4f} "
            f"| {zs.objective / best.objective:.3f} |"
        )

    for budget in [float(b) for b in args.transfer_budgets.split(",") if b]:
        p = build_problem(prep.units, prep.palette, prof, budget)
        transfer_row("default", budget, p, emb)
    other = second_model(len(prep.loaded.tokenizer))
    prep2 = prepare(other, tokenizer=prep.loaded.tokenizer)
    prof2 = profile_model(prep2, "fisher", progress=False, use_cache=False)
    emb2 = unit_embeddings(prep2.model, prep2.units, prep2.calibration_windows()[:4])
    for budget in (args.avg_bits, 4.0):
        p = build_problem(prep2.units, prep2.palette, prof2, budget)
        transfer_row(f"random Llama 12x384 ({len(prep2.units)} units)", budget, p, emb2)

    notes = []
    for name, info in infos.items():
        notes.append(
            f"- {name}: {info['steps']} SAC steps ({info['episodes']} episodes) in "
            f"{info['train_seconds']:.0f} s on one torch thread; the policy's own allocation "
            f"predicts {info['policy_objective']:.4f}, the best training episode "
            f"{info['best_episode_objective']:.4f} (returned: {info['source']})."
        )
    notes.append(
        f"- Embeddings: {emb_s:.1f} s. Scale Folding (α {fold.alpha:g}, {fold.tokens} tokens, "
        f"{fold.seconds:.1f} s): mean outlier ratio {fold.outlier_ratio_before:.1f} → "
        f"{fold.outlier_ratio_after:.1f}."
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
            f"Default model, Fisher profile of the same weights, {args.avg_bits} bits; measured "
            f"loss = ln(perplexity / unquantized perplexity) on {args.eval_tokens} evaluation "
            "tokens, with and without Scale Folding (the folded rows use the folded model's "
            "profile and weights throughout).",
            "",
            "| folding | allocation | avg bits | predicted loss | × ILP optimum | measured loss "
            "| perplexity | solve time |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            *rows_f,
            "",
            *notes,
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
