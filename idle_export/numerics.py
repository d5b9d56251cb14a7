"""Non-finite numbers (NaN, ±inf): found in weights or outputs and named, never passed silently;
reports keep valid JSON (null where a figure is not a number, with the fields listed)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def nonfinite_counts(named: Iterable[tuple[str, np.ndarray]]) -> list[tuple[str, int, int, int]]:
    """(name, NaN count, inf count, size) of every floating array that has non-finite values."""
    found = []
    for name, array in named:
        a = np.asarray(array)
        if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
            continue
        nan = int(np.isnan(a).sum())
        inf = int(np.isinf(a).sum())
        if nan or inf:
            found.append((name, nan, inf, int(a.size)))
    return found


def describe_nonfinite(found: list[tuple[str, int, int, int]], most: int = 3) -> str:
    """'head.bias (10 NaN of 10), blocks.0.mlp.fc1.weight (2 inf of 294912) and 1 more'."""
    parts = []
    for name, nan, inf, size in found[:most]:
        what = " + ".join(f"{n:,} {w}" for n, w in ((nan, "NaN"), (inf, "inf")) if n)
        parts.append(f"{name} ({what} of {size:,})")
    more = f" and {len(found) - most} more" if len(found) > most else ""
    return ", ".join(parts) + more


def json_safe(value, path: str = "", found: list[str] | None = None):
    """`value` with every NaN/inf float replaced by None (JSON has no such numbers); the
    dotted paths of the replaced fields are appended to `found`."""
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        if found is not None:
            found.append(f"{path or '.'} = {float(value)}")
        return None
    if isinstance(value, dict):
        return {k: json_safe(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value
