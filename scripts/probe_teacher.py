"""Linear-probe a teacher, or an SSL checkpoint in the middle of its training, the way
`ddkd evaluate` probes its "teacher (ceiling)" row (standardised L-BFGS, class-stratified label
subsets, seeds 0..2), against a randomly initialised ConvNet student under the same probe.

    .venv/bin/python scripts/probe_teacher.py TEACHER [--dataset fashion-mnist]
        [--fractions 0.01,0.05] [--seeds 3]

TEACHER is a teacher.h5 (shipped, or from a run) or the `checkpoints/teacher.pt` of a teacher
run still training (its BatchNorm statistics are re-estimated first, as at the end of training).
It answers "has this teacher a margin over random features yet?" in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ddkd.data.datasets import load_dataset
from ddkd.data.transforms import Normalization
from ddkd.eval.labels import label_subset
from ddkd.eval.probe import linear_probe
from ddkd.io.weights import load_weights
from ddkd.models import ConvNet, ConvNetConfig, ResNet, ResNetConfig
from ddkd.probes import extract_features
from ddkd.ssl_training import recalibrate_batchnorm


def _teacher(path: str, train) -> tuple[torch.nn.Module, Normalization]:
    if path.endswith(".h5"):
        state, kind, arch, meta = load_weights(path)
        if kind != "resnet":
            raise SystemExit(f"{path}: a {kind!r} teacher; this script probes ResNet teachers")
        net = ResNet(ResNetConfig(**arch))
        net.load_state_dict(state)
        norm = meta.get("normalization")
        normalize = (Normalization(tuple(norm["mean"]), tuple(norm["std"])) if norm
                     else Normalization.fit(train.images))
        return net.eval(), normalize
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    run_config = json.loads((Path(path).parent.parent / "config.json")
                            .read_text())["config"]["teacher"]
    net = ResNet(ResNetConfig(in_channels=train.shape[0], depth=int(run_config["arch"][6:]),
                              base_width=run_config["base_width"]))
    prefix = "backbone."
    net.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["model"].items()
                         if k.startswith(prefix)})
    normalize = Normalization.fit(train.images)
    recalibrate_batchnorm(net, train.images, normalize, torch.device("cpu"))
    print(f"{path}: checkpoint after epoch {checkpoint['epoch']}")
    return net.eval(), normalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--fractions", default="0.01,0.05")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    train, test = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    teacher, normalize = _teacher(args.teacher, train)
    c, h, _ = train.shape
    torch.manual_seed(0)
    random_student = ConvNet(ConvNetConfig(in_channels=c, image_size=h, out_dim=0)).eval()
    classes = int(train.labels.max()) + 1
    for name, net in (("teacher", teacher), ("random ConvNet", random_student)):
        test_x = extract_features(net, test.images, normalize, torch.device("cpu"))
        cells = []
        for fraction in (float(f) for f in args.fractions.split(",")):
            accs = []
            for seed in range(args.seeds):
                idx = label_subset(train.labels, fraction, seed, classes)
                train_x = extract_features(net, train.images[idx], normalize,
                                           torch.device("cpu"))
                accs.append(100 * linear_probe(train_x, train.labels[idx], test_x, test.labels,
                                               classes))
            a = torch.tensor(accs)
            cells.append(f"{fraction:g}: {a.mean():.1f} +- {a.std():.1f}")
        print(f"{name:>15}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
