"""`serve bench --plot`: images/s and p99 latency against concurrency, one line per model and batch."""

from __future__ import annotations

from pathlib import Path

from idle_export.bench.plot import require_matplotlib, save_png


def plot_load(report: dict, path: Path) -> Path:
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (thr, lat) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    keys = list(dict.fromkeys((r["model"], r["batch"]) for r in report["rows"]))
    for model, batch in keys:
        rows = sorted((r for r in report["rows"] if (r["model"], r["batch"]) == (model, batch)),
                      key=lambda r: r["Concurrency"])
        conc = [r["Concurrency"] for r in rows]
        label = f"{model}, batch {batch}"
        thr.plot(conc, [r["images_per_second"] for r in rows], marker="o", label=label)
        lat.plot(conc, [(r["p99 latency"] or 0) / 1e3 for r in rows], marker="o", label=label)
    for ax, title, unit in ((thr, "throughput", "images/s"), (lat, "p99 latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"closed-loop load, {report['url']} ({report['protocol']})")
    return save_png(fig, path)
