"""LoRA-SB / LoRA-XS: the init math against plain references, only R trains, merge/unmerge, several adapters,
saving, and the paper's claim that LoRA-SB's first update is much closer to full fine-tuning's than LoRA's."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, set_peft_model_state_dict

from weightkit.adapt import (
    LoRAConfig,
    add_lora,
    load_adapter,
    save_adapter,
    set_active_adapters,
    trainable_parameters,
)
from weightkit.adapt.layer import batch_loss
from weightkit.adapt.lora_sb import (
    LoRASBConfig,
    LoRASBLinear,
    add_lora_sb,
    first_step_update,
    mean_gradients,
    svd_init,
    to_lora_factors,
    update_init,
)
from weightkit.errors import WeightkitError
from weightkit.registry import config_from_dict, config_to_dict
from weightkit.testing import tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
# q_proj and v_proj of both layers of tiny_llama.
TARGETS = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def _batches(n=4, seed=0):
    """Random token ids as a causal-LM task (labels = input_ids), deterministic."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 128, (4, 16), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def _reference_gradients(model, batches):
    """Full fine-tuning's gradient of each target weight, averaged over the batches, by plain autograd."""
    weights = [model.get_submodule(n).weight for n in TARGETS]
    for param in model.parameters():
        param.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    total = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for t, w in zip(total, weights, strict=True):
            t += w.grad
    return {n: t / len(batches) for n, t in zip(TARGETS, total, strict=True)}


def _truncated_svd_reference(matrix, rank):
    """sum_{i<rank} s_i u_i v_i^T with NumPy's SVD, one rank-1 term at a time."""
    U, S, Vh = np.linalg.svd(matrix.double().numpy())
    out = np.zeros(matrix.shape)
    for i in range(rank):
        out += S[i] * np.outer(U[:, i], Vh[i])
    return torch.from_numpy(out), torch.from_numpy(S)


def _cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_svd_init_is_lora_xs_truncated_svd_of_the_weight():
    W = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    B, A = svd_init(W, 3)
    reference, S = _truncated_svd_reference(W, 3)
    torch.testing.assert_close((B @ A).double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B.T @ B, torch.eye(3), rtol=0, atol=1e-5)
    # The singular values sit in A: its rows are orthogonal with norms s_1..s_r.
    torch.testing.assert_close((A @ A.T).double(), torch.diag(S[:3] ** 2), rtol=1e-5, atol=1e-4)


