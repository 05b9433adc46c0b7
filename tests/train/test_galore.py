"""GaLoreAdamW: AdamW in a rotated basis at full rank, the state the paper counts, exact resume, the
per-layer mode, and training a tiny Llama with a fraction of AdamW's state."""

import copy

import pytest
import torch
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama
from weightkit.train import GaLoreAdamW, galore_param_groups, galore_state_bytes
from weightkit.train.galore import projection

TARGET = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))


def _loss(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((x @ weight.T - x @ TARGET.T) ** 2).mean() + (weight**3).sum() * 1e-3  # not quadratic


def _inputs(step: int) -> torch.Tensor:
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(100 + step))


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_full_rank_without_refresh_is_adamw_on_the_weight_in_the_first_gradients_singular_basis(shape):
    # W = Y P (right side) or W = P Y (left): GaLore's step on W is torch's AdamW step on Y.
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.1
    target = TARGET if shape == (24, 16) else TARGET.T[:16, :24]
    rank = min(shape)
    weight = nn.Parameter(w0.clone())
    galore = GaLoreAdamW(
        [{"params": [weight], "rank": rank, "update_proj_gap": 10**6, "scale": 1.0}], lr=0.01, eps=0
    )

    def loss_of(w, step):
        x = torch.randn(32, shape[1], generator=torch.Generator().manual_seed(100 + step))
        return ((x @ w.T - x @ target.T) ** 2).mean() + (w**3).sum() * 1e-3

    basis = None
    for step in range(6):
        galore.zero_grad()
        loss_of(weight, step).backward()
        if basis is None:
            basis = projection(weight.grad, rank, "right" if shape[0] >= shape[1] else "left")
        galore.step()
    right = shape[0] >= shape[1]
    y = nn.Parameter(w0 @ basis.T if right else basis.T @ w0)
    adamw = torch.optim.AdamW([y], lr=0.01, eps=0, weight_decay=0)
    for step in range(6):
        adamw.zero_grad()
        loss_of(y @ basis if right else basis @ y, step).backward()
        adamw.step()
    rotated_back = y @ basis if right else basis @ y
    torch.testing.assert_close(weight.detach(), rotated_back.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weight, w0)


def test_a_group_without_rank_is_adamw():
    weight = nn.Parameter(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)))
    twin = nn.Parameter(weight.detach().clone())
    ours, theirs = (
        GaLoreAdamW([weight], lr=0.01, eps=0),
        torch.optim.AdamW([twin], lr=0.01, eps=0, weight_decay=0),
    )
    for step in range(5):
        for w, opt in ((weight, ours), (twin, theirs)):
            opt.zero_grad()
            _loss(w, _inputs(step)).backward()
            opt.step()
    torch.testing.assert_close(weight, twin, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("shape", "proj_type"), [((64, 16), "std"), ((16, 64), "std"), ((64, 16), "reverse_std")]
)
def test_the_state_is_the_papers_count(shape, proj_type):
    weight = nn.Parameter(torch.randn(*shape))
    opt = GaLoreAdamW([{"params": [weight], "rank": 4, "proj_type": proj_type}], lr=0.01)
    weight.grad = torch.randn(*shape)
    opt.step()
    held = sum(t.numel() * t.element_size() for t in opt.state[weight].values() if torch.is_tensor(t))
    if proj_type == "std":
        assert held == galore_state_bytes(shape, 4)  # two 4 x 64 moments and one 16 x 4 projection
    else:  # the larger side projected: moments 4 x 16, projection 64 x 4
        assert held == 4 * (2 * 4 * 16 + 64 * 4)
    assert held < 2 * weight.numel() * 4  # AdamW's two full moments


