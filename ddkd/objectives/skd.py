"""``skd``: stagewise knowledge distillation (Kulkarni, Patil & Karande, "Data Efficient Stagewise
Knowledge Distillation", 2019), adapted to a feature teacher and the ConvNet student.

The student is trained block by block. In stage ``s`` only block ``s`` (conv, norm, ReLU, pool)
and a 1x1 adapter convolution (student width -> teacher channels, discarded afterwards) are
trained; the blocks before it are frozen (and in eval mode), the blocks after it are not run.
Block ``s`` regresses the teacher stage of the same down-sampling factor (``layer1``..``layer4``
of a ResNet, found by name): the stage whose map is the smallest one at least as large as the
block's output, average-pooled to the block's size and standardised per channel with the mean
and standard deviation fitted once on the training images. The loss is ``MSE_mean``. After the
``depth`` block stages comes the global-feature stage: MKDT's ``MSE_mean(head(f_s), f_t)`` on
the teacher feature (raw, or standardised per dimension exactly as ``mse`` does with
``experts.target_norm = standardize``), training every parameter (the paper's last stage
trains only what is left, with labels; here the last stage must move the whole network, or
the trajectory would say nothing about the encoder that a synthetic set is meant to pre-train).

**How ``synthesize`` treats the piecewise trajectory: as an initialisation.** The block stages
are run first and are not recorded (their losses go to metrics.jsonl); the experts file records
the global stage, whose epoch 0 is the stagewise-trained student. Trajectory matching therefore
works unchanged: the synthetic targets live in the global stage's target space (the teacher
features, as for ``mse``), and every matched segment starts from a stagewise-initialised student
rather than from a random one. ``evaluate`` pre-trains a fresh encoder on the set with the global
loss. The alternative, matching per-stage segments, would need the teacher's feature maps of the
synthetic images as further learned targets and a stage-aware inner loop, and was not chosen.

Fitted state: ``stage_source`` (the teacher stage of every block), ``stage_size`` (the block's
output size) and ``stage{s}_mean`` / ``stage{s}_std`` (the per-channel normalisers); with
standardised global targets also ``mean`` / ``std``, as for ``mse``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddkd.errors import ConfigError
from ddkd.objectives.mse import MSEObjective

#: the teacher modules whose outputs are the stages (those of ddkd's and torchvision's ResNets)
TEACHER_STAGES = ("layer1", "layer2", "layer3", "layer4")


def teacher_stage_modules(net: nn.Module) -> list[nn.Module]:
    """The teacher's stage modules, by name; a teacher without them cannot teach ``skd``."""
    modules = dict(net.named_modules())
    missing = [name for name in TEACHER_STAGES if name not in modules]
    if missing:
        raise ConfigError(
            f"--objective skd needs a teacher with the stages {', '.join(TEACHER_STAGES)} (a "
            f"ResNet); {type(net).__name__} has no {', '.join(missing)}")
    return [modules[name] for name in TEACHER_STAGES]


@torch.no_grad()
def teacher_stage_maps(net: nn.Module, x: torch.Tensor, stages: list[int]) -> list[torch.Tensor]:
    """The outputs ``(B, C_t, H_t, W_t)`` of the requested teacher ``stages`` (indices into
    :data:`TEACHER_STAGES`) for a batch ``x``, captured by forward hooks."""
    modules = teacher_stage_modules(net)
    captured: dict[int, torch.Tensor] = {}
    handles = [modules[t].register_forward_hook(
        lambda _m, _i, out, t=t: captured.__setitem__(t, out)) for t in set(stages)]
    try:
        net(x)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[t] for t in stages]


