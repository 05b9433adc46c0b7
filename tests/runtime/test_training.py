"""The shared training loop: where it runs, its warm-up, and the first step it takes."""

import pytest
import torch

from weightkit.adapt import LoRAConfig, adapt
from weightkit.adapt.trainer import train_adapter
from weightkit.runtime.training import TrainConfig, first_step_lr, train_loop
from weightkit.testing import tiny_llama, tiny_tokenizer

TEXTS = [f"the cat sat on the mat and the dog ran to the park {w}" for w in ("a", "b", "c", "d") * 4]


class _Seen(Exception):
    """Stops a run at its first forward pass once the placement is recorded."""


def _record_first_forward(model):
    seen = {}

    def hook(module, args, kwargs):
        seen["input"] = kwargs["input_ids"].device
        seen["parameters"] = {p.device for p in module.parameters()}
        raise _Seen

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_train_adapter_moves_the_model_to_the_device_it_is_given(tmp_path):
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=2))
    seen = _record_first_forward(model)
    with pytest.raises(_Seen):
        train_adapter(
            model, tiny_tokenizer(), TEXTS, None, tmp_path / "out", TrainConfig(max_steps=1, batch_size=4),
            device="meta", progress=False,
        )  # fmt: skip
    assert seen == {"input": torch.device("meta"), "parameters": {torch.device("meta")}}


def test_the_loop_trains_where_the_model_is(tmp_path):
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=2)).to("meta")
    seen = _record_first_forward(model)
    with pytest.raises(_Seen):
        train_loop(
            model, tiny_tokenizer(), TEXTS, None, TrainConfig(max_steps=1, batch_size=4),
            params=[p for p in model.parameters() if p.requires_grad], save_checkpoint=lambda *_: None,
            checkpoints=tmp_path / "ckpt", progress=False,
        )  # fmt: skip
    assert seen["input"] == torch.device("meta")


@pytest.mark.parametrize(("lr", "warmup", "expected"), [(1e-3, 0, 1e-3), (4e-3, 3, 1e-3), (1e-2, 9, 1e-3)])
def test_the_first_step_runs_at_first_step_lr(tmp_path, lr, warmup, expected):
    # Adam's first step moves every parameter with a gradient by the learning rate (m / sqrt(v) = +-1), so
    # the largest move is the rate the loop's warm-up gave step 1: what LoRA-SB's init_lr is set to.
    config = TrainConfig(max_steps=1, batch_size=4, lr=lr, warmup_steps=warmup, eval_fraction=0)
    assert first_step_lr(config) == pytest.approx(expected)
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=2))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    train_loop(
        model, tiny_tokenizer(), TEXTS, None, config, params=params, save_checkpoint=lambda *_: None,
        checkpoints=tmp_path / "ckpt", progress=False,
    )  # fmt: skip
    moved = max((p - b).abs().max().item() for p, b in zip(params, before, strict=True))
    assert moved == pytest.approx(expected, rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_adapter_trains_on_the_gpu(tmp_path):
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=2))
    summary = train_adapter(
        model, tiny_tokenizer(), TEXTS, None, tmp_path / "out", TrainConfig(max_steps=2, batch_size=4),
        device="cuda", progress=False,
    )  # fmt: skip
    assert summary["steps"] == 2 and {p.device.type for p in model.parameters()} == {"cuda"}
