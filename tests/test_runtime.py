"""Helpers of ddkd.runtime that the stages share."""

import torch

from ddkd.runtime import global_cpu_rng_from, make_generator


def test_global_cpu_rng_from_is_reproducible_and_leaves_the_callers_rng_alone():
    with torch.random.fork_rng(devices=[]):  # this test's own seed, not the session's
        torch.random.default_generator.manual_seed(123)  # the CPU's alone, as the helper
        before = torch.random.get_rng_state()
        draws = []
        for _ in range(2):
            with global_cpu_rng_from(make_generator(7, 1)):
                draws.append(torch.randn(5))
        assert torch.equal(draws[0], draws[1])
        assert torch.equal(torch.random.get_rng_state(), before)
        with global_cpu_rng_from(make_generator(7, 2)):
            assert not torch.equal(torch.randn(5), draws[0])
