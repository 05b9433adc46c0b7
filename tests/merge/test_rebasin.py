"""Tests for weightkit.merge.rebasin (Git Re-Basin weight matching, arXiv 2209.04836).

The pure functions are checked against plain references written here (permutation by explicit loops,
the optimum of one permutation by brute force over all of them); the spec builders by the exact symmetry
they claim (a permuted tiny Llama/BERT computes the same outputs) and by recovering a known permutation;
the method by what it is for (lower loss barrier between two MLPs trained from different seeds).
"""

import contextlib
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

from weightkit.errors import WeightkitError
from weightkit.merge.rebasin import (
    PermutationSpec,
    align_checkpoint,
    apply_permutation,
    bert_spec,
    llama_spec,
    matching_objective,
    mlp_spec,
    transformer_spec,
    weight_matching,
)
from weightkit.testing import save_tiny, tiny_bert, tiny_llama, tiny_tokenizer

# -- helpers -------------------------------------------------------------------------------------------


def make_mlp(seed, sizes=(10, 20, 16, 3)):
    torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def loaded_copy_mlp(state, sizes=(10, 20, 16, 3)):
    model = make_mlp(0, sizes)
    model.load_state_dict(state)
    return model


def random_perms(spec, seed):
    """A random permutation for every permutation of the spec, none of them the identity."""
    gen = torch.Generator().manual_seed(seed)
    perms = {}
    for name, size in spec.sizes.items():
        index = torch.randperm(size, generator=gen)
        while size > 1 and torch.equal(index, torch.arange(size)):
            index = torch.randperm(size, generator=gen)
        perms[name] = index
    return perms


def shapes_of(model):
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def clone_state(state):
    return {name: t.clone() for name, t in state.items()}


def assert_states_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def loaded_copy(model, state):
    """A model of ``model``'s class and config holding ``state``."""
    copy = type(model)(model.config).eval()
    copy.load_state_dict(state)
    return copy


def take_rows(tensor, index, block):
    """Plain reference: blocks of ``block`` rows, block i of the result = block index[i] of the input."""
    return torch.cat([tensor[int(j) * block : (int(j) + 1) * block] for j in index])


# -- the spec ------------------------------------------------------------------------------------------


def test_spec_refuses_unknown_unused_and_bad_sizes():
    with pytest.raises(WeightkitError, match="names permutation 'q'"):
        PermutationSpec({"p": 3}, {"w": ("q", None)})
    with pytest.raises(WeightkitError, match="permutation unused acts on no tensor"):
        PermutationSpec({"p": 3, "unused": 2}, {"w": ("p", None)})
    with pytest.raises(WeightkitError, match="positive integer"):
        PermutationSpec({"p": 0}, {"w": ("p",)})
    spec = PermutationSpec({"p": 3}, {"a": ["p", None], "b": (None, "p")})
    assert spec.axes["a"] == ("p", None)
    assert spec.perm_axes() == {"p": [("a", 0), ("b", 1)]}


def test_mlp_spec_of_a_sequential():
    spec = mlp_spec(make_mlp(0).state_dict())
    assert spec.sizes == {"0": 20, "2": 16}
    assert spec.axes == {
        "0.weight": ("0", None),
        "0.bias": ("0",),
        "2.weight": ("2", "0"),
        "2.bias": ("2",),
        "4.weight": (None, "2"),
    }


def test_mlp_spec_refuses_what_is_not_a_chain_of_linear_layers():
    with pytest.raises(WeightkitError, match="norm.weight"):
        mlp_spec({**make_mlp(0).state_dict(), "norm.weight": torch.ones(3)})
    broken = make_mlp(0).state_dict()
    broken["2.weight"] = torch.zeros(16, 21)
    with pytest.raises(WeightkitError, match="not a chain"):
        mlp_spec(broken)
    with pytest.raises(WeightkitError, match="at least two"):
        mlp_spec(nn.Linear(3, 4).state_dict())


# -- apply_permutation ---------------------------------------------------------------------------------


