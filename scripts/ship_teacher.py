"""Ship the teacher of a finished teacher run as ddkd's teacher for its dataset.

    .venv/bin/python scripts/ship_teacher.py RUN_DIR [--recipe NAME] [--machine TEXT]

Copies RUN_DIR/teacher.h5 to ddkd/assets/<dataset>-teacher.h5 and writes its record
ddkd/assets/<dataset>-teacher.json (architecture, SSL method, epochs, seed, kNN report,
normalisation, checksums, versions, the command that retrains it and the one that was run,
training time), both atomically. It refuses a run that is not finished, that did not train its
teacher, or whose epochs differ from the recipe's (set the recipe's `epochs` first, so that the
documented command retrains exactly this teacher). Then update the README's teacher section
with the numbers it prints.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ddkd.config import load_recipe
from ddkd.io.atomic import atomic_path, write_json
from ddkd.io.weights import load_weights
from ddkd.runtime import sha256_file

ASSETS = Path(__file__).resolve().parent.parent / "ddkd" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--recipe", default=None,
                        help="the recipe that retrains it (default: <dataset>-teacher)")
    parser.add_argument("--machine", default=None, help="where it was trained, in words")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="where to write (a check)")
    args = parser.parse_args()
    run = args.run
    for name in ("config.json", "environment.json", "summary.json", "teacher.h5"):
        if not (run / name).is_file():
            raise SystemExit(f"ship_teacher: {run} has no {name}: not a finished teach run")
    config = json.loads((run / "config.json").read_text())["config"]
    env = json.loads((run / "environment.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    teacher = config["teacher"]
    dataset = config["data"]["dataset"]
    if teacher["source"] != "train":
        raise SystemExit(f"ship_teacher: {run} did not train its teacher "
                         f"(teacher.source = {teacher['source']!r})")
    recipe_name = args.recipe or f"{dataset}-teacher"
    recipe_path = ASSETS.parent / "recipes" / f"{recipe_name}.toml"
    recipe = load_recipe(recipe_path)["teach"]["teacher"]
    if int(recipe["epochs"]) != int(teacher["epochs"]):
        raise SystemExit(f"ship_teacher: {recipe_path} says epochs = {recipe['epochs']}, the run "
                         f"trained {teacher['epochs']}; set the recipe's epochs first")
    _, kind, arch, meta = load_weights(run / "teacher.h5")
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r.get("phase") == "teacher"]
    name = f"{dataset}-teacher"
    target = args.assets / f"{name}.h5"
    with atomic_path(target) as tmp:
        shutil.copyfile(run / "teacher.h5", tmp)
    record = {
        "architecture": {"kind": kind, **arch},
        "bytes": target.stat().st_size,
        "command": f"ddkd teach --recipe {recipe_name} --out runs/{run.name}",
        "command_run": " ".join(env.get("command") or []),
        "dataset": dataset,
        "epochs": int(teacher["epochs"]),
        "file": target.name,
        "knn": meta["knn"],
        "machine": args.machine or f"{env.get('cpu_count')} CPU cores",
        "normalization": meta["normalization"],
        "recipe": f"ddkd/recipes/{recipe_name}.toml",
        "seed": int(config["seed"]),
        "sha256": sha256_file(target),
        "ssl": teacher["ssl"],
        "train_checksum": env["inputs"]["train_checksum"],
        "training_seconds": round(sum(r["seconds"] for r in epochs)),
        "run_seconds": summary.get("seconds"),
        "versions": {k: env.get(k) for k in ("ddkd", "git_revision", "kornia", "lightly",
                                             "torch")},
    }
    write_json(args.assets / f"{name}.json", record)
    knn = meta["knn"]
    print(f"shipped {target} ({record['bytes']:,} bytes, sha256 {record['sha256'][:8]}...)\n"
          f"  {teacher['ssl']}, {teacher['epochs']} epochs, seed {config['seed']}, "
          f"{record['training_seconds']} s of teacher epochs\n"
          f"  kNN: teacher {100 * knn['teacher']:.2f}%, raw pixels {100 * knn['raw_pixels']:.2f}%, "
          f"random init {100 * knn['random_init']:.2f}%")


if __name__ == "__main__":
    main()
