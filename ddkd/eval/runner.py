"""``ddkd evaluate``: pre-train fresh encoders on sets and baselines, probe with few labels.

Every (method, architecture, seed) encoder is pre-trained once and its features of each
downstream task are computed once, then probed at every label fraction. The labelled subsets
depend only on (task, fraction, seed), so every row of the table sees the same labels.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ddkd.config import DEFAULT_BASELINES, EvalConfig
from ddkd.data.datasets import ImageTensors, load_dataset
from ddkd.data.transforms import ZCA, Normalization
from ddkd.errors import ConfigError
from ddkd.eval.baseline_data import (
    BaselineData,
    from_run,
    from_shipped_teacher,
    shipped_teacher_of,
)
from ddkd.eval.budget import budget_tables
from ddkd.eval.labels import label_subset
from ddkd.eval.plot import plot_budget, plot_results
from ddkd.eval.pretrain import build_encoder, pretrain, steps_per_epoch
from ddkd.eval.probe import linear_probe, linear_probe_sgd
from ddkd.io.atomic import write_json, write_text
from ddkd.io.experts import ExpertsFile
from ddkd.io.run import OpenedRun, open_run
from ddkd.io.synthset import SynthSet, load_synthset
from ddkd.io.weights import load_weights
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec
from ddkd.models.resnet import ResNet, ResNetConfig
from ddkd.objectives import Objective, restore_objective
from ddkd.probes import extract_features, knn_accuracy
from ddkd.runtime import (
    Ranks,
    Stream,
    environment_record,
    global_rng_from,
    make_generator,
    sha256_file,
)
from ddkd.ssl_training import SSLSchedule, SSLTrainer, recalibrate_batchnorm
from ddkd.subsets import high_loss_indices
from ddkd.synth.views import initial_view_targets, load_run_teacher, viewed_pairs

log = logging.getLogger(__name__)

_BASELINE_LR = 0.1  # MKDT's learning rate for every baseline trained on real images


@dataclass
class Method:
    """One row of the table: what an encoder is pre-trained on (or is)."""

    name: str
    images: torch.Tensor | None  # (n, C, H, W) in the method's input space; None: no training
    targets: torch.Tensor | None  # (n, D)
    lr: float
    space: Normalization  # how downstream images are mapped into the encoder's input space
    zca: object | None = None
    fixed_encoder: torch.nn.Module | None = None  # the teacher: used as is
    subset_size: int | None = None  # a random subset of images/targets, drawn per seed
    ssl: str | None = None  # train with this SSL objective on uint8 ``images`` (no targets)
    proj_dim: int = 1024  # the SSL projection head's width
    objective: Objective | None = None  # the KD objective of ``targets`` (None: MSE)
    baseline: str | None = None  # the --baselines name; None for a synthetic set
    epochs: int | None = None  # pre-training epochs of this method (None: --epochs)
    # predefined views of a subset baseline: ``targets`` is (N, V, D), one per (image, view)
    views: tuple[str, ...] = ()

    def data(self, seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.subset_size is None or self.images is None:
            return self.images, self.targets
        # One stream for every random-subset method: "random + KD", "random + KD with views"
        # and "random + SSL" of a seed see the same images, so the rows differ only in how
        # those images are used.
        gen = make_generator(seed, Stream.RANDOM_SUBSET)
        idx = torch.randperm(len(self.images), generator=gen)[: self.subset_size]
        images, targets = self.images[idx], None if self.targets is None else self.targets[idx]
        if self.views and targets is not None:  # every (image, view) pair, as a viewed set
            return viewed_pairs(images, targets, self.views)
        return images, targets


def _set_method(path: str, synth: SynthSet) -> Method:
    space = Normalization(tuple(synth.mean.tolist()), tuple(synth.std.tolist()))
    objective = restore_objective(synth.objective, synth.objective_state, synth.target_dim)
    # A set with predefined views pre-trains on every (image, view) pair with its own target
    # (n * V pairs: V times the steps of the same recipe); a plain set on its images.
    images, targets = synth.pairs()
    return Method(Path(path).stem, images, targets, synth.lr, space, synth.zca,
                  objective=objective)


def _baselines(names: list[str], source: BaselineData | None, size: int, shape,
               sets: list[SynthSet], device: torch.device,
               full_epochs: int | None = None) -> list[Method]:
    if names == ["none"] and sets:  # needs no run: a fresh encoder in the set's input space
        return [Method("no pre-training", None, None, 0.0, _set_method("", sets[0]).space,
                       baseline="none")]
    if not names:
        return []
    if source is None:
        raise ConfigError(f"the baselines {','.join(n for n in names if n != 'none')} need the "
                          "teach run: pass --run RUN_DIR (or evaluate a set whose provenance "
                          "names an existing run or the shipped teacher)")
    space = source.normalization
    if tuple(source.images.shape[1:]) != tuple(shape):
        raise ConfigError(f"{source.where} holds {tuple(source.images.shape[1:])} images but "
                          f"the sets are {tuple(shape)}")
    x_all = space(source.images)
    objective = source.objective
    z_all = objective.targets(source.targets)  # the objective's target space
    zca = source.zca
    if zca is not None:  # the run's targets and experts live in whitened space
        x_all = zca(x_all)
    if {"random", "high-loss", "ssl-random"} & set(names) and size > len(x_all):
        raise ConfigError(f"the subset baselines need {size} images (the set's size); "
                          f"{source.where} has {len(x_all)}")
    data = _RealData(source, x_all, z_all, objective, zca, size, sets, device, full_epochs)
    return [_BASELINE_BUILDERS[name](data) for name in names]


@dataclass
class _RealData:
    """The run's images in the encoders' input space and its targets in the objective's."""

    source: BaselineData
    x: torch.Tensor  # (N, C, H, W)
    z: torch.Tensor  # (N, D)
    objective: Objective
    zca: ZCA | None
    size: int  # the subsets' size: the set's
    sets: list[SynthSet]
    device: torch.device
    full_epochs: int | None = None  # --full-epochs: the full-data KD baseline's own epochs


