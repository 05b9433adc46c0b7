"""Intrinsic-dimension fine-tuning (DID, SAID): Fastfood against dense matrices; the model wrapper."""

import json

import pytest
import torch

from weightkit.adapt import (
    load_adapter,
    merge_and_unload,
    save_adapter,
    set_active_adapters,
    trainable_parameters,
)
from weightkit.adapt.layer import adapter_keys, adapter_state
from weightkit.adapt.subspace import (
    FastfoodParams,
    SubspaceConfig,
    SubspaceLayer,
    add_subspace,
    fastfood_params,
    fastfood_project,
    fwht,
)
from weightkit.errors import WeightkitError
from weightkit.testing import tiny_bert, tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
BATCH = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
# Modules with parameters of their own: embed_tokens, 2 layers x (7 projections + 2 norms), the final norm,
# lm_head. Each holds one tensor (no biases), so the tiny Llama has 21 adapted tensors too.
LLAMA_MODULES = 21
HOME = "model.embed_tokens.subspace_theta.default"  # theta_d lives in the first adapted module


def _hadamard(length):
    """Sylvester's Hadamard matrix from its closed form H[i, j] = (-1)^popcount(i & j)."""
    i = torch.arange(length)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    popcount = sum((bits >> k) & 1 for k in range(max(length.bit_length(), 1)))
    return (1 - 2 * (popcount % 2)).double()


def _dense(params: FastfoodParams, d, out_features):
    """The D x d matrix: blocks scale_b * H diag(G_b) Pi_b H diag(B_b), stacked; first D rows, d columns."""
    length = params.gauss.shape[-1]
    h = _hadamard(length)
    blocks = []
    for sign, perm, gauss, scale in zip(params.sign, params.perm, params.gauss, params.scale, strict=True):
        permutation = torch.zeros(length, length, dtype=torch.float64)
        permutation[torch.arange(length), perm] = 1  # (Pi v)[k] = v[perm[k]]
        blocks.append(scale * h @ torch.diag(gauss.double()) @ permutation @ h @ torch.diag(sign.double()))
    return torch.cat(blocks)[:out_features, :d]