def plan_stages(student_sizes: list[int], teacher_sizes: list[int]) -> list[int]:
    """For every student block (its output size), the teacher stage it regresses: the smallest
    teacher map at least as large (pooled down to the block's size), else the largest one
    (average pooling then repeats its cells); of equal sizes, the deeper stage."""
    plan = []
    for size in student_sizes:
        fits = [t for t, ts in enumerate(teacher_sizes) if ts >= size]
        plan.append(min(fits, key=lambda t: (teacher_sizes[t], -t)) if fits
                    else max(range(len(teacher_sizes)), key=lambda t: (teacher_sizes[t], t)))
    return plan


class SKDObjective(MSEObjective):
    """Stagewise KD; the global stage's loss is :class:`MSEObjective`'s (see the module
    docstring). ``fit`` has nothing to fit on the final features; ``fit_stages`` fits the
    per-stage normalisers on the teacher's maps.

    Example:
        >>> obj = SKDObjective(teacher_dim=4)
        >>> obj.fit_stages([1], [2], [torch.zeros(3)], [torch.ones(3)])
        >>> obj.stage_targets(0, torch.ones(5, 3, 4, 4)).shape
        torch.Size([5, 3, 2, 2])
    """

    name = "skd"

    def __init__(self, teacher_dim: int, standardize: bool = False):
        super().__init__(teacher_dim, standardize)
        self.stage_source = self.stage_size = None
        self.means: list[torch.Tensor] = []
        self.stds: list[torch.Tensor] = []

    @property
    def num_stages(self) -> int:
        return 0 if self.stage_source is None else len(self.stage_source)

    def fit_stages(self, source: list[int], sizes: list[int], means: list[torch.Tensor],
                   stds: list[torch.Tensor]) -> None:
        """Set the plan (teacher stage and output size of every block) and the normalisers."""
        self.stage_source = torch.tensor(source, dtype=torch.int64)
        self.stage_size = torch.tensor(sizes, dtype=torch.int64)
        self.means = [m.float() for m in means]
        self.stds = [s.float().clamp_min(1e-6) for s in stds]

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.stage_source is None:
            raise RuntimeError("objective 'skd' is not fitted (no stage plan)")
        state = {"stage_source": self.stage_source, "stage_size": self.stage_size}
        for s, (mean, std) in enumerate(zip(self.means, self.stds, strict=True)):
            state[f"stage{s}_mean"], state[f"stage{s}_std"] = mean.cpu(), std.cpu()
        return {**state, **super().state_dict()}  # the global targets' mean and std, if any

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "stage_source" not in state or "stage_size" not in state:
            raise KeyError("objective 'skd' state lacks ['stage_source', 'stage_size']")
        depth = len(state["stage_source"])
        missing = [f"stage{s}_{k}" for s in range(depth) for k in ("mean", "std")
                   if f"stage{s}_{k}" not in state]
        if missing:
            raise KeyError(f"objective 'skd' state lacks {missing}")
        self.fit_stages(state["stage_source"].tolist(), state["stage_size"].tolist(),
                        [state[f"stage{s}_mean"] for s in range(depth)],
                        [state[f"stage{s}_std"] for s in range(depth)])
        super().load_state_dict({k: state[k] for k in ("mean", "std") if k in state})

    def to(self, device: torch.device) -> SKDObjective:
        self.means = [m.to(device) for m in self.means]
        self.stds = [s.to(device) for s in self.stds]
        super().to(device)
        return self

    def pool(self, s: int, teacher_map: torch.Tensor) -> torch.Tensor:
        """Teacher map ``(B, C_t, H_t, W_t)`` -> ``(B, C_t, h, h)``, block ``s``'s size."""
        size = int(self.stage_size[s])
        return F.adaptive_avg_pool2d(teacher_map, size)

    def stage_targets(self, s: int, teacher_map: torch.Tensor) -> torch.Tensor:
        """Block ``s``'s targets: its teacher stage's map, pooled and standardised."""
        mean, std = self.means[s], self.stds[s]
        return (self.pool(s, teacher_map) - mean[:, None, None]) / std[:, None, None]

    @staticmethod
    def stage_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction, target)