def _no_pretraining(d: _RealData) -> Method:
    return Method("no pre-training", None, None, 0.0, d.source.normalization, baseline="none")


def _random_kd(d: _RealData) -> Method:
    return Method(f"random subset + KD (n={d.size})", d.x, d.z, _BASELINE_LR,
                  d.source.normalization, d.zca, subset_size=d.size, objective=d.objective,
                  baseline="random")


def _random_views_kd(d: _RealData) -> Method:
    """The fair control of a set made with predefined views: the random subset of ``random``
    used as a viewed set: every image under each of the set's views with the teacher's
    target of that viewed image (what ``synthesize --views`` starts its targets from), so
    that it pre-trains on as many (image, view) pairs, for as many steps."""
    views = next(s.views for s in d.sets if s.views)  # checked by _baseline_names
    teacher = load_run_teacher(d.source.teacher_file)
    log.info("random-views: the teacher's targets of the run's %d images under %s",
             len(d.x), ",".join(views))
    z_views = initial_view_targets(views, "teacher", d.z, d.source.images, teacher,
                                   d.source.normalization, d.objective, torch.device("cpu"))
    return Method(f"random subset + KD, {len(views)} views (n={d.size})", d.x, z_views,
                  _BASELINE_LR, d.source.normalization, d.zca, subset_size=d.size,
                  objective=d.objective, baseline="random-views", views=views)


def _high_loss_kd(d: _RealData) -> Method:
    idx = _high_loss_subset(d.source, d.x, d.z, d.objective, d.size, d.sets, d.device)
    return Method(f"high-loss subset + KD (n={d.size})", d.x[idx], d.z[idx], _BASELINE_LR,
                  d.source.normalization, d.zca, objective=d.objective, baseline="high-loss")


def _random_ssl(d: _RealData) -> Method:
    _, _, _, meta = load_weights(d.source.teacher_file)
    # The teacher's own SSL objective where it is recorded; MKDT's otherwise.
    method = meta.get("ssl") or "barlowtwins"
    return Method(f"random subset + SSL ({method}, n={d.size})", d.source.images, None,
                  _BASELINE_LR, d.source.normalization, subset_size=d.size, ssl=method,
                  proj_dim=d.source.proj_dim, baseline="ssl-random")


def _full_kd(d: _RealData) -> Method:
    epochs = "" if d.full_epochs is None else f", {d.full_epochs} epochs"
    return Method(f"full data + KD (n={len(d.x)}{epochs})", d.x, d.z, _BASELINE_LR,
                  d.source.normalization, d.zca, objective=d.objective, baseline="full",
                  epochs=d.full_epochs)


