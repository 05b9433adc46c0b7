"""``weightkit.merge``: configs and presets, per-model parameters, mergekit recipes, whole-model TIES trim."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightkit.errors import WeightkitError
from weightkit.merge import merge
from weightkit.merge.pcb import pcb_merge, pcb_model_stats
from weightkit.merge.recipe import load_merge_recipe
from weightkit.merge.sparsify import magnitude_prune, model_magnitude_thresholds, threshold_prune
from weightkit.registry import config_from_dict, config_to_dict
from weightkit.testing import save_tiny, tiny_llama

METHODS = [
    ("linear", {}),
    ("task_arithmetic", {}),
    ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.5}),
    ("breadcrumbs", {"density": 0.5}),
    ("breadcrumbs_ties", {"density": 0.5}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("della_linear", {"density": 0.5, "epsilon": 0.1}),
    ("model_stock", {}),
    ("pcb", {"density": 0.5}),
]


def _weights(directory):
    return load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and three 'fine-tunes' (base + small seeded deltas) of a tiny Llama."""
    root = tmp_path_factory.mktemp("models")
    base = save_tiny(tiny_llama(seed=0, tie_word_embeddings=False), root / "base")
    tuned = []
    for seed in (1, 2, 3):
        model = tiny_llama(seed=0, tie_word_embeddings=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        tuned.append(save_tiny(model, root / f"ft{seed}"))
    return base, tuned


@pytest.mark.parametrize(("method", "fields"), METHODS)
def test_merging_a_model_with_itself_returns_it(models, tmp_path, method, fields):
    base, tuned = models
    config = config_from_dict("merge", {"method": method, **fields})
    if method == "linear":
        merge(None, [tuned[0], tuned[0]], config, tmp_path / "out", progress=False)
        expected = _weights(tuned[0])
    else:
        # A copy of the base has zero task vectors: every task-vector method returns the base.
        copies = [
            save_tiny(tiny_llama(seed=0, tie_word_embeddings=False), tmp_path / f"copy{i}") for i in (1, 2)
        ]
        merge(
            base,
            copies if method in ("model_stock", "pcb") else copies[:1],
            config,
            tmp_path / "out",
            progress=False,
        )
        expected = _weights(base)
    merged = _weights(tmp_path / "out")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-7)


def test_task_arithmetic_with_weight_zero_returns_the_base(models, tmp_path):
    base, tuned = models
    config = config_from_dict("merge", {"method": "task_arithmetic", "weight": 0.0})
    merge(base, tuned, config, tmp_path / "out", progress=False)
    for name, tensor in _weights(base).items():
        torch.testing.assert_close(_weights(tmp_path / "out")[name], tensor, rtol=0, atol=0)


def test_per_model_weights_and_lambda_follow_the_formula(models, tmp_path):
    base, tuned = models
    config = config_from_dict("merge", {"method": "task_arithmetic", "scale": 0.5})
    entries = [
        {"model": tuned[0], "parameters": {"weight": 0.3}},
        {"model": tuned[1], "parameters": {"weight": 1.2}},
    ]
    merge(base, entries, config, tmp_path / "out", progress=False)
    wb, w0, w1, out = _weights(base), _weights(tuned[0]), _weights(tuned[1]), _weights(tmp_path / "out")
    for name in wb:
        expected = wb[name] + 0.5 * (0.3 * (w0[name] - wb[name]) + 1.2 * (w1[name] - wb[name]))
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)