def test_apply_permutation_equals_indexing_by_hand_and_leaves_the_input_alone():
    state = make_mlp(0).state_dict()
    original = clone_state(state)
    spec = mlp_spec(state)
    perms = random_perms(spec, seed=1)
    out = apply_permutation(state, spec, perms)
    p0, p2 = perms["0"].tolist(), perms["2"].tolist()
    expected = {
        "0.weight": torch.stack([state["0.weight"][i] for i in p0]),
        "0.bias": torch.stack([state["0.bias"][i] for i in p0]),
        "2.weight": torch.stack([torch.stack([state["2.weight"][i, j] for j in p0]) for i in p2]),
        "2.bias": torch.stack([state["2.bias"][i] for i in p2]),
        "4.weight": torch.stack([state["4.weight"][:, j] for j in p2], dim=1),
        "4.bias": state["4.bias"],
    }
    assert_states_equal(out, expected)
    assert_states_equal(state, original)


def test_apply_permutation_moves_blocks_when_an_axis_is_longer_than_the_permutation():
    gen = torch.Generator().manual_seed(0)
    state = {"q": torch.randn(6, 5, generator=gen), "o": torch.randn(5, 6, generator=gen)}
    spec = PermutationSpec({"heads": 3}, {"q": ("heads", None), "o": (None, "heads")})
    index = torch.tensor([2, 0, 1])
    out = apply_permutation(state, spec, {"heads": index})
    torch.testing.assert_close(out["q"], take_rows(state["q"], index, 2), rtol=0, atol=0)
    torch.testing.assert_close(out["o"], take_rows(state["o"].T, index, 2).T, rtol=0, atol=0)


def test_apply_permutation_refuses_bad_input():
    state = make_mlp(0).state_dict()
    spec = mlp_spec(state)
    perms = random_perms(spec, seed=0)
    with pytest.raises(WeightkitError, match="no index tensor for permutation 2"):
        apply_permutation(state, spec, {"0": perms["0"]})
    with pytest.raises(WeightkitError, match="not a permutation"):
        apply_permutation(state, spec, {**perms, "0": torch.zeros(20, dtype=torch.long)})
    with pytest.raises(WeightkitError, match="tensor 2.bias of the permutation spec is missing"):
        apply_permutation({k: v for k, v in state.items() if k != "2.bias"}, spec, perms)
    odd = PermutationSpec({"p": 3}, {"0.weight": ("p", None)})
    with pytest.raises(WeightkitError, match="not a multiple of the 3 units"):
        apply_permutation(state, odd, {"p": torch.arange(3)})


def test_permuting_hidden_units_keeps_the_mlp_function():
    model = make_mlp(0)
    spec = mlp_spec(model.state_dict())
    permuted = loaded_copy_mlp(apply_permutation(model.state_dict(), spec, random_perms(spec, seed=3)))
    x = torch.randn(7, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-6, atol=1e-6)
    assert not torch.equal(permuted[0].weight, model[0].weight)


# -- weight_matching -----------------------------------------------------------------------------------


def test_weight_matching_recovers_a_known_permutation_of_an_mlp_exactly():
    reference = make_mlp(0, sizes=(10, 32, 24, 16, 3)).state_dict()
    spec = mlp_spec(reference)
    shuffled = apply_permutation(reference, spec, random_perms(spec, seed=5))
    original = clone_state(shuffled)
    perms = weight_matching(reference, shuffled, spec, seed=0)
    assert_states_equal(apply_permutation(shuffled, spec, perms), reference)
    assert_states_equal(shuffled, original)  # inputs not modified
    assert all(p.dtype == torch.int64 for p in perms.values())


def plain_objective(reference, other, spec, perms):
    """<reference, permuted other> summed over the spec tensors, with the permutation done by loops."""
    total = 0.0
    for name, axes in spec.axes.items():
        tensor = other[name]
        for axis, perm in enumerate(axes):
            if perm is not None:
                block = tensor.shape[axis] // spec.sizes[perm]
                tensor = take_rows(tensor.movedim(axis, 0), perms[perm], block).movedim(0, axis)
        total += float((reference[name].double() * tensor.double()).sum())
    return total


