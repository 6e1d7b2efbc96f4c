"""Predefined views in trajectory matching: every synthetic image under each view of a fixed
set, each (image, view) pair with its own learnable target.

After Yu, Yao & Chiu, "Boost Self-Supervised Dataset Distillation via Parameterization,
Predefined Augmentation, and Approximation" (ICLR 2025, arXiv 2507.21455), who fix the
augmentations of self-supervised distillation to a predefined set (the 90-degree rotations) so
that each view's representation can be learned and stored. They distil with KRR-ST's kernel
objective; here the same idea is carried into MKDT's trajectory matching (beyond either paper).

In matching, the images ``x (n, C, H, W)`` are expanded into their ``n * V`` (image, view)
pairs (``ddkd.data.views.expand_views``, exact index permutations) and the inner loop draws
its mini-batches over the pairs, each regressed to its own target ``y[i, v]``. The
meta-gradient of a pair flows back through its view to its image, so every image gets the sum
of its views' gradients; the inner-loop functions of ``ddkd.synth.matching`` are unchanged
(they see a plain set of pairs).

Initial targets: the teacher's representation of each *viewed* real image (the teacher runs
once on ``view(real image)``, as ``ddkd teach`` ran it on the real images), mapped into the
objective's target space; the identity view keeps the run's own stored target bit for bit.
``view_init = "copy"`` gives every view the real image's target instead (the teacher is then
not needed; the ablation of "does the teacher's view of a rotated image carry information").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ddkd.data.transforms import Normalization
from ddkd.data.views import apply_view, expand_views
from ddkd.errors import ConfigError, TrainingError
from ddkd.io.weights import load_weights
from ddkd.models.resnet import ResNet, ResNetConfig
from ddkd.objectives.base import Objective
from ddkd.synth.matching import MetaGradient

log = logging.getLogger(__name__)

VIEW_INITS = ("teacher", "copy")


def load_run_teacher(path: Path) -> torch.nn.Module:
    """The teacher a run saved (``RUN/teacher.h5``), rebuilt in eval mode. Only ResNet teachers
    can be rebuilt from the file alone (a factory-made one needs its code)."""
    state, kind, arch, _ = load_weights(path)
    if kind != "resnet":
        raise ConfigError(f"--views with view_init teacher: the run's teacher {path} is a "
                          f"{kind!r}, which ddkd cannot rebuild from the file alone; expected a "
                          "ResNet teacher, or pass --set view_init=copy (every view starts "
                          "from the real image's target)")
    teacher = ResNet(ResNetConfig(**arch))
    teacher.load_state_dict(state)
    return teacher.eval()


@torch.no_grad()
def teacher_view_targets(teacher: torch.nn.Module, images: torch.Tensor,
                         normalize: Normalization, objective: Objective, view: str,
                         device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """The objective's targets of the teacher's features of ``view(images)``: ``(n, C, H, W)``
    uint8 pixels -> ``(n, target_dim)`` on ``device``."""
    teacher = teacher.to(device).eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = apply_view(images[start : start + batch_size].to(device), view)
        out.append(teacher(normalize(batch)).float())
    z = objective.targets(torch.cat(out))
    if not torch.isfinite(z).all():
        raise TrainingError(f"the teacher produced NaN/inf features for the {view} view of "
                            "the initial images")
    return z


def initial_view_targets(views: tuple[str, ...], mode: str, z_init: torch.Tensor,
                         images: torch.Tensor | None = None,
                         teacher: torch.nn.Module | None = None,
                         normalize: Normalization | None = None,
                         objective: Objective | None = None,
                         device: torch.device | None = None) -> torch.Tensor:
    """The per-view targets a viewed set starts from -> ``(n, V, D)``.

    Args:
        views: the view names.
        mode: ``teacher`` (the teacher's targets of each viewed real image; needs ``images``
            ``(n, C, H, W)`` uint8, ``teacher``, ``normalize``, ``objective``, ``device``) or
            ``copy`` (``z_init`` for every view).
        z_init: ``(n, D)`` the run's targets of the real images the set starts from; the
            identity view takes them as they are in either mode.
    """
    columns = []
    for view in views:
        if view == "identity" or mode == "copy":
            columns.append(z_init)
        else:
            if (teacher is None or images is None or objective is None or normalize is None
                    or device is None):
                raise ValueError("view_init 'teacher' needs the images, teacher, "
                                 "normalisation, objective and device")
            columns.append(teacher_view_targets(teacher, images, normalize, objective, view,
                                                device).to(z_init.dtype))
    return torch.stack(columns, dim=1)  # (n, V, D)


def viewed_pairs(x: torch.Tensor, y: torch.Tensor,
                 views: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (n, C, H, W)``, ``y (n, V, D)`` -> the pairs ``(n * V, C, H, W)``, ``(n * V, D)``."""
    return expand_views(x, views), y.flatten(0, 1)


MetaGradientFn = Callable[..., MetaGradient]


def with_views(compute: MetaGradientFn, views: tuple[str, ...]) -> MetaGradientFn:
    """A meta-gradient function (``meta_gradient`` or ``meta_gradient_constant_memory``) of a
    viewed set: same signature, with ``x_syn (n, C, H, W)`` and ``y_syn (n, V, D)``, and the
    segment's batches indexing the ``n * V`` pairs. Returns gradients shaped like ``x_syn``
    and ``y_syn``: a pair's image gradient goes back through its view to its image."""

    def viewed(model, spec, segment, x_syn, y_syn, alpha, *args, **kwargs) -> MetaGradient:
        x = x_syn.detach().requires_grad_(True)
        x_pairs, y_pairs = viewed_pairs(x, y_syn.detach(), views)
        mg = compute(model, spec, segment, x_pairs.detach(), y_pairs, alpha, *args, **kwargs)
        # The views are permutations: their vector-Jacobian product puts each pair's gradient
        # back on its image's pixels, summed over the views.
        (grad_x,) = torch.autograd.grad(x_pairs, x, grad_outputs=mg.grad_x)
        return MetaGradient(mg.loss, grad_x, mg.grad_y.reshape(y_syn.shape), mg.grad_alpha)

    return viewed