def _train(model, optimizer, steps, start=0):
    """``steps`` steps on batches drawn from 4 fixed sequences (learnable: the model memorises them)."""
    generator = torch.Generator().manual_seed(7)
    sequences = torch.randint(0, 128, (4, 12), generator=generator)
    picks = [torch.randint(0, 4, (2,), generator=generator) for _ in range(steps + start)]
    losses = []
    for pick in picks[start:]:
        ids = sequences[pick]
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_state_dict_resumes_bit_identically_across_projection_refreshes():
    def fresh():
        model = tiny_llama(seed=0)
        return model, GaLoreAdamW(
            galore_param_groups(model, rank=4, update_proj_gap=3), lr=3e-3, weight_decay=0.01
        )

    model, optimizer = fresh()
    _train(model, optimizer, 8)

    half, half_opt = fresh()
    _train(half, half_opt, 4)
    saved_model, saved_opt = copy.deepcopy(half.state_dict()), copy.deepcopy(half_opt.state_dict())
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, 4, start=4)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_per_layer_mode_updates_in_the_gradient_hook_and_frees_the_gradients():
    reference, per_layer = tiny_llama(seed=0), tiny_llama(seed=0)
    _train(reference, GaLoreAdamW(galore_param_groups(reference, rank=4), lr=3e-3), 3)
    optimizer = GaLoreAdamW(galore_param_groups(per_layer, rank=4), lr=3e-3, per_layer=True)
    _train(per_layer, optimizer, 3)
    assert all(p.grad is None for p in per_layer.parameters())
    for (name, a), b in zip(reference.state_dict().items(), per_layer.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_galore_trains_a_tiny_llama_with_a_third_of_adamws_state():
    # The paper's claim on a small case: the loss falls as AdamW's does, with a fraction of its state.
    results = {}
    for name in ("adamw", "galore"):
        model = tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
        if name == "adamw":
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
        else:
            # The paper's settings: scale 0.25, a refresh every 200 steps, and a larger learning rate than
            # AdamW's to make up for the scale.
            groups = galore_param_groups(model, rank=8, update_proj_gap=200, scale=0.25)
            optimizer = GaLoreAdamW(groups, lr=1e-2)
        losses = _train(model, optimizer, 30)
        matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        state = sum(
            t.numel() * t.element_size()
            for p, s in optimizer.state.items() if id(p) in matrices
            for t in s.values() if torch.is_tensor(t) and t.dim() > 0
        )  # fmt: skip
        results[name] = (losses[0], sum(losses[-5:]) / 5, state)
    (start, adamw_end, adamw_state), (_, galore_end, galore_state) = results["adamw"], results["galore"]
    assert adamw_end < start - 1, results
    assert galore_end < start - 0.5 * (start - adamw_end), results  # at least half of AdamW's progress
    assert galore_state < adamw_state / 3, results


def test_bad_groups_are_refused_by_name():
    weight, norm = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.ones(8))
    with pytest.raises(WeightkitError, match="rank 5 is larger than a \\(8, 4\\) matrix"):
        GaLoreAdamW([{"params": [weight], "rank": 5}])
    with pytest.raises(WeightkitError, match="1-D parameter"):
        GaLoreAdamW([{"params": [norm], "rank": 2}])
    with pytest.raises(WeightkitError, match="proj_type 'full'"):
        GaLoreAdamW([{"params": [weight], "rank": 2, "proj_type": "full"}])
    with pytest.raises(WeightkitError, match="unknown proj_type"):
        GaLoreAdamW([{"params": [weight], "rank": 2, "proj_type": "diagonal"}])


# -- SVD-free (DCT) basis ----------------------------------------------------------------------------------