def _randomise(model, seed=0, scale=0.3):
    """Move theta_d (and SAID's scales) away from their neutral start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".subspace_theta." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            if ".subspace_lambda." in name:
                param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.5)


def _base_weights(model):
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if ".subspace_" not in n
    }


def test_fwht_is_multiplication_by_the_hadamard_matrix():
    for length in (1, 2, 8, 64, 128):
        x = torch.randn(2, 3, length, dtype=torch.float64)
        torch.testing.assert_close(fwht(x), x @ _hadamard(length))
        torch.testing.assert_close(fwht(fwht(x)), length * x)  # H H = L I
    with pytest.raises(WeightkitError, match="power of two, got 12"):
        fwht(torch.zeros(12))


@pytest.mark.parametrize(("d", "out_features"), [(20, 100), (32, 128), (5, 3), (300, 70)])
def test_fastfood_project_is_the_dense_fastfood_matrix(d, out_features):
    params = fastfood_params(d, out_features, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    length = params.gauss.shape[-1]
    assert length >= d and length // 2 < d and params.gauss.shape[0] * length >= out_features
    assert set(params.sign.unique().tolist()) <= {-1, 1}
    assert torch.equal(params.perm.sort(dim=-1).values, torch.arange(length).expand_as(params.perm))
    theta = torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(
        fastfood_project(theta, params, out_features), _dense(params, d, out_features) @ theta
    )


def test_fastfood_columns_are_unit_length_and_nearly_orthogonal():
    # D a multiple of the block size: every column has length exactly 1 (the paper's normalisation).
    d, out_features = 32, 256
    params = fastfood_params(d, out_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(
        _dense(params, d, out_features).norm(dim=0), torch.ones(d, dtype=torch.float64)
    )
    # Otherwise the last block is cut short and lengths are 1 up to that cut; the random directions are
    # nearly orthogonal (a random d-dimensional subspace, not a few repeated directions).
    d, out_features = 300, 5000
    params = fastfood_params(d, out_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis = torch.eye(d, dtype=torch.float64)
    dense = torch.stack([fastfood_project(e, params, out_features) for e in basis], dim=1)
    norms = dense.norm(dim=0)
    assert (norms - 1).abs().max() < 0.05
    cosines = (dense / norms).T @ (dense / norms) - torch.eye(d, dtype=torch.float64)
    assert cosines.abs().max() < 0.15
    assert torch.linalg.matrix_rank(dense) == d


def test_fastfood_params_depend_only_on_the_seed():
    def draw(seed):
        return fastfood_params(40, 500, generator=torch.Generator().manual_seed(seed))

    for a, b in zip(draw(3), draw(3), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(draw(3).gauss, draw(4).gauss)


def test_a_fresh_adapter_trains_exactly_d_numbers_and_leaves_outputs_unchanged():
    model = tiny_llama(seed=0)
    before = model(IDS).logits
    add_subspace(model, SubspaceConfig(dim=50))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    trainable, total = trainable_parameters(model)
    assert trainable == 50
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [HOME]
    # The whole model, as in the papers: embeddings, every projection, the norms and the output head.
    layers = [m for m in model.modules() if isinstance(m, SubspaceLayer)]
    assert len(layers) == LLAMA_MODULES
    assert all(
        isinstance(m, SubspaceLayer) for m in (model.model.embed_tokens, model.model.norm, model.lm_head)
    )
    # One parameter, shared: every layer reads the very tensor the first layer registers.
    theta = model.model.embed_tokens.subspace_theta["default"]
    assert all(layer.theta_home["default"]["default"] is theta for layer in layers)


def test_said_counts_one_scale_per_tensor_in_d():
    model = tiny_llama(seed=0)
    add_subspace(model, SubspaceConfig(dim=50, said=True))
    assert trainable_parameters(model)[0] == 50
    assert model.model.embed_tokens.subspace_theta["default"].numel() == 50 - LLAMA_MODULES
    # BERT: 3 embedding tables, 13 linear layers (incl. the pooler) with biases, 5 LayerNorms with biases:
    # 39 tensors, each with its own scale, held by the module the tensor belongs to.
    bert = tiny_bert(seed=0)
    assert len(list(bert.parameters())) == 39
    add_subspace(bert, SubspaceConfig(dim=60, said=True))
    assert trainable_parameters(bert)[0] == 60
    scales = {n: p.numel() for n, p in bert.named_parameters() if ".subspace_lambda." in n}
    assert sum(scales.values()) == 39
    assert scales["embeddings.word_embeddings.subspace_lambda.default"] == 1
    assert scales["encoder.layer.0.attention.self.query.subspace_lambda.default"] == 2
    with pytest.raises(WeightkitError, match="dim > 39"):
        add_subspace(tiny_bert(seed=0), SubspaceConfig(dim=39, said=True))
    # Fewer targets, fewer tensors: the projections only.
    projections = tiny_llama(seed=0)
    add_subspace(projections, SubspaceConfig(dim=50, said=True, targets=["re:.*_proj"]))
    assert projections.model.layers[0].self_attn.q_proj.subspace_theta["default"].numel() == 50 - 14


@pytest.mark.parametrize("said", [False, True])
def test_training_moves_the_weights_only_inside_the_subspace_and_lowers_the_loss(said):
    model = tiny_llama(seed=0)
    base = _base_weights(model)
    add_subspace(model, SubspaceConfig(dim=256, said=said))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        loss = model(BATCH, labels=BATCH).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, weight in _base_weights(model).items():
        assert torch.equal(weight, base[name]), name  # the frozen weights did not move
    # Each effective weight is W_0 + lambda * P theta_d, with P the layer's own Fastfood matrix.
    layer = model.model.layers[1].mlp.down_proj
    theta = model.model.embed_tokens.subspace_theta["default"].detach()
    proj = layer.subspace_proj["default"]["weight"]
    params = FastfoodParams(proj.sign, proj.perm, proj.gauss, proj.scale)
    expected = fastfood_project(theta, params, layer.base_layer.weight.numel()).view(32, 64)
    if said:
        expected = expected * layer.subspace_lambda["default"].detach()[0]
    torch.testing.assert_close(layer.param_delta("default", "weight").detach(), expected)


def test_more_dimensions_fit_better():
    """The papers' premise on a small case: the same training in a larger random subspace gets further."""
    final = {}
    for dim in (8, 512):
        model = tiny_llama(seed=0)
        add_subspace(model, SubspaceConfig(dim=dim))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for _ in range(8):
            loss = model(BATCH, labels=BATCH).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        final[dim] = model(BATCH, labels=BATCH).loss.item()
    assert final[512] < final[8] - 0.05


