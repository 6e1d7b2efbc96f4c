"""ddkd's performance benchmark: experts and trajectory matching against the reference.

    .venv/bin/python bench/run.py [--device cpu|cuda] [--shapes fashion-mnist,cifar10-ipc10]
                                  [--syn-steps 5,10,20,40] [--groups 4,8] [--repeats 2]
                                  [--parts experts,matching,teacher]
                                  [--precisions fp32,bf16]

For each shape it prints one table:

* expert training throughput (images/s): the reference (``bench/reference.py``: MTT/MKDT's
  ``buffer.py`` loop, one expert at a time), ddkd's ``train_expert`` (one at a time) and
  ``train_experts`` (G students batched with ``vmap``), each eager and under ``torch.compile``
  (``experts.compile``; the first run, which compiles, is timed apart). ddkd's variants run
  with the allocator setting the ``ddkd`` command makes (``ddkd.runtime.tune_cpu_allocator``);
  the reference runs as published, and on the CPU once more with that setting, to show what it
  is worth (on a GPU the setting only touches host memory, so that row is left out);
  with ``bf16`` in ``--precisions``, ddkd's one-at-a-time variants also run under bfloat16
  autocast (``experts.precision``; ddkd does not batch bf16 students);
* trajectory matching, per outer iteration at every ``syn_steps``: time and peak memory of the
  reference (``distill.py``: flat-vector student, fully unrolled graph), ddkd ``unrolled`` and
  ddkd ``constant`` (TESLA-style recomputation), each also under bfloat16 autocast with
  ``bf16`` in ``--precisions`` (``--precision``), the FLOPs of an iteration (counted by
  ``torch.utils.flop_counter``) and the fraction of the device's measured convolution
  throughput that each reaches.

Every ratio is against the reference on the same row. On the CPU every variant runs in a fresh
process, and its memory is the peak resident set (``ru_maxrss``) above the resident set once
the inputs are built, before the first run. On a GPU the variants run one after another in this
process, and memory is ``torch.cuda.max_memory_allocated`` above the memory allocated at that
point (the peak is reset for each variant); the "first run" of a compiled variant may then find
some of its kernels already compiled by an earlier one. Either way memory is what one
iteration needs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from reference import (  # noqa: E402
    FlatConvNet,
    matching_iteration_reference,
    train_expert_reference,
)

from ddkd.config import ExpertConfig  # noqa: E402
from ddkd.models.convnet import ConvNet, ConvNetConfig  # noqa: E402
from ddkd.models.functional import ParamSpec  # noqa: E402
from ddkd.models.resnet import ResNet, ResNetConfig  # noqa: E402
from ddkd.runtime import tune_cpu_allocator  # noqa: E402
from ddkd.ssl_training import SSLModel  # noqa: E402
from ddkd.synth.matching import (  # noqa: E402
    Segment,
    meta_gradient,
    meta_gradient_constant_memory,
    sample_batches,
)
from ddkd.teach.experts import StudentLoss, train_expert, train_experts  # noqa: E402

# name -> (channels, size, student width, depth, target dim, synthetic images, batch_syn)
SHAPES = {
    # the CPU default recipe (recipes/fashion-mnist.toml): ipc 10, batch_syn 25
    "fashion-mnist": (1, 28, 128, 3, 128, 100, 25),
    # CIFAR-10 at ipc 10 with MKDT's ResNet-18 teacher (512-d targets), whole set per step
    "cifar10-ipc10": (3, 32, 128, 3, 512, 100, 100),
}
EXPERT_IMAGES = int(os.environ.get("DDKD_BENCH_IMAGES", 512))  # images per timed expert epoch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _student(shape: str) -> ConvNetConfig:
    c, size, width, depth, dim, _, _ = SHAPES[shape]
    return ConvNetConfig(in_channels=c, image_size=size, depth=depth, width=width, out_dim=dim)


def _data(shape: str, n: int, device: torch.device):
    c, size, _, _, dim, _, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, c, size, size, generator=gen).to(device),
            torch.randn(n, dim, generator=gen).to(device))


# ----------------------------------------------------------------------------- one measurement


def measure(variant: str, shape: str, device: torch.device, syn_steps: int, group: int,
            repeats: int) -> dict:
    """Run one variant (after a warm-up) and return its figures: in a fresh process on the CPU,
    in the benchmark's own process on a GPU (see :func:`_child`)."""
    if not variant.endswith("reference"):  # ddkd's variants run as the ddkd CLI runs them
        tune_cpu_allocator()
    torch.manual_seed(0)
    cfg = _student(shape)
    c, size, width, depth, dim, n_syn, batch_syn = SHAPES[shape]
    amp_dtype = torch.bfloat16 if variant.endswith("-bf16") else None
    if variant.startswith("teacher-"):
        return _measure_teacher(c, size, device, amp_dtype, repeats)
    if variant.startswith("experts-"):
        x, z = _data(shape, EXPERT_IMAGES, device)
        ec = ExpertConfig(num_experts=group, epochs=1)
        compiled = "-compiled" in variant
        # one per run, as ddkd teach does
        loss = StudentLoss(cfg, compile=compiled, amp_dtype=amp_dtype)
        if variant.startswith("experts-reference"):
            def run():
                for _ in range(group):
                    train_expert_reference(ConvNet(cfg).to(device), x, z, epochs=1)
        elif variant.startswith("experts-ddkd"):
            def run():
                for k in range(group):
                    train_expert(cfg, ec, x, z, seed=0, k=k, loss=loss)
        else:
            def run():
                train_experts(cfg, ec, x, z, seed=0, ks=list(range(group)), loss=loss)
        base = _memory(device, reset=True)
        t0 = time.perf_counter()
        run()  # warm-up (and compilation)
        _sync(device)
        first = time.perf_counter() - t0
        best = _best_time(run, repeats, device)
        return {"seconds": best, "images_per_s": group * EXPERT_IMAGES / best,
                "first_seconds": first, "peak_bytes": _memory(device) - base}

    gen = torch.Generator().manual_seed(1)
    x_syn, y_syn = _data(shape, n_syn, device)
    alpha = torch.tensor(0.01, device=device)
    batches = [b.to(device) for b in sample_batches(n_syn, syn_steps, batch_syn, gen)]
    if variant.startswith("match-reference"):
        flat = FlatConvNet(c, size, depth, width, dim)
        theta0 = flat.init(gen).to(device)
        theta1 = theta0 + 0.01 * torch.randn(theta0.shape, generator=gen).to(device)

        def run():
            matching_iteration_reference(flat, theta0, theta1, x_syn, y_syn, alpha, batches)
    else:
        model = ConvNet(cfg).to(device)
        spec = ParamSpec.of(model)
        theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
        theta1 = theta0 + 0.01 * torch.randn(theta0.shape, generator=gen).to(device)
        segment = Segment(0, 0, theta0, theta1, tuple(batches))
        fn = (meta_gradient if variant.startswith("match-unrolled")
              else meta_gradient_constant_memory)

        def run():
            fn(model, spec, segment, x_syn, y_syn, alpha, amp_dtype=amp_dtype)
    base = _memory(device, reset=True)
    run()  # warm-up
    with _FlopCount() as counter:
        run()
    flops = counter.total
    best = _best_time(run, repeats, device)
    return {"seconds": best, "flops": flops, "peak_bytes": _memory(device) - base}


