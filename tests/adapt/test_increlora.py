"""IncreLoRA: the update and importance math against plain references, the allocation rule and budget,
advance learning, merge/unmerge, determinism, and the grown ranks surviving save/load."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightkit.adapt import load_adapter, merge_and_unload, save_adapter
from weightkit.adapt.increlora import (
    RESERVE_VALUE,
    IncreLoRAConfig,
    IncreLoRAController,
    IncreLoRALinear,
    add_increlora,
    allocate_ranks,
    increlora_delta,
    lora_factors,
    module_sensitivity,
    orthogonality_penalty,
    smooth_importance,
)
from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])


def _layers(model, name="default") -> dict[str, IncreLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IncreLoRALinear) and name in m.lora_A}


def _randomise_singular_values(model, seed=0):
    """Random singular values for the active components (as after some training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(model).values():
            for e in list(layer.lora_E["default"])[: layer.rank("default")]:
                e.copy_(torch.randn(1, generator=generator))


class TwoBranch(nn.Module):
    """``10 * big(x) + 0.1 * small(x)``: the loss gradient at ``big``'s update is 100 times ``small``'s.
    ``small`` comes first in module order, so a rule that ignored the scores would pick it."""

    def __init__(self):
        super().__init__()
        self.small = nn.Linear(16, 16)
        self.big = nn.Linear(16, 16)

    def forward(self, x):
        return 10 * self.big(x) + 0.1 * self.small(x)


def _train_two_branch(config: IncreLoRAConfig, steps: int, on_step=None) -> tuple[nn.Module, list[bool]]:
    torch.manual_seed(0)
    model = add_increlora(TwoBranch(), config)
    controller = IncreLoRAController(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    x, target = torch.randn(32, 16, generator=generator), torch.randn(32, 16, generator=generator)
    grew = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), target) + controller.regularization()
        loss.backward()
        optimizer.step()
        grew.append(controller.step())
        optimizer.zero_grad()
        if on_step is not None:
            on_step(model, controller)
    return model, grew


def test_the_update_is_a_scaled_sum_of_rank_one_components():
    generator = torch.Generator().manual_seed(0)
    a, e, b = (torch.randn(shape, generator=generator) for shape in ((3, 6), (3,), (5, 3)))
    expected = torch.zeros(5, 6)
    for i in range(3):
        expected += 0.7 * e[i] * torch.outer(b[:, i], a[i])
    torch.testing.assert_close(increlora_delta(a, e, b, 0.7), expected)

    # The layer: 2 active components (trainable e), 1 reserve (e fixed at 1e-5), scale alpha / 2.
    model = add_increlora(
        nn.Sequential(nn.Linear(6, 5)), IncreLoRAConfig(init_rank=2, alpha=3.0, targets=["0"])
    )
    _randomise_singular_values(model)
    layer = model[0]
    assert (layer.rank("default"), int(layer.lora_ranknum["default"].reserve)) == (2, 1)
    expected = torch.zeros(5, 6)
    for i in range(3):
        value = layer.lora_E["default"][i] if i < 2 else torch.tensor([RESERVE_VALUE])
        expected += 3.0 / 2 * value * torch.outer(layer.lora_B["default"][i], layer.lora_A["default"][i])
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer.delta_weight("default"), expected.detach())
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T)
    factor_a, factor_b = lora_factors(layer, "default")
    assert factor_a.shape == (3, 6) and factor_b.shape == (5, 3)
    torch.testing.assert_close(factor_b @ factor_a, expected.detach())


def test_sensitivity_and_its_smoothing_match_the_reference():
    generator = torch.Generator().manual_seed(0)
    delta, grad = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    expected = sum(
        abs(float(delta[i, j]) * float(grad[i, j])) for i in range(4) for j in range(3)
    ) / math.sqrt(12)
    assert float(module_sensitivity(delta, grad)) == pytest.approx(expected, rel=1e-6)

    series = torch.rand(6, 3, generator=generator)  # 6 steps, 3 layers
    average, uncertainty = torch.zeros(3), torch.zeros(3)
    for step in series:
        average, uncertainty = smooth_importance(step, average, uncertainty, 0.8, 0.7)
    for layer in range(3):
        avg = unc = 0.0
        for step in series[:, layer].tolist():
            avg = 0.8 * avg + 0.2 * step
            unc = 0.7 * unc + 0.3 * abs(step - avg)
        assert float(average[layer]) == pytest.approx(avg, rel=1e-6)
        assert float(uncertainty[layer]) == pytest.approx(unc, rel=1e-6)


