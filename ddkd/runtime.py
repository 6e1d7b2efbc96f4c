"""Seeding, devices, checksums and the environment record of a run.

Library code never reseeds globally: it takes a seed or a :class:`torch.Generator`. The CLI
calls :func:`seed_everything` once, at the edge.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddkd.config import PRECISIONS
from ddkd.errors import ConfigError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch once for the whole process (CLI edge only)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Stream:
    """The named sub-streams of :func:`make_generator`, all in one place: one id per kind of
    random draw, so that no two draws share a stream and a new draw changes no other. The values
    are part of every result (changing one changes what is drawn from it); the trailing
    comments say which further ids a draw appends (``make_generator(seed, Stream.X, k)``)."""

    SSL_EPOCH = 1  # ssl_training: an SSL epoch's order and augmentations (+ epoch)
    RUN_SUBSET = 10  # subsets: the run's training subset (data.subset)
    EXPERT_INIT = 20  # teach.experts: expert k's initialisation (+ k)
    EXPERT_ORDER = 21  # expert k's data order (+ k)
    SKD_ADAPTER = 22  # teach.stagewise: skd's block-stage adapters (+ k, stage)
    SKD_STAGE_ORDER = 23  # their data order (+ k, stage)
    RANDOM_NET = 30  # teach.runner: the kNN report's randomly initialised network
    TEACHER_INIT = 31  # the initialisation of a teacher trained in the run
    OBJECTIVE_FIT = 32  # the objective's fit on the teacher's features (k-means, hashes)
    SYNTH_INIT = 40  # synth.runner: the random initialisation's subset
    SYNTH_ITERATION = 41  # an outer iteration's expert, start epoch and batches (+ it[, j])
    SYNTH_PROBE = 42  # the fixed batches of the matching-loss probe (+ k, t)
    DSA = 60  # synth.augment: a DSA draw (+ iteration, step[, segment])
    LABELS = 70  # eval.labels: the labelled subset (+ fraction)
    SGD_PROBE = 71  # eval.probe: the SGD probe's order
    PRETRAIN_INIT = 80  # eval.pretrain: a fresh encoder's initialisation
    PRETRAIN_ORDER = 81  # its pre-training data order
    RANDOM_SUBSET = 90  # eval.runner: the random-subset baselines' images
    SSL_HEAD = 91  # the SSL baseline's projection head


def make_generator(seed: int, *streams: int) -> torch.Generator:
    """A CPU generator for the sub-stream ``streams`` of ``seed``.

    Derived deterministically, so that e.g. expert ``k`` of a run always draws the same
    initialisation and data order however many experts ran before it (this is what makes a
    resumed run equal an uninterrupted one).
    """
    material = ",".join(str(s) for s in (seed, *streams)).encode()
    derived = int.from_bytes(hashlib.sha256(material).digest()[:8], "little") & (2**63 - 1)
    gen = torch.Generator()
    gen.manual_seed(derived)
    return gen


@contextlib.contextmanager
def global_rng_from(gen: torch.Generator, device: torch.device | None = None,
                    offset: int = 0) -> Iterator[None]:
    """For the block, the global RNG is forked and seeded from ``gen``: for code that draws
    from it (PyTorch's initialisers, kornia's parameters), reproducibly and without touching
    the caller's RNG. The one way ddkd seeds a global generator.

    The CPU generator is always seeded; with a CUDA ``device``, that device's generator too
    (with the same seed), inside the same fork. ``torch.manual_seed`` is not used: it would
    reseed every GPU's generator, outside the fork, and leave them changed. ``offset`` is added
    to the seed (each process of a data-parallel run its own draws: its rank).
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed = int(torch.randint(2**62, (1,), generator=gen)) + offset
        torch.random.default_generator.manual_seed(seed)
        for d in devices:  # fork_rng has initialised CUDA: its generators exist
            index = d.index if d.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def global_cpu_rng_from(gen: torch.Generator) -> contextlib.AbstractContextManager[None]:
    """:func:`global_rng_from` for code that draws on the CPU only (initialisers)."""
    return global_rng_from(gen)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def separate_compile_cache() -> str | None:
    """Point ``torch.compile``'s CPU kernel cache at a folder of this process's instruction
    sets, unless the user chose one (``TORCHINDUCTOR_CACHE_DIR``) -> the folder set, or None.

    Inductor's cache keys do not include PyTorch's kernel capability
    (``ATEN_CPU_CAPABILITY``) or oneDNN's (``ONEDNN_MAX_CPU_ISA``): a run limited to AVX2 that
    reuses kernels an AVX-512 run cached trains to NaN or dies in ``free()``, and the other
    way round (docs/performance.md, "Is it the instruction set?"). One folder per pair keeps
    them apart. Must run before ``torch._dynamo`` is first imported: its import fixes the
    folder (and sets the variable), after which this sees a chosen folder and does nothing.
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    aten = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "all"
    folder = os.path.join(default_cache_dir(), f"ddkd-{aten}-onednn-{onednn}".lower())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def autocast_dtype(precision: str, device: torch.device, option: str) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a ``precision`` setting (``None``: plain float32).

    ``bf16`` runs the students' convolutions and matrix products in bfloat16 under
    ``torch.autocast`` (parameters, optimiser and losses stay float32). It needs no loss
    scaling, unlike float16. ``option`` names the setting in errors.
    """
    if precision == "fp32":
        return None
    if precision != "bf16":
        raise ConfigError(f"{option} {precision!r} is unknown; valid: {', '.join(PRECISIONS)}")
    # bfloat16 units from compute capability 8 (Ampere) on; older GPUs only emulate it
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        raise ConfigError(f"{option} = bf16: this GPU ({torch.cuda.get_device_name(device)}) "
                          "has no bfloat16 units (compute capability < 8.0); use fp32")
    return torch.bfloat16