def _teacher(d: _RealData) -> Method:
    state, kind, arch, _ = load_weights(d.source.teacher_file)
    if kind != "resnet":
        raise ConfigError(f"the teacher of {d.source.where} is a {kind!r}; only ResNet "
                          "teachers can be rebuilt for evaluation")
    teacher = ResNet(ResNetConfig(**arch))
    teacher.load_state_dict(state)
    return Method("teacher (ceiling)", None, None, 0.0, d.source.normalization,
                  fixed_encoder=teacher.eval(), baseline="teacher")


#: --baselines name -> the method it builds (names: ddkd.config.BASELINES)
_BASELINE_BUILDERS: dict[str, Callable[[_RealData], Method]] = {
    "none": _no_pretraining, "random": _random_kd, "random-views": _random_views_kd,
    "high-loss": _high_loss_kd,
    "ssl-random": _random_ssl, "full": _full_kd, "teacher": _teacher,
}


def _high_loss_subset(source: BaselineData, x_all: torch.Tensor, z_all: torch.Tensor,
                      objective: Objective, size: int, sets: list[SynthSet],
                      device: torch.device) -> torch.Tensor:
    """MKDT's high-loss selection (``ddkd.subsets``) over the run's images -> positions.

    A set initialised high-loss from the same experts already holds exactly this subset (its
    ``init_indices``): it is reused rather than recomputed.
    """
    position = {int(i): p for p, i in enumerate(source.indices.tolist())}
    for synth in sets:
        prov = synth.provenance
        if (prov.get("init") == "high-loss"
                and prov.get("experts_checksum") == source.experts_checksum
                and synth.init_indices is not None and len(synth.init_indices) == size):
            return torch.tensor([position[int(i)] for i in synth.init_indices.tolist()])
    if source.experts_file is None:
        raise ConfigError(f"the high-loss baseline needs the experts, and {source.where} has "
                          "none: pass --run RUN_DIR, or leave high-loss out of --baselines")
    with ExpertsFile(source.experts_file) as experts:
        student = ConvNet(ConvNetConfig(**experts.header.student)).to(device)
        spec: ParamSpec = experts.header.param_spec
        snapshots = [experts.snapshot(k, 1) for k in range(len(experts))]
    log.info("selecting the %d highest-loss images of %s", size, source.where)
    return high_loss_indices(student, spec, snapshots, x_all.to(device), z_all.to(device), size,
                             objective.to(device).per_example_loss)


def _downstream(name: str, data_root: str | None, shape) -> tuple[ImageTensors, ImageTensors]:
    train = load_dataset(name, "train", data_root)
    test = load_dataset(name, "test", data_root)
    if tuple(train.shape) != tuple(shape):
        raise ConfigError(
            f"--downstream {name} has {tuple(train.shape)} images but the encoders take "
            f"{tuple(shape)}; ddkd does not resize or convert channels silently: evaluate on a "
            "task of the same size and channel count (e.g. the set's source dataset)"
        )
    return train, test


def run_evaluate(
    sets: list[str],
    config: EvalConfig,
    out: str | Path,
    device: torch.device,
    run_dir: str | None = None,
    progress: bool = True,
    command: list[str] | None = None,
    dist: Ranks | None = None,
) -> dict:
    """Evaluate ``sets`` and ``config.baselines``; writes results.{json,csv,md,png} into
    ``out``. ``run_dir``: the teach run of the baselines (default: the sets' own).

    ``dist`` (``--devices``): the (method, architecture, seed) encoders are dealt out across
    processes (job i to rank i mod world size); rank 0 gathers every row and writes.

    ``config.pretrain_steps`` (``--pretrain-steps``): every KD-trained method is also probed
    after each of these numbers of SGD steps (``ddkd.eval.budget``); the full-data KD baseline
    is added, and results.md gains the budget tables and each set's worth, budget.png the
    curves.

    Every finished encoder's rows are appended to ``out/jobs.jsonl`` at once, so that a rerun
    of the same evaluation (same configuration and set files) redoes none of them.
    """
    t0 = time.time()
    dist = dist or Ranks()
    out = prepare_out(out)
    plan = prepare(sets, run_dir, config, device)
    rows = evaluate_jobs(plan, out, progress, dist)
    if rows is None:  # another process's rows: rank 0 writes them
        return {"out": str(out), "rank": dist.rank}
    table = write_results(out, plan, rows, {**environment_record(device), "command": command})
    return {"out": str(out), "table": table, "seconds": round(time.time() - t0, 1),
            "rows": len(rows)}


