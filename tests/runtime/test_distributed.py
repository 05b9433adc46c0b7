"""torch.distributed set-up: the backend follows the device, one GPU per process, shared scalars."""

import math

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.runtime.distributed import gather_scalars, init_distributed, rank_and_world


class _Started(Exception):
    """Raised by the stand-in for init_process_group, so no process group is really started."""


@pytest.fixture
def torchrun_env(monkeypatch):
    """This process as rank 0 of 2 under torchrun; init_process_group records its backend and stops."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    backends = []

    def init_process_group(backend, *args, **kwargs):
        backends.append(backend)
        raise _Started

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    return backends


def test_a_cpu_model_joins_over_gloo_even_on_a_machine_with_gpus(torchrun_env, monkeypatch):
    # NCCL cannot reduce CPU tensors: a CPU run on a GPU machine must not pick it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(_Started):
        init_distributed(torch.device("cpu"))
    assert torchrun_env == ["gloo"]


def test_a_gpu_other_than_this_processs_own_is_refused_under_torchrun(torchrun_env):
    with pytest.raises(WeightkitError, match="each process uses its own GPU .*cuda:0.*--device cuda"):
        init_distributed(torch.device("cuda", 1))
    assert torchrun_env == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_joins_over_nccl_and_becomes_the_current_device(torchrun_env):
    with pytest.raises(_Started):
        init_distributed(torch.device("cuda", 0))
    assert torchrun_env == ["nccl"] and torch.cuda.current_device() == 0


def test_without_torchrun_nothing_starts(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(torch.device("cpu")) == (0, 1) == rank_and_world()
    assert gather_scalars(torch.tensor(2.5)) == [2.5]
    assert math.isnan(gather_scalars(torch.tensor(float("nan")))[0])