def test_one_permutation_is_solved_to_the_brute_force_optimum():
    # One hidden layer: the problem is a single assignment, which weight matching must solve exactly.
    reference = make_mlp(0, sizes=(4, 6, 3)).state_dict()
    other = make_mlp(1, sizes=(4, 6, 3)).state_dict()
    spec = mlp_spec(reference)
    scores = {
        order: plain_objective(reference, other, spec, {"0": torch.tensor(order)})
        for order in itertools.permutations(range(6))
    }
    best = max(scores, key=scores.get)
    perms = weight_matching(reference, other, spec)
    assert tuple(perms["0"].tolist()) == best
    assert math.isclose(matching_objective(reference, other, spec, perms), scores[best], rel_tol=1e-6)


def test_heads_are_assigned_whole_by_the_summed_similarity_of_their_slices():
    # Four heads of width 3 in q (rows), k (rows) and o (columns): brute force over the 24 head orders,
    # scoring each head pair as the sum over q, k, o of the inner products of their slices.
    gen = torch.Generator().manual_seed(0)
    heads, width = 4, 3

    def head_state():
        return {
            "q": torch.randn(heads * width, 5, generator=gen),
            "k": torch.randn(heads * width, 5, generator=gen),
            "o": torch.randn(5, heads * width, generator=gen),
        }

    reference, other = head_state(), head_state()
    spec = PermutationSpec({"h": heads}, {"q": ("h", None), "k": ("h", None), "o": (None, "h")})

    def pair_score(i, j):
        rows_i, rows_j = slice(i * width, (i + 1) * width), slice(j * width, (j + 1) * width)
        return sum(float((reference[t][rows_i] * other[t][rows_j]).sum()) for t in ("q", "k")) + float(
            (reference["o"][:, rows_i] * other["o"][:, rows_j]).sum()
        )

    scores = {
        order: sum(pair_score(i, j) for i, j in enumerate(order))
        for order in itertools.permutations(range(heads))
    }
    best = max(scores, key=scores.get)
    perms = weight_matching(reference, other, spec)
    assert tuple(perms["h"].tolist()) == best
    assert math.isclose(matching_objective(reference, other, spec, perms), scores[best], rel_tol=1e-5)


def test_weight_matching_is_deterministic_and_never_lowers_the_objective():
    reference = make_mlp(0, sizes=(8, 24, 24, 24, 4)).state_dict()
    other = make_mlp(1, sizes=(8, 24, 24, 24, 4)).state_dict()
    spec = mlp_spec(reference)
    first = weight_matching(reference, other, spec, seed=3)
    again = weight_matching(reference, other, spec, seed=3)
    assert all(torch.equal(first[p], again[p]) for p in spec.sizes)
    before = matching_objective(reference, other, spec)
    for seed in (0, 3):
        perms = weight_matching(reference, other, spec, seed=seed)
        assert matching_objective(reference, other, spec, perms) > before
    one_round = weight_matching(reference, other, spec, seed=3, max_iter=1)
    assert matching_objective(reference, other, spec, first) >= matching_objective(
        reference, other, spec, one_round
    )
    with pytest.raises(WeightkitError, match="max_iter"):
        weight_matching(reference, other, spec, max_iter=0)
    with pytest.raises(WeightkitError, match="has shape"):
        weight_matching(reference, make_mlp(1, sizes=(9, 24, 24, 24, 4)).state_dict(), spec)


def test_weight_matching_refuses_nan_weights():
    reference = make_mlp(0).state_dict()
    other = clone_state(reference)
    other["2.weight"][3, 4] = float("nan")
    with pytest.raises(WeightkitError, match="NaN/Inf"):
        weight_matching(reference, other, mlp_spec(reference))


