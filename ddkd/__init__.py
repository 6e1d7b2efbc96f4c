"""ddkd: dataset distillation via knowledge distillation.

The method follows Joshi, Ni and Mirzasoleiman, "Dataset Distillation via Knowledge
Distillation: Towards Efficient Self-Supervised Pre-Training of Deep Networks" (ICLR 2025,
arXiv 2410.02116, "MKDT"). The stages meet only through files: ``ddkd teach`` writes a run
directory (teacher, targets, expert trajectories) that the later stages read.
"""

from ddkd.errors import DDKDError
from ddkd.version import __version__

__all__ = ["DDKDError", "__version__", "load_synthset"]


def __getattr__(name: str):
    # Lazy, so that `import ddkd` (and `ddkd --help`) stays fast.
    if name == "load_synthset":
        from ddkd.io.synthset import load_synthset

        return load_synthset
    raise AttributeError(f"module 'ddkd' has no attribute {name!r}")
