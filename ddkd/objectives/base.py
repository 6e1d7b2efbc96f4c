"""The interface every KD objective follows (docs/method.md section 5, docs/objectives.md).

An objective is three things: a fixed transform of teacher features, fitted once on the
teacher's features of the training images (``fit``); the target space it maps them into
(``targets``), which is where the experts regress and where synthetic targets live; and the
student's loss against such a target (``loss``), computed from the student's output of width
``student_dim``. Its fitted state is a flat ``{name: tensor}`` dict, saved with the run and
copied into every synthetic set, so that evaluation uses the same targets.
"""

from __future__ import annotations

import torch


class Objective:
    """Base class; subclasses set ``name`` and implement ``fit``, ``targets`` and ``loss``."""

    name: str = ""
    #: state tensors (names) that ``fit`` sets; ``state_dict`` and ``load_state_dict`` use them
    state_names: tuple[str, ...] = ()
    #: the loss is a weighted MSE of the student output against the target, so a constant
    #: output's loss is the bar for the experts' fit (``ddkd teach``'s R^2)
    regression: bool = False

    def __init__(self, teacher_dim: int):
        self.teacher_dim = teacher_dim

    @staticmethod
    def teacher_dim_from_state(state: dict, target_dim: int) -> int:
        """The teacher's feature width, from a saved state and the targets' width."""
        return int(state["mean"].shape[0]) if "mean" in state else target_dim

    @property
    def student_dim(self) -> int:
        """Width of the student output the loss takes (the student's head size)."""
        return self.teacher_dim

    def fit(self, z_teacher: torch.Tensor, generator: torch.Generator) -> None:
        """Fit the fixed statistics on teacher features ``(N, D)``; the default has none."""

    def targets(self, z_teacher: torch.Tensor) -> torch.Tensor:
        """Teacher features ``(N, D)`` -> targets ``(N, target_dim)``."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Student output ``(B, student_dim)`` against targets ``(B, target_dim)`` -> scalar."""
        raise NotImplementedError

    def per_example_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``loss`` of every example on its own -> ``(B,)`` (high-loss selection)."""
        return torch.vmap(lambda o, t: self.loss(o[None], t[None]))(output, target)

    def state_dict(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.state_names if getattr(self, n, None) is None]
        if missing:
            raise RuntimeError(f"objective {self.name!r} is not fitted (no {missing})")
        return {n: getattr(self, n).detach().cpu() for n in self.state_names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.state_names if n not in state]
        if missing:
            raise KeyError(f"objective {self.name!r} state lacks {missing}")
        for n in self.state_names:
            setattr(self, n, state[n])

    def to(self, device: torch.device) -> Objective:
        for n in self.state_names:
            value = getattr(self, n, None)
            if value is not None:
                setattr(self, n, value.to(device))
        return self
