"""``weightkit merge``, ``extract-lora``, ``align`` and ``fisher`` (weightkit.cli.merge) as commands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightkit.cli import main
from weightkit.testing import save_tiny, tiny_llama


@pytest.fixture
def linear_recipe(tmp_path):
    """A linear recipe over two tiny Llamas."""
    for seed in (1, 2):
        save_tiny(tiny_llama(seed=seed), tmp_path / f"m{seed}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("models:\n  - model: m1\n  - model: m2\nmerge_method: linear\n")
    return recipe


_WAIT_POLICY = (
    "import os, sys; from weightkit.cli import main; code = main(sys.argv[1:]); import torch; "
    "print(code, os.environ.get('OMP_WAIT_POLICY'))"
)


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_merge_lets_openmp_threads_sleep_unless_told_otherwise(tmp_path, linear_recipe, given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    cmd = [
        sys.executable,
        "-c",
        _WAIT_POLICY,
        "merge",
        str(linear_recipe),
        "-o",
        str(tmp_path / "o"),
        "--dry-run",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["0", expected]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("method", "where"), [("ties", "meta"), ("linear", "cpu")])
def test_merge_dry_run_says_where_it_would_merge(tmp_path, capsys, linear_recipe, method, where):
    recipe = linear_recipe
    if method == "ties":
        save_tiny(tiny_llama(seed=0), tmp_path / "base")
        recipe.write_text(recipe.read_text().replace("linear", "ties") + "base_model: base\n")
    code, stdout, _ = run(
        capsys, "merge", recipe, "-o", tmp_path / "o", "--dry-run", "--json", "--device", "meta"
    )
    assert code == 0 and json.loads(stdout)["device"] == where


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a missing GPU")
@pytest.mark.parametrize("command", ["merge", "align", "fisher"])
def test_a_missing_device_is_refused_by_name(tmp_path, capsys, linear_recipe, llama_dir, command):
    args = {
        "merge": ["merge", linear_recipe, "-o", tmp_path / "o"],
        "align": ["align", llama_dir, llama_dir, "-o", tmp_path / "o"],
        "fisher": ["fisher", llama_dir, "-o", tmp_path / "f.safetensors"],
    }[command]
    code, _, err = run(capsys, *args, "--device", "cuda")
    assert code == 1 and "--device cuda: this machine has no CUDA GPU" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "f.safetensors").exists()


FRANKENMERGE = """\
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
  - sources:
      - model: b
        layer_range: [1, 4]
        parameters: {scale: 0.5}
