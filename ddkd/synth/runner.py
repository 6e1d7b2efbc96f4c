"""``ddkd synthesize``: the outer loop of MKDT's trajectory matching, resumable.

Every outer iteration draws its expert, start epoch and synthetic batches from a generator
derived from ``(seed, iteration)``, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would (the checkpoint holds images, targets, step size and optimiser states).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ddkd.config import SynthConfig, to_dict
from ddkd.data.views import check_views_fit, parse_views
from ddkd.errors import ConfigError, TrainingError
from ddkd.io.atomic import check_writable
from ddkd.io.experts import ExpertsFile
from ddkd.io.partial import PartialSet
from ddkd.io.provenance import synth_provenance
from ddkd.io.run import OpenedRun, open_run
from ddkd.io.synthset import SynthSet
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec
from ddkd.objectives import Objective
from ddkd.runtime import (
    Ranks,
    Stream,
    autocast_dtype,
    environment_record,
    make_generator,
    sha256_file,
)
from ddkd.subsets import high_loss_indices, random_indices
from ddkd.synth.augment import DSA
from ddkd.synth.matching import (
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



def default_out(dataset: str, config: SynthConfig, n: int) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)
    size = f"ipc{config.ipc}" if config.ipc is not None else f"n{n}"
    return Path("synth_sets") / f"{slug}_{size}_seed{config.seed}.h5"


def sample_segment(experts: ExpertsFile, config: SynthConfig, n_syn: int, iteration: int,
                   device: torch.device, j: int = 0) -> Segment:
    """Segment ``j`` of one outer iteration: expert, start epoch and inner batches, seeded by
    ``(iteration, j)`` (segment 0 by the iteration alone, as with one segment)."""
    streams = (iteration,) if j == 0 else (iteration, j)
    gen = make_generator(config.seed, Stream.SYNTH_ITERATION, *streams)
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
            gen = make_generator(config.seed, Stream.SYNTH_PROBE, k, t)
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
        self.init_indices: torch.Tensor | None = None  # (n,) into the run's images, if any
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
    with ExpertsFile(opened.run.experts) as experts:
        plan = prepare(config, opened, experts, out, device, resume, overwrite, dist)
        dist.barrier()  # every rank has checked the same state before rank 0 changes it
        plan.output.start(plan.record, resume)
        state = initial_state(plan)
        initial_probe = probe_matching_loss(plan.model, plan.spec, experts, config,
                                            *_probe_set(plan, state), plan.alpha0, device,
                                            plan.objective.loss)
        start = resume_state(plan, state) if resume else 0
        tally = _Tally()
        bar = tqdm(total=config.iterations, initial=start, desc="matching", unit="it",
                   disable=not (progress and dist.is_main and sys.stderr.isatty()),
                   dynamic_ncols=True, leave=False)
        for it in range(start, config.iterations):
            step = match_step(plan, state, tally, it)
            plan.output.append_metrics(step.metrics(it))
            bar.update(1)
            bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{step.alpha:.4g}")
            plan.output.checkpoint_if_due(state.state_dict, it + 1, config.checkpoint_minutes)
        bar.close()
        tally.report(config, config.iterations - start)
        if plan.output.saved_at != config.iterations:
            # The finished state, so that a failed final write (a full disk) resumes to it.
            plan.output.save_checkpoint(state.state_dict(), config.iterations)
        final_probe = probe_matching_loss(plan.model, plan.spec, experts, config,
                                          *_probe_set(plan, state), float(state.alpha), device,
                                          plan.objective.loss)
        if not dist.is_main:  # every rank holds the same set; rank 0 writes it
            return {"out": str(plan.output.out), "rank": dist.rank, "probe_final": final_probe}
        losses = finish(plan, state, (initial_probe, final_probe), command)
    window = max(1, len(losses) // 10)
    return {"out": str(plan.output.out), "images": plan.n, "iterations": config.iterations,
            "loss_first": sum(losses[:window]) / window,
            "loss_last": sum(losses[-window:]) / window,
            "probe_initial": initial_probe, "probe_final": final_probe, "window": window,
            "lr": float(state.alpha), "lr_init": plan.alpha0,
            "seconds": round(time.time() - t_start, 1)}


@dataclass
class _Plan:
    """Everything ``synthesize`` decides and opens before its first write."""

    config: SynthConfig
    opened: OpenedRun
    experts: ExpertsFile
    output: PartialSet
    record: dict  # the partial folder's config.json
    n: int  # images of the set
    views: tuple[str, ...]  # --views: the predefined views of every image (empty: none)
    model: ConvNet  # the student (a template: its parameters come from the experts)
    spec: ParamSpec
    objective: Objective  # fitted, on the device
    alpha0: float  # the initial step size
    compute: Callable[..., MetaGradient]  # MTT's unrolled or TESLA's constant-memory gradient
    dsa: DSA | None
    amp_dtype: torch.dtype | None
    device: torch.device
    dist: Ranks


def prepare(config: SynthConfig, opened: OpenedRun, experts: ExpertsFile,
            out: str | Path | None, device: torch.device, resume: bool, overwrite: bool,
            dist: Ranks) -> _Plan:
    """Check every option against the run and the output and open every input; writes
    nothing."""
    header = experts.header
    # The start epoch t is drawn from {0, ..., T+ - 1} and the target is t + M.
    last_needed = config.max_start_epoch - 1 + config.expert_epochs
    if last_needed > header.epochs:
        raise ConfigError(
            f"--max-start-epoch {config.max_start_epoch} with --matched-epochs "
            f"{config.expert_epochs} needs snapshots up to epoch {last_needed}, beyond the "
            f"recorded trajectories ({header.epochs} epochs in {opened.run.experts}); lower "
            "them or record longer experts"
        )
    experts.check_finite(last_needed)  # a damaged file is named now, not as a divergence
    views = tuple(parse_views(config.views))
    check_views_fit(views, tuple(opened.images.shape), where=f"the images of {opened.run.root}")
    n = config.num_images(opened.num_classes, opened.images.shape[0])
    out = Path(out) if out is not None else default_out(opened.dataset, config, n)
    check_writable(out, "--out")
    if config.zca and opened.zca is None:
        raise ConfigError(f"--zca: the experts of {opened.run.root} were trained without ZCA "
                          "whitening; make a whitened run with `ddkd teach --set data.zca=true`")
    model = ConvNet(ConvNetConfig(**header.student)).to(device)
    if ParamSpec.of(model) != header.param_spec:
        raise ConfigError(f"{opened.run.experts}: its parameter layout does not match the "
                          "ConvNet it describes (written by another ddkd version?)")
    amp_dtype = autocast_dtype(config.precision, device, "--precision")
    output = PartialSet(out, dist.is_main)
    record = {"synthesize": to_dict(config), "run": str(opened.run.root.resolve()), "size": n,
              "experts_checksum": sha256_file(opened.run.experts)}
    output.check(record, resume, overwrite, _complete_record)
    if opened.zca is not None:
        # The experts define the input space: a whitened run is matched in whitened space.
        log.info("the run's experts were trained on ZCA-whitened images: matching in that space")
    compute = meta_gradient if config.memory == "unrolled" else meta_gradient_constant_memory
    return _Plan(
        config, opened, experts, output, record, n, views, model, header.param_spec,
        objective=opened.objective.to(device),
        alpha0=config.lr_init if config.lr_init is not None else header.experts_config["lr"],
        compute=with_views(compute, views) if views else compute,
        dsa=DSA(config.seed) if config.augment == "dsa" else None,
        amp_dtype=amp_dtype, device=device, dist=dist)


def _complete_record(saved: dict) -> dict:
    """A run begun by an older ddkd lacks the settings added since: they had their defaults."""
    previous = saved.get("synthesize")
    return {**saved, "synthesize": {**to_dict(SynthConfig()),
                                    **(previous if isinstance(previous, dict) else {})}}


def initial_state(plan: _Plan) -> _State:
    """The set before the first iteration: MKDT's high-loss images of the run (or a random
    subset), with their targets in the objective's space, and the experts' step size."""
    opened, device = plan.opened, plan.device
    x_real = opened.normalization(opened.images.to(device))  # (N, C, H, W)
    if opened.zca is not None:
        x_real = opened.zca(x_real)
    # The experts regressed the objective's targets: the synthetic targets live there too.
    z_real = plan.objective.targets(opened.targets.to(device))  # (N, target_dim)
    if plan.config.init == "high-loss":
        snapshots = (plan.experts.snapshot(k, 1) for k in range(len(plan.experts)))
        init = high_loss_indices(plan.model, plan.spec, snapshots, x_real, z_real, plan.n,
                                 plan.objective.per_example_loss)
    else:
        init = random_indices(len(x_real), plan.n, make_generator(plan.config.seed,
                                                                   Stream.SYNTH_INIT))
    x_init, y_init = x_real[init.to(device)], z_real[init.to(device)]
    del x_real, z_real
    if plan.views:  # (n, V, D): one learnable target per (image, view)
        teacher = (load_run_teacher(opened.run.teacher)
                   if plan.config.view_init == "teacher" else None)
        y_init = initial_view_targets(plan.views, plan.config.view_init, y_init,
                                      opened.images[init], teacher, opened.normalization,
                                      plan.objective, device)
        if plan.dist.world > 1:  # one start for every rank, even if their teacher forwards differ
            y_init = plan.dist.sum([y_init])[0] / plan.dist.world
    state = _State(x_init, y_init, plan.alpha0, plan.config)
    state.init_indices = init
    return state


def _probe_set(plan: _Plan, state: _State) -> tuple[torch.Tensor, torch.Tensor]:
    """The set as the fixed matching-loss probe sees it: its (image, view) pairs with views."""
    if plan.views:
        return viewed_pairs(state.x.detach(), state.y.detach(), plan.views)
    return state.x, state.y


def resume_state(plan: _Plan, state: _State) -> int:
    """Load the checkpoint of an interrupted run into ``state``; -> the iteration to go on
    from (0 when it stopped before its first checkpoint)."""
    saved = plan.output.load_checkpoint(plan.device)
    if saved is None:
        return 0
    state.load_state_dict(saved[0])
    log.info("resuming %s at iteration %d", plan.output.out, saved[1])
    return saved[1]


@dataclass
class _Step:
    """What one outer iteration did, for metrics.jsonl and the progress bar."""

    loss: float
    alpha: float
    bounded: bool
    segments: list[tuple[int, int]]  # (expert, start epoch) of this process's segments

    def metrics(self, it: int) -> dict:
        return {"iteration": it + 1, "loss": self.loss, "lr": self.alpha,
                "expert": self.segments[0][0], "start_epoch": self.segments[0][1],
                **({"segments": self.segments} if len(self.segments) > 1 else {}),
                **({"lr_bounded": True} if self.bounded else {})}


@dataclass
class _Tally:
    """How the trust region of the step size acted over the iterations of this process."""

    bounded: int = 0
    largest_log_step: float = 0.0

    def add(self, state: _State, bounded: bool, it: int, bound: float) -> None:
        self.largest_log_step = max(self.largest_log_step, abs(state.log_step))
        if bounded:
            self.bounded += 1
            if self.bounded == 1:
                log.warning("iteration %d: the meta-gradient asked to change log(step size) "
                            "by %.3g; bounded to %g (max_log_lr_step)", it + 1,
                            state.log_step, bound)

    def report(self, config: SynthConfig, iterations: int) -> None:
        if iterations > 0:
            log.info("step size: largest change of log(alpha) in one iteration %.3g (bound "
                     "%g), bounded in %d of %d iterations", self.largest_log_step,
                     config.max_log_lr_step, self.bounded, iterations)


def match_step(plan: _Plan, state: _State, tally: _Tally, it: int) -> _Step:
    """Outer iteration ``it``: sample this process's segments -> their meta-gradients ->
    the mean over every process -> the guards -> one update of ``state`` (in place).

    A non-finite meta-gradient or a step size leaving its band stops the run with the last
    good state checkpointed (``TrainingError``)."""
    config = plan.config
    pairs = plan.n * max(1, len(plan.views))  # the inner batches index (image, view) pairs
    mine = [sample_segment(plan.experts, config, pairs, it, plan.device, j)
            for j in range(config.segments) if j % plan.dist.world == plan.dist.rank]
    loss, grad_x, grad_y, grad_alpha = _mean_meta_gradient(plan, state, mine, it)
    before = _clone(state.state_dict())
    problem, bounded = None, False
    if not (math.isfinite(loss) and all(bool(torch.isfinite(g).all())
                                        for g in (grad_x, grad_y, grad_alpha))):
        problem = f"the matching loss or its gradient became non-finite (loss {loss})"
    else:
        bounded = state.step(grad_x, grad_y, grad_alpha.reshape(()))
        tally.add(state, bounded, it, config.max_log_lr_step)
        problem = _step_size_problem(float(state.alpha), plan.alpha0, config.max_lr_factor)
    if problem is not None:
        plan.output.save_checkpoint(before, it)  # the last good state, for inspection/--resume
        raise TrainingError(
            f"{problem} at iteration {it + 1}; the last good state (after iteration {it}) "
            f"is kept in {plan.output.folder}; start again with a lower --lr-img / --lr-lr "
            f"(now {config.lr_img:g} / {config.lr_lr:g}) and --overwrite"
        )
    return _Step(loss, float(state.alpha), bounded, [(s.expert, s.start_epoch) for s in mine])


def _mean_meta_gradient(plan: _Plan, state: _State, mine: list[Segment], it: int
                        ) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_x, grad_y, grad_alpha)``: the mean over every segment of iteration ``it``,
    wherever it was computed (this process computes ``mine``)."""
    config, dist, dsa = plan.config, plan.dist, plan.dsa
    total: list[torch.Tensor] = []
    for segment, j in zip(mine, range(dist.rank, config.segments, dist.world), strict=True):
        augment = ((lambda x, step, it=it, j=j: dsa(x, it, step, j)) if dsa is not None
                   else None)
        mg = plan.compute(plan.model, plan.spec, segment, state.x, state.y,
                          state.alpha.to(state.x.dtype), plan.objective.loss, augment=augment,
                          amp_dtype=plan.amp_dtype)
        parts = (mg.loss.reshape(1), mg.grad_x, mg.grad_y, mg.grad_alpha.reshape(1))
        total = list(parts) if not total else [a + b for a, b in zip(total, parts,
                                                                      strict=True)]
    loss_t, grad_x, grad_y, grad_alpha = (t / config.segments for t in dist.sum(total))
    return float(loss_t), grad_x, grad_y, grad_alpha


