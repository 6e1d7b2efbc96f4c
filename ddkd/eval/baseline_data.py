"""What the real-data baselines of ``ddkd evaluate`` are built from.

Usually a ``ddkd teach`` run: its training images, the teacher's targets, its experts. A set
made from ddkd's *shipped* teacher can be compared without its run: the run's images are the
seeded subset its provenance names (drawn again with teach's own stream, and checked against
the recorded checksum), and the targets are the shipped teacher's features of those images,
computed as ``teach`` computes them (eval mode, the teacher's normalisation, batches of 1024),
then checked against the objective statistics the set carries. So a user who installed ddkd
can put the shipped set beside a random subset, full-data KD and the teacher at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ddkd.data.datasets import load_dataset
from ddkd.data.transforms import ZCA, Normalization
from ddkd.errors import ConfigError
from ddkd.io.run import open_run
from ddkd.io.synthset import SynthSet
from ddkd.io.weights import ASSETS, SHIPPED_TEACHERS, load_weights
from ddkd.models.resnet import ResNet, ResNetConfig
from ddkd.objectives import Objective, restore_objective
from ddkd.probes import extract_features
from ddkd.runtime import sha256_file
from ddkd.subsets import select_subset

log = logging.getLogger(__name__)


@dataclass
class BaselineData:
    """A run's images and targets, and where its teacher and experts are."""

    where: str  # for messages: "--run DIR" or the shipped teacher's file
    images: torch.Tensor  # (N, C, H, W) uint8: the run's training images
    targets: torch.Tensor  # (N, D) float32: the teacher's raw features
    indices: torch.Tensor  # (N,) into the dataset's training split
    normalization: Normalization
    zca: ZCA | None  # the whitening the run's experts (and sets) live in
    objective: Objective  # the run's KD objective, fitted
    teacher_file: Path
    experts_file: Path | None  # None: rebuilt from the shipped teacher (no experts)
    experts_checksum: str | None
    proj_dim: int  # the teacher's SSL projection width (for the SSL baseline's head)
    dataset: str


def from_run(run_dir: str | Path) -> BaselineData:
    """The baselines' data from a complete teach run."""
    opened = open_run(run_dir)
    return BaselineData(
        where=f"--run {run_dir}", images=opened.images, targets=opened.targets,
        indices=opened.indices, normalization=opened.normalization,
        zca=opened.zca,  # the run's targets and experts live in whitened space
        objective=opened.objective, teacher_file=opened.run.teacher,
        experts_file=opened.run.experts, experts_checksum=sha256_file(opened.run.experts),
        proj_dim=opened.config.teacher.proj_dim, dataset=opened.dataset)


def shipped_teacher_of(synth: SynthSet) -> Path | None:
    """The shipped teacher file a set was made from, if it is this installation's (same
    checksum), else None."""
    teacher = synth.provenance.get("teacher")
    dataset = synth.provenance.get("source_dataset")
    if not isinstance(teacher, dict) or teacher.get("source") != "shipped":
        return None
    if dataset not in SHIPPED_TEACHERS:
        return None
    path = ASSETS / SHIPPED_TEACHERS[dataset]
    if not path.is_file() or teacher.get("checksum") != sha256_file(path):
        return None
    return path


def from_shipped_teacher(synth: SynthSet, set_path: str, data_root: str | None,
                         device: torch.device) -> BaselineData:
    """The baselines' data of a set made from the shipped teacher, rebuilt without its run."""
    teacher_file = shipped_teacher_of(synth)
    if teacher_file is None:
        raise ConfigError(f"{set_path} was not made from this installation's shipped teacher: "
                          "pass --run RUN_DIR for its baselines")
    prov = synth.provenance
    config = prov.get("teach_config") or {}
    data = config.get("data", {})
    dataset = prov["source_dataset"]
    train = load_dataset(dataset, "train", data_root)
    indices = select_subset(len(train), data.get("subset"), int(config.get("seed", 0)))
    train = train.subset(indices)
    if train.checksum() != prov.get("source_train_checksum"):
        raise ConfigError(f"the {dataset} training images here differ from those {set_path} "
                          "was distilled from (checksum mismatch): pass --run RUN_DIR")
    state, kind, arch, meta = load_weights(teacher_file)
    teacher = ResNet(ResNetConfig(**arch))
    teacher.load_state_dict(state)
    norm = meta["normalization"]
    normalize = Normalization(tuple(norm["mean"]), tuple(norm["std"]))
    log.info("no teach run given: computing the shipped teacher's targets of the %d training "
             "images %s was distilled from, as `ddkd teach` does", len(train), Path(set_path).name)
    targets = extract_features(teacher.to(device).eval(), train.images, normalize, device)
    _check_against_objective(targets, synth, set_path)
    return BaselineData(
        where=f"the shipped teacher {teacher_file.name}", images=train.images, targets=targets,
        indices=indices, normalization=normalize, zca=synth.zca,
        objective=restore_objective(synth.objective, synth.objective_state or {},
                                    targets.shape[1]),
        teacher_file=teacher_file,
        experts_file=None, experts_checksum=prov.get("experts_checksum"),
        proj_dim=int(config.get("teacher", {}).get("proj_dim", 1024)), dataset=dataset)


def _check_against_objective(targets: torch.Tensor, synth: SynthSet, set_path: str) -> None:
    """The set's objective was fitted on exactly these features: where it kept their mean
    (``mse`` standardised), the rebuilt targets must have it, or they are not the run's."""
    mean = (synth.objective_state or {}).get("mean")
    if mean is None or mean.shape != targets.shape[1:]:
        return
    if not torch.allclose(targets.double().mean(0), mean.double(), rtol=1e-3, atol=1e-5):
        raise ConfigError(f"the shipped teacher's features of the training images do not match "
                          f"the statistics stored in {set_path}: pass --run RUN_DIR")