def test_ties_differs_from_the_average_where_signs_conflict_and_reports_conflicts(models, tmp_path):
    base, tuned = models
    ties = merge(
        base,
        tuned,
        config_from_dict("merge", {"method": "ties", "density": 1.0}),
        tmp_path / "t",
        progress=False,
    )
    ta = config_from_dict("merge", {"method": "task_arithmetic", "normalize": True})
    merge(base, tuned, ta, tmp_path / "avg", progress=False)
    # Three independent Gaussian deltas: an entry has mixed signs with probability 3/4.
    assert 0.7 < ties["sign_conflict_rate"] < 0.8
    name = "model.layers.0.mlp.up_proj.weight"
    wb = _weights(base)[name]
    deltas = torch.stack([_weights(t)[name] - wb for t in tuned])
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = deltas.sign() == elected
    expected = wb + (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(_weights(tmp_path / "t")[name], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_weights(tmp_path / "t")[name], _weights(tmp_path / "avg")[name], atol=1e-4)


def test_dare_is_seeded_per_tensor(models, tmp_path):
    base, tuned = models
    runs = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        config = config_from_dict("merge", {"method": "dare_ties", "density": 0.3, "seed": seed})
        merge(base, tuned, config, tmp_path / label, progress=False)
        runs[label] = _weights(tmp_path / label)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(runs["a"][name], runs["b"][name])
    assert not torch.equal(runs["a"][name], runs["c"][name])


def test_whole_model_thresholds_equal_a_top_k_over_the_concatenated_task_vector():
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(shape, generator=generator) * scale
        for shape, scale in [((40, 30), 1.0), ((500,), 3.0), ((7, 9), 0.1)]
    ]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    for density in (0.05, 0.3, 0.9):
        (threshold,) = model_magnitude_thresholds(lambda: ([t] for t in tensors), [density])
        k = int(density * flat.numel())
        assert threshold == float(flat.abs().topk(k).values[-1])
        kept = sum(int(torch.count_nonzero(threshold_prune(t, threshold))) for t in tensors)
        assert kept == k
    # Per-tensor trim keeps density of every tensor; whole-model trim favours the large-magnitude tensor.
    (threshold,) = model_magnitude_thresholds(lambda: ([t] for t in tensors), [0.3])
    assert torch.count_nonzero(threshold_prune(tensors[1], threshold)) > torch.count_nonzero(
        magnitude_prune(tensors[1], 0.3)
    )
    assert torch.count_nonzero(threshold_prune(tensors[2], threshold)) == 0


def test_ties_model_scope_merges(models, tmp_path):
    base, tuned = models
    config = config_from_dict("merge", {"method": "ties", "density": 0.4, "scope": "model"})
    summary = merge(base, tuned, config, tmp_path / "out", progress=False)
    assert summary["tensors"] == len(_weights(base))
    wb, out = _weights(base), _weights(tmp_path / "out")
    changed = sum(int(torch.count_nonzero(out[n] != wb[n])) for n in wb)
    total = sum(t.numel() for t in wb.values())
    # Each model keeps 40% of its entries; the union over three models covers 1 - 0.6^3 = 78% at most.
    assert 0.4 <= changed / total <= 0.79


def test_pcb_whole_model_scope_through_the_engine_equals_the_pure_function(models, tmp_path):
    base, tuned = models
    config = config_from_dict("merge", {"method": "pcb", "density": 0.3, "scope": "model", "scale": 0.8})
    merge(base, tuned[:2], config, tmp_path / "out", progress=False)
    wb, w = _weights(base), [_weights(t) for t in tuned[:2]]
    names = list(wb)
    stats = pcb_model_stats(lambda: ([m[n] - wb[n] for m in w] for n in names), n_models=2, ratio=0.3)
    out = _weights(tmp_path / "out")
    for name in names:
        expected = pcb_merge(wb[name], [m[name] - wb[name] for m in w], ratio=0.3, scale=0.8, stats=stats)
        torch.testing.assert_close(out[name], expected)


def test_configs_round_trip_and_presets_set_mergekit_defaults():
    ties = config_from_dict("merge", {"method": "ties", "density": 0.5})
    assert ties.normalize and ties.sign_consensus and ties.sparsify == "magnitude"
    dare = config_from_dict("merge", {"method": "dare_linear"})
    assert dare.rescale and not dare.normalize and not dare.sign_consensus
    for config in (ties, dare, config_from_dict("merge", {"method": "della", "epsilon": 0.05})):
        data = config_to_dict(config)
        assert config_from_dict("merge", data) == config
    assert config_to_dict(dare)["method"] == "dare_linear"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "ties", "density": 0.0}, r"density must be in \(0, 1\]"),
        ({"method": "ties", "density": 1.5}, r"density must be in \(0, 1\]"),
        ({"method": "ties", "density": [0.2, 1.2]}, r"density must be in \(0, 1\]"),
        ({"method": "ties", "rescale": True}, "rescale applies to random"),
        ({"method": "tie"}, "Did you mean 'ties'"),
        ({"method": "ties", "densty": 0.5}, "Did you mean 'density'"),
    ],
)
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(WeightkitError, match=message):
        config_from_dict("merge", fields)


