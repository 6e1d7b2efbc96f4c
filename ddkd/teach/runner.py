"""``ddkd teach``: teacher -> targets -> kNN report -> experts, resumable phase by phase.

Every phase writes its output atomically into the run directory; ``--resume`` skips the phases
whose outputs exist, continues SSL training from its last epoch checkpoint, and trains only the
experts that have no shard yet. Each expert draws its initialisation and data order from its own
stream of the run's seed, so a resumed run writes the same experts as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ddkd.config import ExpertConfig, TeachConfig, build_config, to_dict
from ddkd.data.datasets import ImageTensors, load_dataset
from ddkd.data.transforms import ZCA, Normalization
from ddkd.errors import ConfigError, TrainingError
from ddkd.io.atomic import append_jsonl, check_writable, save_torch, write_json
from ddkd.io.experts import ExpertsFile, ExpertsHeader, assemble_experts, write_expert_shard
from ddkd.io.run import (
    RunDir,
    load_objective_state,
    load_targets,
    load_zca,
    prepare_run_dir,
    read_json_object,
    save_targets,
)
from ddkd.io.weights import load_weights, save_weights
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec
from ddkd.models.resnet import ResNet
from ddkd.objectives import OBJECTIVES, Objective, objective_from_config, student_output
from ddkd.objectives.mse import MSEObjective
from ddkd.objectives.skd import SKDObjective, teacher_stage_modules
from ddkd.probes import extract_features, knn_accuracy
from ddkd.runtime import (
    Ranks,
    Stream,
    autocast_dtype,
    environment_record,
    global_cpu_rng_from,
    make_generator,
    sha256_file,
)
from ddkd.ssl_training import SSLSchedule, SSLTrainer, recalibrate_batchnorm
from ddkd.subsets import select_subset
from ddkd.teach import sources
from ddkd.teach.experts import (
    StudentLoss,
    experts_plan,
    init_student,
    resolve_compile,
    train_experts,
)
from ddkd.teach.stagewise import fit_skd_stages, stagewise_students
from ddkd.teach.targets import compute_targets

log = logging.getLogger(__name__)



def _bar(total: int, desc: str, unit: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False)


def student_config(config: TeachConfig, image_shape: tuple[int, int, int], out_dim: int,
                   output: str = "linear"):
    c, h, w = image_shape
    if h != w:
        raise ConfigError(f"images are {h}x{w}; the ConvNet student needs square images")
    sc = ConvNetConfig(
        in_channels=c, image_size=h, depth=config.student.depth, width=config.student.width,
        norm=config.student.norm, out_dim=out_dim, output=output,
    )
    if sc.feature_dim < 1:
        raise ConfigError(f"student.depth {sc.depth} halves {h}x{w} images to nothing; use at "
                          f"most depth {max(1, h.bit_length() - 1)}")
    return sc


class _Teacher:
    """The resolved teacher before training: module, description, normalisation, source file."""

    def __init__(self, net: torch.nn.Module, arch: dict, meta: dict, normalize: Normalization,
                 file: Path | None, dim: int):
        self.net, self.arch, self.meta, self.normalize, self.file = net, arch, meta, normalize, file
        self.dim = dim  # the teacher's feature dimension = the students' target dimension


def _resolve_teacher(config: TeachConfig, train: ImageTensors) -> _Teacher:
    """Load (or build untrained) the teacher and check it fits the data, before any writing."""
    tc = config.teacher
    channels = train.shape[0]
    fitted = Normalization.fit(train.images)
    if tc.source == "train":
        rc = sources.resnet_config(tc, channels)
        gen = make_generator(config.seed, Stream.TEACHER_INIT)
        with global_cpu_rng_from(gen):
            net: torch.nn.Module = ResNet(rc)
        return _Teacher(net, {"kind": "resnet", **asdict(rc)}, {}, fitted, None, rc.feature_dim)
    if tc.source == "shipped":
        path = sources.shipped_teacher_path(config.data.dataset)
        net, arch, meta = sources.load_checkpoint_teacher(str(path), tc, channels, None)
        where = f"the shipped teacher {path.name}"
    else:
        path = Path(tc.checkpoint)  # type: ignore[arg-type]
        net, arch, meta = sources.load_checkpoint_teacher(str(path), tc, channels, tc.factory)
        where = f"--teacher-checkpoint {path}"
    norm = meta.get("normalization")
    normalize = Normalization(tuple(norm["mean"]), tuple(norm["std"])) if norm else fitted
    if len(normalize.mean) != channels:
        raise ConfigError(f"{where} was trained on {len(normalize.mean)}-channel images, "
                          f"but {train.name} has {channels}")
    dim = sources.check_teacher_output(net, normalize(train.images[:2]), where)
    return _Teacher(net, arch, meta, normalize, path, dim)


@dataclass
class _Plan:
    """Everything ``teach`` decides and loads before its first write."""

    config: TeachConfig
    train: ImageTensors  # the run's training images (the subset, when data.subset is set)
    test: ImageTensors
    indices: torch.Tensor  # (N,) of ``train`` into the dataset's training split
    teacher: _Teacher
    objective: Objective  # unfitted until the targets phase
    stagewise: bool  # skd: block stages before the recorded global stage
    device: torch.device
    dist: Ranks


def prepare(config: TeachConfig, out: str | Path, device: torch.device, dist: Ranks) -> _Plan:
    """Check everything that can fail on user input and load the data and the teacher, before
    the run directory is touched."""
    check_writable(out, "--out", kind="dir")  # before any work: a folder we cannot write to
    full_train = load_dataset(config.data.dataset, "train", config.data.data_root)
    test = load_dataset(config.data.dataset, "test", config.data.data_root)
    indices = select_subset(len(full_train), config.data.subset, config.seed)
    train = full_train.subset(indices)
    teacher = _resolve_teacher(config, train)
    student_config(config, train.shape, teacher.dim)  # validates the student before writing
    objective = _objective(config, teacher, len(train))
    autocast_dtype(config.teacher.precision, device, "teacher.precision")
    experts_plan(config.experts, device)
    return _Plan(config, train, test, indices, teacher, objective,
                 stagewise=isinstance(objective, SKDObjective), device=device, dist=dist)


def run_teach(
    config: TeachConfig,
    out: str | Path,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: list[str] | None = None,
    recipe: str | None = None,
    dist: Ranks | None = None,
) -> dict:
    """Run ``ddkd teach`` into ``out``; returns the summary (also written to summary.json).

    ``dist`` (``--devices``): the experts are shared out across processes (expert k is
    trained by rank k mod world size, each writes its own shards, rank 0 assembles them);
    the teacher must already exist (shipped or a checkpoint), and rank 0 alone computes the
    targets and the kNN report and writes every other file.
    """
    t_start = time.time()
    dist = dist or Ranks()
    plan = prepare(config, out, device, dist)
    if dist.is_main:
        run = prepare_run_dir(out, to_dict(config), resume=resume, overwrite=overwrite,
                              complete=lambda old: to_dict(build_config(TeachConfig, old)))
    dist.barrier()
    if not dist.is_main:
        run = RunDir(Path(out))
    if run.is_complete():
        log.info("run %s is already complete", run.root)
        return json.loads(run.summary.read_text())
    inputs = _record_environment(plan, run, resume, command, recipe)
    plan.teacher.net.to(device)
    _teacher_phase(plan, run, progress)  # 1: the teacher
    z_train, zca = _targets_phase(plan, run, progress)  # 2: its targets (and ZCA)
    knn = _knn_phase(plan, run, inputs, z_train)  # 3: what its features are worth
    sc = student_config(config, plan.train.shape, plan.objective.student_dim,
                        student_output(plan.objective, config.student.width))
    expert_losses = _record_experts(plan, sc, z_train, zca, run, progress)  # 4: the experts
    if not dist.is_main:
        return {"run": str(run.root), "rank": dist.rank}
    summary = {
        "run": str(run.root),
        "dataset": config.data.dataset,
        "train_images": len(plan.train),
        "target_dim": int(z_train.shape[1]),
        "teacher_knn": knn,
        "experts": config.experts.num_experts,
        "expert_epochs": config.experts.epochs,
        "expert_final_loss_mean": (sum(expert_losses) / len(expert_losses)
                                   if expert_losses else None),
        "expert_fit": _expert_fit(plan.objective, z_train, expert_losses, config.experts),
        "seconds": round(time.time() - t_start, 1),
    }
    write_json(run.summary, summary)
    return summary


def _record_environment(plan: _Plan, run: RunDir, resume: bool, command: list[str] | None,
                        recipe: str | None) -> dict:
    """Write environment.json (library versions, command, checksums of the inputs); a resumed
    run must have the same inputs. -> the record's ``inputs``."""
    teacher_file = plan.teacher.file
    env = {**environment_record(plan.device), "command": command, "recipe": recipe}
    env["inputs"] = {
        "dataset": plan.config.data.dataset,
        "train_checksum": plan.train.checksum(),
        "test_checksum": plan.test.checksum(),
        "teacher_file": str(teacher_file) if teacher_file else None,
        "teacher_checksum": sha256_file(teacher_file) if teacher_file else None,
    }
    if resume and run.environment.is_file():
        before = read_json_object(run.environment, "--resume").get("inputs")
        before = before if isinstance(before, dict) else {}
        changed = [k for k in ("train_checksum", "test_checksum", "teacher_checksum")
                   if before.get(k) != env["inputs"][k]]
        if changed:
            raise ConfigError(f"--resume: the inputs differ from those of the run in {run.root} "
                              f"({', '.join(changed)}): the dataset or teacher file changed; "
                              "start a new run")
    if plan.dist.is_main:
        write_json(run.environment, env)
    return env["inputs"]


