"""`sweep`'s outputs: the Pareto front (agreement vs images/s), the console table and the plot."""

from __future__ import annotations

from pathlib import Path

from idle_export.bench.plot import save_png
from idle_export.deps import pip_extra
from idle_export.errors import MissingDependencyError


def pareto_front(rows: list[dict], batch: int) -> list[float]:
    """Keep ratios on the front at `batch`: no other ratio is at least as fast and agrees at least
    as well, being strictly better in one of the two."""
    key = str(batch)
    front = []
    for r in rows:
        speed, agree = r["images_per_s"][key], r["agreement"]
        dominated = any(o is not r and o["images_per_s"][key] >= speed and o["agreement"] >= agree
                        and (o["images_per_s"][key] > speed or o["agreement"] > agree) for o in rows)
        if not dominated:
            front.append(r["keep_rate"])
    return front


def mark_front(report: dict) -> None:
    """Add "pareto": {batch: bool} to every row of the report."""
    batches = report["settings"]["batch"]
    fronts = {b: set(pareto_front(report["results"], b)) for b in batches}
    for r in report["results"]:
        r["pareto"] = {str(b): r["keep_rate"] in fronts[b] for b in batches}


def print_sweep(report: dict, console=None) -> None:
    """The sweep table: one row per keep ratio, then the dense model."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    batches = report["settings"]["batch"]
    own = report["checkpoint"]["keep_rate"]
    chosen = (report.get("choice") or {}).get("keep_rate")
    table = Table(title=f"idle-export sweep: {report['model']} on {report['backend']}, "
                        f"{report['images']['num']} images, {report['settings']['threads']} threads",
                  box=box.SIMPLE_HEAD)
    cols = ["keep", "K", "GMACs", "agree", "acc"]
    cols += [f"img/s\nb={b}" for b in batches] + [f"ms\nb={b}" for b in batches]
    k_width = max(len(_groups(list(r["k_per_layer"].values()))) for r in report["results"])
    for col in cols:
        table.add_column(col, justify="left" if col == "K" else "right", no_wrap=True,
                         min_width=k_width if col == "K" else None)
    for r in report["results"]:
        marks = ("*" if own is not None and abs(r["keep_rate"] - own) < 1e-9 else "") + (
            "<" if chosen is not None and r["keep_rate"] == chosen else "")
        table.add_row(f"{r['keep_rate']:g}{marks}", _groups(list(r["k_per_layer"].values())),
                      f"{r['gmacs']:.3f}", f"{r['agreement']:.1%}",
                      "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}",
                      *[f"{r['images_per_s'][str(b)]:.1f}" + ("" if r.get("pareto", {}).get(str(b), True)
                                                               else "·") for b in batches],
                      *[f"{r['latency_ms'][str(b)]:.1f}" for b in batches])
    d = report["dense"]
    table.add_row("dense", "-", f"{d['gmacs']:.3f}", "100.0%", "-" if d["accuracy"] is None else
                  f"{d['accuracy']:.1%}", *[f"{d['images_per_s'][str(b)]:.1f}" for b in batches],
                  *[f"{d['latency_ms'][str(b)]:.1f}" for b in batches])
    console.print(table)
    notes = []
    if own is not None and any(abs(r["keep_rate"] - own) < 1e-9 for r in report["results"]):
        notes.append(f"* the checkpoint's own keep rate ({own:g})")
    if chosen is not None:
        notes.append("< the chosen ratio")
    if any(not all(r.get("pareto", {}).values()) for r in report["results"]):
        notes.append("· off the Pareto front (another ratio is as fast and agrees as well)")
    console.print("; ".join(notes) + f". K: per group of idle layers. ms: median call. Labels: "
                  f"{report['images']['labels_from']}.")


def _groups(ks: list[int]) -> str:
    """K per idle layer without repeats: 137,137,137,96,96,96 → 137,96 (the JSON has every layer)."""
    out: list[int] = []
    for k in ks:
        if not out or out[-1] != k:
            out.append(k)
    return ",".join(map(str, out))


def import_matplotlib():
    """matplotlib, or a one-line error naming the extra that brings it (exit 3)."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("plot= needs matplotlib", pip_extra("plot")) from None
    return matplotlib


def plot_sweep(report: dict, path: Path) -> Path:
    """Agreement vs images/s, one panel per batch size: every ratio, the Pareto front, the
    checkpoint's own ratio (star) and the dense model (black diamond)."""
    import_matplotlib().use("Agg")
    import matplotlib.pyplot as plt

    batches = report["settings"]["batch"]
    rows = report["results"]
    own = report["checkpoint"]["keep_rate"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        key = str(b)
        xs = [r["images_per_s"][key] for r in rows]
        ys = [100 * r["agreement"] for r in rows]
        ax.plot(xs, ys, "o", color="tab:blue", label="keep ratio")
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"{r['keep_rate']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = sorted((r for r in rows if r["keep_rate"] in pareto_front(rows, b)),
                       key=lambda r: r["images_per_s"][key])
        ax.plot([r["images_per_s"][key] for r in front], [100 * r["agreement"] for r in front], "-",
                color="tab:blue", alpha=0.5, label="Pareto front")
        mine = [r for r in rows if own is not None and abs(r["keep_rate"] - own) < 1e-9]
        if mine:
            ax.plot([mine[0]["images_per_s"][key]], [100 * mine[0]["agreement"]], "*", markersize=16,
                    color="tab:orange", label=f"checkpoint's ratio {own:g}")
        ax.plot([report["dense"]["images_per_s"][key]], [100.0], "D", color="black", label="dense")
        ax.set_xlabel("images / s")
        ax.set_ylabel("top-1 agreement with dense (%)")
        ax.set_title(f"batch {b}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{report['model']} — {report['backend']}, {report['settings']['threads']} threads, "
                 f"{report['images']['num']} images", fontsize=10)
    return save_png(fig, path)