def test_bad_merges_are_refused_and_write_nothing(models, tmp_path):
    base, tuned = models
    out = tmp_path / "out"
    linear = config_from_dict("merge", {"method": "linear"})
    zero_sum = [
        {"model": tuned[0], "parameters": {"weight": 1.0}},
        {"model": tuned[1], "parameters": {"weight": -1.0}},
    ]
    with pytest.raises(WeightkitError, match="sum to zero"):
        merge(None, zero_sum, linear, out, progress=False)
    with pytest.raises(WeightkitError, match="does not use a base model"):
        merge(base, tuned, linear, out, progress=False)
    with pytest.raises(WeightkitError, match=r"slerp merges exactly 1 model"):
        merge(base, tuned[:2], config_from_dict("merge", {"method": "slerp", "t": 0.5}), out, progress=False)
    with pytest.raises(WeightkitError, match="needs a base|base model"):
        merge(None, tuned, config_from_dict("merge", {"method": "ties"}), out, progress=False)
    bad_density = [{"model": tuned[0], "parameters": {"density": 2}}]
    with pytest.raises(WeightkitError, match=r"ft1: density must be in"):
        merge(base, bad_density, config_from_dict("merge", {"method": "ties"}), out, progress=False)
    with pytest.raises(WeightkitError, match="unknown parameter"):
        merge(
            base,
            [{"model": tuned[0], "parameters": {"t": 0.5}}],
            config_from_dict("merge", {"method": "ties"}),
            out,
            progress=False,
        )
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(WeightkitError, match="exists"):
        merge(base, tuned, config_from_dict("merge", {"method": "ties"}), out, progress=False)
    merge(base, tuned, config_from_dict("merge", {"method": "ties"}), out, progress=False, overwrite=True)
    assert (out / "model.safetensors").is_file()


def test_nan_in_a_model_stops_the_merge_and_leaves_nothing(models, tmp_path):
    base, tuned = models
    broken = save_tiny(tiny_llama(seed=0, tie_word_embeddings=False), tmp_path / "broken")
    weights = _weights(broken)
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightkitError, match="model.norm.weight"):
        merge(
            base,
            [tuned[0], broken],
            config_from_dict("merge", {"method": "ties"}),
            tmp_path / "out",
            progress=False,
        )
    assert not (tmp_path / "out").exists()