def test_the_recorded_sensitivity_uses_the_gradient_autograd_gives_the_whole_update():
    model = add_increlora(nn.Sequential(nn.Linear(6, 5)), IncreLoRAConfig(init_rank=2, targets=["0"]))
    _randomise_singular_values(model)
    layer = model[0]
    layer.tracked.add("default")
    x = torch.randn(2, 4, 6)
    (layer(x) ** 2).sum().backward()
    (layer(2 * x) ** 2).sum().backward()  # a second pass (gradient accumulation): the mean is kept
    recorded = layer.pop_sensitivity("default")
    assert layer.pop_sensitivity("default") is None

    expected = []
    for inputs in (x, 2 * x):
        delta = layer.delta_weight("default").detach().requires_grad_()
        ((layer.base_layer(inputs) + F.linear(inputs, delta)) ** 2).sum().backward()
        expected.append(module_sensitivity(delta.detach(), delta.grad))
    torch.testing.assert_close(recorded, (expected[0] + expected[1]) / 2)


def _allocate_reference(scores, ranks, capacity, top_h, rank_step, budget):
    ranks = list(ranks)
    remaining = budget - sum(ranks)
    with_room = [i for i in range(len(ranks)) if ranks[i] < capacity[i]]
    for i in sorted(with_room, key=lambda i: (-scores[i], i))[:top_h]:
        grant = max(min(rank_step, capacity[i] - ranks[i], remaining), 0)
        ranks[i] += grant
        remaining -= grant
    return ranks


def test_allocate_ranks_matches_the_reference_and_never_exceeds_the_budget():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 7, (1,), generator=generator))
        scores = torch.randint(0, 4, (n,), generator=generator).double()  # small integers: ties happen
        ranks = torch.randint(1, 4, (n,), generator=generator)
        capacity = ranks + torch.randint(0, 4, (n,), generator=generator)
        top_h, rank_step = torch.randint(1, 4, (2,), generator=generator).tolist()
        budget = int(ranks.sum()) + int(torch.randint(0, 8, (1,), generator=generator))
        new = allocate_ranks(scores, ranks, capacity, top_h=top_h, rank_step=rank_step, budget=budget)
        reference = _allocate_reference(
            scores.tolist(), ranks.tolist(), capacity.tolist(), top_h, rank_step, budget
        )
        assert new.tolist() == reference
        assert int(new.sum()) <= budget and bool((new <= capacity).all())
    # The last grant is cut to the budget: 3 left, 2 layers chosen, 2 components each -> 2 + 1.
    new = allocate_ranks(
        torch.tensor([0.1, 0.9, 0.5]), torch.tensor([1, 1, 1]), torch.tensor([9, 9, 9]),
        top_h=2, rank_step=2, budget=6,
    )  # fmt: skip
    assert new.tolist() == [1, 3, 2]


def test_a_fresh_adapter_leaves_outputs_unchanged_and_trains_only_the_adapter():
    model = tiny_llama(seed=0)
    before = model(IDS).logits
    add_increlora(model, IncreLoRAConfig(init_rank=2, advance_learning=False))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())

    # With advance learning the reserve components' 1e-5 singular value changes the outputs only slightly.
    model = tiny_llama(seed=0)
    add_increlora(model, IncreLoRAConfig(init_rank=2))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=1e-6)


def test_merge_then_unmerge_restores_the_base_weights():
    model = tiny_llama(seed=0)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    add_increlora(model, IncreLoRAConfig(init_rank=2, alpha=4.0))
    _randomise_singular_values(model)
    adapted = model(IDS).logits
    for layer in _layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(WeightkitError, match="unmerge"):
        next(iter(_layers(model).values())).set_rank("default", 3, 0)
    for layer in _layers(model).values():
        layer.unmerge()
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            torch.testing.assert_close(param, weights[name.replace(".base_layer", "")], rtol=0, atol=1e-6)
    torch.testing.assert_close(merge_and_unload(model)(IDS).logits, adapted, rtol=1e-5, atol=1e-5)


def test_the_layer_with_the_larger_gradient_gets_the_new_ranks_and_the_budget_holds():
    config = IncreLoRAConfig(
        init_rank=1, target_total_rank=5, rank_step=1, top_h=1, warmup=3, interval=2, targets=["big", "small"]
    )
    totals, untouched = [], {}

    def on_step(model, controller):
        totals.append(controller.total_rank)
        big = model.big
        if controller.steps == 1:  # component 1 is the reserve, 2 and 3 are not in use yet
            untouched["dormant"] = big.lora_A["default"][3].detach().clone()
            untouched["reserve"] = big.lora_A["default"][1].detach().clone()
        if controller.steps == 3:  # before the first allocation
            assert torch.equal(big.lora_A["default"][3], untouched["dormant"])  # no gradient, no update
            assert not torch.equal(big.lora_A["default"][1], untouched["reserve"])  # advance learning
            assert float(big.lora_E["default"][1].detach()) == pytest.approx(RESERVE_VALUE)  # e stays fixed

    model, grew = _train_two_branch(config, steps=12, on_step=on_step)
    # Allocations after the 3-step warm-up, every 2 steps: steps 4, 6 and 8 spend the surplus of 3.
    assert [i + 1 for i, g in enumerate(grew) if g] == [4, 6, 8]
    assert totals == [2, 2, 2, 3, 3, 4, 4, 5, 5, 5, 5, 5]
    assert (model.big.rank("default"), model.small.rank("default")) == (4, 1)
    # Budget spent: no reserve components and no more importance tracking.
    for layer in (model.big, model.small):
        assert int(layer.lora_ranknum["default"].reserve) == 0
        assert not layer.tracked
    # The activated component's singular value trained on from its advance-learning value.
    assert float(model.big.lora_E["default"][1].detach()) != pytest.approx(RESERVE_VALUE)


