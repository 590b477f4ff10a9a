"""Key against value sensitivity per layer, read from a KV profile."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.kv.formats import FULL_BITS, KV_BITS, KVFormat, parse_kv_format
from bitalloc.sensitivity.profile import Profile


def key_value_sensitivity(
    profile: Profile, *, group_size: int | None = None, residual: int | None = None
) -> list[dict[str, Any]]:
    """Key vs value sensitivity per layer: for every width ``b`` whose ``K<b>V16`` and
    ``K16V<b>`` are both profiled, ``{"unit": name, "key": {b: loss of K<b>V16}, "value":
    {b: loss of K16V<b>}}``, one dict per profile row.

    When the profile holds these pairs for several (group size, residual) layouts, choose one
    with ``group_size`` and ``residual``.
    """
    parsed = {}
    for j, name in enumerate(profile.formats):
        try:
            parsed[parse_kv_format(name)] = j
        except BitallocError:
            raise BitallocError(
                f"profile column {name!r} is not a KV format; key_value_sensitivity takes a "
                "profile from the KV profiler"
            ) from None
    by_layout: dict[tuple[int, int], dict[int, tuple[int, int]]] = {}
    for layout in {(f.group_size, f.residual) for f in parsed}:
        if group_size not in (None, layout[0]) or residual not in (None, layout[1]):
            continue
        for b in KV_BITS[:-1]:
            key = parsed.get(KVFormat(b, FULL_BITS, *layout))
            value = parsed.get(KVFormat(FULL_BITS, b, *layout))
            if key is not None and value is not None:
                by_layout.setdefault(layout, {})[b] = (key, value)
    if not by_layout:
        raise BitallocError(
            "the profile has no pair of formats K<b>V16 and K16V<b> with the same layout; profile "
            "e.g. K2V16 and K16V2 to compare keys with values"
        )
    if len(by_layout) > 1:
        raise BitallocError(
            f"the profile compares keys and values under several (group size, residual) layouts "
            f"{sorted(by_layout)}; choose one with group_size= and residual="
        )
    (columns,) = by_layout.values()
    return [
        {
            "unit": unit,
            "key": {b: float(profile.loss[i, k]) for b, (k, _) in sorted(columns.items())},
            "value": {b: float(profile.loss[i, v]) for b, (_, v) in sorted(columns.items())},
        }
        for i, unit in enumerate(profile.units)
    ]


def kv_sensitivity_table(profile: Profile, **layout: int | None) -> str:
    """:func:`key_value_sensitivity` as text: one line per layer with the loss of keys alone
    (``K<b>``) and values alone (``V<b>``) at each width, then the mean over layers."""
    rows = key_value_sensitivity(profile, **layout)
    widths = list(rows[0]["key"])
    header = ["layer"] + [f"{side}{b}" for b in widths for side in "KV"]
    lines = [[r["unit"]] + [r[s][b] for b in widths for s in ("key", "value")] for r in rows]
    mean = ["mean"] + [float(np.mean([line[c] for line in lines])) for c in range(1, len(header))]
    name_width = max(len(str(line[0])) for line in [header, *lines, mean])
    text = [f"{header[0]:<{name_width}}" + "".join(f"{h:>11}" for h in header[1:])]
    for line in [*lines, mean]:
        text.append(f"{line[0]:<{name_width}}" + "".join(f"{v:>11.3g}" for v in line[1:]))
    return "\n".join(text)