def _teacher_phase(plan: _Plan, run: RunDir, progress: bool) -> None:
    """The run's teacher (read back on resume), trained here when teacher.source = train."""
    teacher = plan.teacher
    if run.teacher.is_file():
        state, _, _, meta = load_weights(run.teacher)
        teacher.net.load_state_dict(state)
        teacher.meta = meta
    elif plan.config.teacher.source == "train":
        _train_teacher(plan.config, teacher, plan.train, run, plan.device, progress, plan.dist)
    teacher.net.eval()


def _targets_phase(plan: _Plan, run: RunDir, progress: bool
                   ) -> tuple[torch.Tensor, ZCA | None]:
    """The teacher's features of the training images, with the objective fitted once on them
    (its state saved with them) and the ZCA transform of the experts' inputs, if asked for.

    Several processes: each computes the features of its share of the images (every world-th
    one), all gather them, and rank 0 fits and writes; the others read its file.
    -> ``(z_train (N, D), zca)``; ``plan.objective`` is fitted."""
    config, teacher, train, dist = plan.config, plan.teacher, plan.train, plan.dist
    if not run.targets.is_file():
        share = torch.arange(dist.rank, len(train), dist.world)
        bar = _bar(len(share), "targets", "img", progress and dist.is_main)
        z_share = compute_targets(teacher.net, train.images[share], teacher.normalize,
                                  plan.device, on_batch=bar.update)
        bar.close()
        z_train = torch.empty(len(train), z_share.shape[1])
        for rank, part in enumerate(dist.gather(z_share)):
            z_train[rank :: dist.world] = part
        if dist.is_main:
            _fit_and_save_targets(plan, run, z_train)
        dist.barrier()  # targets.h5 is written
    z_train, _, _ = load_targets(run.targets)
    zca_tensors = load_zca(run.targets)
    zca = ZCA(**zca_tensors, eps=config.data.zca_eps) if zca_tensors else None
    plan.objective.load_state_dict(load_objective_state(run.targets)[1])
    return z_train, zca


