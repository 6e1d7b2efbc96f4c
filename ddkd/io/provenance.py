"""What a synthetic set records about the teacher behind it.

A run's ``teacher.h5`` is a re-saved copy of whichever teacher was used (with the kNN report
added), so its checksum is not that of the file a user has: the record names the file that
was used (the shipped asset or the user's checkpoint) by name and checksum, and the SSL method
and epochs it was trained with, from the teacher's own metadata rather than from the run's
configuration defaults (which describe training a teacher, not loading one).
"""

from __future__ import annotations

from pathlib import Path

from ddkd.io.run import OpenedRun
from ddkd.io.weights import load_weights
from ddkd.runtime import sha256_file


def teacher_record(run_teacher: str | Path, teacher_config: dict) -> dict:
    """The teacher of a run, truly: ``source`` (shipped | train | checkpoint), ``ssl``,
    ``epochs``, ``arch``, ``file`` and ``checksum`` (the file that was used; for a teacher
    trained in the run, the run's ``teacher.h5``) and ``run_teacher_checksum``."""
    _, kind, arch, meta = load_weights(run_teacher)
    source = meta.get("source") or teacher_config.get("source")
    run_checksum = sha256_file(run_teacher)
    if source == "train":  # trained here: the run's configuration is the truth
        ssl, epochs = teacher_config.get("ssl"), teacher_config.get("epochs")
        file, checksum = None, run_checksum
    else:  # loaded: what the file says it was trained with (None where it does not say)
        ssl, epochs = meta.get("ssl"), meta.get("epochs")
        file = Path(meta["source_file"]).name if meta.get("source_file") else None
        checksum = meta.get("source_checksum") or run_checksum
    return {"source": source, "ssl": ssl, "epochs": epochs, "arch": {"kind": kind, **arch},
            "file": file, "checksum": checksum, "run_teacher_checksum": run_checksum}


def synth_provenance(opened: OpenedRun, num_experts: int, student: dict, config: dict,
                     probes: tuple[float, float], processes: int, environment: dict) -> dict:
    """What a synthetic set records of where it comes from: the run (dataset, checksums of its
    images, teacher and experts, its configuration), the student, how it was made (``config``:
    the resolved SynthConfig as a dict) and the matching loss of the initial and final set
    (``probes``)."""
    teacher = teacher_record(opened.run.teacher, opened.teach_config["teacher"])
    return {
        "source_dataset": opened.dataset,
        "source_train_checksum": opened.environment["inputs"]["train_checksum"],
        "source_num_classes": opened.num_classes,
        "run": str(opened.run.root.resolve()),
        "teacher_checksum": teacher["checksum"],
        "teacher": teacher,
        "experts_checksum": sha256_file(opened.run.experts),
        "num_experts": num_experts,
        "student": student,
        "init": config["init"],
        "iterations": config["iterations"],
        "matching_loss_initial": probes[0],
        "matching_loss_final": probes[1],
        "seed": config["seed"],
        "processes": processes,
        "teach_config": opened.teach_config,
        "environment": environment,
    }
