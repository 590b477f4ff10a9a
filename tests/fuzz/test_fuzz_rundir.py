"""Fuzz: a search run directory whose files were damaged or edited either loads (to the same
inputs, when the edit kept the meaning) or raises BitallocError, by the report's loader
(:func:`bitalloc.dashboards.rundir.load_run`) and by ``search(resume=True)``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc.dashboards.rundir import load_run
from bitalloc.errors import BitallocError

from ..search.driver import run

FILES = ("search.json", "best.json", "frontier.json", "profile.safetensors", "study.db")


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzzrun")
    old = os.environ.get("BITALLOC_CACHE_DIR")
    os.environ["BITALLOC_CACHE_DIR"] = str(base / "cache")
    try:
        run(base / "run", 4)
    finally:
        if old is None:
            os.environ.pop("BITALLOC_CACHE_DIR")
        else:
            os.environ["BITALLOC_CACHE_DIR"] = old
    return base / "run"


def _snapshot(inputs: dict) -> dict:
    """What the report reads from each input, comparable with ==."""
    out = {}
    if "profile" in inputs:
        p = inputs["profile"]
        out["profile"] = (list(p.units), list(p.formats), np.asarray(p.loss).tolist())
    if "allocation" in inputs:
        out["allocation"] = inputs["allocation"].data.model_dump()
    if "frontier" in inputs:
        out["frontier"] = inputs["frontier"]
    if "study" in inputs:
        s = inputs["study"]
        out["study"] = (
            s.study_name,
            s.user_attrs,
            [(t.number, t.state, t.values, t.params, t.user_attrs) for t in s.get_trials()],
        )
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    # search.json names the storage by absolute path: point it at the copy.
    meta = json.loads((dst / "search.json").read_text())
    meta["storage"] = f"sqlite:///{dst / 'study.db'}"
    (dst / "search.json").write_text(json.dumps(meta))
    return dst


def _load(run_dir: Path):
    try:
        return _snapshot(load_run(run_dir))
    except BitallocError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        return None


def _json_edit(data, draw):
    """One structural edit somewhere in a JSON document."""
    if isinstance(data, dict) and data:
        key = draw(st.sampled_from(sorted(data)))
        action = draw(st.sampled_from(["drop", "recurse", "replace"]))
        if action == "drop":
            return {k: v for k, v in data.items() if k != key}
        if action == "recurse":
            return {**data, key: _json_edit(data[key], draw)}
        return {**data, key: draw(_scalars)}
    if isinstance(data, list) and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + [_json_edit(data[i], draw)] + data[i + 1 :]
    return draw(_scalars)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.just([]),
    st.just({}),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_run_directory_loads_or_raises_bitalloc_error(valid_run, tmp_path, data):
    original = _load(_copy(valid_run, tmp_path / "ref"))
    assert original is not None and set(original) == {"profile", "allocation", "frontier", "study"}
    run_dir = _copy(valid_run, tmp_path / "mut")
    name = data.draw(st.sampled_from(FILES))
    target = run_dir / name
    kinds = ["bytes", "truncate", "delete", "directory", "json", "pretty"]
    kind = data.draw(st.sampled_from(kinds))
    blob = target.read_bytes()
    same_meaning = False
    if kind == "bytes":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob = blob[:i] + bytes([data.draw(st.integers(0, 255))]) + blob[i + 1 :]
        target.write_bytes(blob)
    elif kind == "truncate":
        target.write_bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])
    elif kind == "delete":
        target.unlink()
    elif kind == "directory":
        target.unlink()
        target.mkdir()
    elif name.endswith(".json"):
        doc = json.loads(blob)
        if kind == "pretty":
            # Reformatted (indent, key order): the same document, so the same inputs.
            target.write_text(json.dumps(doc, indent=4, sort_keys=True))
            same_meaning = True
        else:
            target.write_text(json.dumps(_json_edit(doc, data.draw)))
    else:
        same_meaning = True  # json edits only apply to JSON files
    loaded = _load(run_dir)
    if same_meaning:
        assert loaded == original
    if name == "study.db" and kind in ("delete", "directory"):
        assert loaded is None  # search.json names it: a missing study is an error, not empty