MERGEKIT_RECIPE = """\
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {ft1}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {ft2}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 0.3
base_model: {base}
merge_method: ties
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_a_mergekit_recipe_runs_unchanged(models, tmp_path):
    base, tuned = models
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(MERGEKIT_RECIPE.format(base=base, ft1=tuned[0], ft2=tuned[1]))
    recipe = load_merge_recipe(recipe_file)
    assert recipe.dtype == torch.float16 and recipe.config.normalize
    summary = merge(
        recipe.base, recipe.models, recipe.config, tmp_path / "out", dtype=recipe.dtype, progress=False
    )
    assert summary["method"] == "ties" and summary["models"] == [str(tuned[0]), str(tuned[1])]
    out, wb, w1, w2 = _weights(tmp_path / "out"), _weights(base), _weights(tuned[0]), _weights(tuned[1])
    # Layer 0 of 2: ft2's density gradient gives it density 1 there (no trim); ft1 keeps half.
    name = "model.layers.0.self_attn.o_proj.weight"
    d1 = magnitude_prune(w1[name] - wb[name], 0.5) * 0.5
    d2 = (w2[name] - wb[name]) * 0.3
    stacked = torch.stack([d1, d2])
    elected = stacked.sum(0) >= 0
    agree = torch.where(elected, stacked > 0, stacked < 0)
    weights = torch.tensor([0.5, 0.3]).view(2, 1, 1)
    expected = wb[name] + (stacked * agree).sum(0) / (weights * agree).sum(0).masked_fill(
        (weights * agree).sum(0) == 0, 1
    )
    assert out[name].dtype == torch.float16
    torch.testing.assert_close(out[name], expected.half())


def test_recipe_errors_name_the_field(models, tmp_path):
    base, tuned = models
    head = f"merge_method: ties\nmodels: [{{model: {tuned[0]}}}]\nbase_model: {base}\n"
    cases = {
        head.replace(str(tuned[0]), "/does/not/exist"): "not a local directory",
        head + "tokenizer_source: union": "union",
        head + "dtype: int4": "dtype",
        head.replace("base_model", "base_modle"): "unknown key",
        f"merge_method: linear\nmodels: [{{model: {tuned[0]}}}]\nslices: []": "exactly one of",
    }
    for text, message in cases.items():
        path = tmp_path / "r.yml"
        path.write_text(text)
        with pytest.raises(WeightkitError, match=message):
            load_merge_recipe(path)


def test_fisher_merge_through_the_engine_reads_each_models_fisher_file(models, tmp_path):
    from weightkit.merge.fisher import fisher_merge
    from weightkit.merge.fisher_file import save_fisher

    _, tuned = models
    weights = [_weights(t) for t in tuned[:2]]
    generator = torch.Generator().manual_seed(0)
    fishers = [{n: torch.rand(t.shape, generator=generator) for n, t in w.items()} for w in weights]
    files = [save_fisher(f, tmp_path / f"f{i}.safetensors") for i, f in enumerate(fishers)]
    entries = [
        {"model": tuned[0], "parameters": {"fisher": str(files[0])}},
        {"model": tuned[1], "parameters": {"fisher": str(files[1]), "weight": 3.0}},
    ]
    merge(None, entries, config_from_dict("merge", {"method": "fisher"}), tmp_path / "out", progress=False)
    out = _weights(tmp_path / "out")
    for name in out:
        expected = fisher_merge([w[name] for w in weights], [f[name] for f in fishers], [1.0, 3.0])
        torch.testing.assert_close(out[name], expected)
    del fishers[1]["model.norm.weight"]
    save_fisher(fishers[1], tmp_path / "partial.safetensors")
    entries[1]["parameters"]["fisher"] = str(tmp_path / "partial.safetensors")
    with pytest.raises(WeightkitError, match=r"lacks 1 tensor\(s\) of the model, e.g. model.norm.weight"):
        merge(
            None, entries, config_from_dict("merge", {"method": "fisher"}), tmp_path / "out2", progress=False
        )
    with pytest.raises(WeightkitError, match="needs a 'fisher' file"):
        merge(
            None,
            tuned[:2],
            config_from_dict("merge", {"method": "fisher"}),
            tmp_path / "out2",
            progress=False,
        )


def test_mwa_recipe_weighs_checkpoints_by_their_loss(models, tmp_path):
    from weightkit.merge.mwa import mwa_weights

    _, tuned = models
    recipe_file = tmp_path / "mwa.yml"
    recipe_file.write_text(
        f"models:\n  - {{model: {tuned[0]}, parameters: {{metric: 2.0}}}}\n"
        f"  - {{model: {tuned[1]}, parameters: {{metric: 0.5}}}}\n"
        "merge_method: mwa\nparameters: {kind: loss, penalty: 2.0}\n"
    )
    recipe = load_merge_recipe(recipe_file)
    merge(recipe.base, recipe.models, recipe.config, tmp_path / "out", progress=False)
    w = mwa_weights([2.0, 0.5], kind="loss", penalty=2.0)
    assert w[1] > w[0]
    out, w0, w1 = _weights(tmp_path / "out"), _weights(tuned[0]), _weights(tuned[1])
    for name in out:
        torch.testing.assert_close(out[name], w[0] * w0[name] + w[1] * w1[name])
    recipe_file.write_text(recipe_file.read_text().replace("{metric: 0.5}", "{}"))
    recipe = load_merge_recipe(recipe_file)
    with pytest.raises(WeightkitError, match="every model needs its metric"):
        merge(recipe.base, recipe.models, recipe.config, tmp_path / "out2", progress=False)


def test_a_full_disk_stops_the_merge_with_a_clear_message_and_leaves_nothing(models, tmp_path, monkeypatch):
    import errno

    import weightkit.checkpoint.writer as writer

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_save_safetensors", no_space)
    base, tuned = models
    with pytest.raises(WeightkitError, match="No space left on device. Nothing was written"):
        merge(base, tuned, config_from_dict("merge", {"method": "ties"}), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_merge_leaves_only_its_resumable_state(models, tmp_path, monkeypatch):
    """Ctrl-C leaves nothing that looks like a model: only OUT.partial (its finished shards, for --resume),
    which holds no config.json."""
    import weightkit.merge.task_arithmetic as ta

    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = ta.task_arithmetic
    monkeypatch.setattr(ta, "task_arithmetic", interrupt)
    base, tuned = models
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge(
            base, tuned, config_from_dict("merge", {"method": "ties"}), out, progress=False, max_shard_bytes=1
        )
    assert len(calls) == 5 and [p.name for p in tmp_path.iterdir()] == ["out.partial"]
    assert not (tmp_path / "out.partial" / "config.json").exists()


# -- devices ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a spy once it has seen what it looks for."""