def test_update_init_is_the_best_rank_r_approximation_with_orthonormal_b_and_a():
    update = torch.randn(9, 14, generator=torch.Generator().manual_seed(1))
    B, R, A = update_init(update, 4)
    reference, S = _truncated_svd_reference(update, 4)
    torch.testing.assert_close((B @ R @ A).double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B.T @ B, torch.eye(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(A @ A.T, torch.eye(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(R.double(), torch.diag(S[:4]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first_step", ["sgd", "adam"])
def test_first_step_update_is_a_real_optimizers_first_step(first_step):
    grad = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    param = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(3)))
    start = param.detach().clone()
    if first_step == "sgd":
        optimizer = torch.optim.SGD([param], lr=0.01)
    else:  # eps -> 0: Adam's first step is -lr * grad / |grad|
        optimizer = torch.optim.Adam([param], lr=0.01, eps=1e-12)
    param.grad = grad
    optimizer.step()
    torch.testing.assert_close(
        first_step_update(grad, lr=0.01, first_step=first_step), param.detach() - start, rtol=1e-5, atol=1e-7
    )


def test_mean_gradients_matches_autograd_and_restores_requires_grad():
    batches = _batches()
    reference = _reference_gradients(tiny_llama(seed=0), batches)
    model = tiny_llama(seed=0)
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag that must come back as it was
    weights = {n: model.get_submodule(n).weight for n in TARGETS}
    grads = mean_gradients(model, weights, iter(batches), max_batches=10)
    for n in TARGETS:
        torch.testing.assert_close(grads[n], reference[n], rtol=1e-5, atol=1e-7)
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    assert all(p.grad is None for p in model.parameters())
    # Only the first max_batches batches count.
    one = mean_gradients(model, weights, batches, max_batches=1)
    torch.testing.assert_close(one[TARGETS[0]], _reference_gradients(tiny_llama(0), batches[:1])[TARGETS[0]])


def test_lora_xs_leaves_outputs_unchanged_and_trains_only_r():
    model = tiny_llama(seed=0)
    before = model(IDS).logits
    add_lora_sb(model, LoRASBConfig(rank=4, init="svd"))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    trainable, _ = trainable_parameters(model)
    assert trainable == len(TARGETS) * 4 * 4
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{t}.lora_R.default" for t in TARGETS
    ]
    # B and A are saved buffers; R gets a gradient although it starts at zero (B and A are not zero).
    state = model.state_dict()
    assert f"{TARGETS[0]}.lora_A.default" in state and f"{TARGETS[0]}.lora_B.default" in state
    batch_loss(model, _batches(1)[0]).backward()
    assert all(model.get_submodule(t).lora_R["default"].grad.abs().sum() > 0 for t in TARGETS)


def test_lora_sb_starts_at_the_best_rank_r_approximation_of_the_first_step():
    batches = _batches()
    grads = _reference_gradients(tiny_llama(seed=0), batches)
    model = tiny_llama(seed=0)
    add_lora_sb(model, LoRASBConfig(rank=4, first_step="sgd", init_lr=1e-2), data=batches)
    plain = tiny_llama(seed=0)
    for n in TARGETS:
        layer = model.get_submodule(n)
        reference, _ = _truncated_svd_reference(-1e-2 * grads[n], 4)
        torch.testing.assert_close(
            layer.delta_weight("default").detach().double(), reference, rtol=1e-4, atol=1e-7
        )
        with torch.no_grad():
            plain.get_submodule(n).weight += layer.delta_weight("default")
    # The update is applied on top of W (the model starts at the approximated first step).
    torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, rtol=1e-5, atol=1e-6)
    assert trainable_parameters(model)[0] == len(TARGETS) * 4 * 4


def test_gradient_init_is_deterministic():
    tensors = []
    for _ in range(2):
        model = add_lora_sb(tiny_llama(seed=0), LoRASBConfig(rank=3, init_lr=1e-4), data=_batches())
        tensors.append({k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k})
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) == 3 * len(TARGETS)
    for key, value in tensors[0].items():
        assert torch.equal(value, tensors[1][key]), key


def test_merge_then_unmerge_restores_the_base_weights_and_merge_keeps_outputs():
    model = tiny_llama(seed=0)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    add_lora_sb(model, LoRASBConfig(rank=4, init_lr=1e-2), data=_batches())
    adapted = model(IDS).logits
    layers = [model.get_submodule(n) for n in TARGETS]
    for layer in layers:
        layer.merge()
        layer.merge()  # idempotent
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    for layer in layers:
        layer.unmerge()
    for n, layer in zip(TARGETS, layers, strict=True):
        torch.testing.assert_close(layer.base_layer.weight, weights[n], rtol=0, atol=1e-6)


def test_two_named_adapters_on_one_layer_and_switching():
    model = tiny_llama(seed=0)
    base = model(IDS).logits
    add_lora_sb(model, LoRASBConfig(rank=2, init="svd"), name="xs")
    add_lora_sb(model, LoRASBConfig(rank=3, init_lr=1e-2), name="sb", data=_batches())
    layer = model.get_submodule(TARGETS[0])
    assert isinstance(layer, LoRASBLinear) and layer.adapter_names() == ["xs", "sb"]
    with torch.no_grad():
        for n in TARGETS:
            model.get_submodule(n).lora_R["xs"].normal_(0, 0.1)
    both = model(IDS).logits
    plain = tiny_llama(seed=0)
    with torch.no_grad():
        for n in TARGETS:
            wrapped = model.get_submodule(n)
            plain.get_submodule(n).weight += wrapped.delta_weight("xs") + wrapped.delta_weight("sb")
    torch.testing.assert_close(both, plain(IDS).logits, rtol=1e-5, atol=1e-6)
    set_active_adapters(model, [])
    torch.testing.assert_close(model(IDS).logits, base, rtol=0, atol=0)
    set_active_adapters(model, ["xs", "sb"])
    torch.testing.assert_close(model(IDS).logits, both, rtol=0, atol=0)
    assert trainable_parameters(model)[0] == len(TARGETS) * (2 * 2 + 3 * 3)


@pytest.mark.parametrize("first_step", ["sgd", "adam"])
def test_lora_sb_first_update_approximates_full_fine_tuning_far_better_than_lora(first_step):
    """The paper's claim: LoRA-SB's initial update is the optimal rank-r approximation of full fine-tuning's
    first step, and its first step on R keeps that direction; LoRA's first step is a random projection."""
    rank, lr, batches = 4, 1e-3, _batches()
    grads = _reference_gradients(tiny_llama(seed=0), batches)
    full_step = {n: first_step_update(grads[n], lr=lr, first_step=first_step) for n in TARGETS}

    sb = tiny_llama(seed=0)
    add_lora_sb(sb, LoRASBConfig(rank=rank, first_step=first_step, init_lr=lr), data=batches)
    sb_update = {n: sb.get_submodule(n).delta_weight("default").detach() for n in TARGETS}

    lora = tiny_llama(seed=0)
    torch.manual_seed(0)  # LoRA's Kaiming A
    add_lora(lora, LoRAConfig(rank=rank, alpha=rank))
    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr) if first_step == "sgd" else torch.optim.Adam(params, lr=lr)
    for batch in batches:
        (batch_loss(lora, batch) / len(batches)).backward()
    optimizer.step()

    for n in TARGETS:
        sb_cos = _cosine(sb_update[n], full_step[n])
        lora_cos = _cosine(lora.get_submodule(n).delta_weight("default").detach(), full_step[n])
        # Optimal: the cosine of the best rank-r approximation is sqrt(top-r energy / total energy).
        S = torch.linalg.svdvals(full_step[n].double())
        optimal = float((S[:rank].square().sum() / S.square().sum()).sqrt())
        assert sb_cos == pytest.approx(optimal, rel=1e-4)
        assert sb_cos > lora_cos + 0.3, (n, sb_cos, lora_cos)

    if first_step == "sgd":
        # One SGD step on R moves W by B B^T g A^T A: still close to full fine-tuning's gradient g there.
        moved = tiny_llama(seed=0)
        with torch.no_grad():
            for n in TARGETS:
                moved.get_submodule(n).weight += sb_update[n]
        grads_there = _reference_gradients(moved, batches)
        optimizer = torch.optim.SGD([p for p in sb.parameters() if p.requires_grad], lr=0.1)
        for batch in batches:
            (batch_loss(sb, batch) / len(batches)).backward()
        optimizer.step()
        for n in TARGETS:
            step = sb.get_submodule(n).delta_weight("default").detach() - sb_update[n]
            lora_cos = _cosine(lora.get_submodule(n).delta_weight("default").detach(), full_step[n])
            assert _cosine(step, -grads_there[n]) > lora_cos + 0.3


