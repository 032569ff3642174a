import numpy as np
import pytest
import torch


@pytest.fixture
def gen():
    """A seeded torch generator (randomness is explicit in this project)."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def np_rng():
    return np.random.default_rng(1234)


def cuda_devices():
    return ["cuda"] if torch.cuda.is_available() else []


# Property tests draw a fixed sequence of examples: CI sees exactly what a local run saw (no flaky draws).
from hypothesis import settings  # noqa: E402

settings.register_profile("fl-compams", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("fl-compams")
