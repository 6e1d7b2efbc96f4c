import pytest
import torch

from ddkd.errors import ConfigError
from ddkd.eval.labels import label_subset
from ddkd.eval.probe import linear_probe, linear_probe_sgd

PROBES = [linear_probe, linear_probe_sgd]


@pytest.mark.parametrize("probe", PROBES)
def test_probe_separates_linearly_separable_features(probe):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 4
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=gen)
    assert probe(x[:200], y[:200], x[200:], y[200:], 4) > 0.99


@pytest.mark.parametrize("probe", PROBES)
def test_probe_is_at_chance_on_noise(probe):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(600, 8, generator=gen), torch.randint(0, 3, (600,), generator=gen)
    assert probe(x[:300], y[:300], x[300:], y[300:], 3) < 0.45


def test_sgd_probe_reaches_the_lbfgs_solution():
    # The same objective: on overlapping classes both should land on nearly one accuracy.
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(1000) % 3
    x = torch.randn(3, 10, generator=gen)[y] + 1.5 * torch.randn(1000, 10, generator=gen)
    a = linear_probe(x[:500], y[:500], x[500:], y[500:], 3)
    b = linear_probe_sgd(x[:500], y[:500], x[500:], y[500:], 3)
    assert 0.5 < a < 0.99 and abs(a - b) < 0.02


def test_stratified_subsets_have_per_class_counts_and_are_fixed_by_seed():
    labels = torch.arange(1000) % 10
    idx = label_subset(labels, 0.05, seed=0, num_classes=10)
    assert labels[idx].bincount().tolist() == [5] * 10
    assert torch.equal(idx, label_subset(labels, 0.05, seed=0, num_classes=10))
    assert not torch.equal(idx, label_subset(labels, 0.05, seed=1, num_classes=10))
    uniform = label_subset(labels, 0.05, seed=0, num_classes=10, stratified=False)
    assert len(uniform) == 50 and torch.equal(uniform, uniform.unique())


def test_too_small_fraction_is_refused_with_the_count():
    labels = torch.arange(1000) % 10
    with pytest.raises(ConfigError, match="leaves 0.40 labels for class 0 .100 examples"):
        label_subset(labels, 0.004, seed=0, num_classes=10)
    with pytest.raises(ConfigError, match="not in"):
        label_subset(labels, 1.5, seed=0, num_classes=10)


@pytest.mark.parametrize("arch", ["convnet", "resnet10"])
def test_pretraining_regresses_the_targets(arch):
    from ddkd.eval.pretrain import build_encoder, pretrain

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=gen)
    y = x.flatten(1)[:, :4] * 2
    enc = build_encoder(arch, (1, 8, 8), 4, seed=0, student={"depth": 2, "width": 8})
    losses = pretrain(enc, x, y, lr=0.05, seed=0, epochs=15, batch_size=8)
    assert losses[-1] < 0.5 * losses[0]
    assert enc.features(x).ndim == 2
    again = build_encoder(arch, (1, 8, 8), 4, seed=0, student={"depth": 2, "width": 8})
    pretrain(again, x, y, lr=0.05, seed=0, epochs=15, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(),
                                                 again.state_dict().values(), strict=True))


@pytest.mark.parametrize("arch", ["convnet", "resnet10"])
def test_a_step_budget_passes_through_every_shorter_run(arch):
    """``steps=`` continues the same data stream: the encoder after k steps of a longer run is
    the encoder of a k-step run, and ``epochs`` epochs are exactly their number of steps
    (here 33 images in batches of 8: a last batch of one, skipped under BatchNorm)."""
    from ddkd.eval.pretrain import build_encoder, pretrain, steps_per_epoch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 1, 8, 8, generator=gen)
    y = x.flatten(1)[:, :4]

    def fresh():
        return build_encoder(arch, (1, 8, 8), 4, seed=0, student={"depth": 2, "width": 8})

    by_epochs = fresh()
    pretrain(by_epochs, x, y, lr=0.05, seed=1, epochs=2, batch_size=8)
    spe = steps_per_epoch(33, 8, by_epochs)
    assert spe == (4 if arch == "resnet10" else 5)
    seen = {}
    longer = fresh()
    pretrain(longer, x, y, lr=0.05, seed=1, steps=3 * spe, batch_size=8,
             on_step=lambda s: seen.setdefault(s, [t.clone() for t in
                                                    longer.state_dict().values()]))
    assert sorted(seen) == list(range(1, 3 * spe + 1))
    assert all(torch.equal(a, b) for a, b in zip(by_epochs.state_dict().values(),
                                                 seen[2 * spe], strict=True))


def test_unknown_arch_lists_the_valid_ones():
    from ddkd.eval.pretrain import build_encoder

    with pytest.raises(ConfigError, match="valid: convnet, resnet10, resnet18"):
        build_encoder("vit", (1, 8, 8), 4, seed=0)


