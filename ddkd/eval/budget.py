"""What a set saves: the pre-training budget curve and a set's worth in full-data steps.

MKDT (Joshi et al., ICLR 2025) sells *efficient* pre-training: a few steps on the set should do
what many steps on the full data do. ``ddkd evaluate --pretrain-steps 10,20,...`` pre-trains
every KD method once to the largest budget and probes it at each budget on the way (the data
order is one stream, so a longer run passes through every shorter one), giving accuracy
against SGD steps. A set's **worth** is the number of full-data KD steps whose accuracy equals
the set's own (at the steps of the standard recipe), read off that curve by linear
interpolation in log(steps) between the two budgets that bracket it; its ratio to the set's own
steps says how much pre-training the set saves.

Everything here is a pure function of result rows (as in ``results.json``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Worth:
    """Where an accuracy falls on a budget curve.

    ``relation``: ``"within"`` (``steps`` interpolated between two budgets, or equal to one),
    ``"above"`` (beats every budget: worth more than the largest, ``steps`` is that budget) or
    ``"below"`` (below the smallest budget's accuracy: ``steps`` is that budget).
    """

    steps: float
    relation: str

    def __str__(self) -> str:
        if self.relation == "above":
            return f"> {self.steps:g} (beats every budget)"
        if self.relation == "below":
            return f"< {self.steps:g} (below the smallest)"
        return f"{self.steps:.0f}"

    def short(self) -> str:
        return {"above": f">{self.steps:g}", "below": f"<{self.steps:g}"}.get(
            self.relation, f"{self.steps:.0f}")


def worth_steps(curve: list[tuple[int, float]], accuracy: float) -> Worth:
    """The steps at which ``curve`` (``(steps, accuracy)`` pairs) first reaches ``accuracy``.

    Interpolated linearly in log(steps) between the last budget below ``accuracy`` and the
    first at or above it; a curve that is not monotone is read at its first crossing.

    Example:
        >>> worth_steps([(10, 0.80), (100, 0.90)], 0.85)
        Worth(steps=31.62..., relation='within')
    """
    if not curve:
        raise ValueError("an empty budget curve")
    points = sorted(curve)
    if accuracy < points[0][1]:
        return Worth(float(points[0][0]), "below")
    for (s0, a0), (s1, a1) in zip([(None, None), *points[:-1]], points, strict=True):
        if a1 < accuracy:
            continue
        if s0 is None or a0 is None or a1 == accuracy:  # (a0 is None where s0 is)
            return Worth(float(s1), "within")
        frac = (accuracy - a0) / (a1 - a0)
        return Worth(math.exp(math.log(s0) + frac * (math.log(s1) - math.log(s0))), "within")
    return Worth(float(points[-1][0]), "above")


def _mean(values: list[float]) -> float:
    return statistics.mean(values)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _curve_rows(rows: list[dict]) -> list[dict]:
    """Rows of pre-trained encoders that have a step count (the budget curve's points)."""
    return [r for r in rows if r.get("steps") is not None and r.get("steps", 0) > 0]


def budget_tables(rows: list[dict], fractions: list[float], tasks: list[str]) -> str:
    """Markdown: accuracy at every budget, each set's worth in full-data KD steps, and the
    pre-training seconds of every method, from the rows of an evaluation with budgets."""
    curve = _curve_rows(rows)
    budgets = sorted({r["steps"] for r in curve if r.get("budget")})
    if not budgets:
        return ""
    keys = list(dict.fromkeys((r["method"], r["arch"]) for r in curve))
    out = []
    for task in tasks:
        for fraction in fractions:
            header = (f"| {task} {100 * fraction:g}% labels: steps | arch | "
                      + " | ".join(str(b) for b in budgets) + " | own steps |")
            lines = [header, "|" + "---|" * (3 + len(budgets))]
            for method, arch in keys:
                mine = [r for r in curve if r["method"] == method and r["arch"] == arch
                        and r["downstream"] == task and r["fraction"] == fraction]
                cells = []
                for b in budgets:
                    accs = [100 * r["accuracy"] for r in mine if r["steps"] == b]
                    cells.append(f"{_mean(accs):.1f} ± {_std(accs):.1f}" if accs else "-")
                own = sorted({r["steps"] for r in mine if r.get("standard")})
                lines.append(f"| {method} | {arch} | " + " | ".join(cells) + " | "
                             + (", ".join(map(str, own)) or "-") + " |")
            out.append("\n".join(lines))
    worth = worth_table(rows, fractions, tasks)
    if worth:
        out.append(worth)
    out.append(seconds_table(rows))
    return "\n\n".join(out)


def set_worths(rows: list[dict], fractions: list[float], tasks: list[str]) -> list[dict]:
    """Each synthetic set's worth at every (task, fraction, arch): one dict per cell.

    The set's accuracy is the mean over seeds at its own (standard-recipe) steps; the worth is
    read off the full-data KD curve of the means, and also per seed (each seed's set against
    the same seed's curve) for the spread. ``random_at_own``: random subset + KD at the set's
    own steps, mean over seeds.
    """
    curve = _curve_rows(rows)
    cells: list[dict] = []
    for r in curve:
        if r.get("baseline") is None and r.get("standard"):
            key = (r["method"], r["arch"], r["downstream"], r["fraction"], r["steps"])
            if key not in [c["key"] for c in cells]:
                cells.append({"key": key})
    result = []
    for cell in cells:
        method, arch, task, fraction, own = cell["key"]

        def pick(pred, task=task, fraction=fraction, arch=arch):
            return [r for r in curve if r["downstream"] == task and r["fraction"] == fraction
                    and r["arch"] == arch and pred(r)]

        set_rows = pick(lambda r, m=method, o=own: r["method"] == m and r["steps"] == o)
        full_rows = pick(lambda r: r.get("baseline") == "full")
        if not full_rows:
            continue
        seeds = sorted({r["seed"] for r in set_rows})
        by_steps: dict[int, list[float]] = {}
        for r in full_rows:
            by_steps.setdefault(r["steps"], []).append(r["accuracy"])
        mean_curve = [(s, _mean(a)) for s, a in sorted(by_steps.items())]
        set_acc = _mean([r["accuracy"] for r in set_rows])
        per_seed = []
        for seed in seeds:
            seed_curve = [(r["steps"], r["accuracy"]) for r in full_rows if r["seed"] == seed]
            seed_acc = [r["accuracy"] for r in set_rows if r["seed"] == seed]
            if seed_curve and seed_acc:
                per_seed.append(worth_steps(seed_curve, seed_acc[0]))
        random_own = pick(lambda r, o=own: r.get("baseline") == "random" and r["steps"] == o)
        result.append({
            "method": method, "arch": arch, "downstream": task, "fraction": fraction,
            "own_steps": own, "accuracy": set_acc, "worth": worth_steps(mean_curve, set_acc),
            "per_seed": per_seed,
            "random_at_own": _mean([r["accuracy"] for r in random_own]) if random_own else None,
        })
    return result


def _per_seed_text(per_seed: list[Worth]) -> str:
    if not per_seed:
        return "-"
    within = [w.steps for w in per_seed if w.relation == "within"]
    if len(within) == len(per_seed) and len(within) > 1:
        return f"{_mean(within):.0f} ± {_std(within):.0f}"
    return ", ".join(w.short() for w in per_seed)


def worth_table(rows: list[dict], fractions: list[float], tasks: list[str]) -> str:
    """Markdown: each set's worth in full-data KD steps (from the mean curve; per seed: mean
    +- std, or each seed's value where some fall outside the budgets), and its ratio to the
    set's own steps."""
    worths = set_worths(rows, fractions, tasks)
    if not worths:
        return ""
    lines = ["| set | arch | labels | set acc. (own steps) | full-data KD steps to match | "
             "per seed | worth / own steps | random + KD at own steps |",
             "|---|---|---|---|---|---|---|---|"]
    for w in worths:
        ratio = w["worth"].steps / w["own_steps"]
        ratio_text = {"above": f"> {ratio:.1f}x", "below": f"< {ratio:.1f}x"}.get(
            w["worth"].relation, f"{ratio:.1f}x")
        random = "-" if w["random_at_own"] is None else f"{100 * w['random_at_own']:.1f}"
        lines.append(f"| {w['method']} | {w['arch']} | {w['downstream']} "
                     f"{100 * w['fraction']:g}% | {100 * w['accuracy']:.1f} ({w['own_steps']}) "
                     f"| {w['worth']} | {_per_seed_text(w['per_seed'])} | {ratio_text} "
                     f"| {random} |")
    return "\n".join(lines)


def seconds_table(rows: list[dict]) -> str:
    """Markdown: pre-training wall-clock seconds of every method at its own steps and at each
    budget (mean over seeds; probing excluded)."""
    curve = _curve_rows(rows)
    seen: dict[tuple, dict[int, dict[int, float]]] = {}
    own: dict[tuple, set[int]] = {}
    for r in curve:
        if r.get("train_seconds") is None:
            continue
        key = (r["method"], r["arch"])
        # One encoder per (method, arch, seed, steps): count it once, not once per fraction.
        seen.setdefault(key, {}).setdefault(r["steps"], {})[r["seed"]] = r["train_seconds"]
        if r.get("standard"):
            own.setdefault(key, set()).add(r["steps"])
    steps = sorted({s for d in seen.values() for s in d})
    lines = ["| pre-training seconds | arch | " + " | ".join(str(s) for s in steps) + " |",
             "|" + "---|" * (2 + len(steps))]
    for (method, arch), by_steps in seen.items():
        cells = []
        for s in steps:
            values = list(by_steps.get(s, {}).values())
            mark = "*" if s in own.get((method, arch), set()) else ""
            cells.append(f"{_mean(values):.1f}{mark}" if values else "-")
        lines.append(f"| {method} | {arch} | " + " | ".join(cells) + " |")
    lines.append("\n(* the method's own steps under the standard recipe)")
    return "\n".join(lines)
