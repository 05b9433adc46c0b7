"""The ``weightkit`` command as a user runs it: compress, eval, recipes, and every bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from weightkit import load
from weightkit.cli import main
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_gptq_writes_a_checkpoint_transformers_loads(tmp_path, capsys, llama_dir, text_file):
    out = tmp_path / "w4"
    code, stdout, _ = run(
        capsys, "compress", llama_dir, "-o", out, "--method", "gptq", "--bits", "4", "--group-size", "32",
        "--calib", text_file, "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(stdout)
    assert summary["config"]["method"] == "gptq" and summary["config"]["group_size"] == 32
    assert summary["size_after_bytes"] < summary["size_before_bytes"]
    assert summary["config"]["act_order"] is True  # the default
    ours = load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_compress_from_a_recipe_matches_the_same_flags(tmp_path, capsys, llama_dir, text_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: awq\nbits: 3\ngroup_size: 32\ncalib_samples: 8\n")
    code, _, _ = run(
        capsys, "compress", llama_dir, "-o", tmp_path / "a", "--recipe", recipe, "--calib", text_file
    )
    assert code == 0
    flags = ["--method", "awq", "--bits", "3", "--group-size", "32", "--calib-samples", "8"]
    code, _, _ = run(capsys, "compress", llama_dir, "-o", tmp_path / "b", *flags, "--calib", text_file)
    assert code == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compress_is_deterministic_and_prints_its_table_on_stdout(tmp_path, capsys, llama_dir, text_file):
    for name in ("x", "y"):
        code, out, err = run(
            capsys, "compress", llama_dir, "-o", tmp_path / name, "--group-size", "32", "--calib", text_file
        )
        assert code == 0
    # The result on stdout (`> result.txt` keeps it), progress and logs on stderr.
    assert "ratio" in out and "gptq" in out and "ratio" not in err
    x, y = (
        (tmp_path / "x" / "model.safetensors").read_bytes(),
        (tmp_path / "y" / "model.safetensors").read_bytes(),
    )
    assert x == y


def test_eval_reports_perplexity_and_fidelity(tmp_path, capsys, llama_dir, bert_dir, text_file):
    code, stdout, _ = run(capsys, "eval", llama_dir, "--data", text_file, "--json")
    assert code == 0 and 1 < json.loads(stdout)["perplexity"] < 1000
    out = tmp_path / "bert-w4"
    assert run(capsys, "compress", bert_dir, "-o", out, "--method", "rtn", "--group-size", "32")[0] == 0
    code, stdout, _ = run(capsys, "eval", out, "--reference", bert_dir, "--data", text_file, "--json")
    assert code == 0 and 0.9 < json.loads(stdout)["embedding_fidelity"] < 1.0


def test_eval_with_an_adapter_equals_eval_of_the_merged_model(tmp_path, capsys, llama_dir, text_file):
    import torch
    from peft import LoraConfig, get_peft_model

    from weightkit.testing import tiny_llama

    peft_model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path / "adapter")
    perplexity = {}
    for name, args in (
        ("base", [llama_dir]),
        ("adapter", [llama_dir, "--adapter", tmp_path / "adapter"]),
    ):
        code, stdout, _ = run(capsys, "eval", *args, "--data", text_file, "--json")
        assert code == 0
        perplexity[name] = json.loads(stdout)["perplexity"]
    assert run(capsys, "merge-adapter", llama_dir, tmp_path / "adapter", "-o", tmp_path / "merged")[0] == 0
    capsys.readouterr()
    code, stdout, _ = run(capsys, "eval", tmp_path / "merged", "--data", text_file, "--json")
    merged = json.loads(stdout)["perplexity"]
    assert abs(perplexity["adapter"] - perplexity["base"]) > 1e-3 * perplexity["base"]
    assert abs(perplexity["adapter"] - merged) < 1e-4 * merged


def test_eval_runs_on_the_device_asked(capsys, monkeypatch, llama_dir, text_file):
    import weightkit.eval

    seen = []

    def fake_perplexity(model, tokenizer, texts, **kwargs):
        seen.append({p.device.type for p in model.parameters()})
        return 1.0

    monkeypatch.setattr(weightkit.eval, "perplexity", fake_perplexity)
    # meta: the placement is visible without a GPU (the real computation would need data).
    code, stdout, _ = run(capsys, "eval", llama_dir, "--data", text_file, "--device", "meta", "--json")
    assert code == 0 and seen == [{"meta"}] and json.loads(stdout)["device"] == "meta"


def test_a_device_this_machine_lacks_is_refused_by_name(tmp_path, capsys, llama_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _assert_fails(capsys, tmp_path, ["eval", llama_dir, "--device", "cuda"], "--device cuda", "no CUDA GPU")


def test_compress_runs_on_the_device_asked(tmp_path, capsys, monkeypatch, llama_dir):
    from weightkit.compress.quant import rtn
    from weightkit.quantized.grid import rtn_quantize

    seen = []

    def record(w, scheme, **kwargs):
        seen.append(w.device.type)
        return rtn_quantize(torch.zeros(w.shape), scheme, **kwargs)  # meta holds no values to round

    monkeypatch.setattr(rtn, "rtn_quantize", record)  # what RTNConfig.quantize_weight calls
    argv = ["compress", llama_dir, "-o", tmp_path / "on-meta", "--method", "rtn", "--group-size", "32"]
    code, stdout, _ = run(capsys, *argv, "--device", "meta", "--json")
    assert code == 0 and set(seen) == {"meta"} and json.loads(stdout)["device"] == "meta"
    argv = ["compress", llama_dir, "--method", "rtn", "--group-size", "32", "--device", "cuda"]
    if not torch.cuda.is_available():
        _assert_fails(capsys, tmp_path, argv, "--device cuda", "no CUDA GPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_on_cuda_matches_the_cpu(capsys, llama_dir, text_file):
    values = []
    for device in ("cpu", "cuda"):
        code, stdout, _ = run(capsys, "eval", llama_dir, "--data", text_file, "--device", device, "--json")
        assert code == 0
        values.append(json.loads(stdout)["perplexity"])
    assert values[1] == pytest.approx(values[0], rel=1e-4)


def _assert_fails(capsys, tmp_path, argv, *fragments):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, *argv, "-o", out) if argv[0] == "compress" else run(capsys, *argv)
    message = " ".join(err.split())  # rich wraps long lines
    assert code == 1, err
    assert "Traceback" not in err and stdout == ""
    for fragment in fragments:
        assert str(fragment) in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers


def test_not_a_model_directory(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_fails(capsys, tmp_path, ["compress", empty], str(empty), "not a model directory")


def test_truncated_safetensors(tmp_path, capsys, llama_dir):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _assert_fails(capsys, tmp_path, ["compress", broken, "--method", "rtn"], "model.safetensors", "truncated")


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    _assert_fails(capsys, tmp_path, ["compress", gpt2, "--method", "rtn"], "h.0.attn.c_attn", "Conv1D")


def test_group_size_that_does_not_divide_the_weight(tmp_path, capsys, llama_dir):
    _assert_fails(
        capsys, tmp_path, ["compress", llama_dir, "--method", "rtn", "--group-size", "128"],
        "model.layers.0.self_attn.q_proj.weight", "group size 128", "32",
    )  # fmt: skip


def test_act_order_can_be_turned_off_and_is_gptq_only(tmp_path, capsys, llama_dir, text_file):
    code, stdout, _ = run(
        capsys, "compress", llama_dir, "-o", tmp_path / "w4", "--method", "gptq", "--group-size", "32",
        "--calib", text_file, "--no-act-order", "--json",
    )  # fmt: skip
    assert code == 0 and json.loads(stdout)["config"]["act_order"] is False
    _assert_fails(
        capsys, tmp_path, ["compress", llama_dir, "--method", "rtn", "--group-size", "32", "--act-order"],
        "--act-order", "gptq or vptq only",
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (
            ["--method", "awq", "--group-size", "32", "--damp", "0.05"],
            ["--damp", "gptq or vptq or sparsegpt only", "not awq"],
        ),
        (["--method", "gptq", "--group-size", "32", "--duo-scaling"], ["--duo-scaling", "awq only"]),
        (
            ["--method", "rtn", "--group-size", "32", "--no-hessian-shrinkage"],
            ["--hessian-shrinkage", "gptq only"],
        ),
        (
            ["--method", "rtn", "--group-size", "32", "--seq-len", "64"],
            ["--seq-len", "flexround or vptq or wanda or sparsegpt or bitstack or foldgpt only", "not rtn"],
        ),
        (
            ["--method", "rtn", "--group-size", "32", "--calib", "texts.txt"],
            ["--calib", "RTN uses no calibration data"],
        ),
        (["--recipe", "recipe.yaml", "--bits", "3"], ["--recipe", "--bits", "in the recipe"]),
    ],
)
def test_a_method_flag_the_method_or_recipe_would_not_use_is_refused(
    tmp_path, capsys, llama_dir, argv, fragments
):
    # They used to be ignored: --damp with AWQ, --calib with RTN, any method flag beside --recipe.
    (tmp_path / "recipe.yaml").write_text("method: rtn\ngroup_size: 32\n")
    (tmp_path / "texts.txt").write_text("some text\n")
    argv = [str(tmp_path / a) if a in ("recipe.yaml", "texts.txt") else a for a in argv]
    _assert_fails(capsys, tmp_path, ["compress", llama_dir, *argv], *fragments)


def test_gptq_and_awq_options_reach_their_configs(tmp_path, capsys, llama_dir, text_file):
    for method, option, field in (("gptq", "--no-hessian-shrinkage", "hessian_shrinkage"),
                                  ("awq", "--no-duo-scaling", "duo_scaling")):  # fmt: skip
        code, stdout, _ = run(
            capsys, "compress", llama_dir, "-o", tmp_path / method, "--method", method, "--group-size", "32",
            "--calib", text_file, option, "--calib-samples", "4", "--json",
        )  # fmt: skip
        config = json.loads(stdout)["config"]
        assert code == 0 and config[field] is False and config["calib_samples"] == 4, config


def test_bits_out_of_range(tmp_path, capsys, llama_dir):
    _assert_fails(capsys, tmp_path, ["compress", llama_dir, "--bits", "9", "--group-size", "32"], "bits", "9")


def test_nan_weights(tmp_path, capsys):
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    bad = save_tiny(model, tmp_path / "nan", tiny_tokenizer(128))
    _assert_fails(
        capsys,
        tmp_path,
        ["compress", bad, "--method", "rtn", "--group-size", "32"],
        "model.layers.1.mlp.up_proj.weight",
        "NaN",
    )


def test_inf_in_an_embedding(tmp_path, capsys, llama_dir):
    bad = tmp_path / "inf"
    shutil.copytree(llama_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.embed_tokens.weight"][0, 0] = float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    _assert_fails(
        capsys,
        tmp_path,
        ["compress", bad, "--method", "rtn", "--group-size", "32"],
        "model.embed_tokens.weight",
        "Inf",
    )


def test_empty_calibration_file(tmp_path, capsys, llama_dir):
    empty = tmp_path / "calib.txt"
    empty.write_text("\n\n")
    _assert_fails(
        capsys, tmp_path, ["compress", llama_dir, "--group-size", "32", "--calib", empty], str(empty)
    )


def test_missing_calibration_file(tmp_path, capsys, llama_dir):
    missing = tmp_path / "nope.jsonl"
    _assert_fails(
        capsys, tmp_path, ["compress", llama_dir, "--group-size", "32", "--calib", missing], str(missing)
    )


def test_pickle_checkpoint_needs_allow_pickle(tmp_path, capsys):
    pickled = save_tiny(tiny_llama(seed=0), tmp_path / "pickled", tiny_tokenizer(128))
    weights = pickled / "model.safetensors"
    torch.save(load_file(weights), pickled / "pytorch_model.bin")
    weights.unlink()
    _assert_fails(
        capsys, tmp_path, ["compress", pickled, "--method", "rtn", "--group-size", "32"], "--allow-pickle"
    )
    out = tmp_path / "ok"
    argv = ["compress", pickled, "-o", out, "--method", "rtn", "--group-size", "32", "--allow-pickle"]
    assert run(capsys, *argv)[0] == 0 and (out / "model.safetensors").exists()


def test_existing_output_needs_force(tmp_path, capsys, llama_dir):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compress", llama_dir, "-o", out, "--method", "rtn", "--group-size", "32")
    assert code == 1 and "--force" in err and (out / "keep.txt").read_text() == "mine"


def test_a_recipe_with_two_quantization_stages_is_refused_by_name(tmp_path, capsys, llama_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - method: gptq\n  - method: rtn\n")
    _assert_fails(capsys, tmp_path, ["compress", llama_dir, "--recipe", recipe], "two quantization stages")


def test_unknown_method_in_a_recipe_suggests_the_right_one(tmp_path, capsys, llama_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: gtpq\nbits: 4\n")
    _assert_fails(
        capsys, tmp_path, ["compress", llama_dir, "--recipe", recipe], "gtpq", "Did you mean 'gptq'"
    )


def test_unknown_field_in_a_recipe_suggests_the_right_one(tmp_path, capsys, llama_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: gptq\nbits: 4\ngroupsize: 32\n")
    _assert_fails(capsys, tmp_path, ["compress", llama_dir, "--recipe", recipe], "groupsize", "group_size")


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--method",
        "--bits",
        "--group-size",
        "--calib",
        "--recipe",
        "--asym",
        "--act-order",
        "--json",
    ):
        assert option in text


@pytest.fixture
def merge_recipe(tmp_path):
    """A mergekit-style TIES recipe over a tiny Llama base and two perturbed copies."""
    save_tiny(tiny_llama(seed=0), tmp_path / "base")
    for seed in (1, 2):
        model = tiny_llama(seed=0)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        save_tiny(model, tmp_path / f"ft{seed}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "models:\n  - model: ft1\n    parameters: {weight: 0.5, density: 0.5}\n"
        "  - model: ft2\n    parameters: {weight: 0.5, density: 0.5}\n"
        "base_model: base\nmerge_method: ties\ndtype: bfloat16\n"
    )
    return recipe


def test_merge_writes_a_model_transformers_loads_and_reports_conflicts(tmp_path, capsys, merge_recipe):
    out = tmp_path / "merged"
    code, stdout, _ = run(capsys, "merge", merge_recipe, "-o", out, "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["method"] == "ties" and summary["tensors"] == 21
    assert 0.3 < summary["sign_conflict_rate"] < 0.7  # two independent Gaussian deltas: ~1/2
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert merged.dtype == torch.bfloat16
    code, _, err = run(capsys, "merge", merge_recipe, "-o", out)
    assert code == 1 and "--force" in err


def test_merge_dry_run_validates_and_writes_nothing(tmp_path, capsys, merge_recipe):
    out = tmp_path / "merged"
    code, stdout, _ = run(capsys, "merge", merge_recipe, "-o", out, "--dry-run", "--json")
    plan = json.loads(stdout)
    assert code == 0 and plan["dry_run"] and plan["tensors"] == 21 and not out.exists()
    assert plan["output_bytes"] * 2 == plan["input_bytes"] // 3  # bfloat16 out of three float32 models
    merge_recipe.write_text(merge_recipe.read_text().replace("density: 0.5}", "density: 1.5}", 1))
    code, _, err = run(capsys, "merge", merge_recipe, "-o", out, "--dry-run")
    assert code == 1 and "density must be in (0, 1]" in err and "ft1" in err


def test_merge_help_shows_a_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    for option in ("merge_method", "--dry-run", "--dtype", "--force", "--json"):
        assert option in text


def test_fisher_files_from_the_cli_drive_a_fisher_merge(tmp_path, capsys, text_file):
    entries = []
    for seed in (1, 2):
        model_dir = save_tiny(tiny_llama(seed=seed), tmp_path / f"m{seed}", tiny_tokenizer())
        fisher = tmp_path / f"m{seed}.fisher.safetensors"
        argv = ["fisher", model_dir, "-o", fisher, "--data", text_file, "--samples", "4", "--seq-len", "16"]
        code, stdout, _ = run(capsys, *argv, "--json")
        assert code == 0 and json.loads(stdout)["bytes"] > 0
        entries.append(f"  - {{model: {model_dir}, parameters: {{fisher: {fisher}}}}}\n")
    recipe = tmp_path / "fisher.yaml"
    recipe.write_text("models:\n" + "".join(entries) + "merge_method: fisher\n")
    code, stdout, _ = run(capsys, "merge", recipe, "-o", tmp_path / "out", "--json")
    assert code == 0 and json.loads(stdout)["method"] == "fisher"
    merged = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    a, b = (
        load_file(tmp_path / f"m{s}" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
        for s in (1, 2)
    )
    # Every entry lies between the two models' values, and the result is not their plain average.
    assert bool(
        ((merged - torch.minimum(a, b)) >= -1e-6).all() and ((torch.maximum(a, b) - merged) >= -1e-6).all()
    )
    assert not torch.allclose(merged, (a + b) / 2, atol=1e-5)


def test_extract_lora_writes_an_adapter_peft_loads(tmp_path, capsys):
    from peft import PeftModel

    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    tuned = tiny_llama(seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a rank-2 change of one projection
        q = tuned.model.layers[0].self_attn.q_proj.weight
        q.add_(
            torch.randn(q.shape[0], 2, generator=generator)
            @ torch.randn(2, q.shape[1], generator=generator)
            * 0.1
        )
    tuned_dir = save_tiny(tuned, tmp_path / "tuned")
    out = tmp_path / "adapter"
    code, stdout, _ = run(capsys, "extract-lora", base_dir, tuned_dir, "-r", "2", "-o", out, "--json")
    summary = json.loads(stdout)
    assert code == 0 and [m["module"] for m in summary["modules"]] == ["model.layers.0.self_attn.q_proj"]
    assert summary["max_relative_error"] < 1e-5
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    torch.testing.assert_close(peft_model(ids).logits, tuned(ids).logits, atol=1e-5, rtol=1e-5)
    code, _, err = run(capsys, "extract-lora", base_dir, tuned_dir, "-r", "2", "-o", out)
    assert code == 1 and "--force" in err


def test_align_undoes_a_permutation_of_mlp_neurons(tmp_path, capsys):
    reference = tiny_llama(seed=0)
    permuted = tiny_llama(seed=0)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    mlp = permuted.model.layers[1].mlp
    with torch.no_grad():  # the same function, neurons in another order
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[order])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[order])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])
    ref_dir, perm_dir = save_tiny(reference, tmp_path / "ref"), save_tiny(permuted, tmp_path / "perm")
    code, stdout, _ = run(capsys, "align", ref_dir, perm_dir, "-o", tmp_path / "out", "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["layers"][1]["mlp_moved"] > 0.9 and summary["layers"][0]["mlp_moved"] == 0
    aligned, original = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(ref_dir / "model.safetensors"),
    )
    for name, tensor in original.items():
        assert torch.equal(aligned[name], tensor), name


def test_version_is_printed(capsys):
    import weightkit

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"weightkit {weightkit.__version__}"


@pytest.mark.parametrize("command", ["adapt", "fisher", "extract-lora", "align"])
def test_verbs_that_read_checkpoints_take_allow_pickle(tmp_path, capsys, text_file, command):
    # Each said "pass --allow-pickle" for a .bin checkpoint and then had no such option.
    pickled = save_tiny(tiny_llama(seed=1), tmp_path / "pickled", tiny_tokenizer(128))
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    other = save_tiny(tiny_llama(seed=0), tmp_path / "other", tiny_tokenizer(128))
    argv = {
        "adapt": ["adapt", pickled, "--data", text_file, "--max-steps", "1", "--device", "cpu"],
        "fisher": [
            "fisher",
            pickled,
            "--data",
            text_file,
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--device",
            "cpu",
        ],
        "extract-lora": ["extract-lora", other, pickled, "-r", "2"],
        "align": ["align", other, pickled, "--device", "cpu"],
    }[command]
    out = tmp_path / ("out.safetensors" if command == "fisher" else "out")
    code, _, err = run(capsys, *argv, "-o", out)
    assert code == 1 and "--allow-pickle" in err and not out.exists()
    code, _, err = run(capsys, *argv, "-o", out, "--allow-pickle", "--json")
    assert code == 0 and out.exists(), err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
        (["--calib-samples", "-3"], "--calib-samples must be at least 1, got -3"),
    ],
)
def test_a_bad_flag_value_is_named_by_its_flag(tmp_path, capsys, llama_dir, flags, message):
    # "--seq-len 0" said "calib_max_length must be at least 1", the config field behind the flag.
    _assert_fails(capsys, tmp_path, ["compress", llama_dir, "--method", "gptq", *flags], message)


def test_adapt_refuses_an_output_it_cannot_write_before_training(tmp_path, capsys, llama_dir, text_file):
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "adapter"
    argv = ["adapt", llama_dir, "-o", out, "--data", text_file, "--max-steps", "50", "--device", "cpu"]
    code, _, err = run(capsys, *argv)
    assert code == 1 and "is not a directory" in " ".join(err.split()) and "step" not in err


def test_eval_prints_its_result_on_stdout(capsys, llama_dir, text_file):
    code, out, err = run(capsys, "eval", llama_dir, "--data", text_file, "--device", "cpu")
    assert code == 0 and "│ perplexity │" in out  # the result table on stdout
    assert "│" not in err and "perplexity ━" in err  # the progress bar on stderr, no table


def test_eval_refuses_a_reference_for_a_causal_lm(tmp_path, capsys, llama_dir, text_file):
    # It was accepted and ignored: the perplexity said nothing about the reference.
    _assert_fails(
        capsys, tmp_path, ["eval", llama_dir, "--reference", llama_dir], "--reference applies to encoders"
    )


def test_help_with_a_method_lists_that_methods_options(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--method", "mos", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "options of --method mos" in text and "budget_rank = 4: the trainable-parameter budget" in text
    with pytest.raises(SystemExit):
        main(["adapt", "--method", "dora", "--help"])
    assert "dora = True" in capsys.readouterr().out  # the method's preset, not the config's default
    with pytest.raises(SystemExit):
        main(["compress", "--method", "awq", "--help"])
    assert "options of --method awq" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # compress --sweep compares a comma list of methods: each one's options
        main(["compress", "--method", "rtn,fp8", "--help"])
    out = capsys.readouterr().out
    assert "options of --method rtn" in out and "options of --method fp8" in out
    with pytest.raises(SystemExit):  # merge's method is the recipe's merge_method: its parameters
        main(["merge", "--method", "breadcrumbs_ties", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "parameters of merge_method breadcrumbs_ties" in text and "sparsify = 'breadcrumbs'" in text
    assert main(["adapt", "--method", "moss", "--help"]) == 1
    assert "Did you mean 'mos'" in capsys.readouterr().err


def test_adapt_warns_that_a_negative_alpha_flips_the_update(tmp_path, capsys, llama_dir, text_file):
    (tmp_path / "a-file").write_text("not a directory")  # stops before training: only the warning matters
    argv = ["adapt", llama_dir, "-o", tmp_path / "a-file" / "x", "--data", text_file, "--alpha", "-16"]
    code, _, err = run(capsys, *argv)
    assert code == 1 and "warning: alpha -16.0 is negative" in " ".join(err.split())
    code, _, err = run(capsys, *argv[:-1], "16")
    assert code == 1 and "warning" not in err


def test_a_recipe_override_that_matches_no_layer_is_named_in_a_warning(tmp_path, capsys, llama_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        'method: rtn\ngroup_size: 32\noverrides: {"re:.*down_proj": {"bits": 8}, '
        '"re:down_proj": {"bits": 2}}\n'
    )
    code, _, err = run(capsys, "compress", llama_dir, "-o", tmp_path / "out", "--recipe", recipe)
    err = " ".join(err.split())
    assert code == 0 and "warning: overrides 're:down_proj' match no quantized layer" in err
    assert "re:.*down_proj'" not in err


@pytest.mark.parametrize(
    "argv", [["align", "a", "b", "-o", "out", "--reference", "c"], ["compress"]], ids=["unknown", "missing"]
)
def test_a_usage_error_prints_the_subcommands_usage(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"usage: weightkit {argv[0]} " in err
    assert "COMMAND ..." not in err  # not the top-level usage


def test_an_error_message_with_brackets_is_printed_as_it_is(tmp_path, capsys):
    # Printed as rich markup, "[/]" raised a MarkupError and "[red]" vanished.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: ./a[/]b\n  - model: ./c[red]d\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "a[/]b" in err or "c[red]d" in err
