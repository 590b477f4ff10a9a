"""KV search-space reduction: Pareto pruning (exact), layer clustering (deterministic), and
their cost in optimality checked against brute force."""

import itertools
import math

import numpy as np
import pytest

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.kv import kv_palette
from bitalloc.kv.reduce import (
    cluster_layers,
    intra_layer_pruning,
    prune_dominated,
    reduction_cost,
)
from bitalloc.sensitivity import Profile


def _random_profile(seed, n=3, k=5, per_layer_bits=True, integers=False):
    """A random profile and bits table (integers make ties in bits and loss likely)."""
    rng = np.random.default_rng(seed)
    if integers:
        loss = rng.integers(0, 6, (n, k)).astype(float)
        bits = rng.integers(1, 6, (n, k) if per_layer_bits else (k,)).astype(float)
    else:
        loss = rng.lognormal(0, 2, (n, k))
        bits = rng.uniform(1, 16, (n, k) if per_layer_bits else (k,))
    prof = Profile(tuple(f"l{i}" for i in range(n)), tuple(f"p{j}" for j in range(k)), loss)
    return prof, np.broadcast_to(bits, (n, k)).copy()


def _brute_force(prof, bits, budget, ties=()):
    """The exact optimum by enumeration; ``ties`` lists groups of rows taking one option."""
    n, k = prof.loss.shape
    best = math.inf
    for choice in itertools.product(range(k), repeat=n):
        if any(len({choice[i] for i in group}) > 1 for group in ties):
            continue
        rows = np.arange(n)
        if bits[rows, choice].sum() <= budget + 1e-9:
            best = min(best, prof.loss[rows, choice].sum())
    return best


# -- pruning -------------------------------------------------------------------------------


def test_prune_dominated_hand_example():
    bits = {"a": 1, "b": 2, "c": 2, "d": 3, "e": 4}
    # c: as many bits as b, more loss. d: more bits than b, same loss. Both dominated.
    assert prune_dominated(bits, np.array([5.0, 3.0, 4.0, 3.0, 0.0])) == ["a", "b", "e"]
    # Exact duplicates dominate neither each other.
    assert prune_dominated({"x": 1, "y": 1}, np.array([2.0, 2.0])) == ["x", "y"]


def test_prune_dominated_keeps_the_cheapest_and_the_best_pair():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 8))
        cost = rng.integers(1, 5, k).astype(float)
        loss = rng.integers(0, 5, k).astype(float)
        names = [f"p{j}" for j in range(k)]
        kept = prune_dominated(dict(zip(names, cost)), loss)
        cheapest = min(range(k), key=lambda j: (cost[j], loss[j]))
        best = min(range(k), key=lambda j: (loss[j], cost[j]))
        assert names[cheapest] in kept and names[best] in kept
        # Every dropped pair has a kept pair at least as good in both.
        for j in set(range(k)) - {names.index(n) for n in kept}:
            assert any(
                cost[names.index(n)] <= cost[j] and loss[names.index(n)] <= loss[j] for n in kept
            )


def test_prune_dominated_errors():
    with pytest.raises(BitallocError, match="one loss per pair"):
        prune_dominated({"a": 1, "b": 2}, np.zeros(3))
    with pytest.raises(BitallocError, match="finite"):
        prune_dominated({"a": 1, "b": 2}, np.array([0.0, np.nan]))


def test_intra_layer_pruning_statistics_and_bits_forms():
    prof, bits = _random_profile(1, n=4, k=6, per_layer_bits=False)
    as_map = dict(zip(prof.formats, bits[0]))
    pruning = intra_layer_pruning(prof, as_map)
    for i, unit in enumerate(prof.units):
        assert pruning.kept[unit] == tuple(prune_dominated(as_map, prof.loss[i]))
        assert pruning.allowed[i].sum() == len(pruning.kept[unit])
    assert (pruning.before.decisions, pruning.before.options) == (4, 24)
    assert pruning.before.log10_size == pytest.approx(4 * math.log10(6))
    counts = pruning.allowed.sum(axis=1)
    assert pruning.after.options == counts.sum() < 24
    assert pruning.after.log10_size == pytest.approx(np.log10(counts).sum())
    for same in (bits[0], bits):  # one row for every layer, or a row per layer
        np.testing.assert_array_equal(intra_layer_pruning(prof, same).allowed, pruning.allowed)
    with pytest.raises(BitallocError, match=r"no storage for \['p5'\]"):
        intra_layer_pruning(prof, {f: 1.0 for f in prof.formats[:5]})
    with pytest.raises(BitallocError, match="one value per format"):
        intra_layer_pruning(prof, np.ones(5))


@pytest.mark.parametrize("seed", range(8))
def test_pruning_never_changes_the_optimum(seed):
    integers = seed % 2 == 1  # ties in bits and loss on odd seeds
    prof, bits = _random_profile(seed, n=3, k=5, integers=integers)
    low, high = bits.min(axis=1).sum(), bits.max(axis=1).sum()
    for fraction in (0.0, 0.3, 0.6, 1.0):
        budget = low + fraction * (high - low)
        exact = _brute_force(prof, bits, budget)
        none, pruned = reduction_cost(prof, bits, budget)
        assert none.name == "none" and pruned.name == "pruning"
        assert none.objective == pytest.approx(exact, rel=1e-7, abs=1e-9)
        assert pruned.objective == pytest.approx(exact, rel=1e-7, abs=1e-9)
        assert pruned.space.log10_size <= none.space.log10_size
        assert none.relative_loss == 0 and pruned.relative_loss == pytest.approx(0, abs=1e-7)
        assert pruned.bits <= budget + 1e-9
        assert set(pruned.choice) == set(prof.units)