@dataclass
class _Plan:
    """Everything ``evaluate`` decided and opened before the first encoder is trained."""

    jobs: _JobPlan
    methods: list[Method]
    archs: list[str]
    seeds: int
    record: dict  # the resolved evaluation, as results.json records it
    set_paths: list[str]


def prepare(sets: list[str], run_dir: str | None, config: EvalConfig,
            device: torch.device) -> _Plan:
    """Open the sets and the baselines' run, build every method and the labelled subsets of
    every task (refusing what cannot be evaluated before any training)."""
    loaded = [(path, load_synthset(path)) for path in sets]
    if config.views:  # before any work: every set must hold the per-view targets asked for
        loaded = [(path, s.select_views(config.views, where=path)) for path, s in loaded]
    if not loaded and not config.baselines:
        raise ConfigError("nothing to evaluate: give a synthetic set and/or --baselines")
    shapes = {tuple(s.images.shape[1:]) for _, s in loaded}
    if len(shapes) > 1:
        raise ConfigError(f"the sets have different image shapes {sorted(shapes)}; evaluate "
                          "them separately")
    if run_dir is None and loaded:
        candidate = loaded[0][1].provenance.get("run")
        run_dir = candidate if candidate and Path(candidate).is_dir() else None
    shipped = bool(run_dir is None and loaded and shipped_teacher_of(loaded[0][1]) is not None)
    baselines = _baseline_names(config, run_dir, loaded, shipped)
    opened = open_run(run_dir) if not loaded and run_dir is not None else None
    shape = shapes.pop() if shapes else None
    if shape is None:
        if opened is None:
            raise ConfigError("baselines alone need --run RUN_DIR")
        shape = tuple(opened.images.shape[1:])
    size = len(loaded[0][1]) if loaded else None
    if size is None and "random" in baselines:
        raise ConfigError("the random baseline takes its size from a set: give one")
    methods = [_set_method(p, s) for p, s in loaded]
    source = None
    if [b for b in baselines if b != "none"]:
        source = (from_run(run_dir) if run_dir is not None else
                  from_shipped_teacher(loaded[0][1], loaded[0][0], config.data_root, device)
                  if shipped else None)
    if config.full_epochs is not None and "full" not in baselines:
        raise ConfigError("--full-epochs sets the full-data KD baseline's epochs, but it is not "
                          "evaluated: add full to --baselines (or give --pretrain-steps)")
    methods += _baselines(baselines, source, size or 0, shape, [s for _, s in loaded], device,
                          config.full_epochs)
    tasks = {name: _downstream(name, config.data_root, shape)
             for name in _downstream_names(config, loaded, opened)}
    jobs = _job_plan(config, tasks, shape, loaded, device)
    record = {"sets": sets, "run": run_dir, "baselines": baselines, "downstream": list(tasks),
              "fractions": list(config.fractions), "seeds": config.seeds,
              "archs": list(config.archs), "probe": config.probe, "epochs": config.epochs,
              "stratified": config.stratified, "pretrain_steps": jobs.budgets or None}
    if config.views:
        record["views"] = list(config.views)
    if config.full_epochs is not None:  # only when given: journals of earlier evaluations hold
        record["full_epochs"] = config.full_epochs
    return _Plan(jobs, methods, list(config.archs), config.seeds, record, sets)


def _baseline_names(config: EvalConfig, run_dir: str | None, loaded: list, shipped: bool
                    ) -> list[str]:
    """The baselines to train: those asked for, or the default (every one but the costly
    full-data one; only none when the sets' run is not here); full is added for the budget
    curve, whose reference it is."""
    budgets = config.pretrain_steps
    if config.baselines is not None:
        baselines = list(config.baselines)
    else:
        baselines = list(DEFAULT_BASELINES)
        if run_dir is None and loaded and not shipped:
            log.warning("the teach run of %s is not here (%s): comparing with no pre-training "
                        "only; pass --run RUN_DIR for the other baselines", loaded[0][0],
                        loaded[0][1].provenance.get("run"))
            baselines = ["none"]
        elif any(s.views for _, s in loaded):  # a viewed set's fair control
            baselines.insert(baselines.index("random") + 1, "random-views")
    if "random-views" in baselines and not any(s.views for _, s in loaded):
        raise ConfigError("--baselines random-views is the control of a set made with "
                          "`ddkd synthesize --views`, and none of the sets has views; expected "
                          "a viewed set, or leave random-views out")
    if budgets and "full" not in baselines:
        log.info("--pretrain-steps: adding the full-data KD baseline (the curve's reference)")
        baselines = [*baselines, "full"]
    if budgets and run_dir is None and not shipped:
        raise ConfigError("--pretrain-steps measures sets against full-data KD, which needs "
                          "the teach run's images and targets: pass --run RUN_DIR")
    return baselines