# Heavy per-tensor work (sparsifiers, PCB) runs on the device asked; weighted sums stay on the CPU.
@pytest.mark.parametrize(
    ("method", "fields", "where"),
    [
        ("ties", {"density": 0.5}, "meta"),
        ("dare_ties", {"density": 0.5}, "meta"),
        ("della", {"density": 0.5, "epsilon": 0.1}, "meta"),
        ("pcb", {"density": 0.5}, "meta"),
        ("task_arithmetic", {}, "cpu"),
        ("linear", {}, "cpu"),
        ("model_stock", {}, "cpu"),
    ],
)
def test_merge_reads_and_merges_on_the_device_of_heavy_methods_only(
    models, tmp_path, monkeypatch, method, fields, where
):
    from weightkit.checkpoint import CheckpointReader

    seen = []

    def spy(self, name, out):
        seen.append(out.device.type)
        raise _Stop

    monkeypatch.setattr(CheckpointReader, "read_into", spy)
    base, tuned = models
    config = config_from_dict("merge", {"method": method, **fields})
    with pytest.raises(_Stop):
        merge(
            None if method == "linear" else base,
            tuned,
            config,
            tmp_path / "out",
            progress=False,
            device="meta",
        )
    assert seen == [where]
    assert not (tmp_path / "out").exists()


def test_merge_reports_its_device_and_defaults_to_the_best_one(models, tmp_path):
    base, tuned = models
    summary = merge(
        base, tuned, config_from_dict("merge", {"method": "ties"}), tmp_path / "o", progress=False
    )
    assert summary["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    linear = merge(
        None, tuned, config_from_dict("merge", {"method": "linear"}), tmp_path / "l", progress=False
    )
    assert linear["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a missing GPU")
@pytest.mark.parametrize("method", ["ties", "linear"])
def test_a_missing_device_is_refused_even_for_a_method_that_stays_on_the_cpu(models, tmp_path, method):
    base, tuned = models
    config = config_from_dict("merge", {"method": method})
    with pytest.raises(WeightkitError, match="--device cuda: this machine has no CUDA GPU"):
        merge(
            None if method == "linear" else base, tuned, config, tmp_path / "o", progress=False, device="cuda"
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("method", "fields"), [("ties", {"density": 0.5}), ("pcb", {"density": 0.5})])
def test_merging_on_cuda_matches_the_cpu(models, tmp_path, method, fields):
    base, tuned = models
    config = config_from_dict("merge", {"method": method, **fields})
    on_gpu = merge(base, tuned, config, tmp_path / "gpu", progress=False, device="cuda")
    merge(base, tuned, config, tmp_path / "cpu", progress=False, device="cpu")
    assert on_gpu["device"].startswith("cuda")
    gpu, cpu = _weights(tmp_path / "gpu"), _weights(tmp_path / "cpu")
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-6)


# -- NaN/Inf checks of weighted sums -----------------------------------------------------------------------


def _broken_copy(tmp_path, value):
    """A copy of the base with one non-finite entry in an MLP weight."""
    broken = save_tiny(tiny_llama(seed=0, tie_word_embeddings=False), tmp_path / "broken")
    weights = _weights(broken)
    weights["model.layers.1.mlp.up_proj.weight"][2, 3] = value
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