merge_method: passthrough
"""


def test_merge_stacks_the_slices_of_a_yaml_recipe(tmp_path, capsys):
    for name, seed in (("a", 1), ("b", 2)):
        save_tiny(tiny_llama(seed=seed, num_hidden_layers=4, tie_word_embeddings=False), tmp_path / name)
    recipe = tmp_path / "frankenmerge.yaml"
    recipe.write_text(FRANKENMERGE)
    code, stdout, _ = run(capsys, "merge", recipe, "-o", tmp_path / "plan", "--dry-run", "--json")
    plan = json.loads(stdout)
    assert code == 0 and plan["tensors"] == 6 * 9 + 3 and not (tmp_path / "plan").exists()
    assert [(row["slice"], row["layers"], row["parameters"]) for row in plan["models"]] == [
        ("0", "0-2", "method defaults"),
        ("1", "1-3", "scale=0.5"),
    ]
    code, stdout, _ = run(capsys, "merge", recipe, "-o", tmp_path / "out", "--json")
    assert code == 0 and json.loads(stdout)["layers"] == 6
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    out = load_file(tmp_path / "out" / "model.safetensors")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    name = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(out[name.format(2)], a[name.format(2)])
    assert torch.equal(out[name.format(3)], b[name.format(1)] * 0.5)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"] * 0.5)


# -- mergekit's nearswap, nuslerp, multislerp, karcher, sce and arcee_fusion from recipes ------------------

FIXTURES = Path(__file__).parents[1] / "merge" / "fixtures" / "mergekit"


def outputs(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize(
    ("case", "method"),
    [
        ("nearswap", "nearswap"),
        ("nuslerp_base", "nuslerp"),
        ("multislerp_base", "multislerp"),
        ("karcher", "karcher"),
        ("sce", "sce"),
        ("arcee_fusion", "arcee_fusion"),
    ],
)
def test_mergekit_recipes_of_each_new_method_give_mergekits_output(tmp_path, capsys, case, method):
    # The recipes mergekit ran to make the fixtures, unchanged (model paths relative to the recipe).
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "merge", FIXTURES / "recipes" / f"{case}.yaml", "-o", out, "--json")
    assert code == 0 and json.loads(stdout)["method"] == method
    expected = load_file(FIXTURES / "outputs" / f"{case}.safetensors")
    got = outputs(out)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def write_recipe(tmp_path: Path, text: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("MODELS", str(FIXTURES / "models")))
    return recipe


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        # mergekit would read a per-layer list of switches; weightkit refuses it rather than read it as true.
        (
            "models: [{model: MODELS/a}, {model: MODELS/b}]\nmerge_method: nuslerp\n"
            "parameters: {nuslerp_flatten: [true, false]}\n",
            "nuslerp_flatten=[True, False]: expected true or false",
        ),
        # mergekit ignores options a method does not have; weightkit names them.
        (
            "models: [{model: MODELS/a}, {model: MODELS/b}]\nmerge_method: nuslerp\n"
            "parameters: {normalize: true}\n",
            "nuslerp: unknown option 'normalize'",
        ),
        (
            "models: [{model: MODELS/a, parameters: {weight: 2}}, {model: MODELS/b}]\n"
            "merge_method: karcher\n",
            "karcher: unknown parameter(s) weight",
        ),
        (
            "models: [{model: MODELS/a}, {model: MODELS/b}, {model: MODELS/c}]\nmerge_method: nuslerp\n",
            "nuslerp merges exactly 2 model(s), got 3",
        ),
        (
            "models: [{model: MODELS/a}]\nbase_model: MODELS/base\nmerge_method: nearswap\n",
            "nearswap needs t",
        ),
        (
            "models: [{model: MODELS/a}, {model: MODELS/b}]\nmerge_method: sce\n",
            "sce merges task vectors against a base model",
        ),
        # mergekit stops without t; weightkit used to merge halfway.
        (
            "models: [{model: MODELS/a}, {model: MODELS/b}]\nbase_model: MODELS/a\nmerge_method: slerp\n",
            "slerp needs t, the interpolation factor",
        ),
    ],
)
def test_what_the_new_methods_do_not_take_is_refused_by_name(tmp_path, capsys, recipe, message):
    code, _, err = run(capsys, "merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert code == 1 and message in " ".join(err.split())
    assert not (tmp_path / "out").exists()


DARE = (
    "models:\n  - model: MODELS/a\n    parameters: {weight: 0.5, density: 0.5}\n"
    "  - model: MODELS/b\n    parameters: {weight: 0.5, density: 0.5}\n"
    "base_model: MODELS/base\nmerge_method: dare_ties\n"
)


def test_random_seed_seeds_the_random_methods_like_the_recipes_seed(tmp_path, capsys):
    recipe = write_recipe(tmp_path, DARE)
    merged = {}
    for seed in (7, 8):
        code, stdout, _ = run(
            capsys, "merge", recipe, "-o", tmp_path / f"s{seed}", "--random-seed", seed, "--json"
        )
        assert code == 0 and json.loads(stdout)["config"]["seed"] == seed
        merged[seed] = outputs(tmp_path / f"s{seed}")
    seeded = tmp_path / "seeded.yaml"
    seeded.write_text(recipe.read_text() + "parameters: {seed: 7}\n")
    code, _, _ = run(capsys, "merge", seeded, "-o", tmp_path / "recipe7", "--random-seed", 7)
    assert code == 0
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outputs(tmp_path / "recipe7")[name], merged[7][name])
    assert not torch.equal(merged[7][name], merged[8][name])
    code, _, err = run(capsys, "merge", seeded, "-o", tmp_path / "clash", "--random-seed", 8)
    assert code == 1 and "--random-seed 8 and the recipe's seed: 7 disagree" in err


def test_random_seed_is_accepted_and_changes_nothing_for_deterministic_methods(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run(capsys, "merge", FIXTURES / "recipes" / "nearswap.yaml", "-o", out, "--random-seed", 3)
    assert code == 0
    expected = load_file(FIXTURES / "outputs" / "nearswap.safetensors")
    assert all(torch.equal(outputs(out)[name], tensor) for name, tensor in expected.items())


def test_random_seed_is_explained_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--random-seed N" in text and "Other methods are deterministic and accept it without effect" in text
    )


def test_a_model_plus_lora_recipe_runs_with_mergekits_lora_cache_flag(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    save_tiny(tiny_llama(seed=0), tmp_path / "base")
    save_tiny(tiny_llama(seed=1), tmp_path / "other")
    peft_model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.fill_(0.05)
    peft_model.save_pretrained(tmp_path / "lora")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models:\n  - model: base+lora\n  - model: other\nmerge_method: linear\n")
    code, _, _ = run(
        capsys, "merge", recipe, "-o", tmp_path / "out", "--lora-merge-cache", tmp_path / "cache"
    )
    assert code == 0 and not (tmp_path / "cache").exists()
    out = load_file(tmp_path / "out" / "model.safetensors")
    base, other = (
        load_file(tmp_path / "base" / "model.safetensors"),
        load_file(tmp_path / "other" / "model.safetensors"),
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    # Every entry of B A is r * 0.05^2 (r = 2), scaled by lora_alpha / r = 8 / 2 (PEFT's default alpha).
    adapted = base[name] + (8 / 2) * 2 * 0.05**2
    torch.testing.assert_close(out[name], (adapted + other[name]) / 2)
    name = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(out[name], (base[name] + other[name]) / 2)


def test_the_merge_verbs_start_without_importing_transformers():
    # `weightkit merge` and `align` skip transformers' ~1 s import (cli._WITHOUT_TRANSFORMERS); a module
    # of theirs that imports weightkit.models at the top undoes that for every merge.
    import subprocess
    import sys

    code = (
        "import sys, weightkit.cli, weightkit.merge, weightkit.merge.recipe, weightkit.merge.align; "
        "sys.exit('transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_extract_lora_saves_changed_norms_whole_and_warns_of_what_it_leaves_out(tmp_path, capsys):
    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    tuned = tiny_llama(seed=0)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # rank 32 reproduces any change
        tuned.model.norm.weight.mul_(1.25)
    tuned_dir = save_tiny(tuned, tmp_path / "tuned")
    args = ["extract-lora", base_dir, tuned_dir, "-r", "32", "--json"]
    assert main([str(a) for a in [*args, "-o", tmp_path / "auto"]]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [m["module"] for m in summary["modules_to_save"]] == ["model.norm"] and summary["skipped"] == []
    saved = load_file(tmp_path / "auto" / "adapter_model.safetensors")["base_model.model.model.norm.weight"]
    assert torch.equal(saved, tuned.model.norm.weight)

    assert main([str(a) for a in [*args, "-o", tmp_path / "none", "--modules-to-save", "none"]]) == 0
    err = capsys.readouterr().err
    assert (
        "warning: 1 changed tensor(s) are not in the adapter" in err
        and "model.norm.weight (changed by 25.00%" in err
    )
    code = main(
        [str(a) for a in [*args, "-o", tmp_path / "named", "--modules-to-save", "embed_tokens,normal"]]
    )
    assert code == 1 and "no module of the model is named 'normal'" in capsys.readouterr().err


def test_a_merge_writes_its_own_model_card_not_the_sources(tmp_path, capsys):
    import yaml

    for name, seed in (("base", 0), ("m1", 1), ("m2", 2)):
        save_tiny(tiny_llama(seed=seed), tmp_path / name)
        (tmp_path / name / "README.md").write_text(f"# {name}\n\nThe source card of {name}.\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"models:\n  - model: {tmp_path / 'm1'}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {tmp_path / 'm2'}\nbase_model: {tmp_path / 'base'}\nmerge_method: breadcrumbs_ties\n"
        "parameters: {weight: 0.5, density: 0.8}\n"
    )
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "breadcrumbs_ties"
    text = (tmp_path / "out" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    inputs = [str(tmp_path / name) for name in ("base", "m1", "m2")]
    assert yaml.safe_load(front)["base_model"] == inputs
    assert yaml.safe_load(front)["tags"] == ["weightkit", "merge", "breadcrumbs_ties"]
    assert "`weightkit merge`, method `breadcrumbs_ties`" in body and "source card" not in text
    assert "- density: `0.8`" in body and f'- {inputs[1]}: `{{"weight": 0.7}}`' in body
