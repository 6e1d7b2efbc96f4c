"""``ddkd synthesize``: the outer loop of MKDT's trajectory matching, resumable.

Every outer iteration draws its expert, start epoch and synthetic batches from a generator
derived from ``(seed, iteration)``, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would (the checkpoint holds images, targets, step size and optimiser states).
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ddkd.config import SynthConfig, to_dict
from ddkd.data.transforms import ZCA, Normalization
from ddkd.data.views import check_views_fit, parse_views
from ddkd.errors import ConfigError, TrainingError
from ddkd.io.atomic import (
    append_jsonl,
    check_writable,
    read_jsonl,
    remove_stale_temps,
    save_torch,
    write_json,
)
from ddkd.io.experts import ExpertsFile
from ddkd.io.provenance import teacher_record
from ddkd.io.run import config_diff, open_run, read_json_object
from ddkd.io.synthset import SynthSet, save_synthset
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec
from ddkd.objectives import restore_objective
from ddkd.runtime import Ranks, autocast_dtype, environment_record, make_generator, sha256_file
from ddkd.subsets import high_loss_indices, random_indices
from ddkd.synth.augment import DSA
from ddkd.synth.matching import (  # noqa: F401 (MetaGradient: for callers and tests)
    MetaGradient,
    Segment,
    matching_loss,
    meta_gradient,
    meta_gradient_constant_memory,
    mse_loss,
    sample_batches,
    unroll,
)
from ddkd.synth.views import initial_view_targets, load_run_teacher, viewed_pairs, with_views

log = logging.getLogger(__name__)

_STREAM_INIT, _STREAM_ITERATION = 40, 41


def default_out(dataset: str, config: SynthConfig, n: int) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)
    size = f"ipc{config.ipc}" if config.ipc is not None else f"n{n}"
    return Path("synth_sets") / f"{slug}_{size}_seed{config.seed}.h5"


def sample_segment(experts: ExpertsFile, config: SynthConfig, n_syn: int, iteration: int,
                   device: torch.device, j: int = 0) -> Segment:
    """Segment ``j`` of one outer iteration: expert, start epoch and inner batches, seeded by
    ``(iteration, j)`` (segment 0 by the iteration alone, as with one segment)."""
    streams = (iteration,) if j == 0 else (iteration, j)
    gen = make_generator(config.seed, _STREAM_ITERATION, *streams)
    k = int(torch.randint(len(experts), (1,), generator=gen))
    t = int(torch.randint(config.max_start_epoch, (1,), generator=gen))
    batches = sample_batches(n_syn, config.syn_steps, config.batch_syn, gen)
    return Segment(
        expert=k,
        start_epoch=t,
        theta_start=experts.snapshot(k, t).to(device),
        theta_target=experts.snapshot(k, t + config.expert_epochs).to(device),
        batches=tuple(b.to(device) for b in batches),
    )


_STREAM_PROBE = 42


def probe_matching_loss(model, spec, experts: ExpertsFile, config: SynthConfig, x: torch.Tensor,
                        y: torch.Tensor, alpha: float, device: torch.device,
                        loss_fn=mse_loss) -> float:
    """Mean matching loss over every (expert, start epoch) pair with fixed batches.

    The per-iteration loss mixes segments of very different difficulty; this fixed probe, run
    on the initial and on the final set, shows what the optimisation achieved.
    """
    losses = []
    for k in range(len(experts)):
        for t in range(config.max_start_epoch):
            gen = make_generator(config.seed, _STREAM_PROBE, k, t)
            batches = sample_batches(len(x), config.syn_steps, config.batch_syn, gen)
            theta_start = experts.snapshot(k, t).to(device)
            theta_target = experts.snapshot(k, t + config.expert_epochs).to(device)
            theta = unroll(model, spec, theta_start, x.detach(), y.detach(),
                           torch.tensor(alpha, device=device, dtype=x.dtype),
                           [b.to(device) for b in batches], loss_fn, create_graph=False)
            losses.append(float(matching_loss(theta.detach(), theta_start, theta_target)))
    return sum(losses) / len(losses)


class _State:
    """The learnable synthetic set and its three optimisers (MKDT: SGD, momentum 0.5).

    The step size is stored as log(alpha) so that it stays positive. Its optimiser's learning
    rate is ``lr_lr / alpha_0^2``: at initialisation a step on log(alpha) then moves alpha by
    the same amount as MKDT's step on alpha itself (d alpha = alpha d log alpha).

    Trust region (``config.max_log_lr_step`` = b): an iteration's change of log(alpha) is
    clipped to [-b, b], and so is the velocity SGD's momentum keeps (``lr * buffer``), so that
    one spike of the meta-gradient moves alpha by at most a factor e^b now and less after it.
    Within the bound nothing is touched: the update is SGD's, bit for bit.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, alpha0: float, config: SynthConfig):
        self.x = x.clone().requires_grad_(True)
        self.y = y.clone().requires_grad_(True)
        self.log_alpha = torch.tensor(math.log(alpha0), device=x.device, requires_grad=True)
        m = config.momentum
        self.opt_x = torch.optim.SGD([self.x], lr=config.lr_img, momentum=m)
        self.opt_y = torch.optim.SGD([self.y], lr=config.lr_targets, momentum=m)
        self.opt_alpha = torch.optim.SGD([self.log_alpha], lr=config.lr_lr / alpha0**2,
                                         momentum=m)
        self.max_log_step = config.max_log_lr_step
        self.log_step = 0.0  # the last iteration's change of log(alpha), as SGD asked for it

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    def step(self, grad_x: torch.Tensor, grad_y: torch.Tensor, grad_alpha: torch.Tensor) -> bool:
        """One outer update; -> whether the trust region bounded the step size's change."""
        self.x.grad, self.y.grad = grad_x, grad_y
        self.log_alpha.grad = grad_alpha * self.alpha  # chain rule through alpha = exp(.)
        before = self.log_alpha.detach().clone()
        for opt in (self.opt_x, self.opt_y, self.opt_alpha):
            opt.step()
        return self._bound_log_alpha(before)

    def _bound_log_alpha(self, before: torch.Tensor) -> bool:
        self.log_step = float(self.log_alpha.detach() - before)
        bound = self.max_log_step
        if not abs(self.log_step) > bound:  # (a NaN step is the guard's business)
            return False
        with torch.no_grad():
            self.log_alpha.copy_(before + math.copysign(bound, self.log_step))
            lr = self.opt_alpha.param_groups[0]["lr"]
            buffer = self.opt_alpha.state[self.log_alpha].get("momentum_buffer")
            if buffer is not None and lr > 0:
                buffer.clamp_(-bound / lr, bound / lr)
        return True

    def state_dict(self) -> dict:
        return {"x": self.x.detach(), "y": self.y.detach(), "log_alpha": self.log_alpha.detach(),
                "opt_x": self.opt_x.state_dict(), "opt_y": self.opt_y.state_dict(),
                "opt_alpha": self.opt_alpha.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.x.copy_(state["x"])
            self.y.copy_(state["y"])
            self.log_alpha.copy_(state["log_alpha"])
        self.opt_x.load_state_dict(state["opt_x"])
        self.opt_y.load_state_dict(state["opt_y"])
        self.opt_alpha.load_state_dict(state["opt_alpha"])


def _clone(obj):
    """A deep copy of a state dict (tensors cloned), cheap next to one matching iteration."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def run_synthesize(
    config: SynthConfig,
    run_dir: str | Path,
    out: str | Path | None,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: list[str] | None = None,
    dist: Ranks | None = None,
) -> dict:
    """Distil a synthetic set from the teach run ``run_dir`` into ``out`` (HDF5).

    ``dist``: this process's rank in a data-parallel run (``--devices``): every rank computes
    its share of each iteration's ``config.segments`` segments, the meta-gradients are summed
    across ranks, and every rank applies the same update; rank 0 alone writes files.
    """
    t_start = time.time()
    dist = dist or Ranks()
    if config.segments % dist.world:
        raise ConfigError(f"--segments {config.segments} cannot be shared by {dist.world} "
                          f"processes: give a multiple of {dist.world}")
    if out is not None:
        check_writable(out, "--out")  # before any work (a default --out: once it is known)
    parse_views(config.views)  # an unknown view is named before the run is read
    opened = open_run(run_dir)
    experts = ExpertsFile(opened.run.experts)
    try:
        return _synthesize(config, opened, experts, out, device, resume, overwrite, progress,
                           command, t_start, dist)
    finally:
        experts.close()


def _synthesize(config, opened, experts, out, device, resume, overwrite, progress, command,
                t_start, dist: Ranks) -> dict:
    header = experts.header
    # The start epoch t is drawn from {0, ..., T+ - 1} and the target is t + M.
    last_needed = config.max_start_epoch - 1 + config.expert_epochs
    if last_needed > header.epochs:
        raise ConfigError(
            f"--max-start-epoch {config.max_start_epoch} with --expert-epochs "
            f"{config.expert_epochs} needs snapshots up to epoch {last_needed}, beyond the "
            f"recorded trajectories ({header.epochs} epochs in {opened.run.experts}); lower "
            "them or record longer experts"
        )
    experts.check_finite(last_needed)  # a damaged file is named now, not as a divergence
    num_train = opened.images.shape[0]
    n = config.num_images(opened.num_classes, num_train)
    views = parse_views(config.views)
    check_views_fit(views, tuple(opened.images.shape), where=f"the images of {opened.run.root}")
    n_pairs = n * max(1, len(views))  # the inner loop's batches index (image, view) pairs
    view_teacher = (load_run_teacher(opened.run.teacher)
                    if views and config.view_init == "teacher" else None)
    dataset = opened.teach_config["data"]["dataset"]
    out = Path(out) if out is not None else default_out(dataset, config, n)
    check_writable(out, "--out")
    if config.zca and opened.zca is None:
        raise ConfigError(f"--zca: the experts of {opened.run.root} were trained without ZCA "
                          "whitening; make a whitened run with `ddkd teach --set data.zca=true`")
    student = ConvNetConfig(**header.student)
    model = ConvNet(student).to(device)
    spec = header.param_spec
    if ParamSpec.of(model) != spec:
        raise ConfigError(f"{opened.run.experts}: its parameter layout does not match the "
                          "ConvNet it describes (written by another ddkd version?)")
    amp_dtype = autocast_dtype(config.precision, device, "--precision")
    partial = out.with_name(out.name + ".partial")
    ckpt = partial / "checkpoint.pt"
    record = {"synthesize": to_dict(config), "run": str(opened.run.root.resolve()), "size": n,
              "experts_checksum": sha256_file(opened.run.experts)}
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
    if resume:
        if not (partial / "config.json").is_file():
            raise ConfigError(f"--resume: there is no unfinished run for {out} (no {partial})")
        saved = read_json_object(partial / "config.json", "--resume")
        # a run begun by an older ddkd lacks the settings added since: they had their defaults
        previous = saved.get("synthesize")
        saved["synthesize"] = {**to_dict(SynthConfig()),
                               **(previous if isinstance(previous, dict) else {})}
        if saved != record:
            diffs = [d.removeprefix("synthesize.") for d in config_diff(saved, record)]
            raise ConfigError(f"--resume: the configuration differs from the unfinished run in "
                              f"{partial} ({'; '.join(diffs[:5])}); resume with the same "
                              "options, or drop --resume and pass --overwrite to start again")
    elif partial.exists() and not overwrite:
        raise ConfigError(f"an unfinished run for {out} exists ({partial}); pass --resume "
                          "to continue it or --overwrite to start again")
    dist.barrier()  # every rank has checked the same state before rank 0 changes it
    if dist.is_main:
        if not resume and partial.exists():
            shutil.rmtree(partial)
        # Leftovers of killed writes of this output (the set itself, the checkpoint): this run
        # is now their only writer.
        stale = remove_stale_temps(out.parent, out.name) + remove_stale_temps(partial)
        if stale:
            log.info("removed %d temporary files of interrupted writes of %s", len(stale), out)
        partial.mkdir(parents=True, exist_ok=True)
        write_json(partial / "config.json", record)

    normalize = Normalization(tuple(opened.normalization["mean"]),
                              tuple(opened.normalization["std"]))
    zca = None
    if opened.zca is not None:
        # The experts define the input space: a whitened run is matched in whitened space.
        zca = ZCA(**opened.zca, eps=float(opened.teach_config["data"].get("zca_eps", 0.1)))
        log.info("the run's experts were trained on ZCA-whitened images: matching in that space")
    x_real = normalize(opened.images.to(device))  # (N, C, H, W)
    if zca is not None:
        x_real = zca(x_real)
    # The experts regressed the objective's targets: the synthetic targets live there too.
    objective = restore_objective(opened.objective, opened.objective_state or {},
                                  opened.targets.shape[1]).to(device)
    z_real = objective.targets(opened.targets.to(device))  # (N, target_dim)

    if config.init == "high-loss":
        snapshots = (experts.snapshot(k, 1) for k in range(len(experts)))
        init = high_loss_indices(model, spec, snapshots, x_real, z_real, n,
                                 objective.per_example_loss)
    else:
        init = random_indices(num_train, n, make_generator(config.seed, _STREAM_INIT))
    alpha0 = config.lr_init if config.lr_init is not None else header.experts_config["lr"]
    y_init = z_real[init.to(device)]
    if views:  # (n, V, D): one learnable target per (image, view)
        y_init = initial_view_targets(views, config.view_init, y_init, opened.images[init],
                                      view_teacher, normalize, objective, device)
    state = _State(x_real[init.to(device)], y_init, alpha0, config)
    del x_real, z_real, view_teacher

    def probe_set(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return viewed_pairs(x.detach(), y.detach(), views) if views else (x, y)

    initial_probe = probe_matching_loss(model, spec, experts, config, *probe_set(state.x, state.y),
                                        alpha0, device, objective.loss)
    start = 0
    if resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        state.load_state_dict(saved["state"])
        start = int(saved["iteration"])
        log.info("resuming %s at iteration %d", out, start)

    dsa = DSA(config.seed) if config.augment == "dsa" else None
    bar = tqdm(total=config.iterations, initial=start, desc="matching", unit="it",
               disable=not (progress and dist.is_main and sys.stderr.isatty()),
               dynamic_ncols=True, leave=False)

    saved_at = start  # the iteration the checkpoint on disk holds

    def save_checkpoint(state_dict: dict, iteration: int) -> None:
        nonlocal saved_at
        saved_at = iteration
        if not dist.is_main:
            return
        save_torch(ckpt, {"state": state_dict, "iteration": iteration})

    clipped, largest_log_step = 0, 0.0
    last_ckpt = time.time()
    compute = meta_gradient if config.memory == "unrolled" else meta_gradient_constant_memory
    if views:
        compute = with_views(compute, views)
    for it in range(start, config.iterations):
        # This process's share of the iteration's segments (all of them on one device).
        mine = [sample_segment(experts, config, n_pairs, it, device, j)
                for j in range(config.segments) if j % dist.world == dist.rank]
        total = None
        for segment, j in zip(mine, range(dist.rank, config.segments, dist.world), strict=True):
            augment = ((lambda x, step, it=it, j=j: dsa(x, it, step, j)) if dsa is not None
                       else None)
            mg = compute(model, spec, segment, state.x, state.y, state.alpha.to(state.x.dtype),
                         objective.loss, augment=augment, amp_dtype=amp_dtype)
            parts = (mg.loss.reshape(1), mg.grad_x, mg.grad_y, mg.grad_alpha.reshape(1))
            total = (list(parts) if total is None
                     else [a + b for a, b in zip(total, parts, strict=True)])
        # the mean over every segment of the iteration, wherever it was computed
        loss_t, grad_x, grad_y, grad_alpha = (t / config.segments for t in dist.sum(total))
        loss = float(loss_t)
        finite = math.isfinite(loss) and all(
            bool(torch.isfinite(g).all()) for g in (grad_x, grad_y, grad_alpha))
        before = _clone(state.state_dict())
        problem, bounded = None, False
        if not finite:
            problem = f"the matching loss or its gradient became non-finite (loss {loss})"
        else:
            bounded = state.step(grad_x, grad_y, grad_alpha.reshape(()))
            largest_log_step = max(largest_log_step, abs(state.log_step))
            if bounded:
                clipped += 1
                if clipped == 1:
                    log.warning("iteration %d: the meta-gradient asked to change log(step size) "
                                "by %.3g; bounded to %g (max_log_lr_step)", it + 1,
                                state.log_step, config.max_log_lr_step)
            alpha = float(state.alpha)
            if not (alpha0 / config.max_lr_factor <= alpha <= alpha0 * config.max_lr_factor):
                what = "exploded" if not alpha < alpha0 else "collapsed"
                problem = (f"the step size {what} to {alpha:.4g} (from {alpha0}, allowed within "
                           f"a factor {config.max_lr_factor:g})")
        if problem is not None:
            save_checkpoint(before, it)  # the last good state, for inspection or --resume
            raise TrainingError(
                f"{problem} at iteration {it + 1}; the last good state (after iteration {it}) "
                f"is kept in {partial}; start again with a lower --lr-img / --lr-lr (now "
                f"{config.lr_img:g} / {config.lr_lr:g}) and --overwrite"
            )
        if dist.rank == 0:
            segments = [(s.expert, s.start_epoch) for s in mine]  # rank 0's share
            append_jsonl(partial / "metrics.jsonl", {
                "iteration": it + 1, "loss": loss, "lr": alpha,
                "expert": segments[0][0], "start_epoch": segments[0][1],
                **({"segments": segments} if len(segments) > 1 else {}),
                **({"lr_bounded": True} if bounded else {})})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{alpha:.4g}")
        if time.time() - last_ckpt >= 60 * config.checkpoint_minutes:
            save_checkpoint(state.state_dict(), it + 1)
            last_ckpt = time.time()
    bar.close()
    if start < config.iterations:
        log.info("step size: largest change of log(alpha) in one iteration %.3g (bound %g), "
                 "bounded in %d of %d iterations", largest_log_step, config.max_log_lr_step,
                 clipped, config.iterations - start)
    if saved_at != config.iterations:
        # The finished state, so that a failed final write (a full disk) resumes straight to it.
        save_checkpoint(state.state_dict(), config.iterations)

    final_probe = probe_matching_loss(model, spec, experts, config, *probe_set(state.x, state.y),
                                      float(state.alpha), device, objective.loss)
    if not dist.is_main:  # every rank holds the same set; rank 0 writes it
        return {"out": str(out), "rank": dist.rank, "probe_final": final_probe}
    history = {}
    for row in read_jsonl(partial / "metrics.jsonl"):  # later rows win after a resume
        if row["iteration"] <= config.iterations:
            history[row["iteration"]] = row
    losses = [history[i]["loss"] for i in sorted(history)]
    lrs = [history[i]["lr"] for i in sorted(history)]
    window = max(1, len(losses) // 10)
    teacher = teacher_record(opened.run.teacher, opened.teach_config["teacher"])
    provenance = {
        "source_dataset": dataset,
        "source_train_checksum": opened.environment["inputs"]["train_checksum"],
        "source_num_classes": opened.num_classes,
        "run": str(opened.run.root.resolve()),
        "teacher_checksum": teacher["checksum"],
        "teacher": teacher,
        "experts_checksum": sha256_file(opened.run.experts),
        "num_experts": len(experts),
        "student": asdict(student),
        "init": config.init,
        **({"views": list(views), "view_init": config.view_init} if views else {}),
        "iterations": config.iterations,
        "matching_loss_initial": initial_probe,
        "matching_loss_final": final_probe,
        "seed": config.seed,
        "processes": dist.world,
        "teach_config": opened.teach_config,
        "environment": {**environment_record(device), "command": command},
    }
    synth = SynthSet(
        images=state.x.detach().cpu(),
        targets=state.y.detach().cpu(),
        lr=float(state.alpha),
        mean=torch.tensor(normalize.mean, dtype=torch.float64),
        std=torch.tensor(normalize.std, dtype=torch.float64),
        objective=header.objective,
        objective_state=objective.state_dict(),
        provenance=provenance,
        config=to_dict(config),
        init_indices=opened.indices[init],
        history={"loss": losses, "lr": lrs},
        zca=zca,
        views=views,
    )
    save_synthset(out, synth)
    shutil.rmtree(partial)
    return {
        "out": str(out),
        "images": n,
        "iterations": config.iterations,
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "probe_initial": initial_probe,
        "probe_final": final_probe,
        "window": window,
        "lr": float(state.alpha),
        "lr_init": alpha0,
        "seconds": round(time.time() - t_start, 1),
    }