# Weighted sums and SLERP check only their result (every NaN/Inf of an input reaches it); an input's NaN or
# Inf, even under a zero weight or in the base, must still be refused with the input named.
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    ("method", "role"),
    [
        ("linear", "model"),
        ("task_arithmetic", "model"),
        ("task_arithmetic", "base"),
        ("slerp", "model"),
        ("slerp", "base"),
    ],
)
def test_a_non_finite_input_of_a_weighted_sum_is_named(models, tmp_path, value, method, role):
    base, tuned = models
    broken = _broken_copy(tmp_path, value)
    zero = {"model": broken, "parameters": {"weight": 0.0}}
    if method == "slerp":  # one model besides the base
        base_dir, entries = (broken, [tuned[0]]) if role == "base" else (base, [broken])
    elif role == "base":
        base_dir, entries = broken, tuned
    else:
        base_dir, entries = (None if method == "linear" else base), [tuned[0], zero, tuned[1]]
    with pytest.raises(
        WeightkitError, match=r"model.layers.1.mlp.up_proj.weight of .*broken contains 1 NaN/Inf"
    ):
        config = config_from_dict("merge", {"method": method, **({"t": 0.5} if method == "slerp" else {})})
        merge(base_dir, entries, config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_weighted_sums_check_their_results_and_the_others_their_inputs(models, tmp_path, monkeypatch):
    import weightkit.merge.engine as engine

    checked = []
    real = engine.require_finite
    monkeypatch.setattr(engine, "require_finite", lambda t, name: (checked.append(name), real(t, name)))
    base, tuned = models
    merge(
        base, tuned, config_from_dict("merge", {"method": "task_arithmetic"}), tmp_path / "ta", progress=False
    )
    assert checked and all(name.endswith("(merged)") for name in checked)
    checked.clear()
    merge(base, tuned, config_from_dict("merge", {"method": "ties"}), tmp_path / "ties", progress=False)
    assert any(name.endswith(f"of {base}") for name in checked)


# -- mergekit parity: where gradients put each tensor ------------------------------------------------------


def _weights_used(base, tuned, out):
    """Per tensor, the weight task arithmetic gave the fine-tune: (out - base) / (tuned - base)."""
    b, t, o = _weights(base), _weights(tuned), _weights(out)
    used = {}
    for name, delta in ((n, t[n].double() - b[n].double()) for n in o):
        moved = delta.abs() > 1e-3
        used[name] = float(((o[name].double() - b[name].double())[moved] / delta[moved]).median())
    return used


def test_a_gradient_gives_tensors_outside_the_layers_its_first_value(models, tmp_path):
    base, tuned = models
    config = config_from_dict("merge", {"method": "task_arithmetic"})
    spec = {"model": tuned[0], "parameters": {"weight": [0.1, 0.9]}}
    merge(base, [spec], config, tmp_path / "out", progress=False)
    used = _weights_used(base, tuned[0], tmp_path / "out")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert used[name] == pytest.approx(0.1, abs=1e-3), name
    assert used["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.1, abs=1e-3)
    assert used["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.9, abs=1e-3)


def test_gpt2_gradients_span_its_n_layer_layers(tmp_path):
    # GPT-2 configs call the layer count n_layer: the gradient ran 0.3, 0.7, 1.1, 1.5 over 4 layers.
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(seed):
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=64, vocab_size=96)
        return save_tiny(GPT2LMHeadModel(config).eval(), tmp_path / f"gpt2-{seed}")

    base, tuned = gpt2(0), gpt2(1)
    config = config_from_dict("merge", {"method": "task_arithmetic"})
    merge(
        base,
        [{"model": tuned, "parameters": {"weight": [0.3, 0.7]}}],
        config,
        tmp_path / "out",
        progress=False,
    )
    used = _weights_used(base, tuned, tmp_path / "out")
    got = [used[f"transformer.h.{i}.mlp.c_fc.weight"] for i in range(4)]
    assert got == pytest.approx([0.3, 0.3 + 0.4 / 3, 0.3 + 0.8 / 3, 0.7], abs=1e-3)
    assert used["transformer.wte.weight"] == pytest.approx(0.3, abs=1e-3)


CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
PLAIN = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def test_a_recipes_chat_template_is_written_into_the_output_tokenizer(tmp_path):
    # mergekit writes it into the tokenizer it saves; weightkit refused the key before.
    from weightkit.merge.recipe import merge_recipe_from_dict
    from weightkit.models import load_tokenizer
    from weightkit.testing import tiny_tokenizer

    for name, template in (("a", PLAIN), ("b", CHATML), ("c", CHATML), ("bare", None)):
        tokenizer = tiny_tokenizer()
        tokenizer.chat_template = template
        save_tiny(tiny_llama(seed=len(name)), tmp_path / name, tokenizer if name != "bare" else None)

    def run(chat_template, models=("a", "b", "c"), out="out"):
        doc = {
            "models": [{"model": m} for m in models],
            "merge_method": "linear",
            "chat_template": chat_template,
        }
        recipe = merge_recipe_from_dict(doc, relative_to=tmp_path)
        merge(recipe.base, recipe.models, recipe.config, tmp_path / out, progress=False,
              chat_template=recipe.chat_template)  # fmt: skip
        return load_tokenizer(tmp_path / out).chat_template

    assert run(PLAIN + " ") == PLAIN + " "  # a template's text, as given
    assert run("auto", out="auto") == CHATML  # the most common among the models (b and c), not the first's
    with pytest.raises(WeightkitError, match="'chatml' names a template mergekit ships"):
        run("chatml", out="named")
    with pytest.raises(WeightkitError, match="has no tokenizer to write the template into"):
        run(PLAIN, models=("bare", "a"), out="bare-out")
    assert not (tmp_path / "named").exists() and not (tmp_path / "bare-out").exists()