def _fit_and_save_targets(plan: _Plan, run: RunDir, z_train: torch.Tensor) -> None:
    config, teacher, train, objective = plan.config, plan.teacher, plan.train, plan.objective
    zca = (ZCA.fit(teacher.normalize(train.images), config.data.zca_eps)
           if config.data.zca else None)
    objective.fit(z_train, make_generator(config.seed, Stream.OBJECTIVE_FIT))
    if plan.stagewise:  # the block stages' normalisers
        fit_skd_stages(typing.cast(SKDObjective, objective), teacher.net,
                       student_config(config, train.shape, 1),
                       teacher.normalize(train.images.to(plan.device)))
    save_targets(run.targets, z_train, plan.indices,
                 {"normalization": asdict(teacher.normalize), "teacher": teacher.arch},
                 zca.tensors() if zca else None, objective.name, objective.state_dict())


def _knn_phase(plan: _Plan, run: RunDir, inputs: dict, z_train: torch.Tensor) -> dict:
    """The kNN report of the teacher's features, saved with the teacher (teacher.h5, which
    supersedes the training checkpoints) on its first pass; -> the report."""
    config, teacher, dist = plan.config, plan.teacher, plan.dist
    if not run.teacher.is_file() and dist.is_main:
        knn = _knn_report(config, teacher, plan.train, plan.test, z_train, plan.device)
        meta = {**teacher.meta, "normalization": asdict(teacher.normalize), "knn": knn,
                "source": config.teacher.source, "source_file": inputs["teacher_file"],
                "source_checksum": inputs["teacher_checksum"]}
        kind = teacher.arch["kind"]
        arch_config = {k: v for k, v in teacher.arch.items() if k != "kind"}
        save_weights(run.teacher, teacher.net.state_dict(), kind, arch_config, meta)
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # teacher.h5 supersedes them
        teacher.meta = meta
        append_jsonl(run.metrics, {"phase": "knn", **knn})
    dist.barrier()  # teacher.h5 (with the kNN report) is written
    if not dist.is_main:
        teacher.meta = load_weights(run.teacher)[3]
    knn = teacher.meta["knn"]
    log.info("kNN accuracy on %s test (k=%d): teacher %.2f%%, random-init network %.2f%%, "
             "raw pixels %.2f%%", config.data.dataset, config.teacher.knn_k,
             100 * knn["teacher"], 100 * knn["random_init"], 100 * knn["raw_pixels"])
    return knn


