"""``ddkd import replay-buffer PATH... --run RUN``: MTT-format expert buffers -> ``experts.h5``.

The layout (MTT: ``GeorgeCazenavette/mtt-distillation``, ``buffer.py``; MKDT:
``sjoshi804/mkdt-data-distill-ssl``, ``src/mkdt/buffer.py``): ``replay_buffer_{n}.pt`` is
``torch.save`` of a list of experts; an expert is a list of ``epochs + 1`` snapshots (the
initialisation, then one per epoch); a snapshot is the list
``[p.detach().cpu() for p in net.parameters()]``, float32. For the codes' ``ConvNet``
(``networks.py``: ``depth`` x [conv3x3, ``GroupNorm(width, width)`` as instance norm, ReLU,
AvgPool2d(2)], then ``Linear``) that order is conv weight, conv bias, norm weight, norm bias
per block, then the classifier's weight and bias: exactly ddkd's ConvNet ``ParamSpec``
(``body.{4s}.weight``, ``body.{4s}.bias``, ``body.{4s+1}.weight``, ``body.{4s+1}.bias``...,
``head.weight``, ``head.bias``).

What can and cannot be checked: the number of tensors and every shape are compared with the
run's student; a mismatch is named. Shapes cannot tell instance norm from batch norm or ReLU
from another activation: the buffer is taken to come from the codes' default ConvNet (ReLU,
instance norm, average pooling), which the run's student must then be. Two known differences
are refused outright: on 1-channel images the codes' first convolution pads by 3 (and treats
28x28 as 32x32), ddkd's by 1; and KDEP's parameter-free output has no classifier to match.
MTT's own buffers regress class labels (a classifier of K outputs); only buffers whose head has
the run's target width (MKDT's, trained on the teacher's representations) match a ddkd run.

The experts saw images in the code's normalisation (ddkd.interop.published): it must be the
run's, or matching would feed them inputs of another scale. The check compares the published
values for the run's dataset with the run's; ``--normalization run`` takes the run's on trust
and ``--normalization M/S`` names the buffer's.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ddkd.errors import ConfigError, FileFormatError
from ddkd.interop import published
from ddkd.interop.torchfiles import load_pt
from ddkd.io.experts import ExpertsHeader, assemble_experts, write_expert_shard
from ddkd.io.run import RunDir, load_objective_state, load_targets
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec
from ddkd.runtime import sha256_file

SOURCES = ("mkdt", "mtt")


def run_student(run: RunDir, data_root: str | None = None) -> tuple[ConvNetConfig, dict, dict]:
    """The ConvNet the run's experts would be (ddkd teach's ``student_config``), with the
    run's teach configuration and the targets' metadata (normalisation, objective)."""
    from ddkd.data.datasets import load_dataset
    from ddkd.objectives import restore_objective, student_output

    if not run.root.is_dir():
        raise ConfigError(f"--run {run.root} does not exist; make it with `ddkd teach --out "
                          f"{run.root} --experts 0` (the teacher and its targets)")
    missing = [p.name for p in (run.config, run.targets, run.teacher, run.summary)
               if not p.is_file()]
    if missing:
        raise ConfigError(f"--run {run.root} is not a complete ddkd teach run (missing "
                          f"{', '.join(missing)}); finish it with `ddkd teach --resume`")
    record = json.loads(run.config.read_text())
    if record.get("stage") != "teach":
        raise ConfigError(f"--run {run.root} is not a ddkd teach run")
    config = record["config"]
    targets, _, meta = load_targets(run.targets)
    objective_name, state = load_objective_state(run.targets)
    objective = restore_objective(objective_name, state, targets.shape[1])
    data = config["data"]
    shape = load_dataset(data["dataset"], "train", data_root or data.get("data_root")).shape
    c, h, _ = shape
    student = config["student"]
    sc = ConvNetConfig(in_channels=c, image_size=h, depth=student["depth"],
                       width=student["width"], norm=student["norm"],
                       out_dim=objective.student_dim,
                       output=student_output(objective, student["width"]))
    return sc, config, {**meta, "objective": objective_name}


def _describe(sc: ConvNetConfig) -> str:
    return (f"ConvNet depth {sc.depth}, width {sc.width}, {sc.norm}, {sc.in_channels}x"
            f"{sc.image_size}x{sc.image_size} -> {sc.out_dim}")


def flatten_expert(expert: object, spec: ParamSpec, where: str, sc: ConvNetConfig
                   ) -> torch.Tensor:
    """One expert (a list of snapshots, each a list of tensors) -> ``(epochs + 1, P)`` float32,
    every snapshot checked against ``spec``."""
    if not isinstance(expert, list | tuple) or not expert:
        raise FileFormatError(f"{where} is a {type(expert).__name__}, not a list of per-epoch "
                              "parameter lists: not an MTT replay buffer")
    rows = []
    for e, snapshot in enumerate(expert):
        at = f"{where}, snapshot {e}"
        if not isinstance(snapshot, list | tuple) or not all(
                isinstance(p, torch.Tensor) for p in snapshot):
            raise FileFormatError(f"{at} is not a list of parameter tensors: not an MTT replay "
                                  "buffer")
        if len(snapshot) != len(spec.shapes):
            count = sum(p.numel() for p in snapshot)
            raise FileFormatError(
                f"{at} holds {len(snapshot)} parameter tensors ({count} numbers); the run's "
                f"student ({_describe(sc)}) has {len(spec.shapes)} ({spec.numel}): another "
                "architecture (depth, norm or head)")
        for name, shape, p in zip(spec.names, spec.shapes, snapshot, strict=True):
            if tuple(p.shape) != shape:
                raise FileFormatError(
                    f"{at}: parameter {name} is {tuple(p.shape)} in the buffer but "
                    f"{shape} in the run's student ({_describe(sc)})" + _hint(name, p, shape))
            if not p.is_floating_point():
                raise FileFormatError(f"{at}: parameter {name} is {p.dtype}, not floating point")
        rows.append(torch.cat([p.detach().reshape(-1).float() for p in snapshot]))
    trajectory = torch.stack(rows)  # (epochs + 1, P)
    if not bool(torch.isfinite(trajectory).all()):
        raise FileFormatError(f"{where} holds NaN or infinite parameters")
    still = [e for e in range(len(rows) - 1) if torch.equal(rows[e], rows[e + 1])]
    if still:
        # Trajectory matching divides by ||theta_t - theta_{t+M}||^2. Identical snapshots are
        # what `[p.detach().cpu() for p in net.parameters()]` records when the net is already
        # on the CPU: .cpu() then copies nothing, and every snapshot is the final state.
        raise FileFormatError(f"{where}: snapshots {still[0]} and {still[0] + 1} are identical "
                              "(no training between them, or a buffer recorded on the CPU "
                              "without copying the parameters)")
    return trajectory


def _hint(name: str, p: torch.Tensor, shape: tuple[int, ...]) -> str:
    if name.startswith("head.") and p.shape[0] != shape[0]:
        return (f": the buffer's experts were trained to {p.shape[0]} outputs (MTT's are class "
                f"logits), the run's targets have {shape[0]} dimensions")
    if name == "head.weight":
        return ": another image size or depth"
    return ": another width or input"


def import_replay_buffers(paths: list[str | Path], run_dir: str | Path, source: str = "mkdt",
                          normalization: str | None = None, expert_lr: float | None = None,
                          data_root: str | None = None, overwrite: bool = False) -> dict:
    """Write ``RUN/experts.h5`` from MTT-format replay buffers; every check before writing.

    Returns:
        a summary for the CLI (experts, epochs, parameters, the file written).
    """
    if source not in SOURCES:
        raise ConfigError(f"--source {source!r} is unknown; valid: {', '.join(SOURCES)}")
    if expert_lr is not None and not (expert_lr > 0 and math.isfinite(expert_lr)):
        raise ConfigError(f"--expert-lr must be a positive number, got {expert_lr}")
    run = RunDir(Path(run_dir))
    sc, config, meta = run_student(run, data_root)
    _check_run(run, sc, meta, overwrite)
    _check_normalization(normalization, source, config, meta, sc, run)
    spec = ParamSpec.of(ConvNet(sc))
    files = [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise FileFormatError(f"{f} does not exist")
    shards = run.root / "experts.import-partial"
    if shards.exists():
        shutil.rmtree(shards)
    shards.mkdir()
    try:
        records, epochs, k = _write_shards(files, spec, sc, shards)
        lr = expert_lr if expert_lr is not None else published.EXPERT_LR[source]
        experts_config = {
            **config["experts"], "num_experts": k, "epochs": epochs, "lr": lr,
            "dtype": "float32",
            "imported": {
                "format": "mtt-replay-buffer", "source": source, "files": records,
                "lr_source": ("--expert-lr" if expert_lr is not None else
                              f"{source}'s buffer.py --lr_teacher default"),
                "note": "trajectories from another code: the teach settings of these experts "
                        "(batch size, momentum, augmentation) are that code's, not this run's",
            },
        }
        header = ExpertsHeader(num_experts=k, epochs=int(epochs), n_params=spec.numel,
                               dtype="float32", student=asdict(sc), param_spec=spec,
                               experts_config=experts_config, objective=meta["objective"],
                               seed=int(config.get("seed", 0)))
        assemble_experts(run.experts, shards, header)  # atomic; removes the shards
    finally:
        if shards.exists():
            shutil.rmtree(shards)
    return {"experts_file": str(run.experts), "experts": k, "epochs": int(epochs),
            "n_params": spec.numel, "student": _describe(sc), "lr": lr}


def _check_run(run: RunDir, sc: ConvNetConfig, meta: dict, overwrite: bool) -> None:
    """The run can take the buffers' experts: none yet (or --overwrite), a linear head, and
    images the published ConvNet computes the same function on."""
    if run.experts.exists() and not overwrite:
        raise ConfigError(f"--run {run.root} already has experts ({run.experts}); pass "
                          "--overwrite to replace them")
    if sc.output != "linear":
        raise ConfigError(f"--run {run.root}: its objective {meta['objective']} trains a "
                          "parameter-free output, the buffers' ConvNet a linear classifier")
    if sc.in_channels == 1:
        raise ConfigError(
            "replay buffers of 1-channel images do not fit ddkd's ConvNet: the published "
            "ConvNet's first convolution pads by 3 on 1-channel input (networks.py), ddkd's by "
            "1, so the same parameters compute another function")


def _write_shards(files: list[Path], spec: ParamSpec, sc: ConvNetConfig, shards: Path
                  ) -> tuple[list[dict], int, int]:
    """Every buffer's experts as shards in ``shards``; -> (a record per file, epochs,
    experts)."""
    records, epochs, k = [], None, 0
    for f in files:
        buffer = load_pt(f)  # weights_only: a buffer that needs code is refused
        if not isinstance(buffer, list | tuple) or not buffer:
            raise FileFormatError(
                f"{f} holds a {type(buffer).__name__}"
                + (" (empty)" if isinstance(buffer, list | tuple) else "")
                + ", not a list of experts: not an MTT replay buffer "
                "(replay_buffer_{n}.pt: experts -> per-epoch snapshots -> parameters)")
        in_file = len(buffer)
        for i, expert in enumerate(buffer):
            trajectory = flatten_expert(expert, spec, f"{f.name} expert {i}", sc)
            if epochs is None:
                epochs = trajectory.shape[0] - 1
            elif trajectory.shape[0] - 1 != epochs:
                raise FileFormatError(f"{f.name} expert {i} has {trajectory.shape[0] - 1} "
                                      f"epochs, the first expert {epochs}: one experts file "
                                      "holds trajectories of one length")
            if epochs < 1:
                raise FileFormatError(f"{f.name} expert {i} holds only its initialisation")
            write_expert_shard(shards / f"expert_{k:04d}.h5", trajectory, [], seed=-1,
                               dtype="float32")
            k += 1
        del buffer  # one file's snapshots in memory at a time
        records.append({"path": str(f.resolve()), "sha256": sha256_file(f),
                        "experts": in_file})
    return records, int(epochs or 0), k


def _check_normalization(spec: str | None, source: str, config: dict, meta: dict,
                         sc: ConvNetConfig, run: RunDir) -> None:
    """The buffer's experts must have seen images normalised as the run normalises them."""
    if spec == "run":  # the user vouches for it (a buffer made in the run's normalisation)
        return
    dataset = config["data"]["dataset"]
    code = source
    whitened = "zca" in _zca_groups(run)
    if whitened and spec is None:
        raise ConfigError(f"--run {run.root} whitens its images (ZCA); ddkd cannot tell whether "
                          "the buffers' experts saw the same whitening: pass --normalization "
                          "run if they did")
    expected, where = published.resolve_normalization(spec, code, dataset, sc.image_size,
                                                      sc.in_channels)
    have = meta["normalization"]
    close = np.allclose(expected.mean, have["mean"], atol=1e-4) and np.allclose(
        expected.std, have["std"], atol=1e-4)
    if not close:
        raise ConfigError(
            f"the buffers' experts saw images normalised with mean {list(expected.mean)}, std "
            f"{list(expected.std)} ({where}), but --run {run.root} normalises with mean "
            f"{[round(v, 4) for v in have['mean']]}, std {[round(v, 4) for v in have['std']]}: "
            "make the run with a teacher checkpoint that carries the buffers' normalisation, "
            "or pass --normalization run if the buffers were made in the run's")


def _zca_groups(run: RunDir) -> set[str]:
    import h5py

    with h5py.File(run.targets, "r") as fh:
        return set(fh.keys())
