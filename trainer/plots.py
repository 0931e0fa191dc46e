"""Small matplotlib figures logged as artifacts (headless backend)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(path: Path, curves: dict[str, list[tuple[int, float]]], *, title: str, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, label=label)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_histograms(path: Path, groups: dict[str, list[float]], *, title: str, xlabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in groups.items():
        if values:
            ax.hist(values, bins=30, alpha=0.5, label=label)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metric_bars(path: Path, systems: dict[str, dict[str, float]], *, title: str,
                     intervals: dict[str, dict[str, tuple[float, float]]] | None = None) -> Path:
    """Grouped bars: one group per metric, one bar per system; `intervals` (system -> metric ->
    (low, high)) draws each mean's 95% interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(systems)
    metrics = sorted({m for v in systems.values() for m in v})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * len(metrics) / 2), 4))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs = [j + i * width for j in range(len(metrics))]
        heights = [systems[n].get(m, 0.0) for m in metrics]
        err = None
        if intervals and n in intervals:
            lo_hi = [intervals[n].get(m, (h, h)) for m, h in zip(metrics, heights)]
            err = [[h - lo for (lo, _), h in zip(lo_hi, heights)], [hi - h for (_, hi), h in zip(lo_hi, heights)]]
        ax.bar(xs, heights, width=width, label=n, yerr=err, capsize=3 if err else 0)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
    ax.set(title=title, ylabel="mean over examples" + (" (95% bootstrap interval)" if intervals else ""))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_grid(path: Path, panels: dict[str, dict[str, list[tuple[int, float]]]], *, title: str,
              xlabel: str = "iteration") -> Path:
    """Several small line charts (panel title -> curves), e.g. reward, KL, length and eval metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, curves) in zip(axes.flat, panels.items()):
        for label, points in curves.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, label=label)
        ax.set(title=name, xlabel=xlabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
