"""Linear-probe the experts of a teach run after every epoch: does KD from this teacher make
the students' features better than their random initialisation (epoch 0), and when?

    .venv/bin/python scripts/probe_experts.py RUN_DIR [--experts 0] [--epochs 0,1,2]
        [--fractions 0.01,0.05] [--seeds 3]

The probe is `ddkd evaluate`'s (standardised L-BFGS on the frozen flat features,
class-stratified label subsets, seeds 0..S-1, the whole test split), on the run's dataset in
the run's input normalisation. This is the diagnosis behind issue 5's claim: a distilled set can
only reproduce what its experts' first epochs do (MKDT matches epochs t..t+M, t < T+), so if
those epochs probe below epoch 0, every KD row of the evaluation will sit below "no
pre-training". About 40 s per (expert, epoch) on 2 cores at Fashion-MNIST size.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ddkd.data.datasets import load_dataset
from ddkd.data.transforms import Normalization
from ddkd.eval.labels import label_subset
from ddkd.eval.probe import linear_probe
from ddkd.io.experts import ExpertsFile
from ddkd.io.run import open_run
from ddkd.models import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec
from ddkd.probes import extract_features


class _Features(nn.Module):
    """A student's flat features (the encoder that `ddkd evaluate` probes)."""

    def __init__(self, net: ConvNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--experts", default="0", help="comma list of expert indices")
    parser.add_argument("--epochs", default=None, help="comma list (default: every snapshot)")
    parser.add_argument("--fractions", default="0.01,0.05")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    opened = open_run(args.run)
    if opened.zca is not None:
        raise SystemExit(f"{args.run}: a ZCA-whitened run; this script probes unwhitened ones")
    dataset = opened.teach_config["data"]["dataset"]
    data_root = opened.teach_config["data"].get("data_root")
    train, test = load_dataset(dataset, "train", data_root), load_dataset(dataset, "test",
                                                                           data_root)
    normalize = Normalization(tuple(opened.normalization["mean"]),
                              tuple(opened.normalization["std"]))
    classes = int(train.labels.max()) + 1
    fractions = [float(f) for f in args.fractions.split(",")]
    cpu = torch.device("cpu")
    with ExpertsFile(opened.run.experts) as experts:
        header = experts.header
        epochs = (range(header.epochs + 1) if args.epochs is None
                  else [int(e) for e in args.epochs.split(",")])
        for k in (int(v) for v in args.experts.split(",")):
            for epoch in epochs:
                net = ConvNet(ConvNetConfig(**header.student))
                if ParamSpec.of(net) != header.param_spec:
                    raise SystemExit(f"{opened.run.experts}: its parameters do not match the "
                                     "ConvNet it describes")
                theta = experts.snapshot(k, epoch).float()
                net.load_state_dict(header.param_spec.unflatten(theta), strict=False)
                encoder = _Features(net).eval()
                test_x = extract_features(encoder, test.images, normalize, cpu)
                cells = []
                for fraction in fractions:
                    accs = []
                    for seed in range(args.seeds):
                        idx = label_subset(train.labels, fraction, seed, classes)
                        train_x = extract_features(encoder, train.images[idx], normalize, cpu)
                        accs.append(100 * linear_probe(train_x, train.labels[idx], test_x,
                                                       test.labels, classes))
                    a = torch.tensor(accs)
                    spread = a.std().item() if len(a) > 1 else 0.0
                    cells.append(f"{fraction:g}: {a.mean():.1f} +- {spread:.1f}")
                print(f"expert {k} epoch {epoch}:  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
