"""DistributedZerothOrderSGD under torchrun (2 processes, gloo): both end with bit-identical weights, equal
to a one-process replay of the exchanged scalars along the same seeds; only 2 scalars (or 2 bytes) travel."""

import json
import os
import subprocess
import sys

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama
from weightkit.train import DistributedZerothOrderSGD
from weightkit.train.zeroth_order import directions

WORKER = """
import json, sys, torch
from safetensors.torch import save_file
from weightkit.runtime.distributed import init_distributed
from weightkit.testing import tiny_llama
from weightkit.train import DistributedZerothOrderSGD

out, one_byte = sys.argv[1], None if sys.argv[2] == "none" else float(sys.argv[2])
rank, world = init_distributed(torch.device("cpu"))
model = tiny_llama(seed=0)
ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(rank))  # each its own data
optimizer = DistributedZerothOrderSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=3, one_byte=one_byte)
grads = []
for _ in range(4):
    optimizer.step(lambda: model(input_ids=ids, labels=ids).loss)
    grads.append(optimizer.projected_grad)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"grads": grads, "bytes": optimizer.bytes_exchanged}, f)
# Leave the group together: a process exiting with gloo's threads alive can abort ("terminate called").
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def _torchrun(tmp_path, one_byte):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        str(script),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*command, one_byte], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("one_byte", ["none", "0.05"])
def test_two_processes_stay_identical_and_equal_a_replay_of_the_exchanged_scalars(tmp_path, one_byte):
    from safetensors.torch import load_file

    _torchrun(tmp_path, one_byte)
    weights = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    assert logs[0] == logs[1]
    assert logs[0]["bytes"] == (2 if one_byte != "none" else 16)  # 2 scalars received per step
    # One process, the same seeds (seed + step * 2 + rank), the same probe moves and the exchanged
    # scalars: the same weights, bit for bit.
    replay = tiny_llama(seed=0)
    params = list(replay.parameters())

    def move(seed, scale):
        for p, z in zip(params, directions(params, seed), strict=True):
            p.add_(z, alpha=scale)

    with torch.no_grad():
        for step, grads in enumerate(logs[0]["grads"]):
            seeds = [3 + step * 2 + rank for rank in range(2)]
            for seed in seeds:
                move(seed, 1e-3), move(seed, -2e-3), move(seed, 1e-3)
            for seed, g in zip(seeds, grads, strict=True):
                move(seed, -1e-3 * g / 2)
    for name, tensor in replay.state_dict().items():
        assert torch.equal(tensor, weights[0][name]), name
    if one_byte != "none":  # every scalar is a multiple of the code's step
        assert all(abs(g / 0.05 - round(g / 0.05)) < 1e-9 for grads in logs[0]["grads"] for g in grads)


def test_without_a_process_group_it_says_to_use_torchrun():
    with pytest.raises(WeightkitError, match="launch with torchrun"):
        DistributedZerothOrderSGD(tiny_llama().parameters())