@contextlib.contextmanager
def one_cpu_thread():
    # Hundreds of tiny optimizer steps: with two threads on a busy machine each step waits for the other
    # thread (26 s instead of 5 s in one measurement).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_alignment_lowers_the_loss_barrier_between_mlps_trained_from_different_seeds():
    # Two concentric rings: an easy task that two 64-wide MLPs solve equally well from different starts.
    gen = torch.Generator().manual_seed(0)
    n = 256
    labels = torch.randint(0, 2, (n,), generator=gen)
    angle = torch.rand(n, generator=gen) * 2 * math.pi
    radius = 0.5 + 0.5 * labels + 0.15 * torch.randn(n, generator=gen)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    sizes = (2, 64, 64, 2)

    def trained(seed):
        model = make_mlp(seed, sizes)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(200):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), labels).backward()
            optimizer.step()
        return {k: v.detach() for k, v in model.state_dict().items()}

    def loss(state):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(loaded_copy_mlp(state, sizes)(x), labels))

    def barrier(a, b):
        # Highest rise of the loss above the straight line between the endpoints' losses.
        ends = loss(a), loss(b)
        return max(
            loss({k: (1 - t) * a[k] + t * b[k] for k in a}) - ((1 - t) * ends[0] + t * ends[1])
            for t in (0.25, 0.5, 0.75)
        )

    with one_cpu_thread():
        a, b = trained(1), trained(2)
        spec = mlp_spec(a)
        aligned = apply_permutation(b, spec, weight_matching(a, b, spec))
        assert loss(a) < 0.2 and loss(b) < 0.2  # both learned the task
        assert math.isclose(loss(aligned), loss(b), rel_tol=1e-5)  # same function
        naive, after = barrier(a, b), barrier(a, aligned)
    assert naive > 0.3  # there is a barrier to remove
    assert after < 0.25 * naive


# -- transformer blocks --------------------------------------------------------------------------------


def test_llama_spec_permutes_kv_heads_with_their_query_groups_and_mlp_neurons():
    config = tiny_llama().config.to_dict()
    spec = llama_spec(config, layers=[1])
    assert spec.sizes == {"layers.1.heads": 2, "layers.1.mlp": 64}
    attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert spec.axes == {
        f"{attn}q_proj.weight": ("layers.1.heads", None),
        f"{attn}k_proj.weight": ("layers.1.heads", None),
        f"{attn}v_proj.weight": ("layers.1.heads", None),
        f"{attn}o_proj.weight": (None, "layers.1.heads"),
        f"{mlp}gate_proj.weight": ("layers.1.mlp", None),
        f"{mlp}up_proj.weight": ("layers.1.mlp", None),
        f"{mlp}down_proj.weight": (None, "layers.1.mlp"),
    }
    # No residual-stream tensor is touched.
    assert not any("norm" in name or "embed" in name or "lm_head" in name for name in spec.axes)
    assert len(llama_spec(config).sizes) == 4


def test_permuted_tiny_llama_with_gqa_gives_the_same_logits_and_matching_recovers_it():
    model = tiny_llama(seed=0)
    config = model.config.to_dict()
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    spec = transformer_spec(config, shapes_of(model))
    state = model.state_dict()
    perms = random_perms(spec, seed=7)
    permuted = apply_permutation(state, spec, perms)

    # Plain reference for the GQA layout: kv head j owns query heads 2j, 2j+1 (16 rows of q, 8 of k).
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    head_perm = perms["layers.0.heads"]
    torch.testing.assert_close(permuted[q], take_rows(state[q], head_perm, 16), rtol=0, atol=0)
    torch.testing.assert_close(permuted[k], take_rows(state[k], head_perm, 8), rtol=0, atol=0)

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        actual = loaded_copy(model, permuted)(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    found = weight_matching(state, permuted, spec)
    assert_states_equal(apply_permutation(permuted, spec, found), state)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_permuted_tiny_bert_gives_the_same_outputs_and_matching_recovers_it(with_prefix):
    if with_prefix:  # task models store the encoder under "bert."
        torch.manual_seed(0)
        fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        model = BertForSequenceClassification(BertConfig(vocab_size=128, **fields)).eval()
    else:  # BertModel and sentence-transformers checkpoints have no prefix
        model = tiny_bert(seed=0)
    config = model.config.to_dict()
    spec = transformer_spec(config, shapes_of(model))
    prefix = "bert." if with_prefix else ""
    assert spec.axes[f"{prefix}encoder.layer.1.attention.self.query.bias"] == ("layers.1.heads",)
    assert spec.axes == bert_spec(config, prefix=prefix).axes
    state = model.state_dict()
    permuted = apply_permutation(state, spec, random_perms(spec, seed=2))

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
        actual = loaded_copy(model, permuted)(input_ids=ids, attention_mask=mask)
    key = "logits" if with_prefix else "last_hidden_state"
    torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5)

    found = weight_matching(state, permuted, spec)
    assert_states_equal(apply_permutation(permuted, spec, found), state)


