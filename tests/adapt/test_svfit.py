"""SVFit: r trained singular-value changes per layer, neutral at init, exact gradients, merge, span fit."""

import pytest
import torch
from torch import nn

from weightkit.adapt import load_adapter, save_adapter, set_active_adapters, trainable_parameters
from weightkit.adapt.layer import adapter_state
from weightkit.adapt.svfit import (
    SVFitConfig,
    SVFitLinear,
    add_svfit,
    svfit_delta_weight,
    top_singular_vectors,
)
from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])


def _randomise_delta(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SVFitLinear):
                for delta in module.svfit_delta.values():
                    delta.copy_(torch.randn(delta.shape, generator=generator))


def _svfit_layers(model):
    return [m for m in model.modules() if isinstance(m, SVFitLinear)]


def test_buffers_are_the_top_singular_vectors_and_the_update_is_the_papers_equation():
    weight = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    U_r, Vh_r = top_singular_vectors(weight, 3)
    assert U_r.shape == (12, 3) and Vh_r.shape == (3, 20)
    # Reference: the top eigenvectors of W W^T and W^T W, paired by W v = s u.
    eigvals, eigvecs = torch.linalg.eigh(weight.double() @ weight.double().T)
    for i in range(3):
        u_ref = eigvecs[:, -1 - i]
        assert abs(float(u_ref @ U_r[:, i].double())) == pytest.approx(1, abs=1e-5)
        s_i = float(eigvals[-1 - i].sqrt())
        torch.testing.assert_close(weight @ Vh_r[i], s_i * U_r[:, i], rtol=1e-4, atol=1e-4)
    # W + U_r diag(d) V_r^T == W_e + U_r diag(S_r + d) V_r^T (the paper's form), summed term by term.
    delta = torch.tensor([0.5, -1.0, 2.0])
    S = torch.linalg.svdvals(weight)
    W_e = weight - sum(S[i] * torch.outer(U_r[:, i], Vh_r[i]) for i in range(3))
    papers = W_e + sum((S[i] + delta[i]) * torch.outer(U_r[:, i], Vh_r[i]) for i in range(3))
    torch.testing.assert_close(weight + svfit_delta_weight(U_r, delta, Vh_r), papers, rtol=1e-5, atol=1e-5)


def test_a_fresh_adapter_trains_r_values_per_layer_and_leaves_outputs_unchanged():
    model = tiny_llama(seed=0)
    before = model(IDS).logits
    add_svfit(model, SVFitConfig(rank=4))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * 2 * 4  # q_proj and v_proj in 2 layers, 4 singular values each
    assert all(p.requires_grad == (".svfit_delta." in n) for n, p in model.named_parameters())
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.svfit_U["default"].shape == (16, 4) and layer.svfit_Vh["default"].shape == (4, 32)
    keys = sorted(
        k for k in adapter_state(model, "default") if k.startswith("model.layers.0.self_attn.v_proj")
    )
    assert keys == [f"model.layers.0.self_attn.v_proj.svfit_{part}" for part in ("U", "Vh", "delta")]


def test_structure_only_init_has_zero_buffers_of_the_right_shapes():
    model = add_svfit(tiny_llama(seed=0), SVFitConfig(rank=3), initialize=False)
    layer = model.model.layers[1].self_attn.q_proj
    assert layer.svfit_U["default"].shape == (32, 3) and layer.svfit_Vh["default"].shape == (3, 32)
    assert not layer.svfit_U["default"].any() and not layer.svfit_Vh["default"].any()


def test_gradient_of_delta_s_is_the_diagonal_of_the_weight_gradient_in_the_singular_basis():
    base = nn.Linear(20, 12)
    layer = SVFitLinear(base)
    layer.add_adapter("default", SVFitConfig(rank=5))
    with torch.no_grad():
        layer.svfit_delta["default"].normal_()  # away from 0, where any bug in the product would show
    x, target = torch.randn(7, 20), torch.randn(7, 12)
    ((layer(x) - target) ** 2).sum().backward()

    U_r, Vh_r = layer.svfit_U["default"], layer.svfit_Vh["default"]
    effective = (
        (base.weight + U_r @ torch.diag(layer.svfit_delta["default"]) @ Vh_r).detach().requires_grad_()
    )
    ((nn.functional.linear(x, effective, base.bias) - target) ** 2).sum().backward()
    expected = torch.stack([U_r[:, i] @ effective.grad @ Vh_r[i] for i in range(5)])
    torch.testing.assert_close(layer.svfit_delta["default"].grad, expected, rtol=1e-5, atol=1e-5)


