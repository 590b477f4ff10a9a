"""Fuzzing packed-model directories: any change to a valid one either loads to an equal model or
raises BitallocError; never another exception, never a silently different model."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.kernels import cpu
from bitalloc.packed import MANIFEST, WEIGHTS, load_packed, pack_model, save_packed
from tests.allocations import cycling_allocation
from tests.conftest import make_tiny_llama
from tests.fuzz.jsonpaths import json_paths

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    model = make_tiny_llama()
    alloc = cycling_allocation(model, ("int3-g32", "int4-g32", "int8-g64", "fp16"))
    packed = pack_model(model, alloc.formats, cpu_path=cpu.UNPACK_MATMUL, progress=False)
    out = save_packed(packed, tmp_path_factory.mktemp("fuzz") / "packed", allocation=alloc)
    loaded = load_packed(out, cpu_path=cpu.UNPACK_MATMUL, progress=False)
    return out, loaded.manifest, _state(loaded.model)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _load_or_refuse(directory):
    """The loaded model, or None when the loader refused with the project's own error."""
    try:
        return load_packed(directory, cpu_path=cpu.UNPACK_MATMUL, progress=False)
    except BitallocError as exc:
        assert "\n" not in str(exc)
        return None


def _assert_equal_or_refused(directory, manifest, state):
    loaded = _load_or_refuse(directory)
    if loaded is None:
        return
    assert loaded.manifest == manifest
    got = _state(loaded.model)
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def _copy(source):
    target = Path(tempfile.mkdtemp(prefix="bitalloc-fuzz-")) / "packed"
    shutil.copytree(source, target)
    return target


@SETTINGS
@given(data=st.data())
def test_manifest_field_mutations(original, data):
    source, manifest, state = original
    directory = _copy(source)
    try:
        doc = json.loads((directory / MANIFEST).read_text())
        path = data.draw(st.sampled_from(list(json_paths(doc))[1:]), label="path")
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        op = data.draw(st.sampled_from(["delete", "replace", "as text", "in a list"]), label="op")
        if op == "delete":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = data.draw(JSON_VALUES, label="value")
        else:
            parent[path[-1]] = json.dumps(old) if op == "as text" else [old]
        (directory / MANIFEST).write_text(json.dumps(doc, indent=1))
        _assert_equal_or_refused(directory, manifest, state)
    finally:
        shutil.rmtree(directory.parent)


def _mutate_bytes(data, blob):
    op = data.draw(st.sampled_from(["flip", "truncate", "extend"]), label="op")
    if op == "extend":
        return blob + data.draw(st.binary(min_size=1, max_size=64), label="tail")
    at = data.draw(st.integers(0, len(blob) - 1), label="at")
    if op == "truncate":
        return blob[:at]
    bit = data.draw(st.integers(0, 7), label="bit")
    return blob[:at] + bytes([blob[at] ^ (1 << bit)]) + blob[at + 1 :]


@SETTINGS
@given(data=st.data(), name=st.sampled_from([MANIFEST, WEIGHTS, "config.json"]))
def test_byte_level_damage(original, data, name):
    source, manifest, state = original
    directory = _copy(source)
    try:
        path = directory / name
        path.write_bytes(_mutate_bytes(data, path.read_bytes()))
        _assert_equal_or_refused(directory, manifest, state)
    finally:
        shutil.rmtree(directory.parent)


@SETTINGS
@given(data=st.data())
def test_forged_weights_never_crash_the_loader(original, data):
    """Damaged weights with checksums recomputed to match: the tensors' own checks must answer
    (the values themselves cannot be checked), with BitallocError or a model."""
    source, _, _ = original
    directory = _copy(source)
    try:
        blob = _mutate_bytes(data, (directory / WEIGHTS).read_bytes())
        (directory / WEIGHTS).write_bytes(blob)
        doc = json.loads((directory / MANIFEST).read_text())
        doc["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        rest = {k: v for k, v in doc.items() if k != "manifest_sha256"}
        text = json.dumps(rest, sort_keys=True, separators=(",", ":"))
        doc["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        (directory / MANIFEST).write_text(json.dumps(doc))
        _load_or_refuse(directory)
    finally:
        shutil.rmtree(directory.parent)
