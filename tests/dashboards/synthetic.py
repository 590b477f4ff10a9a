"""Synthetic report inputs (profile, allocation, frontier, study) without loading a model."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import optuna

from bitalloc.allocation import Allocation, Measured, UnitChoice
from bitalloc.formats import parse_format
from bitalloc.models import Unit
from bitalloc.search.storage import default_storage_url
from bitalloc.sensitivity import Profile

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
FORMATS = ("int2-g128", "int3-g128", "int4-g128", "int8-g128", "fp16")
LAYERS = 3
MODEL = "tiny-synthetic"
BUDGET = 3.5
FP16_PPL = 12.0
STUDY = "bitalloc-test"
_SHAPES = {
    "q": (256, 256),
    "k": (128, 256),
    "v": (128, 256),
    "o": (256, 256),
    "gate": (384, 256),
    "up": (384, 256),
    "down": (256, 384),
}
_MODULES = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn"}
_FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gateup", "up": "gateup"}


def make_units(layers: int = LAYERS) -> list[Unit]:
    """``layers`` Llama-style blocks of 7 projections each."""
    units = []
    for layer in range(layers):
        for role in ROLES:
            name = f"model.layers.{layer}.{_MODULES.get(role, 'mlp')}.{role}_proj"
            group = f"model.layers.{layer}.{_FUSED[role]}" if role in _FUSED else name
            units.append(Unit(name, _SHAPES[role], layer, role, group))
    return units


def make_profile(units: list[Unit] | None = None) -> Profile:
    """Loss falls 4x per bit, scaled differently per unit; fp16 costs nothing (a zero)."""
    units = units or make_units()
    scale = np.linspace(0.5, 5.0, len(units))
    loss = np.array(
        [
            [
                0.0 if parse_format(f).is_float else s * 4.0 ** (-parse_format(f).bits)
                for f in FORMATS
            ]
            for s in scale
        ]
    )
    info = [
        {"name": u.name, "shape": list(u.shape), "layer": u.layer, "role": u.role, "group": u.group}
        for u in units
    ]
    meta = {"method": "synthetic", "model": MODEL, "unit_info": info}
    return Profile(tuple(u.name for u in units), FORMATS, loss, meta)


def make_allocation(profile: Profile | None = None, *, measured: bool = True) -> Allocation:
    """int2/int3/int4 in turn across units, with a measurement beside uniform baselines."""
    profile = profile or make_profile()
    units = make_units()
    choices = []
    for i, unit in enumerate(units):
        fmt = ("int2-g128", "int3-g128", "int4-g128")[(i + unit.layer) % 3]
        choices.append(UnitChoice.of(unit, parse_format(fmt), float(profile.column(fmt)[i])))
    alloc = Allocation.from_choices(model=MODEL, budget=BUDGET, units=choices)
    if not measured:
        return alloc
    ppl = 14.0
    return alloc.with_measured(
        Measured(
            perplexity=ppl,
            baselines={"fp16": FP16_PPL, "int3-g128": 17.5, "int4-g128": 13.1},
            baseline_avg_bits={"fp16": 16.0, "int3-g128": 3.25, "int4-g128": 4.25},
            eval_tokens=4096,
            seq_len=512,
            measured_loss_increase=math.log(ppl / FP16_PPL),
            predicted_loss_increase=float(alloc.data.predicted_loss),
        )
    )


def make_frontier() -> dict:
    """Four budgets, three of them measured."""
    points = []
    for k, budget in enumerate((2.75, 3.25, 3.75, 4.25)):
        predicted = 0.4 * 2.0 ** (-2 * k)
        points.append(
            {
                "budget": budget,
                "avg_bits": budget - 0.01,
                "predicted_loss": predicted,
                "perplexity": None if k == 3 else FP16_PPL * math.exp(1.2 * predicted),
                "status": "optimal",
                "gap": 0.0,
                "solve_ms": 1.5,
                "formats": {},
            }
        )
    return {"method": "lagrangian", "ties": [], "fp16_perplexity": FP16_PPL, "points": points}


def trial_values(n: int) -> list[tuple[float, float, str]]:
    """(avg_bits, perplexity, source) of ``n`` synthetic trials: four solver seeds, then
    sampled trials scattered around the same curve."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        if i < 4:
            bits = (2.75, 3.25, 3.25, 3.5)[i]
            source = (
                "seed:lagrangian@2.75",
                "seed:lagrangian@3.25",
                "seed:ilp@3.25",
                "seed:ilp@3.5",
            )[i]
            noise = 1.0
        else:
            bits = float(rng.uniform(2.5, 4.5))
            source = "sampler"
            noise = float(rng.uniform(0.98, 1.15))
        ppl = FP16_PPL * math.exp(3.0 * 4.0 ** (2.25 - bits)) * noise
        rows.append((round(bits, 4), ppl, source))
    return rows


def make_study(run_dir: Path, *, name: str = STUDY, n_trials: int = 24) -> optuna.Study:
    """A finished search stored per the schema in ``run_dir/study.db`` (plus a failed and a
    running trial, as a killed run leaves)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=default_storage_url(run_dir),
        study_name=name,
        directions=["minimize", "minimize"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["avg_bits", "perplexity"])
    units = [u.name for u in make_units()]
    study.set_user_attr(
        "bitalloc",
        {
            "version": 1,
            "model": MODEL,
            "model_fingerprint": "0" * 16,
            "palette": list(FORMATS),
            "budget": BUDGET,
            "eval_tokens": 4096,
            "seq_len": 512,
            "space": "near",
            "units": units,
        },
    )
    study.set_user_attr("fp16_perplexity", FP16_PPL)
    study.set_user_attr(
        "uniform",
        {
            "int3-g128": {"avg_bits": 3.25, "perplexity": 17.5},
            "int4-g128": {"avg_bits": 4.25, "perplexity": 13.1},
        },
    )
    # The search suggests one categorical parameter per unit (its format), as here.
    space = optuna.distributions.CategoricalDistribution(FORMATS[:4])
    trials = []
    for k, (bits, ppl, source) in enumerate(trial_values(n_trials)):
        formats = {u: FORMATS[(k + i) % 4] for i, u in enumerate(units)}
        trials.append(
            optuna.trial.create_trial(
                values=[bits, ppl],
                params=formats,
                distributions=dict.fromkeys(units, space),
                user_attrs={
                    "formats": formats,
                    "loss": 2.5 + math.log(ppl / FP16_PPL),
                    "kl": None,
                    "predicted_loss": 0.9 * math.log(ppl / FP16_PPL),
                    "source": source,
                },
            )
        )
    trials.append(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    trials.append(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING))
    study.add_trials(trials)
    return study
