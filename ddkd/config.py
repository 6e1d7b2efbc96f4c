"""Typed, frozen, validated configuration of every stage.

A configuration is built from defaults, then a TOML recipe (``--recipe``), then ``--set
section.key=value`` overrides, then the named CLI flags, in that order. Each value is coerced to
its field's type; an unknown section or key lists the valid ones. The resolved configuration is
written as JSON into every run and compared on ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddkd.errors import ConfigError

# The names a configuration may hold. The modules above build from them (the dataset table of
# ddkd.data.datasets, lightly's methods in ddkd.ssl_training, the objectives of
# ddkd.objectives; tests/test_config.py checks that each table has exactly these names):
# config.py, the bottom layer, validates without importing them.
PRECISIONS = ("fp32", "bf16")  # the students' arithmetic: see ddkd.runtime.autocast_dtype
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "tiny-imagenet",
                 "cifar10-samples", "cifar100-samples", "imagefolder:PATH")
SSL_METHODS = ("barlowtwins", "simclr", "byol", "vicreg")
OBJECTIVE_NAMES = ("mse", "kdep", "tcs", "ssld", "skd")
TEACHER_ARCHS = ("resnet10", "resnet18", "resnet34")


def is_dataset_name(name: str) -> bool:
    """A name of DATASET_NAMES, or ``imagefolder:PATH`` with a path."""
    return name in DATASET_NAMES[:-1] or bool(re.match(r"^imagefolder:.+", name))


# The named command-line flag of each setting that has one. Messages about a setting name its
# key (what a recipe, --set or a run's config.json holds); when the value came from the flag,
# build_config names the flag instead (see ``flag_keys``).
FLAGS = {
    "data.dataset": "--dataset", "data.subset": "--subset", "data.data_root": "--data-root",
    "teacher.ssl": "--ssl", "teacher.epochs": "--teacher-epochs",
    "experts.num_experts": "--experts", "experts.epochs": "--expert-epochs",
    "experts.objective": "--objective", "experts.per_batch": "--experts-per-batch",
    "seed": "--seed",
}
SYNTH_FLAGS = {name: f"--{name.replace('_', '-')}" for name in (
    "ipc", "size", "fraction", "iterations", "syn_steps", "max_start_epoch",
    "lr_img", "lr_lr", "lr_targets", "batch_syn", "init", "augment", "memory", "precision",
    "seed", "segments", "zca", "views")}
# M keeps MTT's name expert_epochs in recipes and --set; its flag is --matched-epochs, since
# teach's --expert-epochs is the epochs each expert trains
SYNTH_FLAGS["expert_epochs"] = "--matched-epochs"


def _one_of(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} {value!r} is unknown; valid: {', '.join(valid)}", key=name)


def _positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}", key=name)


@dataclass(frozen=True)
class DataConfig:
    """Which images a run distils."""

    dataset: str = "fashion-mnist"
    data_root: str | None = None
    subset: int | None = None  # use N training images (a seeded random subset); None = all
    zca: bool = False  # train the experts on ZCA-whitened images (MTT's option; MKDT: off)
    zca_eps: float = 0.1

    def __post_init__(self) -> None:
        if not is_dataset_name(self.dataset):
            raise ConfigError(
                f"data.dataset {self.dataset!r} is unknown; valid: {', '.join(DATASET_NAMES)}",
                key="data.dataset")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"data.subset must be >= 1, got {self.subset}", key="data.subset")
        if self.zca_eps <= 0:
            raise ConfigError(f"data.zca_eps must be > 0, got {self.zca_eps}")


@dataclass(frozen=True)
class TeacherConfig:
    """The SSL teacher: where it comes from and, when trained, how."""

    source: str = "shipped"  # shipped | train | checkpoint
    checkpoint: str | None = None  # ddkd .h5 weights, or a .pt/.pth state dict
    factory: str | None = None  # "package.module:function" building the checkpoint's module
    arch: str = "resnet18"  # resnet10 | resnet18 | resnet34 (CIFAR stem)
    base_width: int = 64  # 64 is the paper's; 16 (quarter width) for CPU runs
    ssl: str = "barlowtwins"
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.1  # SGD lr for batch 256 (scaled linearly), warm-up then cosine
    weight_decay: float = 5e-4
    proj_dim: int = 1024  # width of the projection head
    knn_k: int = 20
    # fp32 | bf16: the SSL step's forward under bfloat16 autocast (faster on CPUs with bfloat16
    # units, see docs/performance.md; lightly's loss and the parameters stay float32)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.source not in ("shipped", "train", "checkpoint"):
            raise ConfigError(
                f"teacher.source must be shipped, train or checkpoint, got {self.source!r}"
            )
        if self.source == "checkpoint" and not self.checkpoint:
            raise ConfigError("teacher.source = checkpoint needs --teacher-checkpoint FILE")
        if self.ssl not in SSL_METHODS:
            raise ConfigError(f"teacher.ssl {self.ssl!r} is unknown; valid: "
                              f"{', '.join(SSL_METHODS)}", key="teacher.ssl")
        if self.arch not in TEACHER_ARCHS:
            raise ConfigError(f"teacher.arch {self.arch!r}; valid: {', '.join(TEACHER_ARCHS)}")
        for name in ("base_width", "epochs", "batch_size", "lr", "proj_dim", "knn_k"):
            _positive(f"teacher.{name}", getattr(self, name))
        if self.weight_decay < 0:
            raise ConfigError(f"teacher.weight_decay must be >= 0, got {self.weight_decay}")
        _one_of("teacher.precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class StudentConfig:
    """The student ConvNet (docs/method.md section 2); its head maps to the target dimension."""

    arch: str = "convnet"
    depth: int = 3
    width: int = 128
    norm: str = "instancenorm"

    def __post_init__(self) -> None:
        if self.arch != "convnet":
            raise ConfigError(f"student.arch {self.arch!r}; valid: convnet")
        if self.norm not in ("instancenorm", "batchnorm", "none"):
            raise ConfigError(f"student.norm {self.norm!r}; valid: instancenorm, batchnorm, none")
        _positive("student.depth", self.depth)
        _positive("student.width", self.width)


@dataclass(frozen=True)
class ExpertConfig:
    """KD students whose trajectories become the experts (MKDT defaults)."""

    num_experts: int = 100
    epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    objective: str = "mse"
    # mse (and skd's global stage): none (MKDT: the raw teacher features) | standardize
    # (z-scored per dimension; see ddkd/objectives/mse.py for when it is needed). The others
    # define their own target scale (kdep: unit RMS, tcs: hashed directions, ssld: softmax).
    target_norm: str = "none"
    dtype: str = "float32"  # on-disk dtype of the snapshots: float32 | float16
    # Students trained at once, batched (0 = the device's default; see teach/experts.py).
    # The trajectories do not depend on it beyond float tolerance.
    per_batch: int = 0
    anchors: int = 100  # ssld: k-means anchors of the teacher features (~10 x the classes)
    # skd: epochs of each block stage before the recorded global stage (sized for the CPU;
    # Kulkarni et al. train every stage to convergence)
    stage_epochs: int = 2
    # torch.compile the students' training step: auto (when a C++ compiler / Triton is there),
    # on, off. Faster on CPUs too (docs/performance.md); float-tolerance, not bitwise, equal to
    # eager.
    compile: str = "auto"
    # fp32 (MKDT) | bf16: the students' forward under torch.autocast (ddkd.runtime.autocast_dtype)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"experts.num_experts must be >= 0, got {self.num_experts}",
                              key="experts.num_experts")
        _positive("experts.anchors", self.anchors)
        _positive("experts.stage_epochs", self.stage_epochs)
        if self.per_batch < 0:
            raise ConfigError(f"experts.per_batch must be >= 0 (0: the device's default), "
                              f"got {self.per_batch}", key="experts.per_batch")
        _positive("experts.epochs", self.epochs)
        _positive("experts.lr", self.lr)
        _positive("experts.batch_size", self.batch_size)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"experts.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"experts.weight_decay must be >= 0, got {self.weight_decay}")
        if self.objective not in OBJECTIVE_NAMES:
            raise ConfigError(f"experts.objective {self.objective!r} is unknown; valid: "
                              f"{', '.join(OBJECTIVE_NAMES)}", key="experts.objective")
        _one_of("experts.target_norm", self.target_norm, ("none", "standardize"))
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"experts.dtype {self.dtype!r}; valid: float32, float16")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"experts.compile {self.compile!r}; valid: auto, on, off")
        _one_of("experts.precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class TeachConfig:
    """Everything that determines the outputs of ``ddkd teach``."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    seed: int = 0