def _check_in_step(net: torch.nn.Module, dist: Ranks) -> None:
    """Processes that trained one network data-parallel must hold the same weights."""
    if dist.world == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum()
    mean = float(dist.sum([total.reshape(1)])[0]) / dist.world
    if abs(float(total) - mean) > 1e-6 * max(1.0, abs(mean)):
        raise TrainingError(f"process {dist.rank}'s teacher weights differ from the others' "
                            "after data-parallel training (parameter sum "
                            f"{float(total):.8g}, mean over processes {mean:.8g})")


def _train_teacher(config: TeachConfig, teacher: _Teacher, train: ImageTensors, run: RunDir,
                   device: torch.device, progress: bool, dist: Ranks) -> None:
    tc = config.teacher
    if tc.batch_size < 2 * dist.world:
        raise ConfigError(f"teacher.batch_size {tc.batch_size} leaves fewer than 2 images per "
                          f"process on {dist.world} processes")
    trainer = SSLTrainer(
        teacher.net, typing.cast(ResNet, teacher.net).config.feature_dim, tc.ssl,
        SSLSchedule(tc.epochs, tc.batch_size, tc.lr, tc.weight_decay),
        teacher.normalize, train.shape, device, config.seed, proj_dim=tc.proj_dim, dist=dist,
        amp_dtype=autocast_dtype(tc.precision, device, "teacher.precision"),
    )
    ckpt = run.checkpoints / "teacher.pt"
    if ckpt.is_file():
        trainer.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True))
        log.info("resuming teacher training after epoch %d", trainer.epoch)
    steps = max(1, len(train) // min(tc.batch_size, len(train)))
    bar = _bar(tc.epochs * steps, f"teacher ({tc.ssl})", "step", progress and dist.is_main)
    bar.update(trainer.epoch * steps)
    while trainer.epoch < tc.epochs:
        t0 = time.time()
        def on_step(i: int, v: float) -> None:
            bar.update(1)
            bar.set_postfix(epoch=trainer.epoch + 1, loss=f"{v:.3g}")

        loss = trainer.train_epoch(train.images, on_step=on_step)
        if dist.is_main:
            append_jsonl(run.metrics, {"phase": "teacher", "epoch": trainer.epoch,
                                       "loss": loss, "seconds": round(time.time() - t0, 2)})
            save_torch(ckpt, trainer.state_dict())
    bar.close()
    _check_in_step(teacher.net, dist)
    recalibrate_batchnorm(teacher.net, train.images, teacher.normalize, device)
    teacher.meta = {"ssl": tc.ssl, "epochs": tc.epochs, "seed": config.seed,
                    "dataset": config.data.dataset}


def _knn_report(config: TeachConfig, teacher: _Teacher, train: ImageTensors,
                test: ImageTensors, z_train: torch.Tensor, device: torch.device) -> dict:
    """kNN accuracy of the teacher, of a randomly initialised twin, and of raw pixels."""
    k, norm = config.teacher.knn_k, teacher.normalize
    labels = (train.labels, test.labels)
    z_test = extract_features(teacher.net, test.images, norm, device)
    if teacher.arch["kind"] == "factory":
        random_net = sources.build_from_factory(teacher.arch["factory"])
    else:
        gen = make_generator(config.seed, Stream.RANDOM_NET)
        with global_cpu_rng_from(gen):
            random_net = type(teacher.net)(teacher.net.config)
    # As initialised (running stats 0/1): re-estimating them on data gives random features
    # that score lower still on kNN, which would flatter the teacher.
    random_net.to(device)
    r_train = extract_features(random_net, train.images, norm, device)
    r_test = extract_features(random_net, test.images, norm, device)
    px_train = norm(train.images).flatten(1)
    px_test = norm(test.images).flatten(1)
    nc = train.num_classes
    return {
        "k": k,
        "teacher": knn_accuracy(z_train, labels[0], z_test, labels[1], nc, k),
        "random_init": knn_accuracy(r_train, labels[0], r_test, labels[1], nc, k),
        "raw_pixels": knn_accuracy(px_train, labels[0], px_test, labels[1], nc, k),
        "bank": len(train),
        "queries": len(test),
    }


def _expert_fit(objective: Objective, z_train: torch.Tensor, losses: list[float],
                ec: ExpertConfig) -> float | None:
    """The fraction of the targets' variance that the experts explain at their last epoch,
    ``1 - loss / loss of the targets' mean`` (an R^2), for the objectives whose loss is a
    weighted MSE of the output against the target (``Objective.regression``: mse, kdep, skd's
    global stage; None for tcs and ssld). Warns when it is near zero: the students then
    learned the mean and nothing else, and no synthetic set can carry what they never
    learned."""
    if not objective.regression or not losses:
        return None
    objective.to(z_train.device)
    targets = objective.targets(z_train).float()
    constant = objective.loss(targets.mean(0, keepdim=True).expand_as(targets), targets).item()
    final = sum(losses) / len(losses)
    fit = 1.0 - final / constant if constant > 0 else 0.0
    if fit < 0.1:
        rms = targets.pow(2).mean().sqrt().item()
        hint = ("--set experts.target_norm=standardize (see ddkd/objectives/mse.py)"
                if isinstance(objective, MSEObjective) and ec.target_norm == "none"
                else "raise experts.epochs or experts.lr")
        log.warning("the experts explain only %.1f%% of the targets' variance after %d epochs "
                    "(final loss %.3g, the loss of the targets' mean %.3g, their RMS %.3g): they "
                    "learned little beyond the targets' mean, so their trajectories carry little "
                    "of the teacher; %s", 100 * fit, ec.epochs, final, constant, rms, hint)
    return round(fit, 4)


def _objective(config: TeachConfig, teacher: _Teacher, num_train: int) -> Objective:
    """The experts' KD objective, unfitted (checked against the teacher and the data before
    anything is written)."""
    ec = config.experts
    if not issubclass(OBJECTIVES[ec.objective], MSEObjective) and ec.target_norm != "none":
        log.info("experts.target_norm = %s is mse's (and skd's global stage's) option; %s "
                 "keeps its own target scale", ec.target_norm, ec.objective)
    if ec.objective == "skd":
        teacher_stage_modules(teacher.net)  # a teacher without stages cannot teach skd
    if ec.objective == "ssld" and ec.anchors > num_train:
        raise ConfigError(f"ssld: experts.anchors = {ec.anchors} k-means anchors need at least "
                          f"as many training images, got {num_train}; lower --set "
                          "experts.anchors")
    return objective_from_config(ec, teacher.dim, config.student.width)


def _record_experts(plan: _Plan, sc: ConvNetConfig, z_train: torch.Tensor, zca: ZCA | None,
                    run: RunDir, progress: bool) -> list[float]:
    """Train the experts that have no shard yet, assemble experts.h5; -> final KD losses."""
    ec, dist = plan.config.experts, plan.dist
    if ec.num_experts == 0:
        return []
    if not run.experts.is_file():
        _train_missing_experts(plan, sc, z_train, zca, run, progress)
        if dist.is_main:
            spec = ParamSpec.of(init_student(sc, plan.config.seed, 0))
            header = ExpertsHeader(
                num_experts=ec.num_experts, epochs=ec.epochs, n_params=spec.numel,
                dtype=ec.dtype, student=asdict(sc), param_spec=spec, experts_config=asdict(ec),
                objective=ec.objective, seed=plan.config.seed,
            )
            assemble_experts(run.experts, run.expert_shards, header)
        dist.barrier()  # experts.h5 is complete
        if not dist.is_main:
            return []
    with ExpertsFile(run.experts) as experts:
        return [float(experts.losses(k)[-1]) for k in range(len(experts))]


@dataclass
class _ExpertData:
    """What every expert trains on, on the device."""

    x: torch.Tensor  # (N, C, H, W): the normalised (and, with data.zca, whitened) images
    z: torch.Tensor  # (N, D): the targets in the objective's space
    teacher_x: torch.Tensor | None  # skd: the teacher's input (never whitened); else None


def _train_missing_experts(plan: _Plan, sc: ConvNetConfig, z_train: torch.Tensor,
                           zca: ZCA | None, run: RunDir, progress: bool) -> None:
    """This process's experts without a shard (expert k: rank k mod world), group by group,
    each written to its shard as it finishes."""
    ec, dist, device = plan.config.experts, plan.dist, plan.device
    x_train = plan.teacher.normalize(plan.train.images.to(device))
    data = _ExpertData(zca(x_train) if zca is not None else x_train,
                       plan.objective.targets(z_train).to(device),
                       x_train if plan.stagewise else None)
    if dist.is_main:
        run.expert_shards.mkdir(exist_ok=True)
    dist.barrier()
    shards = [run.expert_shards / f"expert_{k:04d}.h5" for k in range(ec.num_experts)]
    todo = [k for k in range(ec.num_experts)
            if k % dist.world == dist.rank and not shards[k].is_file()]
    per_batch, student_loss = _student_loss(plan, sc, run, len(todo))
    bar = _bar(len(todo) * ec.epochs, "experts", "epoch", progress)
    for first in range(0, len(todo), per_batch):
        group = todo[first : first + per_batch]
        results = train_experts(sc, ec, data.x, data.z, plan.config.seed, group,
                                _on_epoch(run, bar, group), loss=student_loss,
                                init=_stagewise_init(plan, sc, data, group, run, bar))
        for k, (trajectory, losses) in zip(group, results, strict=True):
            write_expert_shard(shards[k], trajectory, losses, seed=plan.config.seed,
                               dtype=ec.dtype)
    bar.close()
    dist.barrier()  # every process's shards are written


def _student_loss(plan: _Plan, sc: ConvNetConfig, run: RunDir, todo: int
                  ) -> tuple[int, StudentLoss]:
    """``(students per group, the students' loss)``: what experts.per_batch = 0 and
    experts.compile = auto resolve to on this device, logged and put on record."""
    ec, device = plan.config.experts, plan.device
    per_batch, amp_dtype = experts_plan(ec, device)
    compiled = resolve_compile(ec.compile, device)
    student_loss = StudentLoss(sc, plan.objective.to(device).loss, compile=compiled,
                               amp_dtype=amp_dtype)
    log.info("training %d experts, %d at a time%s%s", todo, per_batch,
             ", compiled (torch.compile)" if compiled else "",
             ", bfloat16 autocast" if amp_dtype is not None else "")
    if plan.dist.is_main:
        append_jsonl(run.metrics, {"phase": "experts-setup", "compiled": compiled,
                                   "per_batch": per_batch, "device": device.type,
                                   "precision": ec.precision})
    return per_batch, student_loss


def _on_epoch(run: RunDir, bar: tqdm, group: list[int]) -> Callable[[int, list[float]], None]:
    """The experts' per-epoch report: the progress bar and metrics.jsonl."""
    def on_epoch(epoch: int, losses: list[float]) -> None:
        bar.update(len(group))
        bar.set_postfix(experts=f"{group[0]}-{group[-1]}", loss=f"{max(losses):.4g}")
        for k, loss in zip(group, losses, strict=True):
            append_jsonl(run.metrics, {"phase": "expert", "expert": k, "epoch": epoch + 1,
                                       "loss": loss})

    return on_epoch


def _stagewise_init(plan: _Plan, sc: ConvNetConfig, data: _ExpertData, group: list[int],
                    run: RunDir, bar: tqdm) -> Callable[[int], ConvNet] | None:
    """``skd``: the group's students after the block stages (their losses go to metrics.jsonl
    as phase "expert-stage"), where the recorded global stage starts; None otherwise."""
    if not plan.stagewise:
        return None

    def on_stage(k: int, s: int, losses: list[float]) -> None:
        bar.set_postfix(expert=k, stage=s + 1, loss=f"{losses[-1]:.4g}")
        for epoch, loss in enumerate(losses):
            append_jsonl(run.metrics, {"phase": "expert-stage", "expert": k, "stage": s + 1,
                                       "epoch": epoch + 1, "loss": loss})

    skd = typing.cast(SKDObjective, plan.objective.to(plan.device))
    students = stagewise_students(sc, plan.config.experts, skd, plan.teacher.net,
                                  typing.cast(torch.Tensor, data.teacher_x), data.x,
                                  plan.config.seed, group, on_stage)
    return students.__getitem__