def test_without_advance_learning_new_components_start_untrained_at_zero():
    config = IncreLoRAConfig(
        init_rank=1, target_total_rank=4, top_h=1, warmup=2, interval=2, advance_learning=False,
        targets=["big", "small"],
    )  # fmt: skip
    model, grew = _train_two_branch(config, steps=6)
    assert grew == [False, False, False, True, False, True]
    assert (model.big.rank("default"), model.small.rank("default")) == (3, 1)
    # The component activated at the last step has not trained yet: it adds nothing.
    assert float(model.big.lora_E["default"][2].detach()) == 0.0


def test_same_seed_same_adapter_and_allocation():
    config = IncreLoRAConfig(
        init_rank=1, target_total_rank=4, top_h=1, warmup=1, interval=2, targets=["big", "small"]
    )
    first, _ = _train_two_branch(config, steps=6)
    second, _ = _train_two_branch(config, steps=6)
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    other = add_increlora(TwoBranch(), IncreLoRAConfig(init_rank=1, targets=["big"], seed=1))
    assert not torch.equal(other.big.lora_A["default"][0], first.big.lora_A["default"][0])


def test_orthogonality_penalty_matches_the_reference_and_trains_only_the_components_in_use():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)
    cov_a, cov_b = a @ a.T, b.T @ b
    expected = math.sqrt(sum((float(cov_a[i, j]) - (i == j)) ** 2 for i in range(3) for j in range(3)))
    expected += math.sqrt(sum((float(cov_b[i, j]) - (i == j)) ** 2 for i in range(3) for j in range(3)))
    assert float(orthogonality_penalty(a, b)) == pytest.approx(expected, rel=1e-5)
    right, _ = torch.linalg.qr(torch.randn(7, 3, generator=generator))
    left, _ = torch.linalg.qr(torch.randn(5, 3, generator=generator))
    assert float(orthogonality_penalty(right.T, left)) < 1e-5

    model = tiny_llama(seed=0)
    add_increlora(model, IncreLoRAConfig(init_rank=2, target_total_rank=12, orth_reg=0.5))
    controller = IncreLoRAController(model)
    controller.regularization().backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"][0].grad is not None and layer.lora_A["default"][2].grad is not None
    assert layer.lora_A["default"][3].grad is None  # dormant: not in use, no gradient


def test_grown_ranks_survive_save_and_load(tmp_path):
    model = tiny_llama(seed=0)
    config = IncreLoRAConfig(init_rank=1, target_total_rank=7, top_h=1, warmup=1, interval=1, alpha=2.0)
    add_increlora(model, config)
    controller = IncreLoRAController(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        (model(IDS, labels=IDS).loss + controller.regularization()).backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    model.eval()
    assert controller.total_rank == 6  # allocations after steps 2 and 3
    expected = model(IDS).logits

    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_llama(seed=0), tmp_path / "adapter")
    torch.testing.assert_close(loaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    resumed = IncreLoRAController(loaded)
    assert resumed.rank_pattern == controller.rank_pattern and resumed.allocating
    for name, layer in _layers(loaded).items():
        counts = layer.lora_ranknum["default"]
        assert int(counts.reserve) == int(_layers(model)[name].lora_ranknum["default"].reserve)


def test_two_named_adapters_add_up():
    model = nn.Sequential(nn.Linear(6, 5))
    add_increlora(model, IncreLoRAConfig(init_rank=1, targets=["0"]), name="a")
    add_increlora(model, IncreLoRAConfig(init_rank=2, targets=["0"], seed=3), name="b")
    layer = model[0]
    with torch.no_grad():
        for name in ("a", "b"):
            for e in layer.lora_E[name]:
                e.fill_(0.5)
    x = torch.randn(3, 6)
    expected = layer.base_layer(x) + x @ (layer.delta_weight("a") + layer.delta_weight("b")).T
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(WeightkitError, match="already has an adapter named 'a'"):
        add_increlora(model, IncreLoRAConfig(targets=["0"]), name="a")


def test_bad_configs_are_refused():
    for bad in ({"init_rank": 0}, {"rank_step": 0}, {"interval": 0}, {"beta1": 1.0}, {"max_rank": 1},
                {"target_total_rank": 1}, {"targets": []}, {"dropout": 1.0}, {"alpha": 0}):  # fmt: skip
        with pytest.raises(WeightkitError, match="increlora"):
            IncreLoRAConfig(**bad)
    with pytest.raises(WeightkitError, match="below the starting total"):
        add_increlora(tiny_llama(seed=0), IncreLoRAConfig(init_rank=2, target_total_rank=7))
    with pytest.raises(WeightkitError, match="no IncreLoRA adapter"):
        IncreLoRAController(tiny_llama(seed=0))
