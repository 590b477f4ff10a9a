"""Any one mutation of a valid profile file (JSON or safetensors) either loads to a profile
that keeps the profiler contract and holds what the file says (or its recorded monotone repair),
or raises BitallocError: never another exception type, never a silently different result."""

from __future__ import annotations

import json
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format
from bitalloc.sensitivity import Profile
from bitalloc.sensitivity.interactions import Interactions
from bitalloc.sensitivity.profile import ProfileRepairWarning
from tests.fuzz.test_fuzz_allocation import faithful, mutated_document

FORMATS = ("int2-g32", "int3-g32", "int4-g32", "int4-g64", "fp16")
UNITS = ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj")


def _profile() -> Profile:
    loss = np.array(
        [[0.9, 0.3, 0.1, 0.15, 0.0], [1.2, 0.4, 0.2, 0.3, 0.0], [0.5, 0.2, 0.05, 0.1, 0.0]]
    )
    terms = Interactions(
        pairs=((UNITS[0], UNITS[2]),), formats=("int2-g32",), pair_increase=np.array([[0.01]]),
        single_increase=np.array([[[0.9], [0.5]]]), metadata={"tokens": 256},
    )  # fmt: skip
    meta = {"method": "fisher", "tokens": 256, "seconds": 1.5, "model_fingerprint": "ab12"}
    return Profile(UNITS, FORMATS, loss, meta, terms)


PROFILE = _profile()
DOC = PROFILE.to_json()
SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _keeps_the_contract(profile: Profile) -> None:
    assert np.isfinite(profile.loss).all() and (profile.loss >= 0).all()
    assert len(set(profile.units)) == len(profile.units)
    assert len(set(profile.formats)) == len(profile.formats)
    weight = {}
    for j, name in enumerate(profile.formats):
        try:
            weight[j] = parse_format(name)
        except BitallocError:
            continue
    for a, fa in weight.items():
        for b, fb in weight.items():
            if not fa.is_float and fa.group_size == fb.group_size and fa.bits < fb.bits:
                assert (profile.loss[:, b] <= profile.loss[:, a]).all()


def _load(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = Profile.load(path)
    repaired = any(issubclass(w.category, ProfileRepairWarning) for w in caught)
    return loaded, repaired


def test_the_base_profile_round_trips(tmp_path):
    for name in ("p.json", "p.safetensors"):
        PROFILE.save(tmp_path / name)
        loaded, repaired = _load(tmp_path / name)
        assert loaded.to_json() == DOC and not repaired


@SETTINGS
@given(mutation=mutated_document(DOC))
def test_any_json_mutation_loads_faithfully_or_raises_the_projects_error(tmp_path, mutation):
    text, what = mutation
    path = tmp_path / "p.json"
    path.write_text(text)
    try:
        loaded, repaired = _load(path)
    except BitallocError:
        return
    _keeps_the_contract(loaded)
    file, out = json.loads(text), loaded.to_json()
    if repaired:
        # Only the table changed (lowered where more bits predicted more), and it says so.
        assert out["metadata"]["monotone_fixes_on_load"] >= 1, what
        file.pop("loss"), out.pop("loss")
        file.get("metadata", {}).pop("monotone_fixes_on_load", None)
    assert faithful(file, out), what


@st.composite
def _byte_mutation(draw, blob: bytes) -> tuple[bytes, str]:
    edit = draw(st.sampled_from(["flip", "truncate", "append", "header size", "zero run"]))
    at = draw(st.integers(0, len(blob) - 1))
    if edit == "flip":
        value = blob[at] ^ draw(st.integers(1, 255))
        return blob[:at] + bytes([value]) + blob[at + 1 :], f"flip at {at}"
    if edit == "truncate":
        return blob[:at], f"truncate at {at}"
    if edit == "append":
        return blob + draw(st.binary(min_size=1, max_size=64)), "append"
    if edit == "header size":
        size = draw(st.sampled_from([0, 1, 2**63, int.from_bytes(blob[:8], "little") - 1]))
        return size.to_bytes(8, "little") + blob[8:], f"header size {size}"
    return blob[:at] + bytes(16) + blob[at + 16 :], f"zero run at {at}"


def _base_blob() -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        PROFILE.save(Path(tmp) / "p.safetensors")
        return (Path(tmp) / "p.safetensors").read_bytes()


BLOB = _base_blob()


@SETTINGS
@given(mutation=_byte_mutation(BLOB))
def test_any_safetensors_mutation_loads_a_valid_profile_or_raises(tmp_path, mutation):
    blob, what = mutation
    path = tmp_path / "p.safetensors"
    path.write_bytes(blob)
    try:
        loaded, _ = _load(path)
    except BitallocError:
        return
    _keeps_the_contract(loaded)
    # What loaded is what it says it is: saved again, it loads the same.
    loaded.save(tmp_path / "again.safetensors")
    assert _load(tmp_path / "again.safetensors")[0].to_json() == loaded.to_json(), what
    if what.startswith("flip"):
        size = int.from_bytes(BLOB[:8], "little")
        changed = int(what.split()[-1])
        if changed >= 8 + size:  # a byte of the table: only the table may differ
            assert loaded.units == PROFILE.units and loaded.formats == PROFILE.formats, what
