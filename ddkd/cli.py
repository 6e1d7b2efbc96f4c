"""The ``ddkd`` command line: ``teach``, ``synthesize``, ``evaluate``, ``inspect``, ``import``,
``export``.

Configuration is resolved as: stage defaults (the published MKDT values) <- recipe (``--recipe``
FILE or the name of a shipped recipe; ``ddkd teach`` with none uses ``fashion-mnist``, the CPU
default) <- ``--set section.key=value`` <- named flags. Heavy imports happen inside the
subcommand so that ``--help`` is instant. A user error prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from ddkd.errors import ConfigError, DDKDError, DiskFullError
from ddkd.io.atomic import disk_full_error, is_disk_full

RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULT_TEACH_RECIPE = "fashion-mnist"
# Ends a help text that states its own default: prints nothing, and keeps
# ArgumentDefaultsHelpFormatter from adding a second "(default: None)".
_STATED = "%(default).0s"


def recipe_path(name_or_file: str) -> Path:
    """A recipe file, or the name of one shipped in ``recipes/`` (with or without .toml)."""
    path = Path(name_or_file)
    if path.is_file():
        return path
    shipped = RECIPES / (name_or_file if name_or_file.endswith(".toml") else f"{name_or_file}.toml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.toml")))
    raise ConfigError(f"--recipe {name_or_file!r} is neither a file nor a shipped recipe ({names})")


def stage_values(recipe: Path, stage: str) -> dict:
    """The ``[stage]`` table of a recipe (recipes may hold several stages)."""
    from ddkd.config import load_recipe

    values = load_recipe(recipe)
    unknown = set(values) - {"teach", "synthesize", "evaluate", "description"}
    if unknown:
        raise ConfigError(f"recipe {recipe}: unknown top-level tables {sorted(unknown)}; "
                          "valid: teach, synthesize, evaluate")
    return values.get(stage, {})


# teach's named flags that set one setting each: {argparse dest: (section, key)}
_TEACH_FLAG_KEYS = {
    "dataset": ("data", "dataset"), "data_root": ("data", "data_root"),
    "subset": ("data", "subset"), "ssl": ("teacher", "ssl"),
    "teacher_epochs": ("teacher", "epochs"), "experts": ("experts", "num_experts"),
    "expert_epochs": ("experts", "epochs"), "objective": ("experts", "objective"),
    "experts_per_batch": ("experts", "per_batch"),
}


def _teach_flags(args: argparse.Namespace) -> dict:
    """Named flags -> nested config values (they win over the recipe and --set)."""
    flags: dict = {"data": {}, "teacher": {}, "experts": {}}
    trains = args.train_teacher or args.teacher_epochs is not None or args.ssl is not None
    if args.teacher_checkpoint is not None:
        if trains:
            raise ConfigError("--teacher-checkpoint cannot be combined with --train-teacher, "
                              "--teacher-epochs or --ssl: either bring a teacher or train one")
        flags["teacher"].update(source="checkpoint", checkpoint=args.teacher_checkpoint)
    elif trains:
        flags["teacher"]["source"] = "train"
    for dest, (section, key) in _TEACH_FLAG_KEYS.items():
        if getattr(args, dest) is not None:
            flags[section][key] = getattr(args, dest)
    if args.seed is not None:
        flags["seed"] = args.seed
    return {k: v for k, v in flags.items() if v != {}}


def cmd_teach(args: argparse.Namespace) -> int:
    from ddkd.config import (
        FLAGS,
        TeachConfig,
        build_config,
        flag_keys,
        merge,
        parse_overrides,
        to_json,
    )
    from ddkd.distributed import join
    from ddkd.runtime import resolve_device, seed_everything
    from ddkd.teach.runner import run_teach

    recipe = recipe_path(args.recipe or DEFAULT_TEACH_RECIPE)
    values = stage_values(recipe, "teach")
    recipe_data = values.get("data", {})
    if args.dataset is not None and args.dataset != recipe_data.get("dataset", "fashion-mnist"):
        # A recipe's subset was sized for its own dataset: another --dataset starts whole
        # (unless --set data.subset or --subset says otherwise).
        recipe_data.pop("subset", None)
    values = merge(values, parse_overrides(args.set or []))
    flags = _teach_flags(args)
    config = build_config(TeachConfig, merge(values, flags), flags=flag_keys(flags, FLAGS))
    dist, device = join(args.devices, args.num_nodes, resolve_device(args.device),
                        args.strategy)
    seed_everything(config.seed)
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in config.data.dataset)
    out = Path(args.out) if args.out else Path("runs") / f"teach-{slug}-seed{config.seed}"
    logging.getLogger(__name__).info("recipe %s, device %s, run directory %s", recipe, device, out)
    logging.getLogger(__name__).debug("resolved configuration:\n%s", to_json(config))
    summary = run_teach(config, out, device, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress, command=sys.argv, recipe=str(recipe),
                        dist=dist)
    if dist.is_main:
        _print_teach_summary(summary)
    return 0


def _deprecated_expert_epochs(args: argparse.Namespace) -> None:
    """``synthesize --expert-epochs M`` (before --matched-epochs): the same, with a warning."""
    if args.old_expert_epochs is None:
        return
    if args.expert_epochs is not None and args.expert_epochs != args.old_expert_epochs:
        raise ConfigError(f"--matched-epochs {args.expert_epochs} and --expert-epochs "
                          f"{args.old_expert_epochs} say two things: give --matched-epochs only")
    logging.getLogger(__name__).warning(
        "ddkd synthesize: --expert-epochs is deprecated here (in teach it is the epochs each "
        "expert trains); use --matched-epochs")
    args.expert_epochs = args.old_expert_epochs


def cmd_synthesize(args: argparse.Namespace) -> int:
    from ddkd.config import (
        SYNTH_FLAGS,
        SynthConfig,
        build_config,
        flag_keys,
        merge,
        parse_overrides,
    )
    from ddkd.distributed import join
    from ddkd.runtime import resolve_device, seed_everything
    from ddkd.synth.runner import run_synthesize

    _deprecated_expert_epochs(args)
    recipe = recipe_path(args.recipe) if args.recipe else _run_recipe(args.run)
    values = stage_values(recipe, "synthesize") if recipe is not None else {}
    flags = {name: getattr(args, name) for name in (
        "ipc", "size", "fraction", "iterations", "syn_steps", "expert_epochs", "max_start_epoch",
        "lr_img", "lr_lr", "lr_targets", "batch_syn", "init", "augment", "memory",
        "precision", "seed",
        "segments", "views",
    ) if getattr(args, name) is not None}
    if args.zca:
        flags["zca"] = True
    overrides = parse_overrides(args.set or [])
    if {"ipc", "size", "fraction"} & (set(flags) | set(overrides)):
        for name in ("ipc", "size", "fraction"):  # a size given now replaces the recipe's
            values.pop(name, None)
    world = args.devices * args.num_nodes
    if world > 1 and "segments" not in flags and "segments" not in overrides:
        flags["segments"] = world  # one segment per process and iteration
    config = build_config(SynthConfig, merge(merge(values, overrides), flags),
                          flags=flag_keys(flags, SYNTH_FLAGS))
    logging.getLogger(__name__).info(
        "synthesize settings from %s", recipe if recipe else "MKDT's defaults (no recipe)")
    dist, device = join(args.devices, args.num_nodes, resolve_device(args.device))
    seed_everything(config.seed)
    summary = run_synthesize(config, args.run, args.out, device, resume=args.resume,
                             overwrite=args.overwrite, progress=not args.no_progress,
                             command=sys.argv, dist=dist)
    if not dist.is_main:
        return 0
    print(
        f"ddkd synthesize: done in {summary['seconds']:.0f}s -> {summary['out']}\n"
        f"  {summary['images']} images, {summary['iterations']} iterations; matching loss "
        f"over every (expert, start epoch) with fixed batches: {summary['probe_initial']:.4f} "
        f"(initial set) -> {summary['probe_final']:.4f} (final set)\n"
        f"  per-iteration loss {summary['loss_first']:.4f} (mean of the first "
        f"{summary['window']}) -> {summary['loss_last']:.4f} (last {summary['window']})\n"
        f"  learned step size {summary['lr']:.4g} (started at {summary['lr_init']:.4g})"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ddkd.io.atomic import check_writable
    from ddkd.io.synthset import load_synthset, non_finite_members

    # By default into the current folder, not beside the set: a set inside an installed
    # package would otherwise have its grid written into site-packages.
    png = Path(args.png) if args.png else Path(Path(args.file).stem + ".png")
    check_writable(png, "--png")  # before reading the set
    # A set with NaN or inf is read anyway: inspecting it is how one finds out what is wrong.
    synth = load_synthset(args.file, finite=False)
    for problem in non_finite_members(synth):
        logging.getLogger(__name__).warning(
            "warning: %s: %s; this set cannot be pre-trained on (ddkd evaluate refuses it)",
            args.file, problem)
    prov = synth.provenance
    lines = [
        f"{args.file}: ddkd synthetic set",
        f"  images      {tuple(synth.images.shape)} (normalised; mean {list(synth.mean.tolist())}"
        f", std {list(synth.std.tolist())})",
        f"  targets     {tuple(synth.targets.shape)}, objective {synth.objective}",
        f"  step size   {synth.lr:.6g} (pre-training learning rate)",
        f"  source      {prov.get('source_dataset')} (train checksum "
        f"{str(prov.get('source_train_checksum'))[:12]}...), {prov.get('num_experts')} experts, "
        f"teacher {str(prov.get('teacher_checksum'))[:12]}...",
        f"  made with   init {prov.get('init')}, {prov.get('iterations')} iterations, seed "
        f"{prov.get('seed')}, ddkd {prov.get('environment', {}).get('ddkd')}",
    ]
    if synth.views:
        lines.insert(3, f"  views       {','.join(synth.views)}: every image under "
                        f"{len(synth.views)} views, one target each (targets (image, view, D)); "
                        f"pre-training sees {len(synth) * len(synth.views)} (image, view) pairs")
    if "matching_loss_initial" in prov:
        lines.append(f"  matching    {prov['matching_loss_initial']:.4f} (initial set) -> "
                     f"{prov['matching_loss_final']:.4f} (final set), every expert and start "
                     "epoch, fixed batches")
    if "loss" in synth.history and len(synth.history["loss"]):
        loss = synth.history["loss"]
        w = max(1, len(loss) // 10)
        lines.append(f"  iterations  loss {loss[:w].mean():.4f} (first {w}) -> "
                     f"{loss[-w:].mean():.4f} (last {w})")
    import io

    from torchvision.utils import save_image

    from ddkd.io.atomic import write_bytes

    nrow = max(1, round(len(synth) ** 0.5)) if args.nrow is None else args.nrow
    buffer = io.BytesIO()  # in memory, then one atomic write (a full disk: one clear line)
    save_image(synth.pixels().nan_to_num(0.0), buffer, nrow=nrow, padding=1, format="png")
    write_bytes(png, buffer.getvalue())
    lines.append(f"  grid        {png}")
    print("\n".join(lines))
    return 0


def _csv(value: str | None, kind=str) -> list:
    if value is None or not value.strip():
        return []
    try:
        return [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as err:
        raise ConfigError(f"{value!r} is not a comma-separated list of {kind.__name__}") from err


def _run_recipe(run: str) -> Path | None:
    """The recipe a teach run was made with, if it has a [synthesize] table and still exists:
    the defaults of synthesize follow the scenario of the run (CPU default or paper scale)."""
    import json

    env = Path(run) / "environment.json"
    try:
        record = json.loads(env.read_text())
    except (OSError, ValueError):
        return None  # a missing or damaged run is reported by synthesize itself
    recipe = record.get("recipe") if isinstance(record, dict) else None
    if (isinstance(recipe, str) and recipe and Path(recipe).is_file()
            and stage_values(Path(recipe), "synthesize")):
        return Path(recipe)
    return None


def _budgets(value: str | None) -> list[int] | None:
    """``--pretrain-steps 10,20,40`` -> [10, 20, 40]: whole numbers of SGD steps >= 1."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if not v.isdigit() or int(v) < 1]
    if bad or not items:
        raise ConfigError(f"--pretrain-steps {value!r}: give SGD step budgets as whole numbers "
                          f">= 1, comma-separated (e.g. 10,20,40,80,160,400); bad: "
                          f"{', '.join(bad) or 'none given'}")
    return [int(v) for v in items]