def _measure_teacher(channels: int, size: int, device: torch.device,
                     amp_dtype: torch.dtype | None, repeats: int) -> dict:
    """Images/s of one SSL training step of the CPU teacher recipe's network (quarter-width
    ResNet-18, SimCLR, batch 256, two views; augmentation excluded)."""
    model = SSLModel(ResNet(ResNetConfig(in_channels=channels, base_width=16)), 128, "simclr",
                     1024, amp_dtype=amp_dtype).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    view_a = torch.randn(256, channels, size, size, device=device)
    view_b = torch.randn(256, channels, size, size, device=device)

    def run():
        for _ in range(3):
            loss = model(view_a, view_b, 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run()  # warm-up
    best = _best_time(run, repeats, device)
    return {"seconds": best, "images_per_s": 3 * 256 / best}


def _best_time(run, repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` timed calls of ``run`` (device work included)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


class _FlopCount(TorchDispatchMode):
    """Sums the FLOPs of every matmul and convolution (forward, backward and double backward)
    with ``torch.utils.flop_counter``'s formulas; unlike ``FlopCounterMode`` it installs no
    module hooks, which ``autograd.grad`` on leaves (the constant-memory sweep) rejects."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _memory(device: torch.device, reset: bool = False) -> int:
    """Bytes: peak allocated on a GPU; peak resident set on the CPU (monotone per process,
    hence one process per variant)."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)
        return torch.cuda.max_memory_allocated(device)
    if reset:  # the current resident set: what the peak is measured above
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def conv_throughput(shape: str, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the student's widest convolution, forward, at the expert batch size, in
    ``dtype``: what these cores can do on the work that dominates every variant."""
    c, size, width, _, _, _, _ = SHAPES[shape]
    x = torch.randn(256, width, size, size, device=device, dtype=dtype)
    w = torch.randn(width, width, 3, 3, device=device, dtype=dtype)
    for _ in range(2):
        torch.nn.functional.conv2d(x, w, padding=1)
    _sync(device)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        torch.nn.functional.conv2d(x, w, padding=1)
    _sync(device)
    return reps * 2 * 256 * width * width * 9 * size * size / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the tables


FAILED: list[str] = []  # the variants that failed, for the exit status


def _child(variant: str, shape: str, args, syn_steps: int = 0, group: int = 1) -> dict | None:
    """One variant; ``None`` if it failed (its error goes to stderr and the table says so, and
    the other variants still run: a GPU session has minutes, not hours).

    On the CPU each variant runs in a fresh process, because the peak resident set that
    measures its memory only grows. On a GPU they run in this process, one after another (the
    CUDA allocator's peak is reset for each), which saves a few seconds of start-up apiece."""
    where = f"{shape} {variant} syn_steps={syn_steps} group={group}"
    if args.device != "cpu":
        try:
            result = measure(variant, shape, torch.device(args.device), syn_steps, group,
                             args.repeats)
        except Exception:  # noqa: BLE001 - any failure is this variant's row, not the run's
            FAILED.append(where)
            print(f"bench: {where} FAILED:\n{traceback.format_exc()[-3000:]}", file=sys.stderr,
                  flush=True)
            return None
        finally:  # nothing of this variant may serve the next: compiled graphs, memory
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
    else:
        cmd = [sys.executable, __file__, "--one", variant, "--shapes", shape, "--device",
               args.device, "--syn-steps", str(syn_steps), "--groups", str(group),
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            FAILED.append(where)
            print(f"bench: {where} FAILED (exit {out.returncode}):\n{out.stderr[-3000:]}",
                  file=sys.stderr, flush=True)
            return None
        result = json.loads(out.stdout.strip().splitlines()[-1])
    # each figure as it comes, so that a run stopped early keeps what it measured
    print(f"bench: {where}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def _ratio(a: float | None, b: float | None, fmt: str = "{:.2f}x") -> str:
    """``a / b``, or a dash where the reference it involves failed (``None``)."""
    return "-" if a is None or b is None else fmt.format(a / b)


def _allocator_row(variant: str, device: torch.device) -> list[tuple[str, str]]:
    """The reference once more with ddkd's allocator setting: a CPU question only."""
    return [("reference, with ddkd's allocator setting", variant)] if device.type == "cpu" else []


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def bench_shape(shape: str, args, device: torch.device) -> str:
    lines = [f"## {shape} ({SHAPES[shape][0]}x{SHAPES[shape][1]}x{SHAPES[shape][1]}, "
             f"ConvNet width {SHAPES[shape][2]} depth {SHAPES[shape][3]}, targets "
             f"{SHAPES[shape][4]}-d, {SHAPES[shape][5]} synthetic images, batch_syn "
             f"{SHAPES[shape][6]}; {device.type}, {torch.get_num_threads()} threads)", ""]
    peak = {"fp32": conv_throughput(shape, device)}
    text = f"Measured convolution throughput: {peak['fp32'] / 1e9:,.1f} GFLOP/s"
    if "bf16" in args.precisions:  # the bf16 rows' "of conv peak" is against this one
        peak["bf16"] = conv_throughput(shape, device, torch.bfloat16)
        text += f" (bfloat16: {peak['bf16'] / 1e9:,.1f})"
    lines.append(text + ".\n")
    if "teacher" in args.parts:
        lines += ["| SSL teacher step (ResNet-18 x 1/4, SimCLR, batch 256) | images/s | "
                  "speed-up |", "|---|---|---|"]
        fp32 = _child("teacher-fp32", shape, args)
        rows = [("fp32", fp32)]
        if "bf16" in args.precisions:
            rows.append(("bf16 autocast", _child("teacher-bf16", shape, args)))
        base = fp32["images_per_s"] if fp32 else None
        for name, r in rows:
            lines.append(f"| {name} | failed (see stderr) | |" if r is None else
                         f"| {name} | {r['images_per_s']:,.0f} | "
                         f"{_ratio(r['images_per_s'], base)} |")
        lines.append("")
    if "experts" not in args.parts:
        if "matching" not in args.parts:
            return "\n".join(lines)
        return "\n".join(lines + _matching_table(shape, args, peak))
    lines += ["| expert training | experts | images/s | speed-up | first run s (compiling) |",
              "|---|---|---|---|---|"]
    # One at a time, a student's images/s does not depend on how many there are: those rows
    # run once, with the first group size; every batched group size is compared with them.
    first = args.groups[0]
    ref = _child("experts-reference", shape, args, group=first)
    base = ref["images_per_s"] if ref else None
    variants = [("reference (one at a time)", None, first),
                *[(name, v, first) for name, v in
                  _allocator_row("experts-reference-tuned-allocator", device)],
                ("ddkd, one at a time", "experts-ddkd", first),
                ("ddkd, one at a time, compiled", "experts-ddkd-compiled", first)]
    if "bf16" in args.precisions:  # one at a time only: vmap does not apply autocast
        variants += [("ddkd, one at a time, bf16", "experts-ddkd-bf16", first),
                     ("ddkd, one at a time, compiled, bf16", "experts-ddkd-compiled-bf16",
                      first)]
    for group in args.groups:
        variants += [(f"ddkd, {group} batched", "experts-batched", group),
                     (f"ddkd, {group} batched, compiled", "experts-batched-compiled", group)]
    for name, variant, group in variants:
        r = ref if variant is None else _child(variant, shape, args, group=group)
        lines.append(f"| {name} | {group} | failed (see stderr) | | |" if r is None else
                     f"| {name} | {group} | {r['images_per_s']:,.0f} | "
                     f"{_ratio(r['images_per_s'], base)} | {r['first_seconds']:.1f} |")
    if "matching" in args.parts:
        lines += [""] + _matching_table(shape, args, peak)
    return "\n".join(lines)


def _matching_table(shape: str, args, peak: dict[str, float]) -> list[str]:
    lines = ["| matching | syn_steps | s/iteration | speed-up | peak MiB | "
             "memory vs reference | GFLOP/iteration | of conv peak |", "|---" * 8 + "|"]
    device = torch.device(args.device)
    for n in args.syn_steps:
        ref = _child("match-reference", shape, args, syn_steps=n)
        variants = [("reference (unrolled)", None),
                    *_allocator_row("match-reference-tuned-allocator", device),
                    ("ddkd unrolled", "match-unrolled"),
                    ("ddkd constant", "match-constant")]
        if "bf16" in args.precisions:
            variants += [("ddkd unrolled, bf16", "match-unrolled-bf16"),
                         ("ddkd constant, bf16", "match-constant-bf16")]
        for name, variant in variants:
            r = ref if variant is None else _child(variant, shape, args, syn_steps=n)
            if r is None:
                lines.append(f"| {name} | {n} | failed (see stderr) |" + " |" * 5)
                continue
            precision = "bf16" if name.endswith("bf16") else "fp32"
            speed = _ratio(ref and ref["seconds"], r["seconds"])
            memory = _ratio(r["peak_bytes"], ref and ref["peak_bytes"], "{:.2f}")
            lines.append(
                f"| {name} | {n} | {r['seconds']:.3f} | {speed} | {_mib(r['peak_bytes'])} | "
                f"{memory} | {r['flops'] / 1e9:,.1f} | "
                f"{100 * r['flops'] / r['seconds'] / peak[precision]:.0f}% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shapes", default="fashion-mnist,cifar10-ipc10",
                        help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--syn-steps", default="5,10,20,40", help="comma list")
    parser.add_argument("--groups", default="4", help="experts per batch, comma list (the "
                        "one-at-a-time rows run once, with the first)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (best is kept)")
    parser.add_argument("--parts", default="experts,matching",
                        help="which tables: experts, matching, teacher (the SSL teacher's "
                        "step in fp32 and bf16; comma list)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="ddkd variants' arithmetic: fp32, bf16 (comma list; fp32 always "
                        "runs)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one variant, JSON out
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"bench: unknown shape(s) {unknown}; valid: {', '.join(SHAPES)}")
    args.syn_steps = [int(v) for v in args.syn_steps.split(",")]
    args.groups = [int(v) for v in args.groups.split(",")]
    args.parts = args.parts.split(",")
    args.precisions = args.precisions.split(",")
    if not set(args.precisions) <= {"fp32", "bf16"}:
        raise SystemExit(f"bench: --precisions {','.join(args.precisions)}; valid: fp32, bf16")
    if not set(args.parts) <= {"experts", "matching", "teacher"}:
        raise SystemExit(f"bench: --parts {','.join(args.parts)}; valid: experts, matching, "
                         "teacher")
    device = torch.device(args.device)
    if args.one:
        result = measure(args.one, shapes[0], device, args.syn_steps[0], args.groups[0],
                         args.repeats)
        print(json.dumps(result))
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{os.cpu_count()} CPU cores"
    print(f"# ddkd benchmark on {name}, torch {torch.__version__}\n")
    for shape in shapes:
        print(bench_shape(shape, args, device) + "\n", flush=True)
    if FAILED:
        raise SystemExit(f"bench: {len(FAILED)} variant(s) failed: {'; '.join(FAILED)}")


if __name__ == "__main__":
    main()