def _downstream_names(config: EvalConfig, loaded: list, opened: OpenedRun | None
                      ) -> list[str]:
    """The tasks to probe on: those asked for, or the dataset the sets were distilled from."""
    if config.downstream is not None:
        return list(config.downstream)
    source = (loaded[0][1].provenance.get("source_dataset") if loaded
              else typing.cast(OpenedRun, opened).dataset)  # (no sets: the run is opened)
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{loaded[0][0]} does not name the dataset it was distilled from "
                          "(provenance.source_dataset): give --downstream NAME")
    return [source]


def _job_plan(config: EvalConfig, tasks: dict, shape, loaded: list,
              device: torch.device) -> _JobPlan:
    """The labelled subsets (refusing impossible fractions before any training) and what
    every job shares. Only the labelled training images are ever probed, so only their
    features are computed."""
    labelled = {(task, f, seed): label_subset(train.labels, f, seed, train.num_classes,
                                              config.stratified)
                for task, (train, _) in tasks.items() for f in config.fractions
                for seed in range(config.seeds)}
    # An encoder of seed s is probed with seed s's labels only: its features of those images.
    needed = {(task, seed): torch.unique(torch.cat([idx for (t, _, s), idx in labelled.items()
                                                    if t == task and s == seed]))
              for task in tasks for seed in range(config.seeds)}
    student = loaded[0][1].provenance.get("student") if loaded else None
    return _JobPlan(tasks, labelled, needed, list(config.fractions), config.probe, shape,
                    student, config.epochs, list(config.pretrain_steps or []), device)


def evaluate_jobs(plan: _Plan, out: Path, progress: bool, dist: Ranks) -> list[dict] | None:
    """Train and probe this process's (method, arch, seed) jobs, those not in the journal
    yet; -> every row, in job order (on rank 0; None on the others)."""
    # The teacher is one fixed network: one row, whatever --arch says (seeds vary the labels).
    jobs = [(m, "teacher" if m.fixed_encoder is not None else a, s) for m in plan.methods
            for a in (plan.archs[:1] if m.fixed_encoder is not None else plan.archs)
            for s in range(plan.seeds)]
    mine = [(i, job) for i, job in enumerate(jobs) if i % dist.world == dist.rank]
    journal = _Journal(out / ("jobs.jsonl" if dist.world == 1 else f"jobs-{dist.rank}.jsonl"),
                       _journal_key(plan.record, plan.set_paths))
    done = journal.load()
    if done:
        log.info("resuming: %d of %d encoders already evaluated in %s", len(done), len(mine),
                 journal.path)
    rows = []
    bar = tqdm(mine, desc="evaluate", unit="encoder", leave=False,
               disable=not (progress and dist.is_main and sys.stderr.isatty()))
    for job_index, (method, arch, seed) in bar:
        bar.set_postfix(method=method.name[:24], arch=arch, seed=seed)
        key = f"{method.name}|{arch}|{seed}"
        if key not in done:
            job_rows = _job_rows(plan.jobs, method, arch, seed)
            journal.append(key, job_rows)
            done[key] = job_rows
        for i, r in enumerate(done[key]):
            rows.append({**r, "_order": (job_index, i)})
    if dist.world > 1:  # every process's rows, in the order one process writes them
        rows = sorted((r for part in dist.gather(rows) for r in part),
                      key=lambda r: r["_order"])
        if not dist.is_main:
            return None
    return [{k: v for k, v in r.items() if k != "_order"} for r in rows]