def test_a_tied_output_head_moves_with_the_embeddings_and_merges_once():
    model = tiny_llama(seed=0, tie_word_embeddings=True)
    table = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    add_subspace(model, SubspaceConfig(dim=40, said=True))
    # The tied table is one tensor: one projection (the embedding's), one scale, counted once in d.
    assert trainable_parameters(model)[0] == 40
    assert (
        list(model.lm_head.subspace_proj["default"]) == [] and "default" not in model.lm_head.subspace_lambda
    )
    assert model.model.embed_tokens.subspace_theta["default"].numel() == 40 - (LLAMA_MODULES - 1)
    _randomise(model)
    adapted = model(IDS).logits
    # The reference: the same model with the moved table under both names.
    moved = table + model.model.embed_tokens.param_delta("default", "weight").detach()
    reference = tiny_llama(seed=0, tie_word_embeddings=True)
    with torch.no_grad():
        for layer_name, layer in model.named_modules():
            if isinstance(layer, SubspaceLayer) and layer_name not in ("model.embed_tokens", "lm_head"):
                target = reference.get_submodule(layer_name)
                target.weight.copy_(layer.base_layer.weight + layer.param_delta("default", "weight"))
        reference.model.embed_tokens.weight.copy_(moved)
    torch.testing.assert_close(adapted, reference(IDS).logits, rtol=1e-5, atol=1e-5)
    # Merged in either layer alone, the tie still holds (the head's merge leaves the shared table alone).
    for first in (model.lm_head, model.model.embed_tokens):
        first.merge()
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
        first.unmerge()
    for layer in [m for m in model.modules() if isinstance(m, SubspaceLayer)]:
        layer.merge()
    torch.testing.assert_close(model.model.embed_tokens.base_layer.weight, moved)  # added once, not twice
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)


def test_a_module_with_parameters_and_adapted_children_runs_them_inside_its_own_layer():
    class Scaled(torch.nn.Module):  # a parameter of its own and a child that has parameters too
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x) * self.scale

    torch.manual_seed(0)
    model = torch.nn.Sequential(Scaled())
    x = torch.randn(3, 4)
    before = model(x)
    add_subspace(model, SubspaceConfig(dim=8))
    outer, inner = model[0], model[0].base_layer.inner
    assert isinstance(outer, SubspaceLayer) and isinstance(inner, SubspaceLayer)
    assert list(outer.subspace_proj["default"]) == ["scale"] and trainable_parameters(model)[0] == 8
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    _randomise(model)
    scale = outer.base_layer.scale + outer.param_delta("default", "scale")
    weight = inner.base_layer.weight + inner.param_delta("default", "weight")
    bias = inner.base_layer.bias + inner.param_delta("default", "bias")
    expected = (x @ weight.T + bias) * scale
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_merge_then_unmerge_restores_the_base_weights_and_biases():
    model = tiny_bert(seed=0)  # with biases
    base = _base_weights(model)
    add_subspace(model, SubspaceConfig(dim=64, said=True))
    _randomise(model)
    adapted = model(IDS).last_hidden_state
    assert not torch.allclose(adapted, tiny_bert(seed=0)(IDS).last_hidden_state, atol=1e-3)
    layers = [m for m in model.modules() if isinstance(m, SubspaceLayer)]
    for layer in layers:
        layer.merge()
        layer.merge()  # idempotent
    torch.testing.assert_close(model(IDS).last_hidden_state, adapted, rtol=1e-5, atol=1e-5)
    for layer in layers:
        layer.unmerge()
    for name, weight in _base_weights(model).items():
        torch.testing.assert_close(weight, base[name], rtol=0, atol=1e-6)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, SubspaceLayer) for m in merged.modules())
    torch.testing.assert_close(merged(IDS).last_hidden_state, adapted, rtol=1e-5, atol=1e-5)


