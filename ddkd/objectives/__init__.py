"""The KD objectives (METHOD.md section 4): ``mse`` (MKDT), ``kdep``, ``tcs``, ``ssld``.

Each is one small unit with the interface of :class:`ddkd.objectives.base.Objective`.
"""

from __future__ import annotations

from ddkd.errors import ConfigError
from ddkd.objectives.base import Objective
from ddkd.objectives.kdep import KDEPObjective
from ddkd.objectives.mse import MSEObjective
from ddkd.objectives.ssld import SSLDObjective
from ddkd.objectives.tcs import TCSObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "mse": MSEObjective,
    "kdep": KDEPObjective,
    "tcs": TCSObjective,
    "ssld": SSLDObjective,
}


def build_objective(name: str, teacher_dim: int) -> Objective:
    """An unfitted objective by name (published defaults)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective {name!r} is unknown; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](teacher_dim)


__all__ = ["OBJECTIVES", "Objective", "build_objective"]