def write_results(out: Path, plan: _Plan, rows: list[dict], environment: dict) -> str:
    """results.{json,csv,md,png} (and budget.png with budgets); -> the markdown table."""
    fractions, tasks, budgets = plan.jobs.fractions, list(plan.jobs.tasks), plan.jobs.budgets
    standard = [r for r in rows if r["standard"]]
    table = markdown_table(standard, fractions, tasks)
    paired = paired_tables(standard, fractions, tasks)
    if paired:
        table += "\n\n" + paired
    curve = budget_tables(rows, fractions, tasks) if budgets else ""
    if curve:
        table += "\n\n## Pre-training budget (probe accuracy against SGD steps)\n\n" + curve
    write_json(out / "results.json", {"config": plan.record, "rows": rows,
                                      "environment": environment})
    _write_csv(out / "results.csv", rows)
    write_text(out / "results.md", table + "\n")
    title = f"{plan.jobs.probe} probe, {plan.seeds} seed(s)"
    plot_results(standard, out / "results.png", title=title)
    if budgets:
        plot_budget(rows, out / "budget.png", title=title)
    return table


def prepare_out(out: str | Path) -> Path:
    """Create the output folder and prove it writable before any work (a failure after
    minutes of pre-training would lose them)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write there ({err.strerror or err}); give a "
                          "writable folder") from None
    return out


@dataclass
class _JobPlan:
    """What every (method, arch, seed) job needs besides its method: decided once."""

    tasks: dict[str, tuple[ImageTensors, ImageTensors]]
    labelled: dict[tuple[str, float, int], torch.Tensor]
    needed: dict[tuple[str, int], torch.Tensor]  # (task, seed): the labelled images, sorted
    fractions: list[float]
    probe: str
    shape: tuple[int, int, int]
    student: dict | None
    epochs: int
    budgets: list[int]
    device: torch.device


def _job_rows(plan: _JobPlan, method: Method, arch: str, seed: int) -> list[dict]:
    """Pre-train (or take) one encoder and probe it: rows of every task x fraction, at the
    standard recipe's steps and, with budgets, at each budget on the way."""
    info = {"method": method.name, "baseline": method.baseline, "arch": arch, "seed": seed,
            "lr": method.lr}
    if method.fixed_encoder is not None or method.images is None or method.ssl is not None:
        start = time.perf_counter()
        encoder, loss = _encoder(method, arch, seed, plan.shape, plan.student, plan.epochs,
                                 plan.device)
        seconds = None if method.images is None else round(time.perf_counter() - start, 3)
        steps = 0 if method.images is None and method.fixed_encoder is None else None
        return _probe_rows(plan, encoder, method, seed, {
            **info, "steps": steps, "standard": True, "budget": False,
            "train_seconds": seconds, "pretrain_final_loss": loss})
    images, targets = typing.cast(tuple[torch.Tensor, torch.Tensor], method.data(seed))
    encoder = _fresh_encoder(method, arch, seed, plan.shape, plan.student, targets)
    encoder = encoder.to(plan.device)
    epochs = method.epochs or plan.epochs
    own = epochs * steps_per_epoch(len(images), 256, encoder)
    marks = set(plan.budgets) | {own}
    rows: list[dict] = []
    clock = {"train": 0.0, "since": time.perf_counter()}

    def at_step(step: int) -> None:
        if step not in marks:
            return
        clock["train"] += time.perf_counter() - clock["since"]
        rows.extend(_probe_rows(plan, encoder, method, seed, {
            **info, "steps": step, "standard": step == own, "budget": step in plan.budgets,
            "train_seconds": round(clock["train"], 3), "pretrain_final_loss": None}))
        encoder.train()
        clock["since"] = time.perf_counter()

    loss_fn = method.objective.to(plan.device).loss if method.objective is not None else None
    losses = pretrain(encoder, images.to(plan.device), targets.to(plan.device), method.lr,
                      seed, steps=max(marks), on_step=at_step, loss_fn=loss_fn)
    for r in rows:  # the standard recipe's last epoch is epoch ``epochs`` of the longer run
        if r["standard"]:
            r["pretrain_final_loss"] = losses[epochs - 1]
    return rows


