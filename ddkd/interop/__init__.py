"""Interoperability with the published dataset-distillation codes (docs/interop.md).

- :mod:`ddkd.interop.formats`: ``ddkd import mkdt|krr-st|mtt|datm|npz|safetensors``: a set
  written by MKDT, KRR-ST, MTT or DATM code (or a ddkd export) -> a ddkd synthetic set.
- :mod:`ddkd.interop.replay_buffer`: ``ddkd import replay-buffer``: MTT-format expert
  trajectories -> a ddkd run's ``experts.h5``.
- :mod:`ddkd.interop.export`: ``ddkd export``: a ddkd set -> npz, safetensors, PNGs or the
  published codes' ``.pt`` trio, each with a JSON sidecar of its metadata.
- :mod:`ddkd.interop.published`: what those codes assume (normalisations, defaults).
- :mod:`ddkd.interop.torchfiles`: ``torch.load(weights_only=True)``, and nothing else.

This package sits beside the stages (``cli -> interop -> {io, models, data, objectives}``) and
imports none of them; like them it meets the rest of ddkd only through ddkd's files.
"""
