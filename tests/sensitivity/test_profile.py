import numpy as np
import pytest

from bitalloc.errors import BitallocError
from bitalloc.sensitivity import Profile, make_profiler


def _profile():
    return Profile(("a", "b"), ("int2-g32", "fp16"), np.array([[1.5, 0.0], [2.5, 1e-9]]), {"k": 1})


def test_safetensors_keeps_the_table_bit_exact(tmp_path):
    prof = _profile().with_metadata(method="fisher", tokens=3)
    prof.save(tmp_path / "p.safetensors")
    again = Profile.load(tmp_path / "p.safetensors")
    assert again.loss.dtype == np.float64
    np.testing.assert_array_equal(again.loss, prof.loss)
    assert again.metadata == {"k": 1, "method": "fisher", "tokens": 3}
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_unreadable_profile_files_raise(tmp_path):
    bad = tmp_path / "p.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(BitallocError, match="not a bitalloc profile"):
        Profile.load(bad)
    with pytest.raises(BitallocError, match="does not exist"):
        Profile.load(tmp_path / "missing.safetensors")
    with pytest.raises(BitallocError, match="does not exist"):
        Profile.load(tmp_path / "missing.json")


def test_unknown_profiler_or_option_raises():
    with pytest.raises(BitallocError, match="unknown profiler 'fishy'; choose one of"):
        make_profiler("fishy")
    with pytest.raises(BitallocError, match="profiler 'output'.*probes"):
        make_profiler("output", probes=3)


def _monotone():
    # Rows: two units; columns: int2-g32, int4-g32, fp16 (more bits, less loss).
    return Profile(
        ("a", "b"), ("int2-g32", "int4-g32", "fp16"), np.array([[3.0, 1.0, 0.0], [2.0, 0.5, 0.0]])
    )


def _write(tmp_path, doc, name="p.json"):
    import json

    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda d: d["loss"][0].__setitem__(1, -0.5),
            "is -0.5; a predicted loss increase is never",
        ),
        (lambda d: d.update(formats=["int2-g32", "int2-g32", "fp16"]), "two format entries"),
        (lambda d: d.update(units=["a", "a"]), "two unit entries named 'a'"),
        (lambda d: d["loss"][0].__setitem__(0, "3.0"), "list of rows of numbers"),
        (lambda d: d["loss"][0].__setitem__(0, True), "list of rows of numbers"),
        (lambda d: d.update(units="ab"), "units must be a list of names"),
        (lambda d: d.update(metadata=[["k", 1]]), "metadata must be a JSON object"),
        (lambda d: d.update(version=True), "version True is not supported"),
        (lambda d: d.update(version=2), "version 2 is not supported"),
        (lambda d: d.update(extra=1), "unknown field 'extra'"),
        (lambda d: d["loss"].pop(), "shape"),
        (lambda d: d["loss"][1].pop(), "rows differ in length"),
        (lambda d: d.pop("formats"), "is not a profile: it has no 'formats' field"),
    ],
)
def test_profiles_that_break_the_contract_are_refused_on_load(tmp_path, edit, match):
    doc = _monotone().to_json()
    Profile.load(_write(tmp_path, doc))
    edit(doc)
    with pytest.raises(BitallocError, match=match):
        Profile.load(_write(tmp_path, doc))


def test_other_files_are_named_not_parsed(tmp_path, tiny_model):
    from tests.allocations import cycling_allocation

    cycling_allocation(tiny_model, ["int4-g32"]).save(tmp_path / "alloc.json")
    with pytest.raises(BitallocError, match="alloc.json is an allocation, not a profile"):
        Profile.load(tmp_path / "alloc.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(BitallocError, match="holds a JSON array, not an object"):
        Profile.load(tmp_path / "list.json")
    (tmp_path / "deep.json").write_bytes(b"[" * 100_000)
    with pytest.raises(BitallocError, match="nested too deeply"):
        Profile.load(tmp_path / "deep.json")


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_a_table_not_monotone_in_bits_is_capped_with_a_recorded_warning(tmp_path, suffix):
    from bitalloc.sensitivity.profile import ProfileRepairWarning

    bad = Profile(
        ("a", "b"), ("int2-g32", "int4-g32", "fp16"), np.array([[1.0, 3.0, 0.0], [2.0, 0.5, 0.0]])
    )
    bad.save(tmp_path / f"p{suffix}")
    with pytest.warns(ProfileRepairWarning, match="1 values predicted more loss"):
        fixed = Profile.load(tmp_path / f"p{suffix}")
    np.testing.assert_array_equal(fixed.loss, [[1.0, 1.0, 0.0], [2.0, 0.5, 0.0]])
    assert fixed.metadata["monotone_fixes_on_load"] == 1
    fixed.save(tmp_path / f"q{suffix}")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Profile.load(tmp_path / f"q{suffix}")  # repaired once, loads without a warning
    assert again.to_json() == fixed.to_json()


def test_a_negative_table_cannot_be_built():
    with pytest.raises(BitallocError, match="never negative"):
        Profile(("a",), ("fp16",), np.array([[-1e-3]]))


def test_safetensors_profiles_with_foreign_tensors_or_headers_are_refused(tmp_path):
    import json

    from safetensors.numpy import save as save_safetensors

    doc = {**_monotone().to_json(), "loss": None}
    table = np.ascontiguousarray(_monotone().loss)
    cases = {
        "extra tensor": ({"loss": table, "x": table}, doc),
        "float32 table": ({"loss": table.astype(np.float32)}, doc),
        "table in the header": ({"loss": table}, {**doc, "loss": table.tolist()}),
    }
    for tensors, header in cases.values():
        path = tmp_path / "p.safetensors"
        path.write_bytes(
            save_safetensors(tensors, metadata={"bitalloc_profile": json.dumps(header)})
        )
        with pytest.raises(BitallocError, match="not a bitalloc profile in safetensors"):
            Profile.load(path)


def test_a_profile_is_a_plain_record_that_loads_without_measuring_code(tmp_path):
    """Importing and loading (and repairing) a profile imports no profiler, job or model code:
    a process that only solves or reports never pays for them."""
    import subprocess
    import sys

    path = tmp_path / "p.json"
    Profile(
        ("a", "b"),
        ("int2-g32", "int4-g32", "K4V4"),
        np.array([[1.0, 2.0, 0.5], [3.0, 1.0, 0.0]]),  # a's int4 rises: repaired on load
    ).save(path)
    script = f"""
import sys, warnings
from bitalloc.sensitivity.profile import Profile
assert "torch" not in sys.modules, "importing the profile record imported torch"
with warnings.catch_warnings(record=True):
    warnings.simplefilter("always")
    p = Profile.load({str(path)!r})
assert p.metadata["monotone_fixes_on_load"] == 1, p.metadata
measuring = [m for m in sys.modules if m in (
    "bitalloc.sensitivity.base", "bitalloc.sensitivity.interactions", "bitalloc.jobs",
    "bitalloc.models", "bitalloc.apply", "transformers")]
assert not measuring, measuring
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
