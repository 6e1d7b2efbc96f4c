"""What the published codes assume and never write down in their files: normalisations,
learning-rate defaults, student sizes.

Each value below was read from the repository and file named beside it (see docs/interop.md);
a set written by that code lives in the space these values define.

- MKDT (``sjoshi804/mkdt-data-distill-ssl``, ``src/mkdt/utils.py``, ``get_dataset``): images
  are ``transforms.Normalize(mean, std)`` of [0, 1] pixels, per dataset; with ``--zca`` they are
  raw [0, 1] pixels whitened by kornia's ``ZCAWhitening(eps=0.1)`` fitted on the training split.
- MTT (``GeorgeCazenavette/mtt-distillation``, ``utils.py``, ``get_dataset``) and DATM
  (``NUS-HPC-AI-Lab/DATM``, ``utils/utils_baseline.py``, ``get_dataset``): the same scheme,
  but CIFAR-100 is normalised with CIFAR-10's statistics and Tiny ImageNet with ImageNet's.
- KRR-ST (``db-Lee/selfsup_dd``, ``data/augmentation.py``, ``MEAN`` / ``STD``, keyed by image
  size): real images pass through ``K.Normalize(MEAN, STD)`` before the network, and the
  synthetic ``x_syn`` is fed to the same network as it is (``algorithms/distill.py``,
  ``algorithms/pretrain_krr_st.py``), so ``x_syn`` lives in that normalised space.
"""

from __future__ import annotations

from ddkd.data.transforms import Normalization
from ddkd.errors import ConfigError

_CIFAR10_MTT = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: per code, per ddkd dataset name: (mean, std) in [0, 1] pixel units
_TABLES: dict[str, dict[str, tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "mkdt": {
        "cifar10": _CIFAR10_MTT,
        "cifar100": ((0.5071, 0.4865, 0.4409), (0.2009, 0.1984, 0.2023)),
        "tiny-imagenet": _IMAGENET,
    },
    "mtt": {
        "cifar10": _CIFAR10_MTT,
        "cifar100": _CIFAR10_MTT,  # sic: MTT's get_dataset reuses CIFAR-10's values
        "tiny-imagenet": _IMAGENET,
    },
}
#: KRR-ST's MEAN/STD tables depend on the image size as well (32 and 64 pixels)
_KRR_ST: dict[int, dict[str, tuple[tuple[float, ...], tuple[float, ...]]]] = {
    32: {
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
        "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    },
    64: {
        "cifar10": ((0.4914, 0.4821, 0.4465), (0.2469, 0.2433, 0.2614)),
        "cifar100": ((0.5070, 0.4865, 0.4409), (0.2671, 0.2562, 0.2760)),
        "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    },
}
_CITATION = {
    "mkdt": "MKDT's get_dataset (sjoshi804/mkdt-data-distill-ssl, src/mkdt/utils.py)",
    "mtt": "MTT's get_dataset (GeorgeCazenavette/mtt-distillation, utils.py; DATM's is the same)",
    "krr-st": "KRR-ST's MEAN/STD (db-Lee/selfsup_dd, data/augmentation.py)",
}

#: the code that wrote each importable layout (for the normalisation and the defaults)
CODE_OF_FORMAT = {"mkdt": "mkdt", "krr-st": "krr-st", "mtt": "mtt", "datm": "mtt"}

#: classes of the source datasets the published codes distil (hard labels are one-hot of this
#: width at least)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}

#: the experts' learning rate of the codes that write replay buffers (``buffer.py``'s
#: ``--lr_teacher`` default): MKDT 0.1 (src/mkdt/buffer.py), MTT 0.01 (buffer.py)
EXPERT_LR = {"mkdt": 0.1, "mtt": 0.01}

#: KRR-ST writes no learned step size; its pre-training uses ``--pre_lr`` (default 0.1, train.py)
KRR_ST_PRE_LR = 0.1


def student_depth(image_size: int) -> int:
    """The depth of the published codes' ConvNet at this resolution: ``ConvNet`` (depth 3,
    the default ``--model`` of MTT's and MKDT's scripts) at 32 pixels, depth 4 for 64-pixel
    Tiny ImageNet (the MTT paper), ``ConvNetD5`` for the 128-pixel ImageNet subsets (MTT's
    readme)."""
    return {64: 4, 128: 5}.get(image_size, 3)


def _base(dataset: str) -> str:
    # cifar10-samples are CIFAR-10 test images: the same statistics
    return dataset.removesuffix("-samples")


def published_normalization(code: str, dataset: str | None,
                            image_size: int) -> Normalization | None:
    """The normalisation ``code`` applies to ``dataset`` at ``image_size``, or None if unknown."""
    if dataset is None:
        return None
    table = _KRR_ST.get(image_size, _KRR_ST[32]) if code == "krr-st" else _TABLES.get(code, {})
    values = table.get(_base(dataset))
    return Normalization(*values) if values else None


def known_datasets(code: str) -> list[str]:
    return sorted(_KRR_ST[32] if code == "krr-st" else _TABLES[code])


def resolve_normalization(spec: str | None, code: str, dataset: str | None, image_size: int,
                          channels: int, flag: str = "--normalization"
                          ) -> tuple[Normalization, str]:
    """``--normalization`` -> (the normalisation, a sentence saying where it came from).

    ``spec``: None or ``published`` (the code's per-dataset values for ``dataset``), ``none``
    (mean 0, std 1: images in [0, 1] pixel units, as the codes' ``--zca`` sets are before
    whitening) or explicit values ``M1,M2,M3/S1,S2,S3``.
    """
    if spec in (None, "published"):
        norm = published_normalization(code, dataset, image_size)
        if norm is None:
            where = (f"--dataset {dataset!r}" if dataset is not None else "no --dataset")
            raise ConfigError(
                f"{flag}: {where}: {code}'s code has no per-dataset normalisation for it (known: "
                f"{', '.join(known_datasets(code))}); give --dataset, or the values the set was "
                "made with as --normalization MEAN1,MEAN2,.../STD1,STD2,... (or 'none')")
        source = f"{_CITATION[code]} for {dataset}"
    elif spec == "none":
        norm = Normalization((0.0,) * channels, (1.0,) * channels)
        source = "none (images in [0, 1] pixel units)"
    else:
        norm = parse_values(spec, flag)
        source = f"given ({flag} {spec})"
    if len(norm.mean) != channels:
        raise ConfigError(f"{flag}: {len(norm.mean)} channel values ({source}) for images of "
                          f"{channels} channels")
    return norm, source


def parse_values(spec: str, flag: str = "--normalization") -> Normalization:
    """``M1,M2,M3/S1,S2,S3`` -> Normalization (std > 0)."""
    try:
        mean_text, std_text = spec.split("/")
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError as err:
        raise ConfigError(f"{flag} {spec!r}: expected 'published', 'none' or "
                          "MEAN1,MEAN2,.../STD1,STD2,... (e.g. 0.5,0.5,0.5/0.25,0.25,0.25)"
                          ) from err
    if len(mean) != len(std) or not all(s > 0 for s in std):
        raise ConfigError(f"{flag} {spec!r}: give as many means as stds, every std > 0")
    return Normalization(mean, std)


def format_values(norm: Normalization) -> str:
    """The inverse of :func:`parse_values` (``repr`` of each float: it reads back exactly)."""
    return (",".join(repr(float(m)) for m in norm.mean) + "/"
            + ",".join(repr(float(s)) for s in norm.std))