@dataclass(frozen=True)
class SynthConfig:
    """Trajectory matching (MKDT, section 4.2; names as in MTT's code).

    Exactly one of ``ipc`` (images per class: ``ipc x num_classes`` images; no labels are
    used), ``size`` (images) or ``fraction`` (of the run's training images) sets the size.
    """

    ipc: int | None = None
    size: int | None = None
    fraction: float | None = None
    iterations: int = 5000
    syn_steps: int = 40  # N: inner SGD steps on the synthetic set
    expert_epochs: int = 2  # M: epochs of the expert matched by the N steps
    max_start_epoch: int = 2  # T+: the start epoch is uniform in {0, ..., T+ - 1}
    lr_img: float = 1000.0
    lr_targets: float = 1.0
    lr_lr: float = 1e-4
    lr_init: float | None = None  # initial step size alpha; None = the experts' lr
    momentum: float = 0.5  # of the three outer SGD optimisers
    batch_syn: int = 256
    init: str = "high-loss"  # high-loss | random
    augment: str = "none"  # none (MKDT) | dsa (MTT's differentiable siamese augmentation)
    zca: bool = False  # require the run's ZCA whitening (set at teach time: data.zca)
    memory: str = "unrolled"  # unrolled (MTT: graph of all N steps) | constant (TESLA)
    # fp32 (MTT/MKDT) | bf16: the inner steps' forward under torch.autocast; the meta-gradient
    # keeps fp32's direction but its elements differ by a few percent (docs/performance.md)
    precision: str = "fp32"
    # expert segments per outer iteration, their meta-gradients averaged (MTT/MKDT: 1); with
    # --devices N each device takes its share
    segments: int = 1
    # Predefined views (after Boost-SSD, Yu et al. ICLR 2025): none, a group (rot4, flip2) or
    # a comma list of identity, hflip, vflip, rot90, rot180, rot270 (ddkd.data.views); every
    # image is matched under each view, each (image, view) pair with its own learned target
    views: str = "none"
    # where a view's target starts: teacher (the teacher's target of the viewed real image)
    # or copy (the real image's own target for every view)
    view_init: str = "teacher"
    max_lr_factor: float = 100.0  # stop when alpha leaves [alpha_0 / f, alpha_0 * f]
    # Trust region of the step size: one outer iteration changes log(alpha) by at most this
    # (0.1: alpha by at most ~10%), however large its meta-gradient. A single spike (e.g. MKDT's
    # N = 40 on a tiny run) then slows alpha down instead of collapsing it past the band above;
    # a sustained drift still leaves the band (>= 47 bounded steps for f = 100) and is stopped.
    # The embedded default's updates are ~3e-4 (median) and 3.5e-3 at most: never bounded.
    # inf: SGD's update unbounded (as MTT/MKDT).
    max_log_lr_step: float = 0.1
    checkpoint_minutes: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_size()
        for name in ("iterations", "syn_steps", "expert_epochs", "max_start_epoch", "batch_syn",
                     "segments"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", key=name)
        for name in ("lr_img", "lr_targets", "lr_lr", "checkpoint_minutes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", key=name)
        if self.max_lr_factor <= 1:
            raise ConfigError(f"max_lr_factor must be > 1, got {self.max_lr_factor}")
        if not self.max_log_lr_step > 0:  # inf allowed (no bound); NaN refused
            raise ConfigError(f"max_log_lr_step must be > 0 (inf: no bound), got "
                              f"{self.max_log_lr_step}")
        if self.lr_init is not None and self.lr_init <= 0:
            raise ConfigError(f"lr_init must be > 0, got {self.lr_init}")
        _one_of("init", self.init, ("high-loss", "random"))
        _one_of("memory", self.memory, ("unrolled", "constant"))
        _one_of("augment", self.augment, ("none", "dsa"))
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("view_init", self.view_init, ("teacher", "copy"))
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")

    def _check_size(self) -> None:
        given = [n for n in ("ipc", "size", "fraction") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give only one of --ipc, --size, --fraction (got {given})")
        if self.ipc is not None and self.ipc < 1:
            raise ConfigError(f"ipc must be >= 1, got {self.ipc}", key="ipc")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"size must be >= 1, got {self.size}", key="size")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}", key="fraction")

    def num_images(self, num_classes: int, num_train: int) -> int:
        if self.ipc is not None:
            n = self.ipc * num_classes
        elif self.size is not None:
            n = self.size
        elif self.fraction is not None:
            n = max(1, round(self.fraction * num_train))
        else:
            raise ConfigError("give the set's size: --ipc K, --size N or --fraction F")
        if n > num_train:
            raise ConfigError(f"the synthetic set would have {n} images but the run has only "
                              f"{num_train} training images to initialise it from")
        return n