# -- clustering ----------------------------------------------------------------------------


def _two_kinds(n=6):
    """Layers alternating between two sensitivity shapes (scaled by a little noise)."""
    rng = np.random.default_rng(3)
    calm = np.array([1.0, 0.1, 0.01, 0.0])
    touchy = np.array([50.0, 20.0, 0.5, 0.0])
    loss = np.stack([(touchy if i % 2 else calm) * rng.uniform(0.9, 1.1) for i in range(n)])
    return Profile(tuple(f"l{i}" for i in range(n)), ("p0", "p1", "p2", "p3"), loss)


def test_cluster_layers_groups_similar_layers_deterministically():
    prof = _two_kinds()
    clustering = cluster_layers(prof, 2)
    assert clustering.groups == ((0, 2, 4), (1, 3, 5))
    assert clustering.names == (("l0", "l2", "l4"), ("l1", "l3", "l5"))
    assert clustering.ties == [["l0", "l2", "l4"], ["l1", "l3", "l5"]]
    assert clustering == cluster_layers(prof, 2)
    assert clustering.after.decisions == 2
    assert clustering.after.log10_size == pytest.approx(2 * math.log10(4))
    assert clustering.before.log10_size == pytest.approx(6 * math.log10(4))


@pytest.mark.parametrize("seed", range(4))
def test_cluster_layers_covers_every_layer_once(seed):
    prof, bits = _random_profile(seed, n=7, k=5)
    for k in range(1, 8):
        clustering = cluster_layers(prof, k, bits_per_pair=bits)
        members = sorted(i for group in clustering.groups for i in group)
        assert len(clustering.groups) == k and members == list(range(7))
        assert clustering.after.options <= 5 * k
        assert clustering == cluster_layers(prof, k, bits_per_pair=bits)
    singletons = cluster_layers(prof, 7)
    assert singletons.groups == tuple((i,) for i in range(7)) and singletons.ties == []


def test_cluster_layers_errors():
    prof = _two_kinds()
    for k in (0, 7, True, 2.0):
        with pytest.raises(BitallocError, match=r"integer in 1\.\.6"):
            cluster_layers(prof, k)


# -- the cost of reducing ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_clustered_optimum_is_the_tied_optimum(seed):
    """Pruning each group's summed row keeps the optimum of the tied problem; clustering
    costs what tying costs, never less than nothing."""
    prof, bits = _random_profile(seed, n=4, k=4, per_layer_bits=False)
    clustering = cluster_layers(prof, 2)
    budget = bits.min(axis=1).sum() + 0.5 * (bits.max(axis=1).sum() - bits.min(axis=1).sum())
    none, _, both = reduction_cost(prof, bits, budget, clusters=clustering)
    assert both.name == "pruning+clustering"
    exact = _brute_force(prof, bits, budget, ties=clustering.groups)
    assert both.objective == pytest.approx(exact, rel=1e-7, abs=1e-9)
    assert both.relative_loss == pytest.approx(both.objective / none.objective - 1)
    assert both.relative_loss >= -1e-9
    assert both.space.decisions == 2 and both.space.log10_size <= 2 * math.log10(4)
    for group in clustering.groups:
        assert len({both.choice[prof.units[i]] for i in group}) == 1


def test_tying_can_make_a_budget_infeasible():
    # Each layer has its own cheap pair; tied, no pair is cheap for both.
    prof = Profile(("a", "b"), ("p", "q"), np.array([[1.0, 0.0], [0.0, 1.0]]))
    bits = np.array([[1.0, 2.0], [2.0, 1.0]])
    none, pruned, tied = reduction_cost(prof, bits, 2.0, clusters=1)
    assert none.status == pruned.status == "optimal" and none.objective == 2.0
    assert tied.status == "infeasible" and tied.objective is None
    with pytest.raises(InfeasibleBudgetError):
        reduction_cost(prof, bits, 1.0)
    with pytest.raises(BitallocError, match="cover this profile's layers"):
        reduction_cost(prof, bits, 2.0, clusters=cluster_layers(_two_kinds(), 2))


# -- the default model ---------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_reduction(default_model):
    from bitalloc.data import default_text, tokenize, windows
    from bitalloc.kv import kv_units
    from bitalloc.kv.profiler import KVProfiler

    model, tok = default_model.model, default_model.tokenizer
    ids = windows(tokenize(tok, default_text().calibration), 256, max_tokens=512)
    units = kv_units(model)
    palette = kv_palette()
    prof = KVProfiler("proxy", batch_size=2).profile(model, units, palette, ids)
    bits = {f.name: f.storage_bits(units[0].shape, 256) for f in palette}
    budget = len(units) * bits["K4V4"]
    results = reduction_cost(prof, bits, budget, clusters=6)
    print("\nKV search-space reduction, proxy profile, budget = K4V4 on average")
    for r in results:
        print(
            f"{r.name:<20} decisions {r.space.decisions:>3} options {r.space.options:>4} "
            f"log10 space {r.space.log10_size:6.2f} objective {r.objective:.5g} "
            f"relative loss {r.relative_loss:+.3%}"
        )
    none, pruned, both = results
    assert pruned.relative_loss == pytest.approx(0, abs=1e-7)
    assert pruned.space.log10_size < none.space.log10_size
    assert both.space.log10_size < pruned.space.log10_size and both.relative_loss >= -1e-9
