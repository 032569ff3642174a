"""tasks.task.resolve_device: device choice and the deterministic-kernel switch on CUDA."""

import pytest
import torch

from tasks.task import resolve_device


@pytest.fixture
def restore_determinism(monkeypatch):
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


def test_cpu_leaves_torch_global_settings_alone(restore_determinism):
    torch.use_deterministic_algorithms(False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_switches_kernels_as_configured(deterministic, restore_determinism, monkeypatch):
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU needed to set the switches
    assert resolve_device("auto", deterministic=deterministic) == torch.device("cuda")
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.is_deterministic_algorithms_warn_only_enabled() or not deterministic
    assert torch.backends.cudnn.benchmark == (not deterministic)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_cuda_without_a_gpu_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="use device = 'auto' or 'cpu'"):
        resolve_device("cuda")