def test_merge_then_unmerge_restores_the_base_and_merge_keeps_outputs():
    model = tiny_llama(seed=0)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    add_svfit(model, SVFitConfig(rank=4))
    _randomise_delta(model)
    adapted = model(IDS).logits
    for layer in _svfit_layers(model):
        layer.merge()
        layer.merge()  # idempotent
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    for layer in _svfit_layers(model):
        layer.unmerge()
    for name, param in model.named_parameters():
        if ".svfit_" not in name:
            torch.testing.assert_close(param, weights[name.replace(".base_layer", "")], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)


def test_two_named_adapters_add_up_and_can_be_switched():
    model = tiny_llama(seed=0)
    base = model(IDS).logits
    add_svfit(model, SVFitConfig(rank=2), name="a")
    add_svfit(model, SVFitConfig(rank=5), name="b")
    _randomise_delta(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 32)
    expected = layer.base_layer(x) + x @ (layer.delta_weight("a") + layer.delta_weight("b")).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    set_active_adapters(model, [])
    torch.testing.assert_close(model(IDS).logits, base, rtol=0, atol=0)
    set_active_adapters(model, ["b"])
    assert not torch.allclose(model(IDS).logits, base)


def _fit(layer, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Least squares in the few trained values; L-BFGS needs a handful of steps for that."""
    optimizer = torch.optim.LBFGS(params, max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = ((layer(x) - y) ** 2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((layer(x) - y) ** 2).mean())


def test_svfit_reaches_a_target_that_rescales_the_principal_directions_and_random_directions_do_not():
    # The paper's premise: adapting means rescaling the weight's own principal subspaces. A target
    # that does exactly that is reached by SVFit's r values, not by r values on random directions.
    generator = torch.Generator().manual_seed(0)
    rank, base = 4, nn.Linear(32, 16, bias=False)
    U, S, Vh = torch.linalg.svd(base.weight.detach())
    change = torch.randn(rank, generator=generator) * S[:rank]
    target_weight = U @ torch.diag(torch.cat([S[:rank] + change, S[rank:]])) @ Vh[:16]
    x = torch.randn(128, 32, generator=generator)
    y = x @ target_weight.T
    with torch.no_grad():
        start = float(((base(x) - y) ** 2).mean())

    layer = SVFitLinear(base)
    layer.add_adapter("default", SVFitConfig(rank=rank))
    svfit_loss = _fit(layer, [layer.svfit_delta["default"]], x, y)

    P = torch.linalg.qr(torch.randn(16, rank, generator=generator)).Q
    Q = torch.linalg.qr(torch.randn(32, rank, generator=generator)).Q.T
    scales = torch.zeros(rank, requires_grad=True)
    random_loss = _fit(lambda inp: base(inp) + ((inp @ Q.T) * scales) @ P.T, [scales], x, y)

    assert svfit_loss < 1e-4 * start
    assert random_loss > 0.5 * start
    torch.testing.assert_close(layer.svfit_delta["default"].detach(), change, rtol=1e-2, atol=1e-2)


def test_save_and_load_round_trip(tmp_path):
    # Needs weightkit.adapt.save_adapter/load_adapter generalised to every registered method.
    model = tiny_llama(seed=0)
    add_svfit(model, SVFitConfig(rank=3))
    _randomise_delta(model, seed=1)
    expected = model(IDS).logits
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_llama(seed=0), tmp_path / "adapter")
    torch.testing.assert_close(loaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_configs_and_states_are_refused():
    with pytest.raises(WeightkitError, match="rank"):
        SVFitConfig(rank=0)
    with pytest.raises(WeightkitError, match="targets is empty"):
        SVFitConfig(targets=[])
    with pytest.raises(WeightkitError, match="larger than a 16x32 layer"):
        add_svfit(tiny_llama(seed=0), SVFitConfig(rank=20, targets=["re:.*v_proj"]))
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(WeightkitError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight contains 1 NaN"):
        add_svfit(model, SVFitConfig(rank=2))
    model = add_svfit(tiny_llama(seed=0), SVFitConfig(rank=2, targets=["re:.*q_proj"]), name="a")
    with pytest.raises(WeightkitError, match="already has an adapter named 'a'"):
        add_svfit(model, SVFitConfig(rank=2, targets=["re:.*q_proj"]), name="a")
    for layer in _svfit_layers(model):
        layer.merge()
    with pytest.raises(WeightkitError, match="unmerge"):
        add_svfit(model, SVFitConfig(rank=2, targets=["re:.*q_proj"]), name="b")
