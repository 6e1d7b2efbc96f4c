"""The evaluation plot: probe accuracy against label fraction, one line per method.

One panel per (downstream task, architecture); each point is the mean over seeds with the
standard deviation as an error bar; the x axis is logarithmic (label fractions span 0.1% to
10% and more). The teacher is one fixed network, not an architecture: it is drawn dashed in
every panel of its task, as the ceiling. A method keeps its colour in every panel.
matplotlib is imported here only, with the file-only ``Agg`` backend.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ddkd.io.atomic import atomic_path


def plot_results(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Write a PNG of ``rows`` (as in results.json: method, arch, downstream, fraction,
    accuracy) to ``path``, atomically."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["downstream"], r["arch"]) for r in rows
                                if r["arch"] != "teacher"))
    if not panels:  # only the teacher was evaluated
        panels = list(dict.fromkeys((r["downstream"], r["arch"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    width = 5.0 * len(panels) + 3.6  # the legend sits to the right of the panels
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.2), squeeze=False)
    for ax, (task, arch) in zip(axes[0], panels, strict=False):
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["downstream"] == task
                    and r["arch"] in (arch, "teacher")]
            fractions = sorted({r["fraction"] for r in mine})
            if not fractions:
                continue
            accs = [[100 * r["accuracy"] for r in mine if r["fraction"] == f] for f in fractions]
            means = [statistics.mean(a) for a in accs]
            stds = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
            fixed = mine[0]["arch"] == "teacher"
            ax.errorbar([100 * f for f in fractions], means, yerr=stds, marker="o", ms=4,
                        capsize=3, label=method, color="black" if fixed else colours[method],
                        linestyle="--" if fixed else "-")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("labelled fraction of the training set (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{task}, {arch}" + (f" ({title})" if title else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    _save(fig, axes, width, path)


def plot_budget(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Write the pre-training budget curve (``ddkd.eval.budget``) as a PNG, atomically.

    One panel per (task, architecture, label fraction): probe accuracy against pre-training
    SGD steps (log scale), mean over seeds with the standard deviation as a band, one line
    per KD-trained method; a set's own steps (the standard recipe) are a star on its line.
    No pre-training and the teacher, which take no steps, are horizontal dashed lines.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    curve = [r for r in rows if r.get("steps")]
    flat = [r for r in rows if r.get("baseline") in ("none", "teacher")]
    panels = list(dict.fromkeys((r["downstream"], r["arch"], r["fraction"]) for r in curve))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    width = 4.6 * len(panels) + 3.6
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(width, 4.2), squeeze=False)
    for ax, (task, arch, fraction) in zip(axes[0], panels, strict=False):
        here = [r for r in curve if r["downstream"] == task and r["arch"] == arch
                and r["fraction"] == fraction]
        for method in dict.fromkeys(r["method"] for r in here):
            mine = [r for r in here if r["method"] == method]
            steps = sorted({r["steps"] for r in mine})
            accs = [[100 * r["accuracy"] for r in mine if r["steps"] == s] for s in steps]
            means = [statistics.mean(a) for a in accs]
            stds = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
            ax.plot(steps, means, marker="o", ms=3, label=method, color=colours[method])
            ax.fill_between(steps, [m - s for m, s in zip(means, stds, strict=True)],
                            [m + s for m, s in zip(means, stds, strict=True)],
                            color=colours[method], alpha=0.15)
            if mine[0].get("baseline") is None:  # a set: its own steps
                own = sorted({r["steps"] for r in mine if r.get("standard")})
                for s in own:
                    ax.plot([s], [means[steps.index(s)]], marker="*", ms=12,
                            color=colours[method])
        for method in dict.fromkeys(r["method"] for r in flat):
            level = [100 * r["accuracy"] for r in flat if r["method"] == method
                     and r["downstream"] == task and r["fraction"] == fraction
                     and r["arch"] in (arch, "teacher")]
            if level:
                ax.axhline(statistics.mean(level), linestyle="--", linewidth=1, label=method,
                           color="black" if "teacher" in method else colours[method])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("pre-training SGD steps")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{task}, {arch}, {100 * fraction:g}% labels"
                     + (f" ({title})" if title else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    _save(fig, axes, width, path)


def _save(fig, axes, width: float, path: str | Path) -> None:
    """One legend to the right of the panels (3.5 inches of ``width``), then an atomic PNG."""
    import matplotlib.pyplot as plt

    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 3.5 / width, 1))
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
