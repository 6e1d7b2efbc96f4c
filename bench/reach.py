"""How far can N inner steps on a small real set follow an expert segment?

Before spending CPU hours on ``ddkd synthesize``, this measures whether its inner loop can cover
the segments it is asked to match at all: for a random real subset of the set's size (with the
teacher's targets, as ``--init random`` starts), it unrolls N plain SGD steps from every
(expert, start epoch) pair at several step sizes and reports MTT's normalised matching loss
``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2``. 1.0 means the student did not
get closer to the segment's end than where it started; the best step size shows how much the
learned step size (alpha) can still do before the images change. Forward unrolls only (no
meta-gradient), so a grid costs minutes where a synthesize run costs hours.

    python bench/reach.py --run runs/fm-full --size 600 --syn-steps 10,20,40 \
        --batch-syn 100 --expert-epochs 1,2 --max-start-epoch 2 --alphas 0.1,0.3,1,3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ddkd.io.experts import ExpertsFile
from ddkd.io.run import open_run
from ddkd.models.convnet import ConvNet, ConvNetConfig
from ddkd.runtime import make_generator
from ddkd.subsets import random_indices
from ddkd.synth.matching import matching_loss, sample_batches, unroll

_STREAM_REACH = 97  # this script's own draws (subset, batches): no ddkd stream is reused


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def real_subset(run_dir: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """A random real subset in the experts' input and target spaces, and the objective."""
    opened = open_run(run_dir)  # builds the run's normalisation, ZCA and fitted objective
    idx = random_indices(opened.images.shape[0], size, make_generator(seed, _STREAM_REACH))
    x = opened.normalization(opened.images[idx])
    if opened.zca is not None:
        x = opened.zca(x)
    return x, opened.objective.targets(opened.targets[idx]), opened.objective


def reach(experts: ExpertsFile, x: torch.Tensor, y: torch.Tensor, loss_fn, syn_steps: int,
          batch_syn: int, expert_epochs: int, max_start_epoch: int, alphas: list[float],
          seed: int) -> dict[float, float]:
    """Mean matching loss over every (expert, start epoch) pair, for each step size."""
    model = ConvNet(ConvNetConfig(**experts.header.student))
    spec = experts.header.param_spec
    losses: dict[float, list[float]] = {a: [] for a in alphas}
    for k in range(len(experts)):
        for t in range(max_start_epoch):
            gen = make_generator(seed, _STREAM_REACH, k, t)
            batches = sample_batches(len(x), syn_steps, batch_syn, gen)
            start, target = experts.snapshot(k, t), experts.snapshot(k, t + expert_epochs)
            for a in alphas:
                theta = unroll(model, spec, start, x, y, torch.tensor(a), batches, loss_fn,
                               create_graph=False)
                losses[a].append(float(matching_loss(theta.detach(), start, target)))
    return {a: sum(v) / len(v) for a, v in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--size", type=int, required=True, help="synthetic set size")
    parser.add_argument("--syn-steps", default="10,20,40", help="N values")
    parser.add_argument("--batch-syn", type=int, default=256)
    parser.add_argument("--expert-epochs", default="1,2", help="M values")
    parser.add_argument("--max-start-epoch", type=int, default=2, help="T+")
    parser.add_argument("--alphas", default="0.1,0.3,1,3", help="step sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, y, objective = real_subset(args.run, args.size, args.seed)
    alphas = _floats(args.alphas)
    print("| M | N | batch_syn | " + " | ".join(f"alpha {a:g}" for a in alphas)
          + " | seconds |")
    print("|---|---|---|" + "---|" * (len(alphas) + 1))
    with ExpertsFile(f"{args.run}/experts.h5") as experts:
        for m in _ints(args.expert_epochs):
            for n in _ints(args.syn_steps):
                t0 = time.perf_counter()
                mean = reach(experts, x, y, objective.loss, n, args.batch_syn, m,
                             args.max_start_epoch, alphas, args.seed)
                cells = " | ".join(f"{mean[a]:.3f}" for a in alphas)
                print(f"| {m} | {n} | {args.batch_syn} | {cells} | "
                      f"{time.perf_counter() - t0:.0f} |", flush=True)
                print(json.dumps({"M": m, "N": n, "batch_syn": args.batch_syn,
                                  "loss": {str(a): v for a, v in mean.items()}}), flush=True)


if __name__ == "__main__":
    main()