def maybe_autocast(device_type: str,
                   dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, dtype)``, or a no-op context for ``dtype=None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tensor(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's contiguous CPU bytes (dtype and shape included)."""
    array = tensor.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def git_revision() -> str | None:
    """The git revision of the ddkd checkout, or None when not installed from git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


#: what :func:`tune_cpu_allocator` did in this process (recorded in environment.json)
ALLOCATOR = {"tuned": False, "why": "not asked"}


def tune_cpu_allocator() -> dict:
    """Keep freed memory in the process instead of returning it to the system (glibc only).

    PyTorch's CPU tensors come from ``malloc``; glibc serves every block over 128 KiB-32 MiB
    by a fresh ``mmap`` and hands it back by ``munmap`` when freed. A training step frees and
    re-allocates the same activation buffers every time, so each step pays for page faults
    that zero the pages again: on 2 cores a large share of expert training's time went to
    the kernel. ``mallopt(M_MMAP_MAX, 0)`` and a high ``M_TRIM_THRESHOLD`` make ``malloc``
    reuse that memory, so expert training runs markedly faster (docs/performance.md) with the
    same results bit for bit. The price: the resident memory stays at its peak until the
    process ends.
    ``DDKD_MALLOC=default`` leaves the allocator alone.
    """
    import ctypes
    import ctypes.util

    if os.environ.get("DDKD_MALLOC", "") == "default":
        ALLOCATOR.update(tuned=False, why="DDKD_MALLOC=default")
        return ALLOCATOR
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        ALLOCATOR.update(tuned=False, why=f"not glibc ({platform.system()})")
        return ALLOCATOR
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    ALLOCATOR.update(tuned=ok, why="mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"
                     if ok else "mallopt refused")
    return ALLOCATOR


def _cpu_bf16_flags() -> list[str] | None:
    """The CPU's bfloat16 instruction sets named in /proc/cpuinfo (None where it is absent)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return sorted(f for f in line.split(":", 1)[1].split() if "bf16" in f)
    except OSError:
        return None
    return []


def environment_record(device: torch.device | None = None) -> dict:
    """Library versions and machine facts, written next to every run's outputs; with
    ``device``, the device the run computed on (``--device auto`` resolved) and, on a GPU,
    whether its float32 convolutions and matrix products ran in TF32 (PyTorch's defaults, which
    MTT's and MKDT's code keep: TF32 convolutions, full float32 matrix products)."""
    from ddkd.version import __version__

    record = {
        "ddkd": __version__,
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # the vector units PyTorch's CPU kernels use (e.g. AVX512) and whether the CPU has
        # bfloat16 units: together they decide CPU speed, in fp32 and in bf16
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": _cpu_bf16_flags(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "malloc_tuned": ALLOCATOR["tuned"],
    }
    if device is not None:
        record["device"] = str(device)
        if device.type == "cuda":
            record["gpu"] = torch.cuda.get_device_name(device)
            record["tf32"] = {"convolutions": torch.backends.cudnn.allow_tf32,
                              "matmul": torch.backends.cuda.matmul.allow_tf32}
    for name in ("torchvision", "kornia", "h5py", "lightly", "tqdm"):
        try:
            module = __import__(name)
            record[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            record[name] = None
    return record


@dataclass
class Ranks:
    """This process's place in a data-parallel run: one process is rank 0 of 1.

    ``all_reduce_sum`` and ``barrier`` come from the distributed engine (Lightning Fabric, see
    :mod:`ddkd.distributed`); ddkd's stages call only these, so they run unchanged on one CPU.
    """

    rank: int = 0
    world: int = 1
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    barrier: Callable[[], None] = lambda: None
    all_gather: Callable[[object], list] | None = None  # picklable objects, one per rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Elementwise sums over all processes (the tensors themselves on one process)."""
        if self.world == 1 or self.all_reduce_sum is None:
            return tensors
        # on a copy: the engine may reduce in place, and the caller keeps its own values
        return [self.all_reduce_sum(t.clone()) for t in tensors]

    def gather(self, obj: object) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` on one)."""
        if self.world == 1 or self.all_gather is None:
            return [obj]
        return self.all_gather(obj)