def tiny_variant(family):
    """A tiny model of another supported family (or Llama with biases), seeded."""
    torch.manual_seed(0)
    fields = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    if family == "llama-bias":
        return tiny_llama(seed=0, attention_bias=True, mlp_bias=True)
    if family == "qwen2":  # q/k/v biases, no o bias
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **fields)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(num_key_value_heads=1, **fields)).eval()
    return RobertaModel(RobertaConfig(**fields)).eval()


@pytest.mark.parametrize("family", ["llama-bias", "qwen2", "mistral", "roberta"])
def test_other_supported_families_keep_their_outputs_under_permutation(family):
    model = tiny_variant(family)
    spec = transformer_spec(model.config.to_dict(), shapes_of(model))
    if family in ("llama-bias", "qwen2"):
        assert "model.layers.1.self_attn.k_proj.bias" in spec.axes
    state = model.state_dict()
    permuted = apply_permutation(state, spec, random_perms(spec, seed=1))
    ids = torch.randint(5, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model(ids)[0], loaded_copy(model, permuted)(ids)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert_states_equal(apply_permutation(permuted, spec, weight_matching(state, permuted, spec)), state)


def test_transformer_spec_refuses_configs_that_do_not_describe_the_weights():
    model = tiny_llama(seed=0)
    config, shapes = model.config.to_dict(), shapes_of(model)
    with pytest.raises(WeightkitError, match="does not support model_type 'gpt2'"):
        transformer_spec({**config, "model_type": "gpt2"}, shapes)
    # Two KV heads stored, four claimed: the k_proj shape gives it away.
    with pytest.raises(WeightkitError, match="k_proj.weight has shape"):
        transformer_spec({**config, "num_key_value_heads": 4}, shapes)
    with pytest.raises(WeightkitError, match="down_proj.weight is missing"):
        transformer_spec(config, {k: v for k, v in shapes.items() if "layers.1.mlp.down" not in k})
    with pytest.raises(WeightkitError, match="q_proj.bias exists but the config declares no such bias"):
        transformer_spec(config, {**shapes, "model.layers.0.self_attn.q_proj.bias": (32,)})
    with pytest.raises(WeightkitError, match="cannot find the bert transformer blocks"):
        transformer_spec(tiny_bert().config.to_dict(), shapes)
    with pytest.raises(WeightkitError, match="not a multiple of num_key_value_heads"):
        llama_spec({**config, "num_key_value_heads": 3})
    with pytest.raises(WeightkitError, match="layer 2 is out of range"):
        llama_spec(config, layers=[2])


# -- align_checkpoint ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """Two tiny Llamas (GQA) from different seeds, saved with a tokenizer."""
    root = tmp_path_factory.mktemp("rebasin")
    tokenizer = tiny_tokenizer(128)
    reference = save_tiny(tiny_llama(seed=0), root / "reference", tokenizer)
    model = save_tiny(tiny_llama(seed=1), root / "model", tokenizer)
    return reference, model


def logits_of(directory, ids):
    model = LlamaForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        return model(ids).logits


def test_align_checkpoint_keeps_the_function_and_raises_the_similarity(llama_pair, tmp_path):
    reference, model = llama_pair
    out = tmp_path / "aligned"
    summary = align_checkpoint(reference, model, out, progress=False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(out, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert [row["layer"] for row in summary["layers"]] == [0, 1]
    for row in summary["layers"]:
        assert row["objective_after"] > row["objective_before"]
        assert row["cosine_after"] > row["cosine_before"]
        assert 0 < row["mlp_moved"] <= 1 and 0 <= row["heads_moved"] <= 1
    written, original = load_file(out / "model.safetensors"), load_file(model / "model.safetensors")
    assert written.keys() == original.keys() and summary["tensors"] == len(original)
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"):
        assert torch.equal(written[name], original[name])


def test_align_checkpoint_undoes_a_known_permutation(llama_pair, tmp_path):
    reference, _ = llama_pair
    ref_model = LlamaForCausalLM.from_pretrained(reference, local_files_only=True).eval()
    spec = transformer_spec(ref_model.config.to_dict(), shapes_of(ref_model))
    shuffled = loaded_copy(ref_model, apply_permutation(ref_model.state_dict(), spec, random_perms(spec, 4)))
    shuffled_dir = save_tiny(shuffled, tmp_path / "shuffled")
    summary = align_checkpoint(reference, shuffled_dir, tmp_path / "out", progress=False)
    assert_states_equal(
        load_file(tmp_path / "out" / "model.safetensors"), load_file(reference / "model.safetensors")
    )
    for row in summary["layers"]:
        assert row["heads_moved"] == 1.0 and row["mlp_moved"] > 0.9  # 2 heads: any non-identity moves both
        assert math.isclose(row["cosine_after"], 1.0, rel_tol=1e-6)


def test_align_checkpoint_of_bert_keeps_hidden_states(bert_dir, tmp_path):
    model_dir = save_tiny(tiny_bert(seed=1), tmp_path / "bert1", tiny_tokenizer(128, kind="encoder"))
    out = tmp_path / "aligned"
    align_checkpoint(bert_dir, model_dir, out, progress=False)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    outputs = []
    for directory in (model_dir, out):
        model = type(tiny_bert()).from_pretrained(directory, local_files_only=True).eval()
        with torch.no_grad():
            outputs.append(model(ids).last_hidden_state)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_align_checkpoint_refuses_an_existing_out_dir_unless_told(llama_pair, tmp_path):
    reference, model = llama_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(WeightkitError, match="exists"):
        align_checkpoint(reference, model, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"
    align_checkpoint(reference, model, out, overwrite=True, progress=False)
    assert (out / "model.safetensors").is_file()


def test_align_checkpoint_fills_config_defaults_before_comparing(llama_pair, tmp_path):
    # A config.json that leaves head_dim out describes the same shapes as one that spells it out.
    reference, _ = llama_pair
    model = save_tiny(tiny_llama(seed=1), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.pop("head_dim", None)
    (model / "config.json").write_text(json.dumps(config))
    align_checkpoint(reference, model, tmp_path / "out", progress=False)
    assert "head_dim" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_align_checkpoint_refuses_mismatched_or_unsupported_models(llama_pair, tmp_path):
    reference, _ = llama_pair
    deeper = save_tiny(tiny_llama(seed=1, num_hidden_layers=3), tmp_path / "deeper")
    with pytest.raises(WeightkitError, match="num_hidden_layers differs"):
        align_checkpoint(reference, deeper, tmp_path / "out", progress=False)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=32))
    gpt2_dirs = [save_tiny(gpt2, tmp_path / "gpt2a"), save_tiny(gpt2, tmp_path / "gpt2b")]
    with pytest.raises(WeightkitError, match="different architectures"):
        align_checkpoint(reference, gpt2_dirs[0], tmp_path / "out", progress=False)
    with pytest.raises(WeightkitError, match="does not support model_type 'gpt2'"):
        align_checkpoint(*gpt2_dirs, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