def _probe_rows(plan: _JobPlan, encoder: torch.nn.Module, method: Method, seed: int,
                info: dict) -> list[dict]:
    """Probe ``encoder``'s frozen features at every task x label fraction -> result rows."""
    def to_space(images):
        x = method.space(images.to(plan.device))
        return method.zca(x) if method.zca is not None else x

    rows = []
    for task, (train, test) in plan.tasks.items():
        needed = plan.needed[(task, seed)]
        f_needed = _features(encoder, train.images[needed], to_space, plan.device)
        f_test = _features(encoder, test.images, to_space, plan.device)
        for fraction in plan.fractions:
            idx = plan.labelled[(task, fraction, seed)]
            f_train = f_needed[torch.searchsorted(needed, idx)]
            y_train = train.labels[idx]
            if plan.probe == "lbfgs":
                acc = linear_probe(f_train, y_train, f_test, test.labels, train.num_classes)
            elif plan.probe == "sgd":
                acc = linear_probe_sgd(f_train, y_train, f_test, test.labels,
                                       train.num_classes, seed=seed)
            else:
                acc = knn_accuracy(f_train, y_train, f_test, test.labels, train.num_classes)
            rows.append({**info, "downstream": task, "fraction": fraction, "labels": len(idx),
                         "accuracy": acc, "probe": plan.probe})
    return rows