def _step_size_problem(alpha: float, alpha0: float, factor: float) -> str | None:
    """Why the step size ``alpha`` stops the run (outside ``[alpha0 / f, alpha0 * f]``)."""
    if alpha0 / factor <= alpha <= alpha0 * factor:
        return None
    what = "exploded" if not alpha < alpha0 else "collapsed"
    return (f"the step size {what} to {alpha:.4g} (from {alpha0}, allowed within a factor "
            f"{factor:g})")


def finish(plan: _Plan, state: _State, probes: tuple[float, float],
           command: list[str] | None) -> list[float]:
    """Write the finished set with its provenance and history; -> the history's per-iteration
    losses."""
    history = plan.output.history(plan.config.iterations)
    losses, lrs = [row["loss"] for row in history], [row["lr"] for row in history]
    header, opened = plan.experts.header, plan.opened
    provenance = synth_provenance(
        opened, len(plan.experts), asdict(plan.model.config), to_dict(plan.config), probes,
        plan.dist.world, {**environment_record(plan.device), "command": command})
    if plan.views:
        provenance.update(views=list(plan.views), view_init=plan.config.view_init)
    plan.output.finish(SynthSet(
        images=state.x.detach().cpu(),
        targets=state.y.detach().cpu(),
        lr=float(state.alpha),
        mean=torch.tensor(opened.normalization.mean, dtype=torch.float64),
        std=torch.tensor(opened.normalization.std, dtype=torch.float64),
        objective=header.objective,
        objective_state=plan.objective.state_dict(),
        provenance=provenance,
        config=to_dict(plan.config),
        init_indices=opened.indices[state.init_indices],
        history={"loss": losses, "lr": lrs},  # type: ignore[dict-item]
        zca=opened.zca,
        views=plan.views,
    ))
    return losses
