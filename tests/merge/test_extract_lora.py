"""LoRA extraction: the truncated-SVD factors against a reference SVD, and adapters loaded by real PEFT."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from weightkit.errors import WeightkitError
from weightkit.merge.extract_lora import extract_lora, lowrank_delta
from weightkit.testing import save_tiny, tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

# Singular values of the rank-2 change added to each fine-tuned weight below.
SINGULAR = (0.3, 0.1)
CHANGED = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",  # [16, 32]: fewer rows than columns
    "model.layers.1.mlp.down_proj",  # [32, 64]
    "lm_head",
)


def reference_svd(delta):
    """float64 SVD of ``delta``: (U, S, Vh)."""
    return torch.linalg.svd(delta.double(), full_matrices=False)


def eckart_young(delta, rank):
    s = reference_svd(delta)[1]
    return math.sqrt(float(s[rank:].square().sum() / s.square().sum()))


def low_rank_change(shape, generator):
    """``U diag(SINGULAR) V^T`` with orthonormal U, V: a rank-2 matrix with known singular values."""
    u = torch.linalg.qr(torch.randn(shape[0], 2, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(shape[1], 2, generator=generator)).Q
    return u @ torch.diag(torch.tensor(SINGULAR)) @ v.T


# -- lowrank_delta -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
@pytest.mark.parametrize("rank", [1, 3])
def test_lowrank_delta_is_the_truncated_svd_split_in_balance(shape, rank):
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    lora_a, lora_b, error = lowrank_delta(delta, rank)
    assert lora_a.shape == (rank, shape[1]) and lora_b.shape == (shape[0], rank)
    assert lora_a.dtype == lora_b.dtype == torch.float32
    u, s, vh = reference_svd(delta)
    expected = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close((lora_b @ lora_a).double(), expected, rtol=0, atol=1e-5)
    # Balanced split: both factors carry sqrt(S), with orthogonal rows of A and columns of B.
    torch.testing.assert_close((lora_a @ lora_a.T).double(), torch.diag(s[:rank]), rtol=0, atol=1e-5)
    torch.testing.assert_close((lora_b.T @ lora_b).double(), torch.diag(s[:rank]), rtol=0, atol=1e-5)
    # Eckart-Young: the error is the norm of the discarded singular values.
    discarded = math.sqrt(float(s[rank:].square().sum())) / float(torch.linalg.matrix_norm(delta.double()))
    assert error == pytest.approx(discarded, rel=1e-5)
    residual = torch.linalg.matrix_norm(delta - lora_b @ lora_a) / torch.linalg.matrix_norm(delta)
    assert error == pytest.approx(float(residual), rel=1e-4)


def test_full_rank_reproduces_the_delta_and_larger_ranks_are_capped():
    delta = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for rank in (5, 9):
        lora_a, lora_b, error = lowrank_delta(delta, rank)
        assert lora_a.shape == (5, 5) and lora_b.shape == (7, 5)
        torch.testing.assert_close(lora_b @ lora_a, delta.float(), rtol=0, atol=1e-5)
        assert error < 1e-6


def test_zero_delta_gives_zero_factors_and_zero_error():
    lora_a, lora_b, error = lowrank_delta(torch.zeros(6, 4), 2)
    assert error == 0.0 and lora_a.shape == (2, 4) and lora_b.shape == (6, 2)
    assert not lora_a.any() and not lora_b.any()


def test_randomized_svd_is_deterministic_and_near_optimal():
    generator = torch.Generator().manual_seed(2)
    u = torch.linalg.qr(torch.randn(300, 200, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(200, 200, generator=generator)).Q
    delta = u @ torch.diag(torch.arange(1, 201, dtype=torch.float32) ** -1.0) @ v.T
    rng = torch.random.get_rng_state()
    a1, b1, e1 = lowrank_delta(delta, 5, method="randomized", seed=3)
    a2, b2, e2 = lowrank_delta(delta, 5, method="randomized", seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)  # its own generator, not the global one
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and e1 == e2
    optimal = eckart_young(delta, 5)
    assert optimal - 1e-6 <= e1 <= optimal * 1.01
    residual = torch.linalg.matrix_norm(delta - b1 @ a1) / torch.linalg.matrix_norm(delta)
    assert e1 == pytest.approx(float(residual), rel=1e-5)
    # "auto" takes the exact SVD for a matrix this small.
    assert lowrank_delta(delta, 5)[2] == pytest.approx(optimal, rel=1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(WeightkitError, match="rank must be an integer >= 1"):
        lowrank_delta(torch.ones(3, 3), 0)
    with pytest.raises(WeightkitError, match="2-D"):
        lowrank_delta(torch.ones(3), 1)
    with pytest.raises(WeightkitError, match="unknown SVD method"):
        lowrank_delta(torch.ones(3, 3), 1, method="qr")
    with pytest.raises(WeightkitError, match="NaN"):
        lowrank_delta(torch.tensor([[1.0, float("nan")]]), 1)


# -- extract_lora on tiny models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny Llama, and a "fine-tune" of it with a rank-2 change on the CHANGED Linear layers."""
    root = tmp_path_factory.mktemp("extract")
    base = save_tiny(tiny_llama(seed=0), root / "base")
    finetuned = tiny_llama(seed=0)
    generator = torch.Generator().manual_seed(7)
    modules = dict(finetuned.named_modules())
    with torch.no_grad():
        for name in CHANGED:
            weight = modules[name].weight
            weight += low_rank_change(weight.shape, generator)
    return base, save_tiny(finetuned, root / "finetuned"), finetuned


