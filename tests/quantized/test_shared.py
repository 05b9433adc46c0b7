"""SharedLinear (weights combined from atoms shared between layers) and weightkit's "shared" checkpoint
format: the weight against a plain reference, tying, exact save/load round trips, refusals, and transformers
failing loudly on the checkpoint."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from weightkit import load
from weightkit.compress.quant.export import save_quantized
from weightkit.errors import WeightkitError
from weightkit.quantized.shared import SharedLinear, share_linears
from weightkit.testing import tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 5, 17, 33, 64, 99, 127, 3, 8, 21]])
UP = [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
GATE = [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]


def reference_weight(atoms, coefficients, lora=None):
    """sum_j c_j * A_j, written as a loop over atoms (and output rows for per-channel coefficients)."""
    weight = torch.zeros(atoms.shape[1:])
    for j in range(atoms.shape[0]):
        if coefficients.dim() == 1:
            weight += coefficients[j] * atoms[j]
        else:
            for row in range(atoms.shape[1]):
                weight[row] += coefficients[j, row] * atoms[j, row]
    if lora is not None:
        weight += lora[1] @ lora[0]
    return weight


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_lora", [False, True])
def test_weight_and_output_match_the_plain_sum_of_atoms(per_channel, with_lora):
    torch.manual_seed(0)
    atoms = nn.Parameter(torch.randn(3, 5, 4))
    coefficients = torch.randn(3, 5) if per_channel else torch.randn(3)
    lora = (torch.randn(2, 4), torch.randn(5, 2)) if with_lora else None
    bias = torch.randn(5)
    layer = SharedLinear(atoms, coefficients, bias, lora_a=lora and lora[0], lora_b=lora and lora[1])
    expected = reference_weight(atoms.detach(), coefficients, lora)
    torch.testing.assert_close(layer.dense_weight(), expected)
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), x @ expected.T + bias)
    assert layer.rank == (2 if with_lora else 0)


def test_layers_hold_one_atoms_parameter_whose_gradient_sums_both_uses():
    torch.manual_seed(0)
    atoms = nn.Parameter(torch.randn(2, 4, 4))
    coefficients = (torch.tensor([1.0, -0.5]), torch.rand(2, 4))
    first, second = (SharedLinear(atoms, c, None) for c in coefficients)
    model = nn.Sequential(first, nn.Tanh(), second)
    assert first.atoms is second.atoms is atoms
    assert sum(p is atoms for p in model.parameters()) == 1  # listed once: an optimizer updates it once
    x = torch.randn(6, 4)
    model(x).square().sum().backward()
    # Reference: the same network with two independent copies of the atoms; the shared gradient is the sum.
    copies = [nn.Parameter(atoms.detach().clone()) for _ in coefficients]
    untied = nn.Sequential(
        SharedLinear(copies[0], coefficients[0], None),
        nn.Tanh(),
        SharedLinear(copies[1], coefficients[1], None),
    )
    untied(x).square().sum().backward()
    torch.testing.assert_close(atoms.grad, copies[0].grad + copies[1].grad)


def test_the_layer_keeps_copies_of_its_own_tensors():
    coefficients = torch.ones(1)
    layer = SharedLinear(nn.Parameter(torch.randn(1, 2, 2)), coefficients, None)
    coefficients.mul_(3)
    assert layer.coefficients.item() == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(atoms=torch.randn(1, 2, 3)), "one nn.Parameter"),
        (dict(atoms=nn.Parameter(torch.randn(2, 3))), "one nn.Parameter"),
        (dict(coefficients=torch.ones(2)), r"expected \(1,\) or \(1, 2\)"),
        (dict(coefficients=torch.ones(1, 3)), r"expected \(1,\) or \(1, 2\)"),
        (dict(bias=torch.ones(3)), r"bias has shape \(3,\), expected \(2,\)"),
        (dict(lora_a=torch.ones(1, 3)), "go together"),
        (dict(lora_a=torch.ones(1, 3), lora_b=torch.ones(2, 2)), "do not fit a"),
        (dict(lora_a=torch.ones(1, 2), lora_b=torch.ones(2, 1)), "do not fit a"),
    ],
)
def test_constructor_refuses_tensors_that_do_not_fit(kwargs, match):
    args = dict(atoms=nn.Parameter(torch.randn(1, 2, 3)), coefficients=torch.ones(1), bias=None)
    args.update(kwargs)
    atoms, coefficients, bias = args.pop("atoms"), args.pop("coefficients"), args.pop("bias")
    with pytest.raises(WeightkitError, match=match):
        SharedLinear(atoms, coefficients, bias, **args)


def shared_llama() -> nn.Module:
    """A tiny Llama whose up projections share two atoms (scalar and per-channel coefficients, one LoRA)
    and whose gate projections share one atom (recursive-style, coefficient 1)."""
    model = tiny_llama(seed=1)
    torch.manual_seed(1)
    up_atoms = nn.Parameter(torch.stack([model.get_submodule(n).weight.detach() for n in UP]))
    share_linears(
        model,
        up_atoms,
        {UP[0]: torch.tensor([0.75, 0.25]), UP[1]: torch.rand(2, 64)},
        loras={UP[1]: (torch.randn(3, 32), torch.randn(64, 3))},
    )
    gate_atoms = nn.Parameter(model.get_submodule(GATE[0]).weight.detach()[None].clone())
    share_linears(model, gate_atoms, {name: torch.ones(1) for name in GATE})
    return model


def test_share_linears_keeps_each_layers_bias_and_refuses_what_it_cannot_share():
    model = tiny_gpt2()
    with pytest.raises(WeightkitError, match=r"transformer.h.0.attn.c_attn is a Conv1D, not an nn.Linear"):
        share_linears(
            model, nn.Parameter(torch.randn(1, 96, 32)), {"transformer.h.0.attn.c_attn": torch.ones(1)}
        )
    llama = tiny_llama()
    with pytest.raises(
        WeightkitError, match=r"model.layers.0.mlp.down_proj is \[32, 64\] but the atoms are \[64, 32\]"
    ):
        share_linears(
            llama, nn.Parameter(torch.randn(1, 64, 32)), {"model.layers.0.mlp.down_proj": torch.ones(1)}
        )
    with pytest.raises(WeightkitError, match="LoRA is given for model.layers.1.mlp.up_proj"):
        share_linears(
            llama,
            nn.Parameter(torch.randn(1, 64, 32)),
            {UP[0]: torch.ones(1)},
            loras={UP[1]: (torch.ones(1, 32), torch.ones(64, 1))},
        )
    with pytest.raises(WeightkitError, match=rf"{UP[0]}: SharedLinear's coefficients"):
        share_linears(llama, nn.Parameter(torch.randn(1, 64, 32)), {UP[0]: torch.ones(3)})
    bert_like = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 3))
    atoms = nn.Parameter(torch.randn(1, 3, 4))
    layers = share_linears(bert_like, atoms, {"0": torch.ones(1), "1": torch.ones(1)})
    assert torch.equal(layers["1"].bias, bert_like[1].bias) and layers["1"] is bert_like[1]


def test_save_and_load_are_bit_identical_with_atoms_stored_once_and_tied_again(tmp_path):
    model = shared_llama()
    with torch.no_grad():
        expected = model(IDS).logits
    save_quantized(model, tmp_path / "shared")
    stored = load_file(tmp_path / "shared/model.safetensors")
    config = json.loads((tmp_path / "shared/config.json").read_text())["quantization_config"]
    assert config["format"] == "shared" and config["atom_sets"] == [GATE[0], UP[0]]  # module order
    assert [k for k in stored if k.endswith("weight_atoms")] == sorted(
        [f"{UP[0]}.weight_atoms", f"{GATE[0]}.weight_atoms"]
    )
    assert stored[f"{UP[1]}.weight"].shape == (128,) and stored[f"{UP[0]}.weight"].shape == (2,)
    assert stored[f"{UP[1]}.weight_atom_set"].tolist() == [1] and stored[
        f"{GATE[1]}.weight_atom_set"
    ].tolist() == [0]

    loaded = load(tmp_path / "shared")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)
    assert loaded.get_submodule(UP[0]).atoms is loaded.get_submodule(UP[1]).atoms
    assert loaded.get_submodule(GATE[0]).atoms is loaded.get_submodule(GATE[1]).atoms
    assert loaded.get_submodule(UP[1]).coefficients.shape == (2, 64) and loaded.get_submodule(UP[1]).rank == 3
    for name in (*UP, *GATE):
        assert torch.equal(
            loaded.get_submodule(name).dense_weight(), model.get_submodule(name).dense_weight()
        )

    half = load(tmp_path / "shared", dtype=torch.bfloat16)
    assert half.get_submodule(UP[0]).atoms.dtype == torch.bfloat16
    assert half.get_submodule(UP[0]).atoms is half.get_submodule(UP[1]).atoms


def test_transformers_refuses_the_checkpoint_instead_of_loading_random_layers(tmp_path):
    save_quantized(shared_llama(), tmp_path / "shared")
    # transformers skips the unknown quant_method with a warning; the 1-D NAME.weight then stops it.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "shared")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared") / "model"
    save_quantized(shared_llama(), path)
    return path


def edited_copy(saved, tmp_path, edit):
    out = tmp_path / "edited"
    out.mkdir()
    for file in saved.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.update({f"{UP[1]}.weight_atom_set": torch.tensor([2])}),
            "expected one index into the 2",
        ),
        (
            lambda t: t.update({f"{UP[1]}.weight_atom_set": torch.tensor([1], dtype=torch.int32)}),
            "weight_atom_set is torch.int32",
        ),
        (lambda t: t.update({f"{UP[1]}.weight": torch.ones(7)}), "holds 7 coefficients, expected 2"),
        (lambda t: t.pop(f"{UP[0]}.weight_atoms"), f"{UP[0]}.weight_atoms is missing"),
        (
            lambda t: t.update({f"{UP[0]}.weight_atoms": torch.ones(2, 32, 64)}),
            r"up_proj is \[64, 32\] in the model but its atom set, model.layers.0.mlp.up_proj.weight_atoms, "
            r"holds atoms of shape \(2, 32, 64\)",
        ),
        (lambda t: t.pop(f"{UP[1]}.weight_lora_b"), "lora_a and lora_b go together"),
        (lambda t: t.update({f"{UP[1]}.weight_lora_a": torch.ones(3, 33)}), "do not fit a"),
        (lambda t: t.update({f"{UP[1]}.weight": torch.full((128,), float("nan"))}), "NaN"),
        (lambda t: t.update({f"{UP[1]}.bias": torch.ones(64)}), "disagree on whether the layer has a bias"),
        # The up projection's atoms are [64, 32]: the down projection [32, 64] cannot use them.
        (
            lambda t: t.update({"model.layers.0.mlp.down_proj.weight_atom_set": torch.tensor([1])}),
            r"down_proj is \[32, 64\] in the model but its atom set, model.layers.0.mlp.up_proj.weight_atoms",
        ),
    ],
)
def test_load_refuses_a_tampered_checkpoint_naming_the_tensor(saved, tmp_path, edit, match):
    with pytest.raises(WeightkitError, match=match):
        load(edited_copy(saved, tmp_path, edit))


def test_load_refuses_a_config_without_atom_sets(saved, tmp_path):
    out = edited_copy(saved, tmp_path, lambda t: None)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["atom_sets"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightkitError, match="needs atom_sets"):
        load(out)


def test_forward_runs_in_the_inputs_dtype():
    layer = SharedLinear(nn.Parameter(torch.randn(1, 3, 4)), torch.ones(1), torch.randn(3))
    x = torch.randn(2, 4, dtype=torch.float64)
    expected = F.linear(x, layer.dense_weight().double(), layer.bias.double())
    assert torch.equal(layer(x), expected)
