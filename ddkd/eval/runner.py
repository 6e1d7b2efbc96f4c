"""``ddkd evaluate``: pre-train fresh encoders on sets and baselines, probe with few labels.

Every (method, architecture, seed) encoder is pre-trained once and its features of each
downstream task are computed once, then probed at every label fraction. The labelled subsets
depend only on (task, fraction, seed), so every row of the table sees the same labels.
"""

from __future__ import annotations

import csv
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ddkd.data.datasets import ImageTensors, load_dataset
from ddkd.data.transforms import Normalization
from ddkd.errors import ConfigError
from ddkd.eval.labels import label_subset
from ddkd.eval.pretrain import ARCHS, build_encoder, pretrain
from ddkd.eval.probe import linear_probe
from ddkd.io.atomic import write_json, write_text
from ddkd.io.run import open_run
from ddkd.io.synthset import SynthSet, load_synthset
from ddkd.io.weights import load_weights
from ddkd.models.resnet import ResNet, ResNetConfig
from ddkd.probes import extract_features, knn_accuracy
from ddkd.runtime import environment_record, make_generator

log = logging.getLogger(__name__)

BASELINES = ("none", "random", "full", "teacher")
PROBES = ("lbfgs", "knn")
_STREAM_RANDOM_SUBSET = 90


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

    def data(self, seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.subset_size is None or self.images is None:
            return self.images, self.targets
        gen = make_generator(seed, _STREAM_RANDOM_SUBSET)
        idx = torch.randperm(len(self.images), generator=gen)[: self.subset_size]
        return self.images[idx], self.targets[idx]


def _set_method(path: str, synth: SynthSet) -> Method:
    space = Normalization(tuple(synth.mean.tolist()), tuple(synth.std.tolist()))
    return Method(Path(path).stem, synth.images, synth.targets, synth.lr, space, synth.zca)


def _baselines(names: list[str], run_dir: str | None, size: int, shape) -> list[Method]:
    if not names:
        return []
    if run_dir is None:
        raise ConfigError("baselines need the teach run: pass --run RUN_DIR (or evaluate a set "
                          "whose provenance names an existing run)")
    opened = open_run(run_dir)
    space = Normalization(tuple(opened.normalization["mean"]), tuple(opened.normalization["std"]))
    if tuple(opened.images.shape[1:]) != tuple(shape):
        raise ConfigError(f"--run {run_dir} holds {tuple(opened.images.shape[1:])} images but "
                          f"the sets are {tuple(shape)}")
    x_all = space(opened.images)
    methods = []
    for name in names:
        if name == "none":
            methods.append(Method("no pre-training", None, None, 0.0, space))
        elif name == "random":
            if size > len(x_all):
                raise ConfigError(f"the random baseline needs {size} images; the run has "
                                  f"{len(x_all)}")
            methods.append(Method(f"random subset + KD (n={size})", x_all, opened.targets,
                                  0.1, space, subset_size=size))
        elif name == "full":
            methods.append(Method(f"full data + KD (n={len(x_all)})", x_all, opened.targets,
                                  0.1, space))
        elif name == "teacher":
            state, kind, arch, _ = load_weights(opened.run.teacher)
            if kind != "resnet":
                raise ConfigError(f"the teacher of {run_dir} is a {kind!r}; only ResNet teachers "
                                  "can be rebuilt for evaluation")
            teacher = ResNet(ResNetConfig(**arch))
            teacher.load_state_dict(state)
            methods.append(Method("teacher (ceiling)", None, None, 0.0, space,
                                  fixed_encoder=teacher.eval()))
    return methods


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
    run_dir: str | None,
    baselines: list[str],
    downstream: list[str] | None,
    fractions: list[float],
    seeds: int,
    archs: list[str],
    probe: str,
    out: str | Path,
    device: torch.device,
    data_root: str | None = None,
    epochs: int = 20,
    stratified: bool = True,
    progress: bool = True,
    command: list[str] | None = None,
) -> dict:
    """Evaluate ``sets`` and ``baselines``; writes results.{json,csv,md} into ``out``."""
    t0 = time.time()
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"--baselines: unknown {unknown}; valid: {', '.join(BASELINES)}")
    if probe not in PROBES:
        raise ConfigError(f"--probe {probe!r} is unknown; valid: {', '.join(PROBES)}")
    bad_archs = [a for a in archs if a not in ARCHS]
    if bad_archs or not archs:
        raise ConfigError(f"--arch {','.join(bad_archs)!r} is unknown; valid: {', '.join(ARCHS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    loaded = [(path, load_synthset(path)) for path in sets]
    if not loaded and not baselines:
        raise ConfigError("nothing to evaluate: give a synthetic set and/or --baselines")
    shapes = {tuple(s.images.shape[1:]) for _, s in loaded}
    if len(shapes) > 1:
        raise ConfigError(f"the sets have different image shapes {sorted(shapes)}; evaluate "
                          "them separately")
    if run_dir is None and loaded:
        candidate = loaded[0][1].provenance.get("run")
        run_dir = candidate if candidate and Path(candidate).is_dir() else None
    shape = shapes.pop() if shapes else None
    if shape is None:
        if run_dir is None:
            raise ConfigError("baselines alone need --run RUN_DIR")
        shape = tuple(open_run(run_dir).images.shape[1:])
    size = len(loaded[0][1]) if loaded else None
    if size is None and "random" in baselines:
        raise ConfigError("the random baseline takes its size from a set: give one")
    methods = [_set_method(p, s) for p, s in loaded]
    methods += _baselines(baselines, run_dir, size or 0, shape)
    if downstream is None:
        source = loaded[0][1].provenance.get("source_dataset") if loaded else \
            open_run(run_dir).teach_config["data"]["dataset"]
        downstream = [source]
    tasks = {name: _downstream(name, data_root, shape) for name in downstream}
    for train, _ in tasks.values():  # refuse impossible fractions before any training
        for f in fractions:
            label_subset(train.labels, f, 0, train.num_classes, stratified)
    student = loaded[0][1].provenance.get("student") if loaded else None

    rows = []
    # The teacher is one fixed network: one row, whatever --arch says (seeds vary the labels).
    jobs = [(m, "teacher" if m.fixed_encoder is not None else a, s) for m in methods
            for a in (archs[:1] if m.fixed_encoder is not None else archs)
            for s in range(seeds)]
    bar = tqdm(jobs, desc="evaluate", unit="encoder", leave=False,
               disable=not (progress and sys.stderr.isatty()))
    for method, arch, seed in bar:
        bar.set_postfix(method=method.name[:24], arch=arch, seed=seed)
        encoder, pretrain_loss = _encoder(method, arch, seed, shape, student, epochs, device)
        for task, (train, test) in tasks.items():
            def to_space(images, method=method):
                x = method.space(images.to(device))
                return method.zca(x) if method.zca is not None else x
            f_train = _features(encoder, train.images, to_space, device)
            f_test = _features(encoder, test.images, to_space, device)
            for fraction in fractions:
                idx = label_subset(train.labels, fraction, seed, train.num_classes, stratified)
                if probe == "lbfgs":
                    acc = linear_probe(f_train[idx], train.labels[idx], f_test, test.labels,
                                       train.num_classes)
                else:
                    acc = knn_accuracy(f_train[idx], train.labels[idx], f_test, test.labels,
                                       train.num_classes)
                rows.append({"method": method.name, "arch": arch, "seed": seed,
                             "downstream": task, "fraction": fraction, "labels": len(idx),
                             "accuracy": acc, "probe": probe, "lr": method.lr,
                             "pretrain_final_loss": pretrain_loss})
    bar.close()
    table = markdown_table(rows, fractions, list(tasks))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"sets": sets, "run": run_dir, "baselines": baselines, "downstream": list(tasks),
              "fractions": fractions, "seeds": seeds, "archs": archs, "probe": probe,
              "epochs": epochs, "stratified": stratified}
    write_json(out / "results.json", {"config": config, "rows": rows,
                                      "environment": {**environment_record(),
                                                      "command": command}})
    _write_csv(out / "results.csv", rows)
    write_text(out / "results.md", table + "\n")
    return {"out": str(out), "table": table, "seconds": round(time.time() - t0, 1),
            "rows": len(rows)}


def _encoder(method: Method, arch: str, seed: int, shape, student, epochs: int,
             device: torch.device):
    if method.fixed_encoder is not None:
        return method.fixed_encoder.to(device), None
    images, targets = method.data(seed)
    out_dim = targets.shape[1] if targets is not None else 1
    encoder = build_encoder(arch, shape, out_dim, seed, student).to(device)
    if images is None:
        return encoder.eval(), None
    losses = pretrain(encoder, images.to(device), targets.to(device), method.lr, seed,
                      epochs=epochs)
    return encoder, losses[-1]


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
    header = "| method | arch | " + " | ".join(f"{t} {100 * f:g}%" for t, f in columns) + " |"
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