def test_to_lora_factors_export_loads_in_peft_with_the_same_outputs():
    model = add_lora_sb(tiny_llama(seed=0), LoRASBConfig(rank=4, init_lr=1e-2), data=_batches())
    expected = model(IDS).logits
    state = {}
    for n in TARGETS:
        layer = model.get_submodule(n)
        lora_A, lora_B = to_lora_factors(layer, "default")
        torch.testing.assert_close(lora_B @ lora_A, layer.delta_weight("default").detach())
        state[f"base_model.model.{n}.lora_A.weight"] = lora_A
        state[f"base_model.model.{n}.lora_B.weight"] = lora_B
    peft_model = get_peft_model(
        tiny_llama(seed=0), PeftLoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    set_peft_model_state_dict(peft_model, state)
    torch.testing.assert_close(peft_model(IDS).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("init", "peft_type"), [("gradient", "LORA_SB"), ("svd", "LORA_XS")])
def test_save_and_load_round_trip(tmp_path, init, peft_type):
    model = add_lora_sb(tiny_llama(seed=0), LoRASBConfig(rank=3, init=init, init_lr=1e-2), data=_batches(2))
    with torch.no_grad():
        for n in TARGETS:
            model.get_submodule(n).lora_R["default"].add_(0.05)  # as if trained
    expected = model(IDS).logits
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type and saved["init"] == init and saved["rank"] == 3
    fresh = load_adapter(tiny_llama(seed=0), tmp_path / "adapter")  # no data needed
    torch.testing.assert_close(fresh(IDS).logits, expected, rtol=0, atol=0)


def test_registry_names_and_presets():
    assert config_to_dict(LoRASBConfig(init="svd"))["method"] == "lora_xs"
    assert config_to_dict(LoRASBConfig())["method"] == "lora_sb"
    assert config_from_dict("adapt", {"method": "lora_xs", "rank": 2}).init == "svd"
    assert config_from_dict("adapt", {"method": "lora_sb"}).init == "gradient"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be an integer"),
        ({"init": "pissa"}, "init must be one of"),
        ({"first_step": "lion"}, "first_step must be one of"),
        ({"init_lr": 0.0}, "init_lr must be a finite number"),
        ({"init_lr": float("nan")}, "init_lr must be a finite number"),
        ({"calib_batches": 0}, "calib_batches must be an integer"),
        ({"targets": []}, "targets is empty"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(WeightkitError, match=message):
        LoRASBConfig(**kwargs)


def test_bad_input_gives_clear_errors():
    with pytest.raises(WeightkitError, match="needs data"):
        add_lora_sb(tiny_llama(seed=0), LoRASBConfig())
    with pytest.raises(WeightkitError, match="needs init_lr, the learning rate of your training run's first"):
        add_lora_sb(tiny_llama(seed=0), LoRASBConfig(), data=_batches())
    with pytest.raises(WeightkitError, match="gave no batches"):
        add_lora_sb(tiny_llama(seed=0), LoRASBConfig(init_lr=1e-4), data=[])
    with pytest.raises(WeightkitError, match="needs a loss"):
        add_lora_sb(tiny_llama(seed=0), LoRASBConfig(init_lr=1e-4), data=[{"input_ids": IDS}])
    with pytest.raises(WeightkitError, match="rank 17 is larger than"):
        add_lora_sb(tiny_llama(seed=0), LoRASBConfig(rank=17, init="svd"))
    model = add_lora_sb(tiny_llama(seed=0), LoRASBConfig(rank=2, init="svd"))
    with pytest.raises(WeightkitError, match="already has an adapter named 'default'"):
        add_lora_sb(model, LoRASBConfig(rank=2, init="svd"))
    # Structure only (what the loader does): no data needed, zero tensors, outputs unchanged.
    model = tiny_llama(seed=0)
    before = model(IDS).logits
    add_lora_sb(model, LoRASBConfig(rank=2), initialize=False)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
