"""Assertions every profiler's profile must pass (the contract of
:class:`bitalloc.sensitivity.base.BaseProfiler`), shared by the registry-wide contract suite
(``test_contract.py``) and the KV profiler's own tests (``tests/kv/test_profiler.py``)."""

import json

import numpy as np
import torch

from bitalloc.kv import KVFormat
from bitalloc.sensitivity import Profile
from bitalloc.sensitivity.monotone import bit_chains


def assert_table(prof: Profile, units, palette) -> None:
    assert prof.units == tuple(u.name for u in units)
    assert prof.formats == tuple(f.name for f in palette)
    assert prof.loss.shape == (len(units), len(palette))
    assert np.isfinite(prof.loss).all() and (prof.loss >= 0).all()


def assert_metadata(prof: Profile, name: str, calibration: torch.Tensor) -> None:
    meta = prof.metadata
    for key in ("method", "tokens", "skipped_batches", "monotone_fixes", "seconds"):
        assert key in meta, key
    assert meta["method"] == name
    assert 0 < meta["tokens"] <= calibration.numel()
    assert meta["skipped_batches"] == 0 and meta["seconds"] > 0
    assert type(meta["monotone_fixes"]) is int and meta["monotone_fixes"] >= 0
    json.dumps(meta)


def assert_model_restored(model, before, flags) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def assert_monotone(prof: Profile, palette) -> None:
    """More bits never predict more loss within a group size (weight palettes)."""
    chains = bit_chains(palette)
    assert chains, "the palette must hold formats to compare"
    for cols in chains:
        for low, high in zip(cols, cols[1:]):
            assert (prof.loss[:, high] <= prof.loss[:, low]).all(), (palette[low], palette[high])


def assert_kv_free_format_is_zero(prof: Profile) -> None:
    """A KV pair that quantizes nothing costs nothing (the KV profilers' ordering rule)."""
    assert (prof.column(KVFormat(16, 16, 16).name) == 0).all()


def assert_save_load(prof: Profile, path) -> None:
    prof.save(path)
    again = Profile.load(path)
    assert again.units == prof.units and again.formats == prof.formats
    np.testing.assert_array_equal(again.loss, prof.loss)
    assert again.metadata == json.loads(json.dumps(prof.metadata))