#: the baselines of ``ddkd evaluate`` (ddkd.eval.runner builds them)
BASELINES = ("none", "random", "random-views", "high-loss", "ssl-random", "full", "teacher")
DEFAULT_BASELINES = ("none", "random", "high-loss", "ssl-random", "teacher")
PROBES = ("lbfgs", "sgd", "knn")  # ddkd.eval.probe, ddkd.probes
EVAL_ARCHS = ("convnet", "resnet10", "resnet18")  # the encoders of ddkd.eval.pretrain
EVAL_FLAGS = {"baselines": "--baselines", "downstream": "--downstream",
              "fractions": "--fractions", "seeds": "--seeds", "archs": "--arch",
              "probe": "--probe", "epochs": "--epochs", "pretrain_steps": "--pretrain-steps",
              "stratified": "--uniform", "data_root": "--data-root",
              "full_epochs": "--full-epochs", "views": "--views"}


@dataclass(frozen=True)
class EvalConfig:
    """How ``ddkd evaluate`` pre-trains and probes (MKDT, section 5): every (method,
    architecture, seed) encoder is pre-trained ``epochs`` epochs and probed at every label
    ``fraction`` of every ``downstream`` task."""

    # None: every baseline but the costly full-data one (only none when the set's teach run
    # is not available)
    baselines: tuple[str, ...] | None = None
    downstream: tuple[str, ...] | None = None  # None: the sets' source dataset
    data_root: str | None = None  # folder holding the downstream datasets
    fractions: tuple[float, ...] = (0.001, 0.01, 0.05, 0.1)
    seeds: int = 3
    archs: tuple[str, ...] = ("convnet",)
    probe: str = "lbfgs"
    epochs: int = 20
    stratified: bool = True  # class-stratified labels (False: uniform, as MKDT drew them)
    # also probe every KD-trained method after each of these numbers of SGD steps
    pretrain_steps: tuple[int, ...] | None = None
    # the full-data KD baseline's epochs (None: ``epochs``); on a whole split 20 epochs are
    # thousands of steps, far past any set's budget curve
    full_epochs: int | None = None
    # pre-train every set on these of its stored views only (None: a set with views on all)
    views: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.full_epochs is not None and (isinstance(self.full_epochs, bool)
                                             or self.full_epochs < 1):
            raise ConfigError(f"full_epochs must be a whole number of epochs >= 1, got "
                              f"{self.full_epochs!r}", key="full_epochs")
        unknown = [b for b in self.baselines or () if b not in BASELINES]
        if unknown:
            raise ConfigError(f"baselines: unknown {unknown}; valid: {', '.join(BASELINES)}",
                              key="baselines")
        _one_of("probe", self.probe, PROBES)
        bad_archs = [a for a in self.archs if a not in EVAL_ARCHS]
        if bad_archs or not self.archs:
            raise ConfigError(f"archs {','.join(bad_archs)!r} is unknown; valid: "
                              f"{', '.join(EVAL_ARCHS)}", key="archs")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}", key="seeds")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}", key="epochs")
        for b in self.pretrain_steps or ():
            if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                raise ConfigError(f"pretrain_steps: every budget must be a whole number of SGD "
                                  f"steps >= 1, got {b!r}", key="pretrain_steps")
        if self.pretrain_steps is not None:  # sorted, once each
            object.__setattr__(self, "pretrain_steps", tuple(sorted(set(self.pretrain_steps))))