def test_the_dct_basis_is_orthonormal_and_picks_the_gradients_energy():
    from weightkit.train.galore import dct_basis, dct_columns, dct_projection

    basis = dct_basis(16, torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(basis @ basis.T, torch.eye(16, dtype=torch.float64))
    # A gradient built from DCT vectors 3 and 11 (right side): those two are chosen, and its projection
    # onto them loses nothing.
    coefficients = torch.randn(24, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad = coefficients @ basis[[3, 11]]
    assert dct_columns(grad, 2, "right").tolist() == [3, 11]
    chosen = dct_projection(grad, torch.tensor([3, 11]), "right")
    torch.testing.assert_close(grad @ chosen.T @ chosen, grad)
    assert dct_columns(grad.T, 2, "left").tolist() == [3, 11]


def test_svd_free_galore_holds_indices_instead_of_a_projection_and_trains():
    model = tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    groups = galore_param_groups(model, rank=8, update_proj_gap=200, scale=0.25, basis="dct")
    optimizer = GaLoreAdamW(groups, lr=1e-2)
    losses = _train(model, optimizer, 30)
    state = optimizer.state[model.model.layers[0].mlp.down_proj.weight]  # 64 x 128: left side, m < n
    assert set(state) == {"step", "next_refresh", "gap", "columns", "exp_avg", "exp_avg_sq"}
    assert state["columns"].shape == (8,)
    assert state["exp_avg"].shape == (8, 128)
    assert sum(losses[-5:]) / 5 < losses[0] - 1, losses


def test_full_rank_dct_galore_without_refresh_is_adamw_in_the_dct_basis():
    from weightkit.train.galore import dct_basis

    w0 = torch.randn(24, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    weight = nn.Parameter(w0.clone())
    group = {"params": [weight], "rank": 16, "update_proj_gap": 10**6, "scale": 1.0, "basis": "dct"}
    galore = GaLoreAdamW([group], lr=0.01, eps=0)
    for step in range(5):
        galore.zero_grad()
        _loss(weight, _inputs(step)).backward()
        galore.step()
    basis = dct_basis(16, w0)  # all 16 vectors, in index order
    y = nn.Parameter(w0 @ basis.T)
    adamw = torch.optim.AdamW([y], lr=0.01, eps=0, weight_decay=0)
    for step in range(5):
        adamw.zero_grad()
        _loss(y @ basis, _inputs(step)).backward()
        adamw.step()
    torch.testing.assert_close(weight.detach(), (y @ basis).detach(), rtol=1e-5, atol=1e-6)


# -- Q-GaLore: quantized projections, lazy refresh ---------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_projection_codes_round_trip_within_half_a_step(bits):
    from weightkit.train.galore import dequantize_rows, quantize_rows

    rows = torch.randn(5, 33, generator=torch.Generator().manual_seed(0))  # odd length: a padded nibble
    codes, scales = quantize_rows(rows, bits)
    assert codes.shape == (5, 33 if bits == 8 else 17) and codes.element_size() == 1
    back = dequantize_rows(codes, scales, bits, 33)
    assert ((back - rows).abs() <= scales / 2 + 1e-7).all()


def test_q_galore_stores_a_4_bit_projection_and_trains_as_the_full_precision_one():
    results = {}
    for bits in (None, 4):
        model = tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
        keys = {"update_proj_gap": 200, "scale": 0.25} | ({"proj_bits": bits} if bits else {})
        optimizer = GaLoreAdamW(galore_param_groups(model, rank=8, **keys), lr=1e-2)
        losses = _train(model, optimizer, 30)
        state = optimizer.state[model.model.layers[0].self_attn.q_proj.weight]  # 64 x 64
        stored = (
            [state["projection"]] if bits is None else [state["projection_codes"], state["projection_scales"]]
        )
        results[bits] = (sum(losses[-5:]) / 5, sum(t.numel() * t.element_size() for t in stored))
    assert results[4][1] == 8 * 32 + 8 * 4 < results[None][1] / 7  # codes + scales vs 8 x 64 float32
    assert abs(results[4][0] - results[None][0]) < 0.1, results


def test_lazy_refresh_doubles_the_gap_once_the_projection_stops_moving(monkeypatch):
    import weightkit.train.galore as galore

    svds = []
    real = galore.projection
    monkeypatch.setattr(galore, "projection", lambda *args: svds.append(1) or real(*args))
    direction = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))

    def run(**lazy):
        svds.clear()
        weight = nn.Parameter(torch.zeros(24, 16))
        optimizer = GaLoreAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 2, **lazy}], lr=1e-2)
        for step in range(40):
            weight.grad = direction * (1 + 0.01 * step)  # the subspace never moves
            optimizer.step()
        return len(svds), optimizer.state[weight]["gap"]

    assert run() == (20, 2)
    refreshes, gap = run(cos_threshold=0.99, queue_size=2)
    assert gap >= 8 and refreshes <= 8, (refreshes, gap)
