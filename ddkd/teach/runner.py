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
from dataclasses import asdict
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
from ddkd.models.convnet import ConvNetConfig
from ddkd.models.functional import ParamSpec
from ddkd.models.resnet import ResNet
from ddkd.objectives import OBJECTIVES, Objective, build_objective, student_output
from ddkd.objectives.mse import MSEObjective
from ddkd.objectives.skd import SKDObjective, teacher_stage_modules
from ddkd.probes import extract_features, knn_accuracy
from ddkd.runtime import (
    Ranks,
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

_STREAM_RANDOM_NET, _STREAM_TEACHER_INIT, _STREAM_OBJECTIVE = 30, 31, 32


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
    if sc.feature_dim() < 1:
        raise ConfigError(f"student.depth {sc.depth} halves {h}x{w} images to nothing; use at "
                          f"most depth {max(1, h.bit_length() - 1)}")
    return sc


class _Teacher:
    """The resolved teacher before training: module, description, normalisation, source file."""

    def __init__(self, net, arch: dict, meta: dict, normalize: Normalization, file: Path | None,
                 dim: int):
        self.net, self.arch, self.meta, self.normalize, self.file = net, arch, meta, normalize, file
        self.dim = dim  # the teacher's feature dimension = the students' target dimension


def _resolve_teacher(config: TeachConfig, train: ImageTensors) -> _Teacher:
    """Load (or build untrained) the teacher and check it fits the data, before any writing."""
    tc = config.teacher
    channels = train.shape[0]
    fitted = Normalization.fit(train.images)
    if tc.source == "train":
        rc = sources.resnet_config(tc, channels)
        gen = make_generator(config.seed, _STREAM_TEACHER_INIT)
        with global_cpu_rng_from(gen):
            net = ResNet(rc)
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
    check_writable(out, "--out", kind="dir")  # before any work: a folder we cannot write to
    # Everything that can fail on user input is checked before the run directory is touched.
    full_train = load_dataset(config.data.dataset, "train", config.data.data_root)
    test = load_dataset(config.data.dataset, "test", config.data.data_root)
    indices = select_subset(len(full_train), config.data.subset, config.seed)
    train = full_train.subset(indices)
    teacher = _resolve_teacher(config, train)
    student_config(config, train.shape, teacher.dim)  # validates the student before writing
    objective = _objective(config, teacher, len(train))
    autocast_dtype(config.teacher.precision, device, "teacher.precision")
    experts_plan(config.experts, device)
    if dist.is_main:
        run = prepare_run_dir(out, to_dict(config), resume=resume, overwrite=overwrite,
                              complete=lambda old: to_dict(build_config(TeachConfig, old)))
    dist.barrier()
    if not dist.is_main:
        run = RunDir(Path(out))
    if run.is_complete():
        log.info("run %s is already complete", run.root)
        return json.loads(run.summary.read_text())
    env = environment_record(device)
    env["command"] = command
    env["recipe"] = recipe
    env["inputs"] = {
        "dataset": config.data.dataset,
        "train_checksum": train.checksum(),
        "test_checksum": test.checksum(),
        "teacher_file": str(teacher.file) if teacher.file else None,
        "teacher_checksum": sha256_file(teacher.file) if teacher.file else None,
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
    if dist.is_main:
        write_json(run.environment, env)
    teacher.net.to(device)

    # Phase 1: the teacher.
    if run.teacher.is_file():
        state, _, _, meta = load_weights(run.teacher)
        teacher.net.load_state_dict(state)
        teacher.meta = meta
    elif config.teacher.source == "train":
        _train_teacher(config, teacher, train, run, device, progress, dist)
    teacher.net.eval()

    # Phase 2: the targets (and the ZCA transform of the experts' inputs, if asked for).
    # The objective is fitted once on the teacher's features; its state is saved with them.
    # Several processes: each computes the features of its share of the images (every
    # world-th one), all gather them, and rank 0 fits and writes; the others read its file.
    if not run.targets.is_file():
        share = torch.arange(dist.rank, len(train), dist.world)
        bar = _bar(len(share), "targets", "img", progress and dist.is_main)
        z_share = compute_targets(teacher.net, train.images[share], teacher.normalize, device,
                                  on_batch=bar.update)
        bar.close()
        z_train = torch.empty(len(train), z_share.shape[1])
        for rank, part in enumerate(dist.gather(z_share)):
            z_train[rank :: dist.world] = part
        if dist.is_main:
            zca = (ZCA.fit(teacher.normalize(train.images), config.data.zca_eps)
                   if config.data.zca else None)
            objective.fit(z_train, make_generator(config.seed, _STREAM_OBJECTIVE))
            if isinstance(objective, SKDObjective):  # the block stages' normalisers
                fit_skd_stages(objective, teacher.net, student_config(config, train.shape, 1),
                               teacher.normalize(train.images.to(device)))
            save_targets(run.targets, z_train, indices,
                         {"normalization": asdict(teacher.normalize), "teacher": teacher.arch},
                         zca.tensors() if zca else None, objective.name,
                         objective.state_dict())
        dist.barrier()  # targets.h5 is written
    z_train, _, _ = load_targets(run.targets)
    zca_tensors = load_zca(run.targets)
    zca = ZCA(**zca_tensors, eps=config.data.zca_eps) if zca_tensors else None
    objective.load_state_dict(load_objective_state(run.targets)[1])
    sc = student_config(config, train.shape, objective.student_dim,
                        student_output(objective, config.student.width))

    # Phase 3: what the teacher's features are worth (saved with the teacher).
    if not run.teacher.is_file() and dist.is_main:
        knn = _knn_report(config, teacher, train, test, z_train, device)
        meta = {**teacher.meta, "normalization": asdict(teacher.normalize), "knn": knn,
                "source": config.teacher.source, "source_file": env["inputs"]["teacher_file"],
                "source_checksum": env["inputs"]["teacher_checksum"]}
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

    # Phase 4: the experts.
    expert_losses = _record_experts(config, sc, train, objective, z_train, teacher,
                                    zca, run, device, progress, dist)
    if not dist.is_main:
        return {"run": str(run.root), "rank": dist.rank}
    fit = _expert_fit(objective, z_train, expert_losses, config.experts)
    summary = {
        "run": str(run.root),
        "dataset": config.data.dataset,
        "train_images": len(train),
        "target_dim": int(z_train.shape[1]),
        "teacher_knn": knn,
        "experts": config.experts.num_experts,
        "expert_epochs": config.experts.epochs,
        "expert_final_loss_mean": (sum(expert_losses) / len(expert_losses)
                                   if expert_losses else None),
        "expert_fit": fit,
        "seconds": round(time.time() - t_start, 1),
    }
    write_json(run.summary, summary)
    return summary


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
        teacher.net, teacher.net.config.feature_dim, tc.ssl,
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
        loss = trainer.train_epoch(train.images, on_step=lambda i, v: (
            bar.update(1), bar.set_postfix(epoch=trainer.epoch + 1, loss=f"{v:.3g}")))
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
        gen = make_generator(config.seed, _STREAM_RANDOM_NET)
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
    name, anchors, teacher_dim = config.experts.objective, config.experts.anchors, teacher.dim
    standardizable = issubclass(OBJECTIVES[name], MSEObjective)  # mse, skd's global stage
    if not standardizable and config.experts.target_norm != "none":
        log.info("experts.target_norm = %s is mse's (and skd's global stage's) option; %s "
                 "keeps its own target scale",
                 config.experts.target_norm, name)
    if name == "skd":
        teacher_stage_modules(teacher.net)  # a teacher without stages cannot teach skd
    if name == "kdep":
        return build_objective(name, teacher_dim, student_width=config.student.width)
    if name == "ssld":
        if anchors > num_train:
            raise ConfigError(f"ssld: experts.anchors = {anchors} k-means anchors need at least "
                              f"as many training images, got {num_train}; lower --set "
                              "experts.anchors")
        return build_objective(name, teacher_dim, num_anchors=anchors)
    if standardizable:
        return build_objective(name, teacher_dim,
                               standardize=config.experts.target_norm == "standardize")
    return build_objective(name, teacher_dim)


def _record_experts(config: TeachConfig, sc: ConvNetConfig, train: ImageTensors,
                    objective: Objective, z_train: torch.Tensor,
                    teacher: _Teacher, zca: ZCA | None, run: RunDir,
                    device: torch.device, progress: bool, dist: Ranks) -> list[float]:
    """Train the experts that have no shard yet, assemble experts.h5; -> final KD losses.

    ``skd``: each group first goes through the block stages (their losses go to
    metrics.jsonl as phase "expert-stage"); the recorded trajectory is the global stage."""
    ec = config.experts
    if ec.num_experts == 0:
        return []
    if not run.experts.is_file():
        # (N, C, H, W) float, kept on the device
        x_train = teacher.normalize(train.images.to(device))
        teacher_x = x_train if isinstance(objective, SKDObjective) else None
        if zca is not None:
            x_train = zca(x_train)
        z_dev = objective.targets(z_train).to(device)  # in the objective's target space
        if dist.is_main:
            run.expert_shards.mkdir(exist_ok=True)
        dist.barrier()
        shards = [run.expert_shards / f"expert_{k:04d}.h5" for k in range(ec.num_experts)]
        todo = [k for k in range(ec.num_experts)
                if k % dist.world == dist.rank and not shards[k].is_file()]
        per_batch, amp_dtype = experts_plan(ec, device)
        compiled = resolve_compile(ec.compile, device)
        student_loss = StudentLoss(sc, objective.to(device).loss, compile=compiled,
                                   amp_dtype=amp_dtype)
        log.info("training %d experts, %d at a time%s%s", len(todo), per_batch,
                 ", compiled (torch.compile)" if compiled else "",
                 ", bfloat16 autocast" if amp_dtype is not None else "")
        if dist.is_main:  # what experts.compile=auto and per_batch=0 resolved to, on record
            append_jsonl(run.metrics, {"phase": "experts-setup", "compiled": compiled,
                                       "per_batch": per_batch, "device": device.type,
                                       "precision": ec.precision})
        bar = _bar(len(todo) * ec.epochs, "experts", "epoch", progress)
        for first in range(0, len(todo), per_batch):
            group = todo[first : first + per_batch]

            def on_epoch(epoch: int, losses: list[float], group: list[int] = group) -> None:
                bar.update(len(group))
                bar.set_postfix(experts=f"{group[0]}-{group[-1]}", loss=f"{max(losses):.4g}")
                for k, loss in zip(group, losses, strict=True):
                    append_jsonl(run.metrics, {"phase": "expert", "expert": k,
                                               "epoch": epoch + 1, "loss": loss})

            init = None
            if isinstance(objective, SKDObjective):
                def on_stage(k: int, s: int, losses: list[float]) -> None:
                    bar.set_postfix(expert=k, stage=s + 1, loss=f"{losses[-1]:.4g}")
                    for epoch, loss in enumerate(losses):
                        append_jsonl(run.metrics, {"phase": "expert-stage", "expert": k,
                                                   "stage": s + 1, "epoch": epoch + 1,
                                                   "loss": loss})

                students = stagewise_students(sc, ec, objective.to(device), teacher.net,
                                              teacher_x, x_train, config.seed, group, on_stage)
                init = students.__getitem__
            results = train_experts(sc, ec, x_train, z_dev, config.seed, group, on_epoch,
                                    loss=student_loss, init=init)
            for k, (trajectory, losses) in zip(group, results, strict=True):
                write_expert_shard(shards[k], trajectory, losses, seed=config.seed,
                                   dtype=ec.dtype)
        bar.close()
        dist.barrier()  # every process's shards are written
        if not dist.is_main:
            dist.barrier()
            return []
        spec = ParamSpec.of(init_student(sc, config.seed, 0))
        header = ExpertsHeader(
            num_experts=ec.num_experts, epochs=ec.epochs, n_params=spec.numel, dtype=ec.dtype,
            student=asdict(sc), param_spec=spec, experts_config=asdict(ec),
            objective=ec.objective, seed=config.seed,
        )
        assemble_experts(run.experts, run.expert_shards, header)
        dist.barrier()  # experts.h5 is complete
    with ExpertsFile(run.experts) as experts:
        return [float(experts.losses(k)[-1]) for k in range(len(experts))]
