"""``weightkit demo``: the options it takes (the full run is the demo itself, minutes long)."""

import pytest
import torch

from weightkit.demo import run_demo
from weightkit.errors import WeightkitError


def test_demo_refuses_a_device_this_machine_lacks_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(WeightkitError, match="no CUDA GPU"):
        run_demo(tmp_path / "out", quiet=True, device="cuda")
    assert not (tmp_path / "out").exists()