def test_paired_differences_cancel_the_noise_shared_by_a_seed():
    from ddkd.eval.runner import markdown_table, paired_tables

    # The label draw moves every method of a seed alike (+-3 points); the set is exactly 0.5
    # above random + KD and 1.5 above no pre-training at every seed.
    shared = {0: 0.80, 1: 0.83, 2: 0.77}
    rows = []
    for seed, base in shared.items():
        for method, baseline, delta in (("set", None, 0.015), ("no pre-training", "none", 0.0),
                                        ("random subset + KD (n=4)", "random", 0.010)):
            rows.append({"method": method, "baseline": baseline, "arch": "convnet",
                         "seed": seed, "downstream": "toy", "fraction": 0.1,
                         "accuracy": base + delta})
    assert "| set | convnet | 81.5 ± 3.0 |" in markdown_table(rows, [0.1], ["toy"])
    random_table, none_table = paired_tables(rows, [0.1], ["toy"]).split("\n\n")
    assert random_table.startswith("| minus random subset + KD (n=4), paired by seed |")
    assert "| set | convnet | +0.5 ± 0.0 |" in random_table
    assert "no pre-training | convnet" not in random_table  # it is in the next table
    assert "| set | convnet | +1.5 ± 0.0 |" in none_table
    assert "| random subset + KD (n=4) | convnet | +1.0 ± 0.0 |" in none_table
    # without the reference rows there is nothing to pair with
    assert paired_tables([r for r in rows if r["baseline"] is None], [0.1], ["toy"]) == ""


def test_paired_differences_per_architecture_with_the_teacher_and_a_missing_seed():
    from ddkd.eval.runner import paired_tables

    def row(method, baseline, arch, seed, accuracy):
        return {"method": method, "baseline": baseline, "arch": arch, "seed": seed,
                "downstream": "toy", "fraction": 0.1, "accuracy": accuracy}

    rows = []
    for seed in range(3):
        rows += [row("random + KD", "random", "convnet", seed, 0.80 + 0.01 * seed),
                 row("random + KD", "random", "resnet10", seed, 0.70 + 0.01 * seed),
                 row("set", None, "convnet", seed, 0.81 + 0.01 * seed),
                 row("teacher (ceiling)", "teacher", "teacher", seed, 0.84 + 0.01 * seed)]
        if seed < 2:  # one seed of the ResNet row is missing
            rows.append(row("set", None, "resnet10", seed, 0.7196 + 0.01 * seed))
    table = paired_tables(rows, [0.1], ["toy"])
    assert "| set | convnet | +1.0 ± 0.0 |" in table
    assert "| set | resnet10 | +2.0 ± 0.0 (n=2) |" in table  # against the ResNet's own row
    assert "| teacher (ceiling) | teacher | +4.0 ± 0.0 |" in table  # against the first arch's
    rows = [dict(r, accuracy=r["accuracy"] - 0.0104) if r["method"] == "set" else r
            for r in rows]
    assert "| set | convnet | +0.0 ± 0.0 |" in paired_tables(rows, [0.1], ["toy"])  # no -0.0


def test_knn_probe_on_a_hand_computed_case():
    """Weighted cosine kNN (ddkd.probes): bank a0 = (1, 0) class 0, a1 = (0.8, 0.6) and
    a2 = (0.6, 0.8) class 1, a3 = (0, 1) class 2; queries q0 = (1, 0) (class 0) and
    q1 = (0, 1) (class 2). With k = 3, q0's votes are e^(1/T) for class 0 against
    e^(0.8/T) + e^(0.6/T) for class 1: at T = 0.07 class 0 wins (e^14.3 > e^11.4 + e^8.6),
    at T = 1 class 1 (2.72 < 2.23 + 1.82); q1 is the mirror image. k = 1: the nearest."""
    from ddkd.probes import knn_accuracy

    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 2])
    queries, truth = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 2])
    assert knn_accuracy(bank, labels, queries, truth, 3, k=3, temperature=0.07) == 1.0
    assert knn_accuracy(bank, labels, queries, truth, 3, k=3, temperature=1.0) == 0.0
    assert knn_accuracy(bank, labels, queries, truth, 3, k=1, temperature=1.0) == 1.0
    # cosine: the bank's and the queries' lengths do not matter; nor does the chunking
    scaled = bank * torch.tensor([[5.0], [0.1], [2.0], [7.0]])
    assert knn_accuracy(scaled, labels, 3 * queries, truth, 3, k=3, temperature=1.0,
                        chunk=1) == 0.0
    # k beyond the bank is the whole bank; one of two queries right: 0.5
    assert knn_accuracy(bank, labels, queries, torch.tensor([0, 1]), 3, k=10) == 0.5
