"""Where a teacher comes from: shipped with ddkd, a checkpoint, or a user factory.

A shipped teacher is a ddkd weights file in ``ddkd/assets`` trained by ddkd itself with the
recipe named in its metadata. A ``--teacher-checkpoint`` is a ddkd weights file (``.h5``), or a
PyTorch state dict (``.pt``/``.pth``, loaded with ``weights_only=True``) of the configured
ResNet, or of any module built by ``teacher.factory = "package.module:function"``.
"""

from __future__ import annotations

import importlib
import re
import typing
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ddkd.config import TeacherConfig
from ddkd.errors import ConfigError, DDKDError
from ddkd.io.weights import ASSETS, SHIPPED_TEACHERS, load_weights
from ddkd.models.registry import model_config
from ddkd.models.resnet import ResNet, ResNetConfig


def shipped_teacher_path(dataset: str) -> Path:
    if dataset not in SHIPPED_TEACHERS:
        raise ConfigError(
            f"ddkd ships no teacher for dataset {dataset!r} (only for "
            f"{', '.join(SHIPPED_TEACHERS)}): pass --train-teacher to train one, or "
            "--teacher-checkpoint FILE to bring one"
        )
    path = ASSETS / SHIPPED_TEACHERS[dataset]
    if not path.is_file():
        raise DDKDError(
            f"the shipped teacher {path} is missing from this installation (a checkout "
            "without ddkd/assets?): pass --train-teacher, or --teacher-checkpoint FILE"
        )
    return path


def resnet_config(config: TeacherConfig, in_channels: int) -> ResNetConfig:
    # teacher.arch is one of TEACHER_ARCHS: a ResNet
    return typing.cast(ResNetConfig, model_config(config.arch, in_channels=in_channels,
                                                  base_width=config.base_width))


def build_from_factory(spec: str) -> nn.Module:
    """``package.module:function`` -> ``function()``, which must return an ``nn.Module``."""
    if ":" not in spec:
        raise ConfigError(f"teacher.factory {spec!r} must look like package.module:function")
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, func_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"teacher.factory {spec!r} cannot be imported: {err}") from err
    try:
        net = factory()
    except Exception as err:  # noqa: BLE001 (user code: any failure is a bad factory)
        raise ConfigError(f"teacher.factory {spec!r} raised {type(err).__name__}: {err}") from err
    if not isinstance(net, nn.Module):
        raise ConfigError(f"teacher.factory {spec!r} returned {type(net).__name__}, not a Module")
    return net


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept common wrappers' keys: ``module.`` (DDP) and ``backbone.`` (lightly models)."""
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_checkpoint_teacher(
    path: str, config: TeacherConfig, in_channels: int, factory: str | None
) -> tuple[nn.Module, dict, dict]:
    """Load a teacher -> ``(module, architecture description, metadata)``."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--teacher-checkpoint {file} does not exist")
    meta: dict = {}
    state: typing.Any  # a state dict, or whatever a .pt file holds until checked
    if file.suffix in (".h5", ".hdf5"):
        state, kind, arch_config, meta = load_weights(file)
        if kind != "resnet":
            raise ConfigError(f"--teacher-checkpoint {file} holds a {kind!r}, not a resnet")
        net: nn.Module = ResNet(ResNetConfig(**arch_config))
        arch = {"kind": "resnet", **arch_config}
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (torch raises many types for a bad file)
            raise ConfigError(_unloadable(file, err)) from err
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ConfigError(f"--teacher-checkpoint {file} holds a {type(state).__name__}, not "
                              f"a state dict of tensors; {ACCEPTED}")
        if factory:
            net = build_from_factory(factory)
            arch = {"kind": "factory", "factory": factory}
        else:
            rc = resnet_config(config, in_channels)
            net = ResNet(rc)
            arch = {"kind": "resnet", **asdict(rc)}
    state = _strip_prefixes(state)
    missing, unexpected = _compare_keys(net, state)
    if missing or unexpected:
        raise ConfigError(
            f"--teacher-checkpoint {file} does not fit the teacher {arch}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}); set teacher.arch / teacher.base_width or teacher.factory"
        )
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ConfigError(
            f"--teacher-checkpoint {file} does not fit the teacher {arch}: {first}"
        ) from err
    return net, arch, meta


ACCEPTED = ("ddkd accepts a ddkd .h5 weights file or a .pt/.pth file holding a state dict "
            "of tensors, written by torch.save(model.state_dict(), PATH)")


def _unloadable(file: Path, err: Exception) -> str:
    """Why torch.load(weights_only=True) refused ``file``, in ddkd's terms: torch's own text
    advises weights_only=False (which would run the file's code) and carries terminal escapes."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"--teacher-checkpoint {file} holds pickled Python objects ({found.group(1)}, "
                "e.g. a whole model saved with torch.save(model)), not a state dict of tensors; "
                "ddkd loads weights only, so that a file cannot run code: save "
                f"model.state_dict() instead ({ACCEPTED})")
    if zipfile.is_zipfile(file):
        reason = "a torch.save archive whose contents do not load as tensors"
    else:
        reason = "neither a torch.save archive nor a pickle of tensors"
    return f"--teacher-checkpoint {file} is not a PyTorch checkpoint ({reason}); {ACCEPTED}"


def _compare_keys(net: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected = set(net.state_dict())
    given = set(state)
    return sorted(expected - given), sorted(given - expected)


def check_teacher_output(teacher: nn.Module, sample: torch.Tensor, where: str) -> int:
    """Run the teacher on a normalised sample ``(B, C, H, W)``; return its feature dimension."""
    teacher.eval()
    try:
        with torch.no_grad():
            out = teacher(sample)
    except Exception as err:  # noqa: BLE001 (any failure means the teacher does not fit)
        raise ConfigError(
            f"{where} cannot process this dataset's images {tuple(sample.shape[1:])}: "
            f"{str(err).splitlines()[0]}"
        ) from err
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != sample.shape[0]:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(
            f"{where} returns {shape} for a batch of {sample.shape[0]} images; a teacher must "
            "return one feature vector per image, (B, D)"
        )
    return int(out.shape[1])