def load_with_peft(base_dir, adapter_dir):
    """The base model loaded by transformers, with the adapter applied by the real PEFT library."""
    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)


def _inputs():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_rank2_adapter_loads_in_peft_and_reproduces_the_finetune(llama_pair, tmp_path):
    base_dir, ft_dir, finetuned = llama_pair
    summary = extract_lora(base_dir, ft_dir, tmp_path / "adapter", rank=2, progress=False)
    assert [m["module"] for m in summary["modules"]] == sorted(CHANGED)
    assert summary["max_relative_error"] < 1e-5 and summary["skipped"] == []
    assert summary["module_types"] == "model" and summary["unchanged"] == 21 - len(CHANGED)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 2 and config["base_model_name_or_path"] == str(base_dir)
    assert sorted(config["target_modules"]) == sorted(CHANGED)
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (2, 32)
    assert weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 2)
    assert summary["adapter_params"] == sum(t.numel() for t in weights.values())

    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter"
    )
    # PEFT wraps exactly the changed layers.
    wrapped = sorted(n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A"))
    assert wrapped == sorted(CHANGED)
    with torch.no_grad():
        torch.testing.assert_close(model(_inputs()).logits, finetuned(_inputs()).logits, rtol=0, atol=1e-5)
    merged = model.merge_and_unload().state_dict()
    for name, tensor in finetuned.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_rank1_errors_are_the_eckart_young_values(llama_pair, tmp_path):
    base_dir, ft_dir, _ = llama_pair
    summary = extract_lora(base_dir, ft_dir, tmp_path / "adapter", rank=1, progress=False)
    base, finetuned = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    # With singular values 0.3 and 0.1 a rank-1 approximation keeps 0.3: error 0.1 / sqrt(0.3^2 + 0.1^2).
    expected = SINGULAR[1] / math.hypot(*SINGULAR)
    for module in summary["modules"]:
        delta = finetuned[module["tensor"]] - base[module["tensor"]]
        assert module["rank"] == 1
        assert module["relative_error"] == pytest.approx(eckart_young(delta, 1), rel=1e-5)
        assert module["relative_error"] == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def moved_pair(request, tmp_path_factory):
    """A tiny Llama (output head tied to the embeddings or not) and a "fine-tune" of it: rank-2 changes of
    its Linear layers, embeddings moved by 16% of their norm, two norms changed."""
    tied = request.param
    root = tmp_path_factory.mktemp("moved")
    base_dir = save_tiny(tiny_llama(seed=0, tie_word_embeddings=tied), root / "base")
    finetuned = tiny_llama(seed=0, tie_word_embeddings=tied)
    generator = torch.Generator().manual_seed(7)
    modules = dict(finetuned.named_modules())
    with torch.no_grad():
        for name in CHANGED[:-1] if tied else CHANGED:  # a tied head moves with the embeddings
            modules[name].weight.add_(low_rank_change(modules[name].weight.shape, generator))
        embed = finetuned.model.embed_tokens.weight
        noise = torch.randn(embed.shape, generator=generator)
        embed.add_(0.16 * embed.norm() / noise.norm() * noise)
        finetuned.model.layers[0].input_layernorm.weight.add_(0.1 * torch.randn(32, generator=generator))
        finetuned.model.norm.weight.mul_(1.2)
    assert (finetuned.lm_head.weight is finetuned.model.embed_tokens.weight) == tied
    return base_dir, save_tiny(finetuned, root / "finetuned"), finetuned


def test_changed_embeddings_and_norms_are_saved_whole_and_peft_puts_them_in_place(moved_pair, tmp_path):
    base_dir, ft_dir, finetuned = moved_pair
    tied = finetuned.config.tie_word_embeddings
    summary = extract_lora(base_dir, ft_dir, tmp_path / "adapter", rank=2, progress=False)
    saved = {"model.embed_tokens", "model.layers.0.input_layernorm", "model.norm"} | (
        {"lm_head"} if tied else set()
    )
    assert {m["module"] for m in summary["modules_to_save"]} == saved and summary["skipped"] == []
    changes = {m["module"]: m["relative_change"] for m in summary["modules_to_save"]}
    assert changes["model.embed_tokens"] == pytest.approx(0.16, rel=1e-4)
    assert changes["model.norm"] == pytest.approx(0.2) and summary["save_threshold"] == 1e-3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == sorted(saved)
    assert "lm_head" in config["target_modules"] or tied

    model = load_with_peft(base_dir, tmp_path / "adapter")
    inner = model.base_model.model
    # PEFT's copies of the saved modules hold the fine-tune's tensors exactly.
    assert torch.equal(inner.get_input_embeddings().weight, finetuned.model.embed_tokens.weight)
    for layer in ("model.norm", "model.layers.0.input_layernorm") + (("lm_head",) if tied else ()):
        ours = inner.get_submodule(layer).modules_to_save["default"].weight
        assert torch.equal(ours, finetuned.get_submodule(layer).weight), layer
    with torch.no_grad():
        torch.testing.assert_close(model(_inputs()).logits, finetuned(_inputs()).logits, rtol=0, atol=1e-4)


def test_without_modules_to_save_a_warning_names_the_largest_dropped_change(moved_pair, tmp_path):
    base_dir, ft_dir, finetuned = moved_pair
    with pytest.warns(UserWarning, match=r"the largest change: model\.norm\.weight \(changed by 20\.00%"):
        summary = extract_lora(
            base_dir, ft_dir, tmp_path / "adapter", rank=2, modules_to_save="none", progress=False
        )
    skipped = {s["tensor"]: s for s in summary["skipped"]}
    assert set(skipped) == {
        "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"
    }  # fmt: skip
    assert skipped["model.embed_tokens.weight"]["relative_change"] == pytest.approx(0.16, rel=1e-4)
    assert (
        "1-D" in skipped["model.norm.weight"]["reason"] and "'none'" in skipped["model.norm.weight"]["reason"]
    )
    assert summary["modules_to_save"] == []
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None


def test_auto_leaves_out_changes_below_its_threshold_and_says_so(llama_pair, tmp_path):
    base_dir, _, finetuned = llama_pair
    extra = tiny_llama(seed=0)
    extra.load_state_dict(finetuned.state_dict())
    with torch.no_grad():
        extra.model.layers[1].post_attention_layernorm.weight.mul_(1 + 5e-4)  # below the 0.1% threshold
        extra.model.layers[0].input_layernorm.weight.mul_(1 + 2e-3)
    ft_dir = save_tiny(extra, tmp_path / "finetuned")
    with pytest.warns(UserWarning, match="post_attention_layernorm"):
        summary = extract_lora(base_dir, ft_dir, tmp_path / "adapter", rank=2, progress=False)
    assert [m["module"] for m in summary["modules_to_save"]] == ["model.layers.0.input_layernorm"]
    (skipped,) = summary["skipped"]
    assert skipped["tensor"] == "model.layers.1.post_attention_layernorm.weight"
    assert (
        skipped["relative_change"] == pytest.approx(5e-4, rel=1e-2)
        and "less than the 0.1%" in skipped["reason"]
    )


def test_named_modules_are_saved_whole_changed_or_not_instead_of_lora_factors(moved_pair, tmp_path):
    base_dir, ft_dir, finetuned = moved_pair
    names = ["input_layernorm", "model.layers.0.self_attn.q_proj"]
    with pytest.warns(UserWarning, match="not in modules_to_save"):
        summary = extract_lora(
            base_dir, ft_dir, tmp_path / "adapter", rank=2, modules_to_save=names, progress=False
        )
    saved = {m["module"]: m for m in summary["modules_to_save"]}
    # Every layer's input_layernorm (a dotted suffix), the unchanged one too; q_proj whole, not factored.
    assert set(saved) == {
        "model.layers.0.input_layernorm", "model.layers.1.input_layernorm", "model.layers.0.self_attn.q_proj"
    }  # fmt: skip
    assert saved["model.layers.1.input_layernorm"]["relative_change"] == 0.0
    assert "model.layers.0.self_attn.q_proj" not in {m["module"] for m in summary["modules"]}
    model = load_with_peft(base_dir, tmp_path / "adapter")
    q_proj = model.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(
        q_proj.modules_to_save["default"].weight, finetuned.model.layers[0].self_attn.q_proj.weight
    )


def test_modules_to_save_names_no_module_has_are_refused(llama_pair, tmp_path):
    base_dir, ft_dir, _ = llama_pair
    with pytest.raises(WeightkitError, match="no module of the model is named 'layernorm'"):
        extract_lora(base_dir, ft_dir, tmp_path / "a", rank=2, modules_to_save=["layernorm"], progress=False)
    with pytest.raises(WeightkitError, match="'auto', 'none' or a list of module names"):
        extract_lora(base_dir, ft_dir, tmp_path / "a", rank=2, modules_to_save="model.norm", progress=False)
    assert not (tmp_path / "a").exists()


def test_rank_above_a_layer_size_is_capped_through_rank_pattern(llama_pair, tmp_path):
    base_dir, _, _ = llama_pair
    # A full-rank change of every layer: only factors of full rank reproduce it.
    finetuned = tiny_llama(seed=0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in finetuned.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param += 0.01 * torch.randn(param.shape, generator=generator)
    ft_dir = save_tiny(finetuned, tmp_path / "finetuned")
    summary = extract_lora(base_dir, ft_dir, tmp_path / "adapter", rank=40, progress=False)
    ranks = {m["module"]: m["rank"] for m in summary["modules"]}
    assert ranks["model.layers.0.self_attn.k_proj"] == 16 and ranks["model.layers.0.mlp.up_proj"] == 32
    assert ranks["lm_head"] == 32 and summary["max_relative_error"] < 1e-5
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"][r"model\.layers\.0\.self_attn\.k_proj"] == 16
    assert config["alpha_pattern"] == config["rank_pattern"]

    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter"
    )
    merged = model.merge_and_unload().state_dict()
    for name, tensor in finetuned.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_gpt2_conv1d_layers_get_transposed_factors(tmp_path):
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config).eval()
    base_dir = save_tiny(base, tmp_path / "base")
    finetuned = GPT2LMHeadModel(config).eval()
    finetuned.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in finetuned.transformer.h:
            for conv in (block.attn.c_attn, block.mlp.c_proj):  # Conv1D weights are [in, out]
                conv.weight += low_rank_change(conv.weight.shape, generator)
    ft_dir = save_tiny(finetuned, tmp_path / "finetuned")
    summary = extract_lora(base_dir, ft_dir, tmp_path / "adapter", rank=2, progress=False)
    assert {m["module"]: m["shape"] for m in summary["modules"]}["transformer.h.0.attn.c_attn"] == [96, 32]
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is True and adapter_config["task_type"] == "CAUSAL_LM"

    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter"
    )
    with torch.no_grad():
        torch.testing.assert_close(model(_inputs()).logits, finetuned(_inputs()).logits, rtol=0, atol=1e-5)


