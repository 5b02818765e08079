"""clsim.seeds: the named streams and the cheap torch seeding."""

from __future__ import annotations

import pytest
import torch

from clsim.seeds import derive_seed, seed_torch


@pytest.mark.parametrize("seed", [0, 7, derive_seed(3, 1, 2), 2**63 - 1])
def test_seed_torch_draws_what_torch_manual_seed_draws(seed):
    torch.manual_seed(seed)
    expected = (torch.rand(5), torch.randn(3), torch.randperm(10))
    torch.manual_seed(seed + 1)  # move off it, so a no-op seed_torch cannot pass
    seed_torch(seed)
    got = (torch.rand(5), torch.randn(3), torch.randperm(10))
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_seed_torch_seeds_the_default_generator():
    seed_torch(123)
    assert torch.initial_seed() == 123
