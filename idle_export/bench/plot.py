"""images/s vs batch per backend, as a PNG (matplotlib, the `plot` extra)."""

from __future__ import annotations

import io
from pathlib import Path

from idle_export.deps import pip_extra
from idle_export.errors import MissingDependencyError
from idle_export.fileio import atomic_write_bytes


def require_matplotlib():
    """matplotlib, or exit 3 naming the `plot` extra: called before a benchmark that will plot,
    so a missing extra does not cost the whole run."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("plot= needs matplotlib", pip_extra("plot")) from None
    return matplotlib


def plot_report(report: dict, path: Path) -> Path:
    """images/s vs batch per backend: idle (solid), dense (dashed), dense × FLOP ideal (dotted)."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(backends), figsize=(5.2 * len(backends), 4.2), squeeze=False)
    ideal = report["flops"]["ideal"]
    for ax, backend in zip(axes[0], backends, strict=True):
        rows = [r for r in report["results"] if r["backend"] == backend]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        dense_rows = sorted((r for r in rows if r["variant"] == "dense"), key=lambda r: r["batch"])
        for var in variants:
            pts = sorted((r for r in rows if r["variant"] == var), key=lambda r: r["batch"])
            ax.plot([p["batch"] for p in pts], [p["images_per_s"] for p in pts],
                    marker="o", linestyle="--" if var.startswith("dense") else "-", label=var)
        if dense_rows:
            xs = [r["batch"] for r in dense_rows]
            for name, factor in (("official", ideal["official"]), ("folded", ideal["folded"])):
                if name == "folded" and "idle-folded" not in variants:
                    continue
                ax.plot(xs, [r["images_per_s"] * factor for r in dense_rows], linestyle=":",
                        color="grey" if name == "official" else "black",
                        label=f"ideal ({name} scores, dense × {factor:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(backend)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    n = report["settings"]["threads"]
    fig.suptitle(f"{report['model']} — {n} thread{'s' if n != 1 else ''}", fontsize=10)
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """A matplotlib figure as a PNG, written atomically, the figure closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
