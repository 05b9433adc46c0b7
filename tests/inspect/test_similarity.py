import copy
import json

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.inspect.similarity import (
    activation_similarity,
    layer_similarity,
    linear_cka,
    mean_token_cosine,
    redundant_blocks,
    weight_similarity,
)
from weightkit.models import default_model_path
from weightkit.testing import save_tiny, tiny_bert, tiny_llama, tiny_model


def _hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA as the paper defines it: HSIC of the n x n linear Gram matrices, with the centring matrix H."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)

    def hsic(k, m):
        return torch.trace(k @ h @ m @ h) / (n - 1) ** 2

    k, m = x @ x.T, y @ y.T
    return float(hsic(k, m) / torch.sqrt(hsic(k, k) * hsic(m, m)))


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


# -- pure functions ------------------------------------------------------------------------------------------


def test_linear_cka_agrees_with_the_hsic_reference_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    y = x @ torch.randn(7, 12, generator=g, dtype=torch.float64) + torch.randn(50, 12, generator=g)
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-14)
    assert 0.2 < linear_cka(x, y) < 0.99  # related but not equal


def test_linear_cka_is_one_on_itself_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) + 3.0  # an offset: centring must remove it
    y = torch.tanh(x @ torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    reference = linear_cka(x, y)
    assert linear_cka(x @ _orthogonal(6, 2), y) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(x, 7.5 * y @ _orthogonal(6, 3)) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(0.01 * x, y) == pytest.approx(reference, abs=1e-12)
    # Not invariant to any invertible map (the paper's point against CCA): a strong stretch changes it.
    stretch = torch.diag(torch.tensor([100.0, 1, 1, 1, 1, 1], dtype=torch.float64))
    assert abs(linear_cka(x @ stretch, y) - reference) > 0.01


def test_linear_cka_of_independent_features_is_small():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4000, 8, generator=g), torch.randn(4000, 8, generator=g)
    assert linear_cka(x, y) < 0.01


