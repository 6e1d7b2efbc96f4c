"""The KD objectives (docs/objectives.md): ``mse`` (MKDT), ``kdep``, ``tcs``, ``ssld``, ``skd``.

Each is one small unit with the interface of :class:`ddkd.objectives.base.Objective`.
"""

from __future__ import annotations

from collections.abc import Callable

from ddkd.config import ExpertConfig
from ddkd.errors import ConfigError
from ddkd.objectives.base import Objective
from ddkd.objectives.kdep import KDEPObjective
from ddkd.objectives.labels import LabelsObjective, SoftLabelsObjective
from ddkd.objectives.mse import MSEObjective
from ddkd.objectives.skd import SKDObjective
from ddkd.objectives.ssld import SSLDObjective
from ddkd.objectives.tcs import TCSObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "mse": MSEObjective,
    "kdep": KDEPObjective,
    "tcs": TCSObjective,
    "ssld": SSLDObjective,
    "skd": SKDObjective,
}

#: objectives a synthetic set may carry but experts cannot be trained with: the labels of the
#: supervised sets ``ddkd import`` reads (MTT, DATM, KRR-ST's baselines); see objectives/labels.py
LABEL_OBJECTIVES: dict[str, type[Objective]] = {
    "labels": LabelsObjective,
    "soft-labels": SoftLabelsObjective,
}


def build_objective(name: str, teacher_dim: int, **options) -> Objective:
    """An unfitted objective by name (published defaults unless ``options`` say otherwise)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective {name!r} is unknown; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](teacher_dim, **options)


# How each objective reads its options from the experts' configuration: (experts, student
# width) -> build_objective's options. mse and skd's global stage may standardise the targets;
# the others define their own target scale.
_OPTIONS: dict[str, Callable[[ExpertConfig, int], dict]] = {
    "mse": lambda ec, width: {"standardize": ec.target_norm == "standardize"},
    "kdep": lambda ec, width: {"student_width": width},
    "tcs": lambda ec, width: {},
    "ssld": lambda ec, width: {"num_anchors": ec.anchors},
    "skd": lambda ec, width: {"standardize": ec.target_norm == "standardize"},
}


def objective_from_config(experts: ExpertConfig, teacher_dim: int,
                          student_width: int) -> Objective:
    """The experts' objective (``experts.objective``), unfitted, with the options of
    ``experts`` that it takes (``target_norm``, ``anchors``) and the student's width (KDEP)."""
    name = experts.objective
    return build_objective(name, teacher_dim, **_OPTIONS[name](experts, student_width))


def restore_objective(name: str, state: dict, target_dim: int) -> Objective:
    """A fitted objective from its saved state (a run's targets file or a synthetic set);
    ``target_dim``: the width of the targets it is used with."""
    known = {**OBJECTIVES, **LABEL_OBJECTIVES}
    if name not in known:
        raise ConfigError(f"objective {name!r} is unknown; valid: {', '.join(known)}")
    try:
        teacher_dim = known[name].teacher_dim_from_state(state, target_dim)
    except KeyError as err:
        raise ConfigError(f"the saved state of objective {name!r} is incomplete: {err}") from err
    objective = known[name](teacher_dim)
    try:
        objective.load_state_dict(state)
    except KeyError as err:
        raise ConfigError(f"the saved state of objective {name!r} is incomplete: {err}") from err
    return objective


def student_output(objective: Objective, width: int) -> str:
    """The student's output mode for ``objective``: KDEP regresses the signed map of the last
    convolution (before norm and ReLU), every other objective a linear head (see
    :class:`ddkd.models.ConvNetConfig`)."""
    return "prenorm" if objective.name == "kdep" else "linear"


__all__ = ["LABEL_OBJECTIVES", "OBJECTIVES", "Objective", "build_objective",
           "objective_from_config", "restore_objective", "student_output"]
