"""``seed_everything`` seeds what ``torch.manual_seed`` (and ``random``, numpy) would: the same
draws follow, for any seed a config accepts."""

from __future__ import annotations

import random

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.seeding import seed_everything


def _draws() -> tuple[float, list[float], list[float]]:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


@settings(max_examples=30, derandomize=True, deadline=None)
@given(seed=st.integers(min_value=-(2**40), max_value=2**40))
def test_seed_everything_draws_as_the_library_seeds_do(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    expected = _draws()
    torch.rand(5), random.random(), np.random.rand()  # move every stream on
    seed_everything(seed)
    assert _draws() == expected
