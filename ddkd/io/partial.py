"""The unfinished synthetic set of ``ddkd synthesize``: its ``OUT.partial`` folder, start to end.

Layout::

    OUT.partial/
      config.json      what the set is made from: {"synthesize": SynthConfig, "run", "size",
                       "experts_checksum"}; ``--resume`` requires the same
      checkpoint.pt    {"state": the learnable set and its optimisers, "iteration": i}: the
                       state after iteration i
      metrics.jsonl    one JSON line per outer iteration (a resumed run appends; later rows win)

The finished set is written to ``OUT`` (``ddkd.io.synthset``) and the folder removed. Checks
(:meth:`PartialSet.check`) are separate from writes (:meth:`PartialSet.start`), so that a run
refuses every bad option before it changes anything on disk.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddkd.errors import ConfigError
from ddkd.io.atomic import append_jsonl, read_jsonl, remove_stale_temps, save_torch, write_json
from ddkd.io.run import config_diff, read_json_object
from ddkd.io.synthset import SynthSet, save_synthset

log = logging.getLogger(__name__)


class PartialSet:
    """The ``.partial`` folder of the set ``out``; ``is_main``: this process writes files (rank
    0 of a data-parallel run; the others only keep count of what was saved)."""

    def __init__(self, out: Path, is_main: bool = True):
        self.out = out
        self.folder = out.with_name(out.name + ".partial")
        self.is_main = is_main
        self.saved_at: int | None = None  # the iteration the checkpoint on disk holds
        self._saved_time = time.time()

    @property
    def config(self) -> Path:
        return self.folder / "config.json"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.jsonl"

    def check(self, record: dict, resume: bool, overwrite: bool,
              complete: Callable[[dict], dict]) -> None:
        """Refuse an output that exists, a ``--resume`` with nothing or something else to
        resume, and an unfinished run that would be lost; writes nothing. ``complete`` fills
        in the settings that a run begun by an older ddkd did not record (their defaults)."""
        if self.out.exists() and not overwrite:
            raise ConfigError(f"--out {self.out} already exists; pass --overwrite to replace it")
        if resume:
            if not self.config.is_file():
                raise ConfigError(f"--resume: there is no unfinished run for {self.out} (no "
                                  f"{self.folder})")
            saved = complete(read_json_object(self.config, "--resume"))
            if saved != record:
                diffs = [d.removeprefix("synthesize.") for d in config_diff(saved, record)]
                raise ConfigError(f"--resume: the configuration differs from the unfinished run "
                                  f"in {self.folder} ({'; '.join(diffs[:5])}); resume with the "
                                  "same options, or drop --resume and pass --overwrite to start "
                                  "again")
        elif self.folder.exists() and not overwrite:
            raise ConfigError(f"an unfinished run for {self.out} exists ({self.folder}); pass "
                              "--resume to continue it or --overwrite to start again")

    def start(self, record: dict, resume: bool) -> None:
        """Begin (or, with ``resume``, keep) the folder; the temporary files of killed writes
        of this output are removed: this run is now their only writer."""
        self._saved_time = time.time()
        if not self.is_main:
            return
        if not resume and self.folder.exists():
            shutil.rmtree(self.folder)
        stale = remove_stale_temps(self.out.parent, self.out.name)
        stale += remove_stale_temps(self.folder)
        if stale:
            log.info("removed %d temporary files of interrupted writes of %s", len(stale),
                     self.out)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.config, record)

    def load_checkpoint(self, device: torch.device) -> tuple[dict, int] | None:
        """``(state, iteration)`` of the checkpoint, or None when there is none."""
        if not self.checkpoint.is_file():
            return None
        saved = torch.load(self.checkpoint, map_location=device, weights_only=True)
        self.saved_at = int(saved["iteration"])
        return saved["state"], self.saved_at

    def save_checkpoint(self, state: dict, iteration: int) -> None:
        """The state after ``iteration`` iterations."""
        self.saved_at = iteration
        self._saved_time = time.time()
        if self.is_main:
            save_torch(self.checkpoint, {"state": state, "iteration": iteration})

    def checkpoint_if_due(self, state: Callable[[], dict], iteration: int,
                          minutes: float) -> None:
        """Save ``state()`` when ``minutes`` have passed since the last checkpoint."""
        if time.time() - self._saved_time >= 60 * minutes:
            self.save_checkpoint(state(), iteration)

    def append_metrics(self, row: dict) -> None:
        if self.is_main:
            append_jsonl(self.metrics, row)

    def history(self, iterations: int) -> list[dict]:
        """The metrics row of every iteration up to ``iterations``, in order (the latest row of
        an iteration that a resumed run did again)."""
        rows = {}
        for row in read_jsonl(self.metrics):
            if row["iteration"] <= iterations:
                rows[row["iteration"]] = row
        return [rows[i] for i in sorted(rows)]

    def finish(self, synth: SynthSet) -> None:
        """Write the set to ``out`` and remove the folder."""
        save_synthset(self.out, synth)
        shutil.rmtree(self.folder)