def test_the_same_seed_gives_the_same_adapter():
    def build(seed):
        model = tiny_llama(seed=0)
        add_subspace(model, SubspaceConfig(dim=30, seed=seed))
        _randomise(model, seed=5)
        return model

    a, b, c = build(7), build(7), build(8)
    state_a, state_b, state_c = (adapter_state(m, "default") for m in (a, b, c))
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=0, atol=0)
    assert not torch.allclose(a(IDS).logits, c(IDS).logits)
    gauss = [m.model.layers[0].self_attn.q_proj.subspace_proj["default"]["weight"].gauss for m in (a, b, c)]
    assert torch.equal(gauss[0], gauss[1]) and not torch.equal(gauss[0], gauss[2])


def test_the_adapter_state_is_d_numbers_and_the_seed_restores_the_projection():
    model = tiny_llama(seed=0)
    add_subspace(model, SubspaceConfig(dim=30, said=True, seed=1))
    _randomise(model)
    state = adapter_state(model, "default")
    assert [k for k in state if "subspace_theta" in k] == ["model.embed_tokens.subspace_theta"]
    assert all(".subspace_theta" in k or ".subspace_lambda" in k for k in state)
    assert sum(t.numel() for t in state.values()) == 30  # the projection is not saved
    # A model given the saved numbers and the same seed computes the same function; another seed does not.
    for seed, same in ((1, True), (2, False)):
        fresh = tiny_llama(seed=0)
        add_subspace(fresh, SubspaceConfig(dim=30, said=True, seed=seed), initialize=False)
        full = {adapter_keys(fresh, "default")[key]: value for key, value in state.items()}
        missing, unexpected = fresh.load_state_dict(full, strict=False)
        assert not unexpected and all(".subspace_" not in k for k in missing)
        assert torch.equal(fresh(IDS).logits, model(IDS).logits) == same


def test_save_adapter_and_load_adapter_round_trip(tmp_path):
    model = tiny_llama(seed=0)
    add_subspace(model, SubspaceConfig(dim=40, said=True, seed=3))
    _randomise(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SAID" and config["seed"] == 3 and config["dim"] == 40
    # 40 float32 numbers in 15 tensors (theta_d, 14 layers' scales) and their header, whatever the model's
    # size (the projection's diagonals would take 13 bytes per adapted weight entry: ~0.5 MB here).
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 4096
    loaded = load_adapter(tiny_llama(seed=0), tmp_path / "adapter")
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    assert trainable_parameters(loaded)[0] == 40


def test_two_named_adapters_each_have_their_own_subspace():
    model = tiny_llama(seed=0)
    base = model(IDS).logits
    add_subspace(model, SubspaceConfig(dim=20, seed=0), name="a")
    add_subspace(model, SubspaceConfig(dim=30, seed=1), name="b")  # the default targets again
    layers = [m for m in model.modules() if isinstance(m, SubspaceLayer)]
    assert len(layers) == LLAMA_MODULES and all(layer.adapter_names() == ["a", "b"] for layer in layers)
    assert trainable_parameters(model)[0] == 50
    _randomise(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 32)
    expected = (
        layer.base_layer(x) + x @ (layer.param_delta("a", "weight") + layer.param_delta("b", "weight")).T
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    set_active_adapters(model, [])
    torch.testing.assert_close(model(IDS).logits, base, rtol=0, atol=0)
    with pytest.raises(WeightkitError, match="already have an adapter named 'a'"):
        add_subspace(model, SubspaceConfig(dim=20), name="a")


def test_bad_configs_and_targets_are_refused():
    for bad in (0, -3, True, 2.5):
        with pytest.raises(WeightkitError, match="dim must be an integer"):
            SubspaceConfig(dim=bad)
    with pytest.raises(WeightkitError, match="said must be true or false"):
        SubspaceConfig(said="yes")
    with pytest.raises(WeightkitError, match="targets is empty"):
        SubspaceConfig(targets=[])
    with pytest.raises(WeightkitError, match="q_prj"):
        add_subspace(tiny_llama(seed=0), SubspaceConfig(targets=["model.layers.0.self_attn.q_prj"]))
