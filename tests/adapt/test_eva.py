"""EVA: incremental SVD against the exact SVD, rank redistribution, captured layer inputs, padding, errors."""

import itertools
import warnings

import pytest
import torch
from peft import EvaConfig, LoraConfig
from peft.tuners.lora.eva import get_eva_state_dict
from sample_texts import TEXTS

from weightkit.adapt import LoRAConfig, add_lora
from weightkit.adapt.eva import (
    converged_components,
    eva_components,
    eva_patterns,
    incremental_svd,
    redistribute_ranks,
)
from weightkit.data import tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama, tiny_tokenizer

Q_PROJ = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
Q_AND_V = Q_PROJ + [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
PAD_ID = 3


def _batches(n_batches=6, batch_size=4, max_length=24, seed=0):
    """Right-padded batches of the sample texts with random lengths (so some positions are padding)."""
    texts = (TEXTS * 2)[: n_batches * batch_size]
    batches = tokenize_batches(tiny_tokenizer(128), texts, max_length=max_length, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        lengths = torch.randint(6, max_length + 1, (batch_size,), generator=generator)
        padding = torch.arange(max_length)[None, :] >= lengths[:, None]
        batch["input_ids"] = batch["input_ids"].masked_fill(padding, PAD_ID)
        batch["attention_mask"] = (~padding).long()
    return batches


def _centred_svd(rows):
    """Reference: the SVD of the rows centred on their mean (float64)."""
    rows = rows.double()
    centred = rows - rows.mean(dim=0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    return s, vt, centred.square().sum()


def _projection_error(a, v):
    """How far the row space of ``a`` is from the row space of orthonormal ``v`` (0 when equal)."""
    q = torch.linalg.qr(a.double().T).Q
    return torch.linalg.matrix_norm(q @ q.T - v.T @ v, ord=2).item()


def _captured_inputs(model, names, batches):
    """Every counted input row of each named layer (plain forward pre-hooks, attention mask applied)."""
    rows = {name: [] for name in names}
    mask = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: rows[name].append(args[0][mask["now"]])
        )
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            mask["now"] = batch["attention_mask"].bool()
            model(**batch)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(r) for name, r in rows.items()}


# --- incremental SVD -------------------------------------------------------------------------------------


def test_incremental_svd_keeping_every_component_is_the_exact_svd_of_all_rows_centred():
    generator = torch.Generator().manual_seed(0)
    chunks = [
        torch.randn(n, 12, generator=generator) * torch.linspace(3, 0.1, 12) + 5 for n in (7, 20, 1, 15)
    ]
    state = None
    for chunk in chunks:
        state = incremental_svd(state, chunk, 12)
    all_rows = torch.cat(chunks)
    s, vt, total = _centred_svd(all_rows)
    assert state.n_rows == all_rows.shape[0]
    torch.testing.assert_close(state.mean, all_rows.double().mean(dim=0))
    torch.testing.assert_close(state.total_sum_squares, total)
    torch.testing.assert_close(state.singular_values.double(), s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.explained_variance_ratio.double(), s**2 / total, rtol=1e-5, atol=1e-6)
    # Each component is the reference right-singular vector up to sign.
    cosines = (state.components.double() * vt).sum(dim=1).abs()
    torch.testing.assert_close(cosines, torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-4)
    # Signs are canonical: each vector's largest-magnitude entry is positive.
    largest = state.components.gather(1, state.components.abs().argmax(dim=1, keepdim=True))
    assert (largest > 0).all()


def test_incremental_svd_truncated_to_k_is_exact_when_the_data_has_rank_k():
    generator = torch.Generator().manual_seed(1)
    basis = torch.randn(3, 10, generator=generator)
    chunks = [torch.randn(n, 3, generator=generator) @ basis + 2.0 for n in (5, 9, 6)]
    state = None
    for chunk in chunks:
        state = incremental_svd(state, chunk, 3)
    s, vt, _ = _centred_svd(torch.cat(chunks))
    assert state.components.shape == (3, 10)
    torch.testing.assert_close(state.singular_values.double(), s[:3], rtol=1e-5, atol=1e-5)
    assert _projection_error(state.components, vt[:3]) < 1e-4
    assert incremental_svd(state, torch.empty(0, 10), 3) is state


def test_converged_components_compares_each_component_with_its_previous_estimate_up_to_sign():
    previous = torch.eye(4)[:3]
    current = torch.stack([-torch.eye(4)[0], torch.tensor([0.6, 0.8, 0.0, 0.0]), torch.eye(4)[2]])
    # |cos| per component: 1, 0.8, 1; the 4th component has no estimate yet.
    result = converged_components(previous, current, tau=0.9, length=4)
    assert result.tolist() == [True, False, True, False]
    assert converged_components(previous, current, tau=0.8, length=4).tolist() == [True, True, True, False]
    assert not converged_components(None, current, tau=0.0, length=3).any()


# --- rank redistribution ---------------------------------------------------------------------------------


def _greedy_ranks(ratios, rank, rho):
    """Reference: hand out the budget one component at a time to the largest remaining ratio."""
    cap = round(rho * rank)
    pool = [(float(v), i, name) for i, (name, r) in enumerate(ratios.items()) for v in r[:cap]]
    counts = dict.fromkeys(ratios, 0)
    for _ in range(rank * len(ratios)):
        if not pool:
            break
        best = max(pool, key=lambda item: (item[0], -item[1]))
        pool.remove(best)
        counts[best[2]] += 1
    return counts


def test_redistribute_ranks_gives_more_rank_to_concentrated_variance_within_budget_and_cap():
    ratios = {
        "concentrated": torch.tensor([0.5, 0.2, 0.15, 0.13, 0.01, 0.005, 0.003, 0.002]),
        "spread": torch.full((8,), 0.12),
        "flat": torch.full((8,), 0.02),
    }
    ranks = redistribute_ranks(ratios, rank=2, rho=2.0)
    assert ranks == _greedy_ranks(ratios, 2, 2.0)
    assert ranks == {"concentrated": 4, "spread": 2, "flat": 0}
    assert sum(ranks.values()) == 2 * 3 and max(ranks.values()) <= 4
    # A larger rho lets the strongest layers take more; rho = 1 keeps the uniform rank.
    assert redistribute_ranks(ratios, rank=2, rho=3.0) == _greedy_ranks(ratios, 2, 3.0)
    assert redistribute_ranks(ratios, rank=2, rho=1.0) == {"concentrated": 2, "spread": 2, "flat": 2}

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        random_ratios = {
            f"layer{i}": torch.rand(int(torch.randint(1, 12, (1,), generator=generator)), generator=generator)
            .sort(descending=True)
            .values
            for i in range(5)
        }
        rank, rho = 1 + trial % 4, 1.0 + (trial % 5) * 0.5
        ranks = redistribute_ranks(random_ratios, rank=rank, rho=rho)
        assert ranks == _greedy_ranks(random_ratios, rank, rho)
        assert sum(ranks.values()) <= rank * 5 and max(ranks.values()) <= round(rho * rank)


def test_eva_patterns_list_only_changed_layers_and_keep_the_scaling():
    components = {
        "a": torch.zeros(4, 8),
        "b": torch.zeros(6, 8),
        "c": torch.zeros(0, 8),
        "d": torch.zeros(2, 8),
    }
    rank_pattern, alpha_pattern = eva_patterns(components, rank=4, alpha=8.0)
    assert rank_pattern == {"b": 6, "d": 2}
    assert alpha_pattern == {"b": 12.0, "d": 4.0}
    assert eva_patterns(components, rank=4, alpha=8.0, adjust_scaling_factors=False) == ({"b": 6, "d": 2}, {})


# --- eva_components on a model ---------------------------------------------------------------------------


def test_eva_a_is_the_top_right_singular_vectors_of_the_captured_layer_inputs():
    model = tiny_llama(seed=0)
    batches = _batches()
    rows = _captured_inputs(model, Q_PROJ, batches)
    # rho * rank = 32 = in_features keeps every component, so the incremental SVD is exact; tau = 1 never
    # stops early, so every batch is used.
    with pytest.warns(UserWarning, match="not converged"):
        components = eva_components(model, Q_PROJ, batches, rank=4, rho=8.0, tau=1.0)
    with pytest.warns(UserWarning, match="not converged"):
        whitened = eva_components(model, Q_PROJ, batches, rank=4, rho=8.0, tau=1.0, whiten=True)
    reference = {name: _centred_svd(r) for name, r in rows.items()}
    ranks = redistribute_ranks({n: s**2 / total for n, (s, _, total) in reference.items()}, rank=4, rho=8.0)
    assert {name: a.shape for name, a in components.items()} == {name: (ranks[name], 32) for name in Q_PROJ}
    assert sum(ranks.values()) == 8
    for name, a in components.items():
        s, vt, _ = reference[name]
        r = ranks[name]
        assert _projection_error(a, vt[:r]) < 1e-4
        torch.testing.assert_close(a @ a.T, torch.eye(r), rtol=0, atol=1e-5)
        torch.testing.assert_close(whitened[name].norm(dim=1).double(), s[:r].rsqrt(), rtol=1e-4, atol=1e-6)


def test_eva_with_one_batch_is_the_svd_of_that_batch_and_caps_ranks_at_the_layer_size():
    model = tiny_llama(seed=0)
    batches = _batches(n_batches=1)
    rows = _captured_inputs(model, Q_AND_V, batches)
    # v_proj is 16x32: it offers at most 16 components although rho * rank = 40.
    with pytest.warns(UserWarning, match="not converged"):
        components = eva_components(model, Q_AND_V, batches, rank=4, rho=10.0)
    reference = {name: _centred_svd(r) for name, r in rows.items()}
    ranks = redistribute_ranks(
        {n: (s**2 / total)[: 16 if "v_proj" in n else 32] for n, (s, _, total) in reference.items()},
        rank=4,
        rho=10,
    )
    assert sum(ranks.values()) == 16
    for name, a in components.items():
        assert a.shape == (ranks[name], 32)
        assert _projection_error(a, reference[name][1][: ranks[name]]) < 1e-4
        if "v_proj" in name:
            assert a.shape[0] <= 16


def test_eva_stops_reading_batches_once_every_layer_has_converged():
    model = tiny_llama(seed=0)
    batches = _batches()
    read = []

    def counted():
        for batch in batches:
            read.append(1)
            yield batch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        components = eva_components(model, Q_AND_V, counted(), rank=2, tau=0.0)
    # The first batch gives estimates, the second confirms them (|cos| >= 0 always).
    assert len(read) == 2
    assert sum(a.shape[0] for a in components.values()) == 2 * 4
    assert all(a.shape[0] <= 4 for a in components.values())
    read.clear()
    with pytest.warns(UserWarning, match="not converged"):
        eva_components(model, Q_AND_V, counted(), rank=2, tau=1.0, max_batches=3)
    assert len(read) == 3


@pytest.mark.filterwarnings("ignore:eva")  # too few batches to converge; not the point here
def test_padded_positions_are_ignored():
    model = tiny_llama(seed=0)
    batches = _batches(n_batches=4)
    extra = []
    for batch in batches:
        # Six more padded columns of a different token: more padding, the same counted tokens.
        pad = torch.full((batch["input_ids"].shape[0], 6), 7)
        extra.append(
            {
                "input_ids": torch.cat([batch["input_ids"], pad], dim=1),
                "attention_mask": torch.cat([batch["attention_mask"], torch.zeros_like(pad)], dim=1),
            }
        )
    kwargs = dict(rank=4, rho=2.0, tau=0.5)
    plain = eva_components(model, Q_AND_V, batches, **kwargs)
    padded = eva_components(model, Q_AND_V, extra, **kwargs)
    unmasked = eva_components(model, Q_AND_V, [{"input_ids": b["input_ids"]} for b in extra], **kwargs)
    for name in Q_AND_V:
        assert plain[name].shape == padded[name].shape
        torch.testing.assert_close(padded[name], plain[name], rtol=0, atol=1e-4)
    # Counting the padding changes the result, so the mask is what made them equal.
    assert any(
        unmasked[n].shape != plain[n].shape or not torch.allclose(unmasked[n], plain[n], atol=1e-2)
        for n in Q_AND_V
    )


@pytest.mark.filterwarnings("ignore:eva")
def test_a_classifiers_labels_do_not_mask_positions():
    # Sequence labels (one per text, as `weightkit adapt` gives an encoder) are not per-token labels.
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    batches = [{**b, "labels": torch.arange(b["input_ids"].shape[0]) % 3} for b in _batches(n_batches=4)]
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    with_labels = eva_components(model, names, batches, rank=4, tau=0.5)
    without = eva_components(model, names, [{k: v for k, v in b.items() if k != "labels"} for b in batches],
                             rank=4, tau=0.5)  # fmt: skip
    for name in names:
        torch.testing.assert_close(with_labels[name], without[name], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:eva")  # too few batches to converge; not the point here
def test_eva_is_deterministic_and_hooks_through_lora_wrappers():
    batches = _batches(n_batches=4)
    kwargs = dict(rank=4, rho=2.0, tau=0.9)
    first = eva_components(tiny_llama(seed=0), Q_AND_V, batches, **kwargs)
    second = eva_components(tiny_llama(seed=0), Q_AND_V, batches, **kwargs)
    assert all(torch.equal(first[n], second[n]) for n in Q_AND_V)
    # A fresh LoRA adapter (B = 0) leaves the inputs unchanged: hooking the wrappers gives the same A.
    wrapped = add_lora(tiny_llama(seed=0), LoRAConfig(rank=4))
    wrapped.train()
    through_wrappers = eva_components(wrapped, Q_AND_V, batches, **kwargs)
    assert all(torch.equal(first[n], through_wrappers[n]) for n in Q_AND_V)
    assert wrapped.training  # the mode is restored
    assert not any(m._forward_pre_hooks for m in wrapped.modules())  # the hooks are removed


def test_eva_matches_peft():
    batches = _batches()
    for names, targets, rho, atol in [
        (Q_PROJ, ["q_proj"], 8.0, 1e-4),
        (Q_AND_V, ["q_proj", "v_proj"], 2.0, 1e-2),
    ]:
        model = tiny_llama(seed=0)
        config = LoraConfig(
            r=4, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(rho=rho)
        )
        # PEFT compares signed cosines, so tau = -1 (past its validation) makes it stop after two batches
        # as ours does with tau = 0; it would otherwise cycle the batches until signs settle.
        config.eva_config.tau = -1.0
        theirs = get_eva_state_dict(model, batches, peft_config=config, show_progress_bar=False)
        ours = eva_components(model, names, batches, rank=4, rho=rho, tau=0.0)
        assert {n: a.shape for n, a in ours.items()} == {n: a.shape for n, a in theirs.items()}
        for name in names:
            # Exact when every component is kept (rho * rank = in_features); otherwise PEFT's randomised
            # low-rank SVD differs from our exact one by a little.
            torch.testing.assert_close(ours[name], theirs[name].float(), rtol=0, atol=atol)


def test_bad_input_gives_a_clear_error():
    model = tiny_llama(seed=0)
    batches = _batches(n_batches=2)
    with pytest.raises(WeightkitError, match="rho"):
        eva_components(model, Q_PROJ, batches, rank=4, rho=0.5)
    with pytest.raises(WeightkitError, match="tau"):
        eva_components(model, Q_PROJ, batches, rank=4, tau=1.5)
    with pytest.raises(WeightkitError, match="rank"):
        redistribute_ranks({"a": torch.ones(3)}, rank=0, rho=2.0)
    with pytest.raises(WeightkitError, match="no module named"):
        eva_components(model, ["model.layers.0.self_attn.nope"], batches, rank=4)
    with pytest.raises(WeightkitError, match="nn.Linear"):
        eva_components(model, ["model.layers.0.input_layernorm"], batches, rank=4)
    with pytest.raises(WeightkitError, match="no calibration batches"):
        eva_components(model, Q_PROJ, [], rank=4)
    masked_out = [{**b, "attention_mask": torch.zeros_like(b["attention_mask"])} for b in batches]
    with pytest.raises(WeightkitError, match="no counted tokens"):
        eva_components(model, Q_PROJ, itertools.islice(masked_out, 1), rank=4)
