"""`sweep`'s ratio list, and picking one ratio for a latency budget or an agreement floor.

--ratios: "0.5:0.9:0.1" (start:stop:step, stop included) or "0.5,0.6,0.7"; each in (0, 1].
Picking (from the sweep's rows):
  * --latency-ms X at one batch size N: among the ratios whose median call latency at N is ≤ X,
    the best top-1 agreement with the dense model (equal agreement: the higher ratio, the one
    nearer the dense model);
  * --min-agreement A: among the ratios with agreement ≥ A, the fastest (the most images/s at the
    largest batch size swept; equal speed: the higher agreement);
  * both: ratios meeting both, the best agreement.
When none qualifies the answer names the closest ratio (the smallest shortfall) and its figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from idle_export.errors import BadInputError

DEFAULT_RATIOS = "0.5:1:0.1"


def parse_ratios(text: str, name: str = "ratios") -> list[float]:
    """Sorted, distinct keep ratios from "start:stop:step" or a comma list; (0, 1] each. Errors
    name the parameter `name=` (the CLI prints its flag)."""
    text = (text or "").replace(" ", "")
    what = f"{name}="
    hint = f"e.g. {what}0.5:0.9:0.1 or {what}0.5,0.6,0.7"
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not step > 0 or stop < start:
                raise BadInputError(f"{what}{text!r}: the step must be > 0 and stop ≥ start", hint)
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p != ""]
    except ValueError:
        raise BadInputError(f"{what}{text!r} is not start:stop:step or a comma-separated list",
                            hint) from None
    if not values:
        raise BadInputError(f"{what}{text!r} names no ratio", hint)
    for v in values:
        if math.isnan(v) or not 0.0 < v <= 1.0:
            raise BadInputError(f"{what}: keep ratio {v:g} is outside (0, 1]",
                                "keep ratios are fractions of the patch tokens, e.g. 0.5 to 1")
    return sorted(set(values))


@dataclass
class Choice:
    """The outcome of picking: the row (or the closest one) and why."""

    met: bool
    row: dict
    reason: str
    constraint: str

    def to_json(self) -> dict:
        return {"met": self.met, "keep_rate": self.row["keep_rate"], "constraint": self.constraint,
                "reason": self.reason}


def _figures(row: dict, batch: int | None, last: int) -> str:
    parts = [f"agreement {row['agreement']:.1%}"]
    if row.get("accuracy") is not None:
        parts.append(f"accuracy {row['accuracy']:.1%}")
    if batch is not None:
        parts.append(f"{row['latency_ms'][str(batch)]:.2f} ms per call at batch {batch}")
    parts.append(f"{row['images_per_s'][str(last)]:.1f} images/s at batch {last}")
    return ", ".join(parts)


def check_choice_options(batches: list[int], *, latency_ms: float | None = None,
                         min_agreement: float | None = None) -> None:
    """One-line errors for picking options that cannot work, before any sweep runs."""
    if latency_ms is not None and (math.isnan(latency_ms) or latency_ms <= 0):
        raise BadInputError(f"latency_ms={latency_ms:g} must be > 0", "e.g. latency_ms=20")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise BadInputError(f"min_agreement={min_agreement:g} is outside [0, 1]",
                            "a fraction of the images, e.g. min_agreement=0.99")
    if latency_ms is not None and len(batches) != 1:
        raise BadInputError(f"latency_ms= needs one batch size, got batches={','.join(map(str, batches))}",
                            "pass the batch size the budget is for, e.g. batches=1")


def choose_ratio(rows: list[dict], batches: list[int], *, latency_ms: float | None = None,
                 min_agreement: float | None = None) -> Choice:
    """Pick the row for the constraint (see the module docstring)."""
    if latency_ms is None and min_agreement is None:
        raise BadInputError("nothing to choose by", "pass latency_ms=X batches=N or min_agreement=A")
    check_choice_options(batches, latency_ms=latency_ms, min_agreement=min_agreement)
    batch = batches[0] if latency_ms is not None else None
    last = max(batches)
    wants = []
    if latency_ms is not None:
        wants.append(f"≤ {latency_ms:g} ms per call at batch {batch}")
    if min_agreement is not None:
        wants.append(f"agreement ≥ {min_agreement:.1%}")
    constraint = " and ".join(wants)

    def shortfall(row: dict) -> float:  # 0 when the row meets every constraint
        miss = 0.0
        if latency_ms is not None:
            miss += max(0.0, row["latency_ms"][str(batch)] / latency_ms - 1.0)
        if min_agreement is not None:
            miss += max(0.0, min_agreement - row["agreement"])
        return miss

    ok = [r for r in rows if shortfall(r) == 0.0]
    if not ok:
        closest = min(rows, key=lambda r: (shortfall(r), -r["keep_rate"]))
        return Choice(False, closest, f"no keep ratio meets {constraint}; the closest is "
                      f"{closest['keep_rate']:g} ({_figures(closest, batch, last)})", constraint)
    if latency_ms is not None:
        best = max(ok, key=lambda r: (r["agreement"], r["keep_rate"]))
        why = "the best agreement with the dense model among the ratios within the budget"
    else:
        best = max(ok, key=lambda r: (r["images_per_s"][str(last)], r["agreement"]))
        why = f"the fastest at batch {last} among the ratios that agree enough"
    return Choice(True, best, f"keep ratio {best['keep_rate']:g} meets {constraint} and is {why} "
                  f"({len(ok)} of {len(rows)} qualify): {_figures(best, batch, last)}", constraint)
