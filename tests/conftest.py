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