def test_unknown_architecture_falls_back_to_names(llama_pair, tmp_path):
    base_dir, ft_dir, finetuned = llama_pair
    renamed = []
    for source in (base_dir, ft_dir):
        target = tmp_path / source.name
        target.mkdir()
        (target / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
        config = json.loads((source / "config.json").read_text())
        config["architectures"] = ["NotARealModelClass"]
        (target / "config.json").write_text(json.dumps(config))
        renamed.append(target)
    summary = extract_lora(*renamed, tmp_path / "adapter", rank=2, progress=False)
    assert summary["module_types"] == "names"
    assert [m["module"] for m in summary["modules"]] == sorted(CHANGED)


def test_bf16_factors_report_the_error_of_what_is_stored(llama_pair, tmp_path):
    base_dir, ft_dir, _ = llama_pair
    summary = extract_lora(
        base_dir, ft_dir, tmp_path / "adapter", rank=2, dtype=torch.bfloat16, progress=False
    )
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    base, finetuned = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    for module in summary["modules"]:
        key = f"base_model.model.{module['module']}"
        lora_a, lora_b = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
        assert lora_a.dtype == lora_b.dtype == torch.bfloat16
        delta = finetuned[module["tensor"]] - base[module["tensor"]]
        residual = torch.linalg.matrix_norm(delta - lora_b.float() @ lora_a.float())
        assert module["relative_error"] == pytest.approx(float(residual / torch.linalg.matrix_norm(delta)))
        assert 1e-4 < module["relative_error"] < 1e-2  # bf16 rounding, well above float32's 1e-7


def test_bad_inputs_stop_with_a_clear_message_and_write_nothing(llama_pair, tmp_path):
    base_dir, ft_dir, _ = llama_pair
    out = tmp_path / "adapter"
    with pytest.raises(WeightkitError, match="rank must be an integer >= 1"):
        extract_lora(base_dir, ft_dir, out, rank=0, progress=False)
    bert_dir = save_tiny(tiny_bert(seed=0), tmp_path / "bert")
    with pytest.raises(WeightkitError, match="different architectures"):
        extract_lora(base_dir, bert_dir, out, rank=2, progress=False)
    wider = save_tiny(tiny_llama(seed=0, intermediate_size=48), tmp_path / "wider")
    with pytest.raises(WeightkitError, match=r"mlp\.\w+_proj\.weight has different shapes"):
        extract_lora(base_dir, wider, out, rank=2, progress=False)
    with pytest.raises(WeightkitError, match="no Linear layer weight differs"):
        extract_lora(base_dir, base_dir, out, rank=2, progress=False)
    with pytest.raises(WeightkitError, match="would replace the input"):
        extract_lora(base_dir, ft_dir, base_dir, rank=2, overwrite=True, progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bert", "wider"]

    extract_lora(base_dir, ft_dir, out, rank=1, progress=False)
    with pytest.raises(WeightkitError, match="exists"):
        extract_lora(base_dir, ft_dir, out, rank=2, progress=False)
    extract_lora(base_dir, ft_dir, out, rank=2, overwrite=True, progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
