"""The machine's measured speeds a resource plan divides its work by."""

from __future__ import annotations

import math

import pytest

from bitalloc.formats import parse_format
from bitalloc.streaming.speed import Speed, cpu_ticks, machine_speed, median_seconds, steal_share


def test_measured_speeds_are_positive_and_rounding_has_a_cost_per_call():
    fmt = parse_format("int4-g32")
    speed = machine_speed([fmt, parse_format("fp16")])
    assert speed.flops > 1e8
    assert list(speed.rounding) == [fmt.name]  # nothing to round in a float format
    assert speed.rounding[fmt.name] > 1e5
    assert speed.per_call[fmt.name] >= 0
    assert 1e8 < speed.convert < math.inf
    assert 0 <= speed.steal <= 1
    # The per-call cost is paid once per call, the rest per weight.
    one = speed.rounding_seconds(fmt.name, 1_000_000)
    ten = speed.rounding_seconds(fmt.name, 1_000_000, calls=10)
    assert ten - one == pytest.approx(9 * speed.per_call[fmt.name])


def test_a_speed_without_call_costs_is_all_per_weight():
    speed = Speed(flops=1e10, rounding={"int4-g32": 2e7})
    assert speed.rounding_seconds("int4-g32", 4e7, calls=100) == pytest.approx(2.0)


def test_median_seconds_repeats_short_work_and_times_one_call():
    calls = []
    seconds = median_seconds(lambda: calls.append(1))
    assert len(calls) > 100  # each sample repeats the work for a tenth of a second
    assert 0 < seconds < 1e-3


def test_steal_share_is_the_stolen_part_of_the_ticks():
    assert steal_share((10, 1000), (30, 1100)) == pytest.approx(0.2)
    assert steal_share((5, 5), (5, 5)) == 0.0
    stolen, total = cpu_ticks()
    assert 0 <= stolen <= total
