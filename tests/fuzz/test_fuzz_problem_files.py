"""Problem files (JSON and NPZ) under mutation: each loads to a valid problem that saves and
loads back equal, or raises the project's own error, never another exception."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.solvers import Problem
from bitalloc.solvers.io import load_problem, problem_to_dict, save_problem
from tests.fuzz.jsonpaths import json_paths

FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _base() -> Problem:
    rng = np.random.default_rng(3)
    n, k = 4, 3
    allowed = np.ones((n, k), dtype=bool)
    allowed[3, 2] = False
    return Problem(
        rng.exponential(1.0, (n, k)),
        {"bits": rng.integers(1, 9, (n, k)).astype(float), "ms": rng.random((n, k))},
        {"bits": 14.0},
        allowed,
        unit_names=["q", "k", "v", "o"],
        option_names=["int2", "int4", "int8"],
        pins={"o": "int4"},
        ties=[["q", "k"]],
        interactions={("k", "v"): rng.normal(0, 0.1, (k, k))},
    )


def _same(a: Problem, b: Problem) -> bool:
    return (
        np.array_equal(a.objective, b.objective)
        and a.costs.keys() == b.costs.keys()
        and all(np.array_equal(a.costs[c], b.costs[c]) for c in a.costs)
        and dict(a.budgets) == dict(b.budgets)
        and np.array_equal(a.allowed, b.allowed)
        and a.unit_names == b.unit_names
        and a.option_names == b.option_names
        and a.pins == b.pins
        and a.ties == b.ties
        and np.array_equal(a.interaction_pairs, b.interaction_pairs)
        and np.array_equal(a.interaction_values, b.interaction_values)
    )


def _load_or_refuse(path) -> None:
    try:
        problem = load_problem(path)
    except BitallocError:
        return
    assert isinstance(problem, Problem)
    # Whatever loaded is a valid problem and survives its own round trip unchanged.
    for suffix in (".json", ".npz"):
        again = path.with_name("again" + suffix)
        save_problem(problem, again)
        assert _same(load_problem(again), problem)


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(-3, 9), max_size=4),
    st.lists(st.lists(st.floats(-1e308, 1e308), max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-2, 5), max_size=2),
)


def _mutate(data, path, action, junk):
    if not path:
        return junk
    parent = data
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[last]))
    else:
        parent[last] = junk
    return data


@FUZZ
@given(data=st.data())
def test_mutated_json_loads_equal_or_refuses(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("json")
    original = problem_to_dict(_base())
    paths = list(json_paths(original))
    mutated = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(json_paths(mutated))
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
        mutated = _mutate(mutated, path, action, data.draw(JUNK))
    path = folder / "p.json"
    path.write_text(json.dumps(mutated))
    _load_or_refuse(path)


@FUZZ
@given(data=st.data())
def test_mutated_json_bytes_load_equal_or_refuse(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("jsonbytes")
    blob = bytearray(json.dumps(problem_to_dict(_base())).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del blob[at:]
            if not blob:
                blob.extend(b"{")
        else:
            blob[at:at] = data.draw(st.sampled_from([b"1e999", b"-", b"NaN", b"[", b'"', b"0"]))
    path = folder / "p.json"
    path.write_bytes(bytes(blob))
    _load_or_refuse(path)


def _npz_arrays(tmp_path) -> dict[str, np.ndarray]:
    path = tmp_path / "base.npz"
    save_problem(_base(), path)
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


ARRAY_JUNK = st.one_of(
    st.just(np.array(np.nan)),
    st.just(np.array([[1.0, np.inf]])),
    st.just(np.array(["a", "b"])),
    st.just(np.array([], dtype=np.float64)),
    st.just(np.zeros((2, 2, 2))),
    st.just(np.array(True)),
    st.just(np.array([1e308, -1e308])),
    st.just(np.array([5e-324])),
    st.just(np.array([[0, 1], [9, 9]], dtype=np.int64)),
    st.just(np.array([-1, 0, 0, -1], dtype=np.int64)),
    st.just(np.array(3 + 1j)),
    st.just(np.array([b"x"])),
)


@FUZZ
@given(data=st.data())
def test_mutated_npz_loads_equal_or_refuses(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("npz")
    arrays = _npz_arrays(folder)
    for _ in range(data.draw(st.integers(1, 3))):
        keys = sorted(arrays)
        action = data.draw(st.sampled_from(["replace", "delete", "add", "retype", "reshape"]))
        key = data.draw(st.sampled_from(keys))
        if action == "replace":
            arrays[key] = data.draw(ARRAY_JUNK)
        elif action == "delete" and len(arrays) > 1:
            del arrays[key]
        elif action == "add":
            name = data.draw(st.sampled_from(["cost:x", "budget:x", "budget:bits", "extra"]))
            arrays[name] = data.draw(ARRAY_JUNK)
        elif action == "retype":
            dtype = data.draw(st.sampled_from([np.int8, np.float32, np.uint64, np.bool_, str]))
            with contextlib.suppress(ValueError, OverflowError):
                arrays[key] = arrays[key].astype(dtype)
        else:
            arrays[key] = arrays[key].reshape(-1)
    path = folder / "p.npz"
    np.savez(path, **arrays)
    _load_or_refuse(path)


@FUZZ
@given(data=st.data())
def test_mutated_npz_bytes_load_equal_or_refuse(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("npzbytes")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key, array in _npz_arrays(folder).items():
            item = io.BytesIO()
            np.save(item, array, allow_pickle=False)
            archive.writestr(key + ".npy", item.getvalue())
    blob = bytearray(buffer.getvalue())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        if data.draw(st.booleans()):
            blob[at] = data.draw(st.integers(0, 255))
        else:
            del blob[at:]
            blob.extend(b"\0")
    path = folder / "p.npz"
    path.write_bytes(bytes(blob))
    _load_or_refuse(path)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_duplicate_names_in_files_are_refused(tmp_path, suffix):
    # A pin by a repeated unit name used to apply to the first unit of that name only.
    data = problem_to_dict(_base())
    data["unit_names"] = ["q", "k", "q", "o"]
    data.pop("ties")
    data.pop("interactions")
    path = tmp_path / ("p" + suffix)
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        np.savez(
            path,
            objective=np.array(data["objective"]),
            **{"cost:bits": np.array(data["costs"]["bits"])},
            unit_names=np.array(data["unit_names"]),
        )
    with pytest.raises(BitallocError, match="repeats 'q'"):
        load_problem(path)