def _journal_key(config: dict, set_paths: list[str]) -> str:
    """What makes one job's rows reusable: the configuration and the sets' bytes. The number
    of seeds and the list of baselines only say which jobs there are, not what one job gives,
    so more seeds or another baseline reuse every job already done."""
    same = {k: v for k, v in config.items() if k not in ("seeds", "baselines")}
    material = {"config": same, "sets": [sha256_file(p) for p in set_paths]}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class _Journal:
    """Finished jobs' rows, one JSON line each, appended and fsynced as they finish.

    The first line holds the evaluation's key; a journal of another evaluation is started
    afresh. A line cut short by a kill is ignored (that job is redone).
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def load(self) -> dict[str, list[dict]]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        done: dict[str, list[dict]] = {}
        if lines and _json_or_none(lines[0]) == {"key": self.key}:
            for line in lines[1:]:
                entry = _json_or_none(line)
                if isinstance(entry, dict) and "job" in entry and "rows" in entry:
                    done[entry["job"]] = entry["rows"]
        else:
            write_text(self.path, json.dumps({"key": self.key}) + "\n")
        return done

    def append(self, job: str, rows: list[dict]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"job": job, "rows": rows}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _fresh_encoder(method: Method, arch: str, seed: int, shape, student,
                   targets: torch.Tensor | None) -> torch.nn.Module:
    if targets is None:  # the head is never trained: any width the student allows
        out_dim = int((student or {}).get("out_dim") or 1)
    else:
        out_dim = (method.objective.student_dim if method.objective is not None
                   else targets.shape[1])
    return build_encoder(arch, shape, out_dim, seed, student)


def _encoder(method: Method, arch: str, seed: int, shape, student, epochs: int,
             device: torch.device):
    if method.fixed_encoder is not None:
        return method.fixed_encoder.to(device), None
    images, targets = method.data(seed)
    encoder = _fresh_encoder(method, arch, seed, shape, student, targets).to(device)
    if images is None:
        return encoder.eval(), None
    if method.ssl is not None:
        return _pretrain_ssl(encoder, method, images, seed, shape, epochs, device)
    loss_fn = method.objective.to(device).loss if method.objective is not None else None
    targets = typing.cast(torch.Tensor, targets)  # a KD method has its targets
    losses = pretrain(encoder, images.to(device), targets.to(device), method.lr, seed,
                      epochs=epochs, loss_fn=loss_fn)
    return encoder, losses[-1]


def _pretrain_ssl(encoder, method: Method, images: torch.Tensor, seed: int, shape,
                  epochs: int, device: torch.device):
    """The "random subset trained with SSL" baseline: the encoder's features trained with the
    SSL objective (lightly's loss and head, ``ddkd.ssl``) under the same schedule as the KD
    rows (batch 256, ``epochs`` epochs, lr 0.1, weight decay 1e-4); the head is dropped."""
    backbone = _Features(encoder)
    with torch.no_grad():
        feature_dim = backbone.eval()(torch.zeros(2, *shape, device=device)).shape[1]
    schedule = SSLSchedule(epochs=epochs, batch_size=256, lr=_BASELINE_LR, weight_decay=1e-4)
    # The projection head is initialised from the global RNG: fix it by the seed, or the row
    # would depend on what ran before it in the process.
    with global_rng_from(make_generator(seed, Stream.SSL_HEAD), device):
        trainer = SSLTrainer(backbone, feature_dim, typing.cast(str, method.ssl), schedule,
                             method.space, shape,
                             device, seed, proj_dim=method.proj_dim)
    loss = None
    for _ in range(epochs):
        loss = trainer.train_epoch(images)
    recalibrate_batchnorm(encoder, images, method.space, device)
    return encoder.eval(), loss


class _Features(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        features = getattr(self.encoder, "features", None)
        return features(x) if features is not None else self.encoder(x)


def _features(encoder, images, to_space, device) -> torch.Tensor:
    return extract_features(_Features(encoder), images, to_space, device)


def _write_csv(path: Path, rows: list[dict]) -> None:
    from ddkd.io.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], fractions: list[float], tasks: list[str]) -> str:
    """One row per (method, arch); one column per task x fraction: mean +- std over seeds."""
    columns = [(t, f) for t in tasks for f in fractions]
    keys = list(dict.fromkeys((r["method"], r["arch"]) for r in rows))
    header = "| method | arch | " + _column_names(columns)
    lines = [header, "|" + "---|" * (2 + len(columns))]
    for method, arch in keys:
        cells = []
        for task, fraction in columns:
            accs = [100 * r["accuracy"] for r in rows if r["method"] == method and
                    r["arch"] == arch and r["downstream"] == task and r["fraction"] == fraction]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.1f} ± {std:.1f}")
        lines.append(f"| {method} | {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column_names(columns: list[tuple[str, float]]) -> str:
    """The header cells after "method | arch": one per task x label fraction."""
    return " | ".join(f"{t} {100 * f:g}%" for t, f in columns) + " |"


PAIRED_REFERENCES = ("random", "none")


def paired_tables(rows: list[dict], fractions: list[float], tasks: list[str]) -> str:
    """Each row's per-seed difference to the ``random`` and ``none`` baselines, where present.

    Every method of a seed is probed with the same labels (and its encoder initialised from the
    same seed), so the difference of two methods at one seed cancels the noise they share: the
    label draw dominates the spread at small fractions. Mean +- std over seeds of that
    difference, in points. A row is paired with the reference of its own architecture; the
    teacher (one fixed network, architecture ``teacher``) with that of the first architecture.
    A cell paired over fewer seeds than the table has says how many (``n=k``).
    """
    columns = [(t, f) for t in tasks for f in fractions]
    acc = {(r["method"], r["arch"], r["downstream"], r["fraction"], r["seed"]):
           100 * r["accuracy"] for r in rows}
    keys = list(dict.fromkeys((r["method"], r["arch"]) for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    tables = []
    for i, ref in enumerate(PAIRED_REFERENCES):
        ref_keys = {r["arch"]: r["method"] for r in rows if r.get("baseline") == ref}
        # A later reference's difference to this one is in that reference's own table.
        later_refs = {r["method"] for r in rows if r.get("baseline") in PAIRED_REFERENCES[i + 1:]}
        if not ref_keys:
            continue
        lines = []
        for method, arch in keys:
            ref_arch = arch
            if arch == "teacher" and arch not in ref_keys:  # paired with the first arch's
                ref_arch = next(iter(ref_keys))
            ref_method = ref_keys.get(ref_arch)
            if ref_method is None or ref_method == method or method in later_refs:
                continue
            cells = []
            for task, fraction in columns:
                pairs = [((method, arch, task, fraction, seed),
                          (ref_method, ref_arch, task, fraction, seed)) for seed in seeds]
                diffs = [acc[row] - acc[ref_row] for row, ref_row in pairs
                         if row in acc and ref_row in acc]
                if not diffs:
                    cells.append("-")
                    continue
                mean = round(statistics.mean(diffs), 1) or 0.0  # no "-0.0"
                std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                count = f" (n={len(diffs)})" if len(diffs) < len(seeds) else ""
                cells.append(f"{mean:+.1f} ± {std:.1f}{count}")
            lines.append(f"| {method} | {arch} | " + " | ".join(cells) + " |")
        if lines:
            name = next(iter(ref_keys.values()))
            header = f"| minus {name}, paired by seed | arch | " + _column_names(columns)
            tables.append("\n".join([header, "|" + "---|" * (2 + len(columns)), *lines]))
    return "\n\n".join(tables)