# --- building from recipes and overrides ---------------------------------------------------


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce ``value`` (from TOML or a ``--set`` string) to the field type ``annotation``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:  # tuple[X, ...]: a TOML list or "a,b,c"
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where} = {value!r} is not a list", key=where)
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, args[0], where)
                     for v in items if not (isinstance(v, str) and not v.strip()))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        # (a list's "none" or "" is a value: the baseline none, the empty list)
        nulls = ("null",) if typing.get_origin(inner[0]) is tuple else ("none", "null", "")
        if value is None or (isinstance(value, str) and value.lower() in nulls):
            if type(None) in args:
                return None
        return _coerce(value, inner[0], where)
    try:
        return _coerce_scalar(value, annotation)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{where} = {value!r} is not a valid {getattr(annotation, '__name__', annotation)}",
            key=where,
        ) from err


def _coerce_scalar(value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if annotation is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if annotation is float:
        return float(value)
    if annotation is str:
        return str(value)
    return value


def build_config(cls: type, values: dict[str, Any], where: str = "",
                 flags: dict[str, str] | None = None) -> Any:
    """Build dataclass ``cls`` from a nested dict, coercing types and rejecting unknown keys.

    ``flags``: ``{key: flag}`` for the settings whose value came from a named command-line
    flag (:func:`flag_keys`); an error about such a setting names the flag the user typed, an
    error about any other names its key (as written in a recipe, ``--set`` or config.json).
    """
    try:
        return _build(cls, values, where)
    except ConfigError as err:
        flag = (flags or {}).get(err.key or "")
        message = str(err)
        if flag is None or err.key is None or not message.startswith(err.key):
            raise
        raise ConfigError(flag + message[len(err.key):], key=err.key) from err


def flag_keys(given: dict[str, Any], names: dict[str, str], prefix: str = "") -> dict[str, str]:
    """The ``{key: flag}`` of the settings in the nested dict ``given`` (the values the named
    flags set), for :func:`build_config`'s messages."""
    out = {}
    for key, value in given.items():
        if isinstance(value, dict):
            out.update(flag_keys(value, names, f"{prefix}{key}."))
        elif f"{prefix}{key}" in names:
            out[f"{prefix}{key}"] = names[f"{prefix}{key}"]
    return out


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the configuration'} must be a table of "
                          f"settings, got {type(values).__name__}", key=where.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{where}{key}"
        if key not in hints:
            valid = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
            raise ConfigError(f"unknown setting {name!r}; valid here: {valid}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} is a section; set its keys as {name}.KEY=VALUE")
            kwargs[key] = _build(typing.cast(type, hint), value, where=f"{name}.")
        elif isinstance(value, dict):
            raise ConfigError(f"{name} is a single value, not a section")
        else:
            kwargs[key] = _coerce(value, hint, name)
    return cls(**kwargs)


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["experts.lr=0.05", "seed=1"]`` -> ``{"experts": {"lr": "0.05"}, "seed": "1"}``."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with another --set")
        node[keys[-1]] = value.strip()
    return out


def load_recipe(path: str | Path) -> dict:
    """Read a TOML recipe into a nested dict (validated when the config is built)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--recipe {path} does not exist")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--recipe {path} is not valid TOML: {err}") from err
