"""Any one mutation of a valid allocation file either loads to exactly what the file says,
with every recomputable number and the budget still consistent, or raises BitallocError:
never another exception type, never a silently different result."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc.allocation import Allocation, Measured, Repair, UnitChoice
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format
from bitalloc.kv.formats import parse_kv_format
from bitalloc.kv.record import KVAllocation, KVChoice
from bitalloc.models import Unit
from bitalloc.records import ProfileSummary, SolverSummary
from tests.fuzz.jsonpaths import json_paths

#: Values a field may be replaced with: every JSON type, edge numbers, a deep nest.
REPLACEMENTS = st.sampled_from(
    [None, True, False, 0, -1, 1, 2**63, 10**30, -1e300, 0.5, "", "x", "3.25", [], {}, [[[]]]]
)
#: How a number is changed: scaled, negated, nudged or made huge.
NUMBER_EDITS = st.sampled_from(
    [
        lambda x: x * 2,
        lambda x: -x,
        lambda x: x * (1 + 1e-6),
        lambda x: x + 1,
        lambda x: x * 1e300,
        lambda x: 0 if x else 1,
    ]
)


def get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated_document(draw, doc: dict) -> tuple[str, Any]:
    """(mutated JSON text, its description) from one mutation of ``doc``."""
    doc = json.loads(json.dumps(doc))
    where = draw(st.sampled_from(list(json_paths(doc))[1:]))  # not the root
    parent, key = get(doc, where[:-1]), where[-1]
    kind = draw(st.sampled_from(["delete", "replace", "number", "rename", "nest", "text"]))
    value = parent[key]
    if kind == "delete":
        del parent[key]
    elif kind == "replace":
        parent[key] = draw(REPLACEMENTS)
    elif kind == "number" and type(value) in (int, float):
        new = draw(NUMBER_EDITS)(value)
        parent[key] = new if abs(new) < 1e308 else 1e308
    elif kind == "rename" and isinstance(parent, dict):
        parent[key + "_"] = parent.pop(key)
    elif kind == "nest":
        parent[key] = [value]
    text = json.dumps(doc)
    if kind == "text":
        text = draw(text_edits(text))
    return text, f"{kind} at {where}"


@st.composite
def text_edits(draw, text: str) -> str:
    """Truncation, a changed character, a number turned NaN/Infinity, or deep nesting."""
    edit = draw(st.sampled_from(["truncate", "flip", "nan", "nest"]))
    at = draw(st.integers(0, len(text) - 1))
    if edit == "truncate":
        return text[:at]
    if edit == "flip":
        return (
            text[:at] + chr((ord(text[at]) + draw(st.integers(1, 94))) % 95 + 32) + text[at + 1 :]
        )
    if edit == "nan":
        return text.replace(": 0.", ': NaN, "_": 0.', 1).replace(": 1", ": Infinity", 1)
    return "[" * 100_000 + text + "]" * 100_000


def faithful(file: Any, loaded: Any) -> bool:
    """True when every value ``file`` holds is in ``loaded`` unchanged (numbers equal and of
    the same kind, no bool read as a number); ``loaded`` may add defaults ``file`` leaves out."""
    if isinstance(file, dict):
        return isinstance(loaded, dict) and all(
            k in loaded and faithful(v, loaded[k]) for k, v in file.items()
        )
    if isinstance(file, list):
        return (
            isinstance(loaded, (list, tuple))
            and len(file) == len(loaded)
            and all(faithful(a, b) for a, b in zip(file, loaded))
        )
    if isinstance(file, bool) or isinstance(loaded, bool):
        return file is loaded
    if isinstance(file, (int, float)):
        if not isinstance(loaded, (int, float)):
            return False
        if isinstance(file, float) or isinstance(loaded, float):
            # A JSON number read into a float field is that number's nearest float.
            try:
                return float(file) == float(loaded)
            except OverflowError:
                return False
        return file == loaded
    return file == loaded


#: Fields a loader recomputes from the rest: a change to one of them alone must be refused.
RECOMPUTED = {
    ("avg_bits",), ("total_bits",), ("bytes",), ("numel",), ("excluded_numel",),
    ("predicted_loss",), ("solver", "objective"), ("solver", "gap"),
    ("measured", "measured_loss_increase"), ("measured", "predicted_loss_increase"),
    ("repair", "predicted_after"), ("kv", "avg_bits"), ("kv", "total_bits"), ("kv", "bytes"),
    ("kv", "predicted_loss"),
}  # fmt: skip


def _document() -> dict:
    units = [
        Unit(f"model.layers.{i}.mlp.{r}_proj", (48, 64) if r != "down" else (64, 48), i, r,
             f"model.layers.{i}.mlp.{r}_proj")
        for i in range(2) for r in ("gate", "down")
    ]  # fmt: skip
    formats = ["int2-g32", "int4-g32", "int3-g64", "fp16"]
    choices = [UnitChoice.of(u, parse_format(f), 0.1 + 0.05 * i) for i, (u, f) in
               enumerate(zip(units, formats))]  # fmt: skip
    pairs = 0.0125
    alloc = Allocation.from_choices(
        model="tiny", budget=8.0, units=choices, excluded={"model.embed_tokens.weight": 4096},
        profile=ProfileSummary(method="fisher", tokens=256, interaction_pairs=1,
                               interaction_formats=["int2-g32"], interaction_loss=pairs),
        interaction_loss=pairs,
    )  # fmt: skip
    loss = alloc.data.predicted_loss
    solver = SolverSummary(method="qp", status="feasible", objective=loss,
                           lower_bound=loss - 0.01, gap=0.01, wall_time_s=0.002)  # fmt: skip
    kv_layers = []
    for i, name in enumerate(("K4V4", "K2V2")):
        fmt = parse_kv_format(name)
        kv_layers.append(KVChoice(
            name=f"model.layers.{i}.self_attn", layer=i, format=name,
            bits_per_element=fmt.bits_per_element(16, 2, 64),
            cache_bits=fmt.cache_bits(64, 1, 2, 16), predicted_loss=0.02 * (i + 1),
        ))  # fmt: skip
    total = sum(c.cache_bits for c in kv_layers)
    kv = KVAllocation(
        context_len=64, batch_size=1, n_kv_heads=2, head_dim=16, budget=5.0,
        avg_bits=total / (2 * 2 * 2 * 16 * 64), total_bits=total, bytes=total / 8,
        predicted_loss=0.06, layers=kv_layers,
    )  # fmt: skip
    data = alloc.data.model_copy(update={"solver": solver, "kv": kv})
    total_loss = loss + 0.06
    measured = Measured(
        perplexity=12.0, baselines={"fp16": 10.0, "int4-g32": 11.0},
        baseline_avg_bits={"fp16": 16.0, "int4-g32": 5.0}, eval_tokens=512, seq_len=64,
        measured_loss_increase=math.log(12.0) - math.log(10.0),
        predicted_loss_increase=total_loss,
    )  # fmt: skip
    repair = Repair(
        tokens=256, tolerance=0.1, budget=4, evaluations=3, predicted_before=loss * 2,
        measured_before=0.3, predicted_after=loss, measured_after=0.2, changed=True,
        groups="unit", groups_measured=2, rounds=[], wall_time_s=1.0,
    )  # fmt: skip
    return Allocation(data.model_copy(update={"measured": measured, "repair": repair})).to_json()


DOC = _document()


def test_the_base_document_loads_equal(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(DOC))
    assert Allocation.load(path).to_json() == DOC


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutation=mutated_document(DOC))
def test_any_mutation_loads_faithfully_or_raises_the_projects_error(tmp_path, mutation):
    text, what = mutation
    path = tmp_path / "a.json"
    path.write_text(text)
    try:
        loaded = Allocation.load(path)
    except BitallocError:
        return
    file = json.loads(text)
    out = loaded.to_json()
    assert faithful(file, out), what
    data = loaded.data
    if data.budget.avg_bits is not None:
        assert data.avg_bits <= data.budget.avg_bits * (1 + 1e-9), what
    if data.budget.max_bytes is not None:
        assert data.bytes <= data.budget.max_bytes * (1 + 1e-9), what
    assert data.bytes == data.total_bits / 8, what
    # A recomputed number that loaded is the one the valid file had: an edit of it alone is
    # never accepted.
    for key in RECOMPUTED:
        try:
            edited = get(file, key)
        except (KeyError, TypeError, IndexError):
            continue
        assert faithful(edited, get(DOC, key)), (what, key)