def _evaluate_flags(args: argparse.Namespace) -> dict:
    """Named flags of ``evaluate`` -> EvalConfig values (they win over the recipe and --set)."""
    flags: dict = {"data_root": args.data_root, "seeds": args.seeds, "probe": args.probe,
                   "epochs": args.epochs, "pretrain_steps": _budgets(args.pretrain_steps),
                   "full_epochs": args.full_epochs, "views": _eval_views(args.views)}
    if args.baselines is not None:
        flags["baselines"] = tuple(_csv(args.baselines))
    if args.downstream is not None:
        flags["downstream"] = tuple(_csv(args.downstream)) or None
    if args.fractions is not None:
        flags["fractions"] = tuple(_csv(args.fractions, float))
    if args.arch is not None:
        flags["archs"] = tuple(_csv(args.arch))
    if args.uniform:
        flags["stratified"] = False
    return {k: v for k, v in flags.items() if v is not None}


def _eval_views(value: str | None) -> tuple[str, ...] | None:
    """``--views`` of evaluate: None (all of each set's views) or the names asked for."""
    if value is None or value.strip() == "all":
        return None
    from ddkd.data.views import parse_views

    views = parse_views(value)
    if not views:
        raise ConfigError(f"--views {value!r}: expected all, a view group such as rot4, or a "
                          "comma list of a set's stored views (e.g. identity)")
    return views


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ddkd.config import EVAL_FLAGS, EvalConfig, build_config, flag_keys, merge, parse_overrides
    from ddkd.distributed import join
    from ddkd.eval.runner import run_evaluate
    from ddkd.runtime import resolve_device

    values = stage_values(recipe_path(args.recipe), "evaluate") if args.recipe else {}
    flags = _evaluate_flags(args)
    config = build_config(EvalConfig, merge(merge(values, parse_overrides(args.set or [])),
                                            flags), flags=flag_keys(flags, EVAL_FLAGS))
    dist, device = join(args.devices, args.num_nodes, resolve_device(args.device))
    summary = run_evaluate(args.sets, config, args.out, device, run_dir=args.run,
                           progress=not args.no_progress, command=sys.argv, dist=dist)
    if not dist.is_main:
        return 0
    print(f"ddkd evaluate: {summary['rows']} probes in {summary['seconds']:.0f}s -> "
          f"{summary['out']}/results.{{json,csv,md,png}}\n\n{summary['table']}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if args.format == "replay-buffer":
        from ddkd.interop.replay_buffer import import_replay_buffers

        unused = [flag for flag, value in (("--out", args.out), ("--dataset", args.dataset),
                                           ("--lr", args.lr), ("--iteration", args.iteration),
                                           ("--zca", args.zca or None)) if value is not None]
        if args.run is None or unused:
            raise ConfigError("import replay-buffer writes the experts of a teach run: give "
                              "--run RUN_DIR" + (f", not {', '.join(unused)}" if unused else ""))
        summary = import_replay_buffers(args.paths, args.run, source=args.source or "mkdt",
                                        normalization=args.normalization,
                                        expert_lr=args.expert_lr, data_root=args.data_root,
                                        overwrite=args.overwrite)
        print(f"ddkd import: {summary['experts']} experts x {summary['epochs']} epochs "
              f"({summary['n_params']} parameters, {summary['student']}) -> "
              f"{summary['experts_file']}\n  experts' learning rate {summary['lr']:g} (the "
              "initial step size of `ddkd synthesize`)")
        return 0
    from ddkd.interop.formats import import_set

    unused = [flag for flag, value in (("--run", args.run), ("--source", args.source),
                                       ("--expert-lr", args.expert_lr)) if value is not None]
    if args.out is None or unused:
        raise ConfigError(f"import {args.format} writes a synthetic set: give --out SET.h5"
                          + (f", not {', '.join(unused)} (replay-buffer's)" if unused else ""))
    summary = import_set(args.format, args.paths, args.out, dataset=args.dataset,
                         normalization=args.normalization, lr=args.lr, zca=args.zca,
                         data_root=args.data_root, iteration=args.iteration,
                         overwrite=args.overwrite, command=sys.argv)
    src = summary["sources"]
    if len(src.get("iterations", [])) > 1:
        print(f"ddkd import: the folder holds the sets of iterations "
              f"{', '.join(src['iterations'])}; importing {src['iteration']} (--iteration "
              "chooses)")
    print(f"ddkd import: {args.format} -> {summary['out']}\n"
          f"  images {summary['images']}, targets {summary['targets']} (objective "
          f"{summary['objective']}{', ZCA-whitened' if summary['zca'] else ''})\n"
          f"  step size {summary['lr']:.6g} from {src['lr']}\n"
          f"  normalisation mean {summary['mean']}, std {summary['std']} from "
          f"{src['normalization']}")
    if args.dataset is None and args.format not in ("npz", "safetensors"):
        print("  no --dataset: the set names no source dataset, so `ddkd evaluate` needs "
              "--downstream NAME for it")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ddkd.interop.export import export_set

    summary = export_set(args.set, args.format, args.out, layout=args.layout,
                         overwrite=args.overwrite)
    kind = "lossless" if summary["lossless"] else "lossy: pixels clipped and quantised"
    print(f"ddkd export: {args.set} -> {summary['out']} ({args.format}, {kind})\n  "
          + "\n  ".join(summary["files"][:4]) + ("\n  ..." if len(summary["files"]) > 4 else ""))
    return 0


def _print_teach_summary(summary: dict) -> None:
    knn = summary["teacher_knn"]
    loss, fit = summary["expert_final_loss_mean"], summary.get("expert_fit")
    lines = [
        f"ddkd teach: done in {summary['seconds']:.0f}s -> {summary['run']}",
        f"  data            {summary['dataset']}, {summary['train_images']} training images, "
        f"targets of dimension {summary['target_dim']}",
        f"  kNN (k={knn['k']}, test) teacher {100 * knn['teacher']:.2f}%  |  random-init "
        f"network {100 * knn['random_init']:.2f}%  |  raw pixels {100 * knn['raw_pixels']:.2f}%",
        f"  experts         {summary['experts']} x {summary['expert_epochs']} epochs"
        + (f", final KD loss (mean) {loss:.4g}" if loss is not None else "")
        + (f", {100 * fit:.0f}% of the targets' variance explained" if fit is not None else ""),
    ]
    print("\n".join(lines))


def _version() -> str:
    from ddkd.version import __version__

    return __version__


def _add_teach(sub) -> None:
    """``ddkd teach``: the teacher, its targets and the experts."""
    teach = sub.add_parser(
        "teach",
        help="teacher -> targets -> KD students' trajectories (the experts)",
        description=(
            "Train or load an SSL teacher, compute its representations of the training images, "
            "and record the trajectories of ConvNet students trained to regress them. With no "
            "arguments: the CPU default on Fashion-MNIST with the shipped teacher (measured: "
            "about 3 minutes on 2 cores of an AVX512-BF16 Xeon, about 15 on 2 cores of an "
            "AVX2-only AMD EPYC; docs/performance.md). Paper scale: --recipe cifar10-paper "
            "--data-root DIR (GPU)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    teach.add_argument("--recipe", help=f"TOML recipe file or shipped recipe name "
                       f"(default: {DEFAULT_TEACH_RECIPE}; shipped: see ddkd/recipes)" + _STATED)
    teach.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override any setting, e.g. --set experts.lr=0.05 (repeatable)")
    teach.add_argument("--dataset", help="fashion-mnist, mnist, cifar10, cifar100, "
                       "tiny-imagenet, cifar10-samples, cifar100-samples or imagefolder:PATH")
    teach.add_argument("--data-root", help="folder holding the dataset (cifar: torchvision layout; "
                       "tiny-imagenet: the folder holding tiny-imagenet-200/)")
    teach.add_argument("--subset", type=int, help="use N training images (seeded random subset)")
    teach.add_argument("--ssl", help="train the teacher with barlowtwins, simclr, byol or vicreg")
    teach.add_argument("--train-teacher", action="store_true",
                       help="train an SSL teacher instead of using the shipped one")
    teach.add_argument("--teacher-epochs", type=int, help="SSL epochs (implies --train-teacher); "
                       "a useful teacher needs tens of epochs")
    teach.add_argument("--teacher-checkpoint", help="bring a teacher: ddkd .h5 weights, or a "
                       ".pt state dict of the configured ResNet (or of --set "
                       "teacher.factory=package.module:function)")
    teach.add_argument("--experts", type=int, help="number of expert students K (paper: 100)")
    teach.add_argument("--expert-epochs", type=int, help="epochs per expert (paper: 20)")
    teach.add_argument("--objective",
                       help="the students' KD objective: mse (MKDT, default), kdep (He et al. "
                       "2022: SVD-aligned, power-temperature-scaled targets, pre-ReLU student), "
                       "tcs (Zhou et al. 2024: PCA coordinates + direction hashing), ssld "
                       "(Cui et al. 2021: symmetric KL over cosine similarities to anchors), skd "
                       "(Kulkarni et al. 2019: block-by-block regression of the teacher's stages, "
                       "then the mse stage, which is what the experts record)" + _STATED)
    teach.add_argument("--devices", type=int, default=1,
                       help="processes on this node (GPUs, or CPU processes with gloo): the "
                       "teacher trains data-parallel (DDP, lightly's losses gathered across "
                       "processes) and the experts are shared out among them (Lightning "
                       "Fabric; under torchrun or srun, the number it started per node)")
    teach.add_argument("--num-nodes", type=int, default=1, help="nodes (torchrun or SLURM)")
    teach.add_argument("--strategy", default="ddp", choices=("ddp",),
                       help="Lightning Fabric's strategy for --devices/--num-nodes: ddp, the one "
                       "ddkd's stages are written for (a process group for their all-reduce "
                       "and gather; DDP for the teacher)")
    teach.add_argument("--experts-per-batch", type=int,
                       help="students trained at once by one batched (vmap) forward; the "
                       "trajectories equal those of one-by-one training to float tolerance. "
                       "Default (0): 8 on a GPU, 1 on the CPU, where batching does not pay "
                       "(see bench/)" + _STATED)
    teach.add_argument("--seed", type=int, help="seed of everything random in the run")
    teach.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    teach.add_argument("--out",
                       help="run directory (default: runs/teach-DATASET-seedS)" + _STATED)
    teach.add_argument("--resume", action="store_true", help="continue an interrupted run")
    teach.add_argument("--overwrite", action="store_true", help="replace an existing run")
    teach.add_argument("--no-progress", action="store_true", help="no progress bars")
    teach.set_defaults(func=cmd_teach)


def _add_synthesize(sub) -> None:
    """``ddkd synthesize``: trajectory matching."""
    syn = sub.add_parser(
        "synthesize",
        help="trajectory matching: distil a synthetic set from a teach run",
        description=(
            "Optimise synthetic images, their target representations and the step size so that "
            "N SGD steps on them move a student as M epochs on real data moved the experts "
            "(MKDT). Defaults: the recipe's [synthesize] table (fashion-mnist: the CPU "
            "default); the paper's values are MKDT's (N=40, M=2, T+=2, lr_img=1e3)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    syn.add_argument("--run", default="runs/teach-fashion-mnist-seed0",
                     help="the ddkd teach run directory to distil from")
    size = syn.add_mutually_exclusive_group()
    size.add_argument("--ipc", type=int, help="images per class (size = ipc x classes)")
    size.add_argument("--size", type=int, help="number of synthetic images")
    size.add_argument("--fraction", type=float, help="fraction of the run's training images")
    syn.add_argument("--iterations", type=int, help="outer iterations")
    syn.add_argument("--syn-steps", type=int, help="N: inner SGD steps per iteration")
    syn.add_argument("--matched-epochs", type=int, dest="expert_epochs",
                     help="M: expert epochs matched by N steps (MTT's expert_epochs)")
    # the old spelling, which in teach means the epochs each expert trains: still read here
    syn.add_argument("--expert-epochs", type=int, dest="old_expert_epochs",
                     help=argparse.SUPPRESS)
    syn.add_argument("--max-start-epoch", type=int, help="T+: start epochs drawn from [0, T+)")
    syn.add_argument("--lr-img", type=float, help="learning rate of the images")
    syn.add_argument("--lr-lr", type=float, help="learning rate of the step size")
    syn.add_argument("--lr-targets", type=float, help="learning rate of the targets")
    syn.add_argument("--batch-syn", type=int, help="synthetic mini-batch per inner step")
    syn.add_argument("--init", help="high-loss (MKDT) or random")
    syn.add_argument("--augment", help="none (MKDT) or dsa (MTT's differentiable siamese "
                     "augmentation, one draw per step shared by all images)")
    syn.add_argument("--views",
                     help="predefined views (after Boost-SSD, Yu et al. ICLR 2025; beyond "
                     "MKDT): none (MKDT), rot4 (identity and the three 90-degree rotations), "
                     "flip2 (identity, hflip), or a comma list of identity, hflip, vflip, "
                     "rot90, rot180, rot270. Every image is matched under each view, each "
                     "(image, view) pair with its own learned target, started from the "
                     "teacher's target of the viewed real image (--set view_init=copy: the "
                     "real image's); the inner batches (--batch-syn) are drawn over the pairs, "
                     "and `ddkd evaluate` pre-trains on every pair" + _STATED)
    syn.add_argument("--segments", type=int,
                     help="expert segments per outer iteration, their meta-gradients averaged "
                     "(MTT/MKDT: 1; default: the number of processes)" + _STATED)
    syn.add_argument("--devices", type=int, default=1,
                     help="processes on this node (GPUs, or CPU processes with gloo), each "
                     "matching its share of every iteration's segments (Lightning Fabric; "
                     "under torchrun or srun, the number it started per node)")
    syn.add_argument("--num-nodes", type=int, default=1, help="nodes (torchrun or SLURM)")
    syn.add_argument("--memory", help="unrolled (MTT: keeps the graph of all N steps, memory "
                     "linear in N) or constant (TESLA: the same gradient, recomputed step by "
                     "step backwards; memory flat in N)")
    syn.add_argument("--precision", help="fp32 (MKDT) or bf16: the inner steps' forward in "
                     "bfloat16 under torch.autocast (faster where the hardware has bfloat16 "
                     "units; the meta-gradient keeps fp32's direction, its elements differ "
                     "by a few percent)")
    syn.add_argument("--zca", action="store_true", help="match in ZCA-whitened space; the "
                     "run must have been made with --set data.zca=true (its experts define "
                     "the space, and a whitened run is always matched whitened)")
    syn.add_argument("--seed", type=int, help="seed of the iterations' draws")
    syn.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    syn.add_argument("--out",
                     help="output file (default: synth_sets/DATASET_ipcK_seedS.h5)" + _STATED)
    syn.add_argument("--resume", action="store_true", help="continue an interrupted run")
    syn.add_argument("--overwrite", action="store_true", help="replace an existing output")
    syn.add_argument("--recipe", help="recipe with a [synthesize] table (default: the one "
                     "the run was made with, e.g. fashion-mnist for the CPU default; MKDT's "
                     "values when it has none)" + _STATED)
    syn.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override any setting, e.g. --set checkpoint_minutes=1")
    syn.add_argument("--no-progress", action="store_true", help="no progress bar")
    syn.set_defaults(func=cmd_synthesize)


def _add_evaluate(sub) -> None:
    """``ddkd evaluate``: pre-training and probing."""
    ev = sub.add_parser(
        "evaluate",
        help="pre-train fresh encoders on sets and baselines, probe with few labels",
        description=(
            "Pre-train a freshly initialised encoder on each set (MSE to its targets, lr = its "
            "learned step size; SGD momentum 0.9, wd 1e-4, batch 256) and on each baseline of "
            "the same size, then fit a linear probe on frozen features with a few labels "
            "(class-stratified, identical across methods). Reports mean +- std over seeds."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("sets", nargs="*", help="synthetic sets (.h5)")
    ev.add_argument("--run",
                    help="teach run for the baselines (default: the set's own run)" + _STATED)
    ev.add_argument("--baselines",
                    help="comma list (or '' for none) of: none (a freshly initialised encoder, "
                    "no pre-training), random (a random real subset of the set's size with the "
                    "teacher's targets, drawn per seed), random-views (that subset under a "
                    "viewed set's views, each (image, view) with the teacher's target: the "
                    "control of a set made with --views), high-loss (MKDT's high-loss subset), "
                    "ssl-random (the random subset trained with the teacher's SSL objective), "
                    "full (all the run's images with KD: costly on a CPU, 20 epochs over the "
                    "run), teacher (the teacher's own features: the ceiling). Default: all but "
                    "full (random-views only for a viewed set); only none when the set's teach "
                    "run is not available (a shared set)" + _STATED)
    ev.add_argument("--downstream",
                    help="comma list of datasets (default: the source)" + _STATED)
    ev.add_argument("--data-root", help="folder holding the downstream datasets")
    ev.add_argument("--fractions",
                    help="label fractions, comma list (0.001 = 6 labels per class on "
                    "Fashion-MNIST, where features matter most) (default: "
                    "0.001,0.01,0.05,0.1)" + _STATED)
    ev.add_argument("--seeds", type=int, help="seeds per method (default: 3)" + _STATED)
    ev.add_argument("--arch", help="comma list of convnet, resnet10, resnet18 "
                    "(cross-architecture: a ConvNet-distilled set on a ResNet) (default: "
                    "convnet)" + _STATED)
    ev.add_argument("--probe",
                    help="lbfgs (MKDT's linear probe: full-batch L-BFGS on standardised "
                    "features, cross-entropy + 1e-3 ||W||^2), sgd (the same objective by "
                    "mini-batch SGD, 100 epochs: for very large label sets) or knn (weighted "
                    "20-NN on the labelled features) (default: lbfgs)" + _STATED)
    ev.add_argument("--epochs", type=int, help="pre-training epochs (default: 20)" + _STATED)
    ev.add_argument("--pretrain-steps", metavar="STEPS",
                    help="also draw the pre-training budget curve: probe every KD-trained "
                    "method after each of these numbers of SGD steps (comma list, e.g. "
                    "10,20,40,80,160,400; one run per encoder passes through all of them), "
                    "add the full-data KD baseline, and report each set's worth: the full-data "
                    "KD steps that reach its accuracy (budget.png, results.md)")
    ev.add_argument("--full-epochs", type=int, metavar="E",
                    help="epochs of the full-data KD baseline (default: --epochs). On a whole "
                    "split 20 epochs are thousands of steps: fewer keep the costliest job to "
                    "what the budget curve needs; its row names its epochs" + _STATED)
    ev.add_argument("--views", default="all",
                    help="a set made with `ddkd synthesize --views` pre-trains on every "
                    "(image, view) pair with its own target (n x V pairs, so the same epochs "
                    "take V times the steps); a comma list of its stored views pre-trains on "
                    "those only (e.g. identity: the views in matching alone)")
    ev.add_argument("--uniform", action="store_true",
                    help="draw labels uniformly as MKDT did (default: class-stratified)"
                    + _STATED)
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ev.add_argument("--devices", type=int, default=1,
                    help="processes on this node; the (method, arch, seed) encoders are dealt "
                    "out among them (Lightning Fabric; torchrun or srun: the number per node)")
    ev.add_argument("--num-nodes", type=int, default=1, help="nodes (torchrun or SLURM)")
    ev.add_argument("--out", default="runs/eval", help="output folder")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--recipe", help="recipe with an [evaluate] table (its keys: the fields "
                    "of ddkd.config.EvalConfig; the flags above override it) (default: "
                    "none: the values above)" + _STATED)
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override any setting, e.g. --set probe=knn")
    ev.set_defaults(func=cmd_evaluate)


def _add_import(sub) -> None:
    """``ddkd import``: sets and expert buffers of the published code."""
    imp = sub.add_parser(
        "import",
        help="read a set (or expert buffers) written by the MKDT, KRR-ST, MTT or DATM code",
        description=(
            "FORMAT mkdt (images_{it}.pt, labels_{it}.pt, synlr_{it}.pt), krr-st (x_syn.pt, "
            "y_syn.pt), mtt or datm (images_best.pt, labels_best.pt, lr_best.pt), npz or "
            "safetensors (a ddkd export): PATHs are the files or the folder holding them; "
            "writes the ddkd set --out. FORMAT replay-buffer (replay_buffer_{n}.pt of MTT or "
            "MKDT's buffer.py): writes the experts of the teach run --run (make it with `ddkd "
            "teach --experts 0`), then `ddkd synthesize --run` matches them. Files are opened "
            "with torch.load(weights_only=True) only. See docs/interop.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    imp.add_argument("format", help="mkdt, krr-st, mtt, datm, npz, safetensors or replay-buffer")
    imp.add_argument("paths", nargs="+", metavar="PATH", help="the files, or their folder")
    imp.add_argument("--out", help="the ddkd synthetic set to write (.h5)")
    imp.add_argument("--dataset", help="the ddkd name of the set's source dataset (cifar10, "
                     "cifar100, tiny-imagenet, ...): its published normalisation, and the "
                     "default downstream task of `ddkd evaluate`")
    imp.add_argument("--data-root", help="folder holding the dataset (for --zca, and for "
                     "replay-buffer: the run's images)")
    imp.add_argument("--normalization", help="the space of the images: 'published' (default: "
                     "the code's per-dataset mean/std for --dataset), 'none' (pixels in [0, 1]) "
                     "or MEAN1,MEAN2,.../STD1,STD2,...; replay-buffer: also 'run' (take the "
                     "run's on trust)" + _STATED)
    imp.add_argument("--lr", type=float, help="the set's step size, when its files lack it "
                     "(MTT never saves it) or to replace theirs; krr-st default: 0.1, KRR-ST's "
                     "--pre_lr" + _STATED)
    imp.add_argument("--iteration", help="which saved set of the folder: an iteration it, "
                     "'best', 'final' (default: best, else the last iteration)" + _STATED)
    imp.add_argument("--zca", action="store_true", help="the set was distilled with the "
                     "code's --zca: refit its whitening (kornia, eps 0.1, [0, 1] pixels) on "
                     "--dataset's training split and store it with the set")
    imp.add_argument("--source", help="replay-buffer: the code that wrote it, mkdt (default) or "
                     "mtt: its normalisation and experts' learning rate" + _STATED)
    imp.add_argument("--run", help="replay-buffer: the teach run whose experts.h5 to write")
    imp.add_argument("--expert-lr", type=float, help="replay-buffer: the experts' learning rate "
                     "(default: the code's buffer.py default, mkdt 0.1, mtt 0.01)" + _STATED)
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output")
    imp.set_defaults(func=cmd_import)


def _add_export(sub) -> None:
    """``ddkd export``: a set in other formats."""
    exp = sub.add_parser(
        "export",
        help="write a synthetic set as npz, safetensors, PNGs or the published .pt trio",
        description=(
            "npz and safetensors: every array, lossless, plus OUT.json (the metadata). "
            "png-folder: OUT/images/*.png (pixels clipped to [0, 1] and quantised to 8 bits), "
            "OUT/targets.npy, OUT/metadata.json. pt: the .pt files the published evaluators "
            "(and DD-Ranking) read: --layout mkdt (images_{it}, labels_{it}, synlr_{it}; "
            "default for representations), mtt (images_best, labels_best, lr_best; default for "
            "labels) or krr-st (x_syn, y_syn). See docs/interop.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    exp.add_argument("set", help="a ddkd synthetic set (.h5)")
    exp.add_argument("--format", required=True, help="npz, safetensors, png-folder or pt")
    exp.add_argument("--out", required=True, help="the file (npz, safetensors) or folder")
    exp.add_argument("--layout", help="pt: mkdt, mtt or krr-st (default: by the set's targets)"
                     + _STATED)
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output")
    exp.set_defaults(func=cmd_export)


def _add_inspect(sub) -> None:
    """``ddkd inspect``: a set's metadata and image grid."""
    insp = sub.add_parser("inspect", help="print a synthetic set's metadata, write a PNG grid")
    insp.add_argument("file", help="a ddkd synthetic set (.h5)")
    insp.add_argument("--png", help="where to write the image grid (default: the set's name "
                      "with .png, in the current folder)")
    insp.add_argument("--nrow", type=int, help="images per row of the grid")
    insp.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddkd",
        description="Dataset distillation via knowledge distillation (MKDT, ICLR 2025).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"ddkd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    for add in (_add_teach, _add_synthesize, _add_evaluate, _add_import, _add_export,
                _add_inspect):
        add(sub)
    return parser




_CONTINUE = {
    "teach": "nothing finished is lost: free space and rerun the same command with --resume",
    "synthesize": "nothing finished is lost: free space and rerun the same command with "
                  "--resume",
    "inspect": "free space and rerun",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _error(command: str, message: str) -> None:
    """The one line a failure prints: the message with line breaks and terminal escapes (which
    wrapped library messages may carry) flattened."""
    text = " ".join(_ANSI.sub("", message).split())
    print(f"ddkd {command}: error: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    from ddkd.runtime import separate_compile_cache, tune_cpu_allocator

    tune_cpu_allocator()  # faster CPU training, same results; see its docstring
    # before anything imports torch._dynamo, which fixes the compile cache's folder on import
    separate_compile_cache()
    try:
        return args.func(args)
    except DiskFullError as err:
        _error(args.command, f"{err}; {_CONTINUE.get(args.command, 'free space and rerun')}")
        return 2
    except DDKDError as err:
        _error(args.command, str(err))
        return 2
    except OSError as err:
        # The environment refused something (permissions, a vanished file, a full disk outside
        # ddkd's writers): one line, as for a user error; -v shows where.
        if args.verbose:
            raise
        if is_disk_full(err):
            where = Path(err.filename) if err.filename else Path(".")
            _error(args.command, f"{disk_full_error(where, err)}; "
                   f"{_CONTINUE.get(args.command, 'free space and rerun')}")
        else:
            _error(args.command, f"{err} (run with -v for where it happened)")
        return 2
    except KeyboardInterrupt:
        print(f"ddkd {args.command}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
