"""MoS: shard assembly against a loop, zero init, merge/unmerge, parameter budget, real sharing, determinism,
saving and loading."""

import itertools
import re

import pytest
import torch

from weightkit.adapt import load_adapter, save_adapter, trainable_parameters
from weightkit.adapt.mos import MoSConfig, MoSLinear, add_mos, assemble_A, assemble_B, draw_shard_indices
from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
# 4 layers, so each q_proj/v_proj group of 4 layers shares a pool of (2 - 1) * 4 = 4 vectors (8 shards),
# from which every layer draws rank - private_rank = 3 vectors (6 shards).
LAYERS = 4
CONFIG = dict(rank=4, alpha=8.0, budget_rank=2, private_rank=1, shards_per_vector=2)


def _model(**config):
    model = tiny_llama(seed=0, num_hidden_layers=LAYERS)
    return add_mos(model, MoSConfig(**{**CONFIG, **config}))


def _mos_layers(model) -> dict[str, MoSLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoSLinear)}


def _randomise(model, seed=1):
    """Non-zero B-shards (pools and private columns), so the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mos_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_assembly_matches_a_loop_over_the_index_matrix():
    generator = torch.Generator().manual_seed(0)
    l, rows, private_rank, d_in, d_out, pool_size = 3, 4, 2, 12, 6, 15
    pool_a, pool_b = torch.randn(pool_size, d_in // l), torch.randn(pool_size, d_out // l)
    private_a, private_b = torch.randn(private_rank, d_in), torch.randn(d_out, private_rank)
    index = draw_shard_indices(pool_size, rows, l, generator)
    assert index.shape == (rows, l) and index.dtype == torch.int64
    assert len(set(index.flatten().tolist())) == rows * l  # no shard twice within a layer

    # Reference, as the paper describes it: row j of A (column j of B) concatenates shards index[j, 0..l-1].
    ref_a = torch.zeros(rows + private_rank, d_in)
    ref_b = torch.zeros(d_out, rows + private_rank)
    for j in range(rows):
        for k in range(l):
            shard = index[j, k]
            ref_a[j, k * (d_in // l) : (k + 1) * (d_in // l)] = pool_a[shard]
            ref_b[k * (d_out // l) : (k + 1) * (d_out // l), j] = pool_b[shard]
    for j in range(private_rank):
        ref_a[rows + j] = private_a[j]
        ref_b[:, rows + j] = private_b[:, j]
    torch.testing.assert_close(assemble_A(pool_a, index, private_a), ref_a, rtol=0, atol=0)
    torch.testing.assert_close(assemble_B(pool_b, index, private_b), ref_b, rtol=0, atol=0)


def test_fresh_adapter_leaves_outputs_unchanged_and_trains_less_than_lora():
    base = tiny_llama(seed=0, num_hidden_layers=LAYERS)
    before = base(IDS).logits
    model = add_mos(base, MoSConfig(**CONFIG))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    assert all(p.requires_grad == (".mos_" in n) for n, p in model.named_parameters())

    trainable, _ = trainable_parameters(model)
    # Budget: each group trains what LoRA of rank budget_rank = 2 would: L * 2 * (in + out).
    q_group, v_group = LAYERS * 2 * (32 + 32), LAYERS * 2 * (32 + 16)
    assert trainable == q_group + v_group == 896
    lora_same_rank = LAYERS * 4 * (32 + 32) + LAYERS * 4 * (32 + 16)
    assert trainable * 2 == lora_same_rank  # rank / budget_rank = 2 times fewer
    # ...while every layer really computes with rank 4.
    for layer in _mos_layers(model).values():
        a, b = layer.factors("default")
        assert a.shape[0] == b.shape[1] == 4


def test_pools_are_registered_once_per_group_and_other_layers_use_them():
    model = _model()
    layers = _mos_layers(model)
    pool_keys = [k for k in model.state_dict() if ".mos_A_pool." in k or ".mos_B_pool." in k]
    # One q_proj group and one v_proj group, held by the first layer of each.
    assert sorted(pool_keys) == [
        "model.layers.0.self_attn.q_proj.mos_A_pool.default",
        "model.layers.0.self_attn.q_proj.mos_B_pool.default",
        "model.layers.0.self_attn.v_proj.mos_A_pool.default",
        "model.layers.0.self_attn.v_proj.mos_B_pool.default",
    ]
    owner = layers["model.layers.0.self_attn.q_proj"]
    other = layers["model.layers.3.self_attn.q_proj"]
    assert other.pool_owner["default"] is owner and len(other.mos_A_pool) == 0
    assert not any(m is owner for m in other.modules())  # a reference, not a submodule
    # Index buffers and private rows are per layer and persistent.
    assert "model.layers.3.self_attn.q_proj.mos_A_index.default" in model.state_dict()
    assert "model.layers.3.self_attn.q_proj.mos_B_private.default" in model.state_dict()
    # Pair dissociation: A and B of one layer use different selections.
    assert not torch.equal(other.mos_A_index["default"], other.mos_B_index["default"])


def test_a_gradient_step_updates_shards_shared_by_several_layers():
    model = _model()
    layers = [m for n, m in _mos_layers(model).items() if n.endswith("q_proj")]
    pool_b = layers[0].mos_B_pool["default"]

    def pool_b_grad(active_layers):
        for layer in layers:
            layer.active = ["default"] if layer in active_layers else []
        model.zero_grad()
        model(IDS).logits.square().mean().backward()
        return pool_b.grad.clone()

    # With B zero every adapter is silent, so the pool's gradient is exactly the sum of what each layer
    # sends it: the same parameter receives the gradient of every layer that uses it.
    together = pool_b_grad(layers)
    alone = [pool_b_grad([layer]) for layer in layers]
    assert all(g.abs().sum() > 0 for g in alone)
    torch.testing.assert_close(together, sum(alone), rtol=1e-5, atol=1e-7)

    for layer in layers:
        layer.active = ["default"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.zero_grad()
    model(IDS).logits.square().mean().backward()
    optimizer.step()
    # A shard both layer 0 and layer 1 select now holds the same, updated values in both layers' B.
    index0, index1 = layers[0].mos_B_index["default"], layers[1].mos_B_index["default"]
    common = sorted(set(index0.flatten().tolist()) & set(index1.flatten().tolist()))
    assert common
    shard = common[0]
    b0, b1 = layers[0].factors("default")[1], layers[1].factors("default")[1]
    length = 32 // 2
    j0, k0 = (index0 == shard).nonzero()[0].tolist()
    j1, k1 = (index1 == shard).nonzero()[0].tolist()
    piece0 = b0[k0 * length : (k0 + 1) * length, j0]
    piece1 = b1[k1 * length : (k1 + 1) * length, j1]
    assert piece0.abs().sum() > 0
    torch.testing.assert_close(piece0, piece1, rtol=0, atol=0)


@pytest.mark.parametrize("overwrite", [False, True])
def test_module_to_keeps_the_sharing(overwrite):
    model = _model()
    _randomise(model)
    expected = model(IDS).logits.double()
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    # Parameters are still held once, and every layer still reads the owner's (converted) pool.
    assert sum(1 for n, _ in model.named_parameters() if ".mos_A_pool." in n) == 2
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    layers = _mos_layers(model)
    owner, other = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.2.self_attn.q_proj"]
    pool = owner.mos_A_pool["default"]
    assert pool.dtype == torch.float64
    other.factors("default")[0].sum().backward()
    assert pool.grad is not None and pool.grad.abs().sum() > 0


def test_merge_then_unmerge_restores_the_base_weights_and_named_adapters_add_up():
    model = tiny_llama(seed=0, num_hidden_layers=LAYERS)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    add_mos(model, MoSConfig(**CONFIG), name="a")
    add_mos(model, MoSConfig(**{**CONFIG, "seed": 7, "private_rank": 0}), name="b")
    _randomise(model)
    layer = model.model.layers[1].self_attn.v_proj
    x = torch.randn(5, 32)
    expected = layer.base_layer(x) + x @ (layer.delta_weight("a") + layer.delta_weight("b")).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)

    adapted = model(IDS).logits
    layers = _mos_layers(model).values()
    for mos in layers:
        mos.merge()
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    for mos in layers:
        mos.unmerge()
    for name, param in model.named_parameters():
        if ".mos_" not in name:
            torch.testing.assert_close(param, weights[name.replace(".base_layer", "")], rtol=0, atol=1e-6)


def test_same_seed_same_adapter_other_seed_other_selection():
    first, second = _model().state_dict(), _model().state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = _model(seed=1).state_dict()
    key = "model.layers.2.self_attn.q_proj.mos_A_index.default"
    assert not torch.equal(first[key], other[key])


def test_structure_built_without_init_takes_a_saved_state_dict():
    model = _model()
    _randomise(model)
    expected = model(IDS).logits
    fresh = tiny_llama(seed=0, num_hidden_layers=LAYERS)
    add_mos(
        fresh, MoSConfig(**{**CONFIG, "seed": 5}), initialize=False
    )  # other seed: indices come from the file
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(IDS).logits, expected, rtol=0, atol=0)


def test_save_and_load_adapter_round_trip(tmp_path):
    # Needs the lead's generic save_adapter/load_adapter (any registered method).
    model = _model()
    _randomise(model)
    expected = model(IDS).logits
    save_adapter(model, tmp_path / "mos")
    fresh = load_adapter(tiny_llama(seed=0, num_hidden_layers=LAYERS), tmp_path / "mos")
    torch.testing.assert_close(fresh(IDS).logits, expected, rtol=0, atol=0)
    assert trainable_parameters(fresh)[0] == 896


def test_bad_configs_and_layers_are_refused():
    with pytest.raises(WeightkitError, match="rank must be an integer >= 1"):
        MoSConfig(rank=0)
    with pytest.raises(WeightkitError, match="budget_rank 8 is larger than rank 4"):
        MoSConfig(rank=4, budget_rank=8)
    with pytest.raises(WeightkitError, match="private_rank 2 must be less than budget_rank 2"):
        MoSConfig(rank=4, budget_rank=2, private_rank=2)
    with pytest.raises(WeightkitError, match="private_rank must be an integer >= 0"):
        MoSConfig(private_rank=-1)
    with pytest.raises(WeightkitError, match="shards_per_vector 3 does not divide the 32x32 layer"):
        add_mos(tiny_llama(seed=0), MoSConfig(**{**CONFIG, "shards_per_vector": 3}))
    # Two layers cannot feed rank 8 from a pool of (2 - 1) * 2 vectors.
    with pytest.raises(WeightkitError, match="share a pool of 2 vectors, but each layer draws"):
        add_mos(tiny_llama(seed=0), MoSConfig(rank=8, budget_rank=2, private_rank=1))
    model = _model()
    with pytest.raises(WeightkitError, match="already has an adapter named 'default'"):
        add_mos(model, MoSConfig(**CONFIG))


def _suggestions(message):
    """The ``field lo..hi`` ranges an error suggests, as ``{field: (lo, hi)}``."""
    return {field: (int(lo), int(hi)) for field, lo, hi in re.findall(r"(\w+) (\d+)\.\.(\d+)", message)}


def test_each_suggested_fix_of_a_bad_rank_combination_is_valid():
    # Every combination of the three ranks: each range an error suggests, taken at either end, gives a
    # config that builds (the fix does not lead to another error contradicting it).
    fixed = 0
    for rank, budget, private in itertools.product(range(1, 6), range(1, 7), range(0, 7)):
        values = {"rank": rank, "budget_rank": budget, "private_rank": private}
        try:
            MoSConfig(**values)
            continue
        except WeightkitError as err:
            message = str(err)
        suggested = _suggestions(message)
        assert suggested or "rank >=" in message, values
        for field, ends in suggested.items():
            for end in ends:
                MoSConfig(**{**values, field: end})
                fixed += 1
    assert fixed > 100
    # The pool check: the suggested budget_rank or rank makes the group fit.
    with pytest.raises(WeightkitError) as err:
        add_mos(tiny_llama(seed=0), MoSConfig(rank=8, budget_rank=2, private_rank=1))
    suggested = _suggestions(str(err.value))
    assert suggested == {"budget_rank": (5, 8), "rank": (2, 3)}
    for field, ends in suggested.items():
        for end in ends:
            add_mos(
                tiny_llama(seed=0), MoSConfig(**{"rank": 8, "budget_rank": 2, "private_rank": 1, field: end})
            )