def test_linear_cka_refuses_mismatched_rows_and_constant_features():
    with pytest.raises(WeightkitError, match="same n"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(WeightkitError, match="constant"):
        linear_cka(torch.ones(5, 3), torch.randn(5, 3))


def test_mean_token_cosine_matches_a_loop_and_ignores_each_tokens_length():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    loop = sum(float(x[t] @ y[t] / (x[t].norm() * y[t].norm())) for t in range(9)) / 9
    assert mean_token_cosine(x, y) == pytest.approx(loop, abs=1e-6)
    lengths = torch.rand(9, 1, generator=g) + 0.1
    assert mean_token_cosine(x * lengths, y) == pytest.approx(loop, abs=1e-6)
    assert mean_token_cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(WeightkitError, match="all zeros"):
        mean_token_cosine(torch.zeros(2, 4), y[:2])


# -- activations on tiny models ------------------------------------------------------------------------------


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two right-padded batches of different widths, with padding in some rows."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for rows, width, lengths in ((3, 10, (10, 6, 8)), (2, 7, (7, 3))):
        ids = torch.randint(5, 120, (rows, width), generator=g)
        mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def test_activation_similarity_equals_cka_and_cosine_of_the_hidden_states():
    # Larger initial weights than BERT's 0.02, so that each block changes its input a lot (CKA ~0.5,
    # cosine ~0.1) and the comparison below is not between numbers that are all near 1.
    model = tiny_bert(num_hidden_layers=3, initializer_range=0.3)
    batches = _batches()
    # Independent reference: transformers' own hidden states (BERT: embeddings, then each layer's output).
    states = [[] for _ in range(4)]
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states
            for k in range(4):
                states[k].append(hidden[k][batch["attention_mask"].bool()])
    states = [torch.cat(s) for s in states]
    result = activation_similarity(model, batches, heatmap_tokens=20)
    assert [row["block"] for row in result.rows] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    for i, row in enumerate(result.rows):
        assert row["tokens"] == 34  # 10 + 6 + 8 + 7 + 3
        assert row["cka_in_out"] == pytest.approx(linear_cka(states[i], states[i + 1]), abs=1e-9)
        assert row["cosine_in_out"] == pytest.approx(mean_token_cosine(states[i], states[i + 1]), abs=1e-9)
        if i < 2:
            assert row["cka_next"] == pytest.approx(linear_cka(states[i + 1], states[i + 2]), abs=1e-9)
    assert result.heatmap_tokens == 20
    for i in range(3):
        for j in range(3):
            expected = linear_cka(states[i + 1][:20], states[j + 1][:20])
            assert result.cka_matrix[i, j] == pytest.approx(expected, abs=1e-9)


def test_activation_similarity_leaves_padding_out():
    model = tiny_bert(num_hidden_layers=2, initializer_range=0.3)
    batches = _batches()
    # Other ids under attention_mask 0 change the padded positions' states only.
    repadded = [
        {**b, "input_ids": torch.where(b["attention_mask"].bool(), b["input_ids"], 77)} for b in batches
    ]
    with torch.no_grad():  # the padded positions' states do change, so counting them would show
        padded = ~batches[0]["attention_mask"].bool()
        old, new = (model(**batch[0]).last_hidden_state[padded] for batch in (batches, repadded))
    assert not torch.allclose(old, new, atol=1e-3)
    first = activation_similarity(model, batches)
    second = activation_similarity(model, repadded)
    for a, b in zip(first.rows, second.rows, strict=True):
        assert a["cka_in_out"] == pytest.approx(b["cka_in_out"], abs=1e-9)
        assert a["cosine_in_out"] == pytest.approx(b["cosine_in_out"], abs=1e-9)
    assert torch.allclose(first.cka_matrix, second.cka_matrix, atol=1e-9)


def _pass_through(model, index: int):
    """Zero a Llama block's output projections: it then adds nothing to its residual stream."""
    block = model.model.layers[index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    return model


def test_a_pass_through_block_has_cka_one_and_is_a_drop_candidate():
    model = _pass_through(tiny_llama(num_hidden_layers=3), 1)
    result = activation_similarity(model, _batches())
    row = result.rows[1]
    assert row["cka_in_out"] == pytest.approx(1.0, abs=1e-12)
    assert row["cosine_in_out"] == pytest.approx(1.0, abs=1e-12)
    assert result.rows[0]["cka_next"] == row["cka_in_out"]  # the same two tensors
    for other in (result.rows[0], result.rows[2]):
        assert other["cka_in_out"] < 0.999
    drops = redundant_blocks(result.rows)
    assert "model.layers.1" in [d["block"] for d in drops if d["action"] == "drop"]
    strict = redundant_blocks(result.rows, drop_cosine=0.999, drop_cka=0.999)
    assert [(d["block"], d["action"]) for d in strict] == [("model.layers.1", "drop")]
    assert "cosine 1.0000" in strict[0]["reason"]


def test_hooks_are_removed_and_the_model_is_unchanged():
    model = tiny_llama(num_hidden_layers=2)
    model.train()
    before = copy.deepcopy(model.state_dict())
    batch = _batches()[0]
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    model.train()
    activation_similarity(model, _batches(), device="cpu")
    assert model.training and model.config.use_cache is True
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, logits)


def test_an_error_inside_a_hook_still_removes_the_hooks():
    model = tiny_llama(num_hidden_layers=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[3] = 0  # token 3 enters the first block as a zero vector
    batch = {"input_ids": torch.tensor([[3, 9, 10]]), "attention_mask": torch.ones(1, 3).long()}
    with pytest.raises(WeightkitError, match="all zeros"):
        activation_similarity(model, [batch])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.config.use_cache is True


def test_blocks_that_do_not_chain_are_refused():
    model = tiny_llama(num_hidden_layers=2)
    # Something between the blocks (registered before weightkit's hooks, so they see its change).
    handle = model.model.layers[1].register_forward_pre_hook(lambda _m, args: (2 * args[0], *args[1:]))
    with pytest.raises(WeightkitError, match="does not read exactly what model.layers.0 outputs"):
        activation_similarity(model, _batches())
    handle.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_an_encoder_decoder_is_refused_for_activations_but_its_weights_compare(tmp_path):
    model = tiny_model("t5")
    with pytest.raises(WeightkitError, match="'seq2seq'"):
        activation_similarity(model, _batches())
    rows = weight_similarity(save_tiny(model, tmp_path / "t5"))
    # Each list of blocks in module order, pair by pair: the encoder's, then the decoder's.
    lists = [r["block"].rsplit(".", 1)[0] for r in rows]
    assert lists == sorted(lists, key=["encoder.block", "decoder.block"].index)
    assert {r["role"] for r in rows if r["block"].startswith("decoder")} >= {"layer.1.EncDecAttention.q"}


# -- weights -------------------------------------------------------------------------------------------------


def test_a_copied_block_has_weight_cosine_one_and_is_a_share_candidate(tmp_path):
    model = tiny_llama(num_hidden_layers=3)
    model.model.layers[2].load_state_dict(model.model.layers[1].state_dict())
    rows = weight_similarity(save_tiny(model, tmp_path / "m"))
    roles = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    roles |= {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert [(r["block"], r["next"]) for r in rows] == [("model.layers.0", "model.layers.1")] * 7 + [
        ("model.layers.1", "model.layers.2")
    ] * 7
    assert {r["role"] for r in rows} == roles
    for row in rows[7:]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-12) and row["relative_difference"] == 0.0
    for row in rows[:7]:  # independent random layers
        assert abs(row["cosine"]) < 0.3 and row["relative_difference"] > 1.0
    found = redundant_blocks(weight_rows=rows)
    assert [(f["block"], f["action"], f["with"]) for f in found] == [
        ("model.layers.2", "share", "model.layers.1")
    ]


def test_weight_similarity_matches_a_direct_computation_and_handles_zero_weights(tmp_path):
    model = _pass_through(tiny_llama(num_hidden_layers=2), 1)
    rows = {r["role"]: r for r in weight_similarity(save_tiny(model, tmp_path / "m"))}
    a, b = (model.model.layers[i].mlp.up_proj.weight.detach().double() for i in (0, 1))
    assert rows["mlp.up_proj"]["cosine"] == pytest.approx(
        float((a * b).sum() / (a.norm() * b.norm())), abs=1e-12
    )
    expected = float((b - a).norm() / max(a.norm(), b.norm()))
    assert rows["mlp.up_proj"]["relative_difference"] == pytest.approx(expected, abs=1e-12)
    assert rows["self_attn.o_proj"]["cosine"] is None  # the zeroed layer has no direction
    assert rows["self_attn.o_proj"]["relative_difference"] == pytest.approx(1.0)
    assert redundant_blocks(weight_rows=list(rows.values())) == []


def test_weight_similarity_refuses_a_quantized_checkpoint(tmp_path):
    out = save_tiny(tiny_llama(), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightkitError, match="quantized"):
        weight_similarity(out)


# -- the bundled MiniLM --------------------------------------------------------------------------------------


def test_minilm_layer_and_weight_similarity(tmp_path):
    path = default_model_path()
    texts = tmp_path / "texts.jsonl"
    sentences = [
        "The cat sat on the mat while the rain fell outside.",
        "Stock markets rose sharply after the central bank's announcement.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "She played the violin at the concert hall last Saturday evening.",
        "The recipe calls for two cups of flour and a pinch of salt.",
        "Engineers tested the bridge for stability under heavy loads.",
        "A quiet library is a good place to study for exams.",
        "The football match ended in a draw after extra time.",
    ]
    texts.write_text("\n".join(json.dumps({"text": s}) for s in sentences * 2))
    result = layer_similarity(path, texts, n_texts=16, max_length=64, heatmap_tokens=128)
    assert [row["index"] for row in result.rows] == list(range(6))
    for row, following in zip(result.rows, result.rows[1:], strict=False):
        assert row["cka_next"] == following["cka_in_out"]
        assert 0 < row["cka_in_out"] < 1 and 0 < row["cosine_in_out"] < 1
    matrix = result.cka_matrix
    assert torch.allclose(matrix, matrix.T) and torch.allclose(
        matrix.diagonal(), torch.ones(6, dtype=matrix.dtype)
    )
    # The sampled heatmap estimates the exact streamed numbers of neighbouring blocks.
    for i in range(5):
        assert matrix[i, i + 1] == pytest.approx(result.rows[i]["cka_next"], abs=0.1)
    # Similarity fades with distance in depth: the first block is closer to the second than to the last.
    assert matrix[0, 1] > matrix[0, 5]
    weights = weight_similarity(path)
    assert len(weights) == 5 * 6
    # Independently trained layers: near-orthogonal weights, nothing to share.
    assert max(abs(r["cosine"]) for r in weights) < 0.1
    assert not [f for f in redundant_blocks(result.rows, weights) if f["action"] == "share"]
