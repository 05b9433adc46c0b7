"""Issue 18, item 6: every output directory carries an integrity manifest (weightkit_manifest.json) whose
checksums are those of its files and inputs, and whose config reproduces the run."""

import ast
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import weightkit
import weightkit.checkpoint.manifest as manifest_module
from weightkit.checkpoint import CheckpointWriter, Provenance
from weightkit.checkpoint.manifest import (
    MANIFEST_NAME,
    check_inputs,
    check_outputs,
    read_manifest,
    sha256_file,
)
from weightkit.compress import GPTQConfig, RTNConfig, SVDConfig, compress_checkpoint
from weightkit.compress.prune.magnitude import MagnitudeConfig
from weightkit.errors import WeightkitError
from weightkit.registry import config_from_dict
from weightkit.runtime.training import TrainConfig
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SRC = Path(weightkit.__file__).parent
TRAIN = TrainConfig(max_steps=2, lr=1e-3, batch_size=2, max_length=32, seed=3)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_files(root: Path, *, hidden: bool = True) -> dict[str, dict]:
    """Every file under ``root`` but the manifest, hashed by hashlib here (the reference)."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (
            path.is_file()
            and rel != MANIFEST_NAME
            and (hidden or not any(p.startswith(".") for p in rel.split("/")))
        ):
            files[rel] = {"sha256": _sha256(path), "size": path.stat().st_size}
    return files


def _manifest(out: Path, verb: str, method: str, inputs: list[Path]) -> dict:
    """``out``'s manifest, checked against hashlib over the output's files and every input."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["weightkit_version"] == weightkit.__version__
    assert (manifest["verb"], manifest["method"]) == (verb, method)
    assert manifest["files"] == _expected_files(out)
    assert [item["path"] for item in manifest["inputs"]] == [os.path.abspath(p) for p in inputs]
    for item, path in zip(manifest["inputs"], inputs, strict=True):
        if path.is_dir():
            assert item["files"] == _expected_files(path, hidden=False)
        else:
            assert (item["sha256"], item["size"]) == (_sha256(path), path.stat().st_size)
    assert check_outputs(out, manifest) == [] and check_inputs(manifest, out) == []
    return manifest


@pytest.fixture(scope="module")
def tunes(llama_dir, tmp_path_factory) -> list[Path]:
    """Two fine-tunes of ``llama_dir`` (its weights plus seeded noise)."""
    root = tmp_path_factory.mktemp("tunes")
    out = []
    for seed in (1, 2):
        model = tiny_llama(seed=0)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        out.append(save_tiny(model, root / f"tune{seed}", tiny_tokenizer(128)))
    return out


# -- the manifest module ----------------------------------------------------------------------------------


def test_sha256_file_equals_hashlib_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "_CHUNK", 5)  # 23 bytes: four full chunks and a partial one
    for size in (0, 5, 23):
        path = tmp_path / f"f{size}"
        path.write_bytes(bytes(range(size)))
        assert sha256_file(path) == hashlib.sha256(bytes(range(size))).hexdigest()


def test_every_checkpoint_writer_in_weightkit_is_given_a_provenance():
    # close() writes the manifest only for a writer that knows what made its output: a call site that
    # forgot would publish a directory verify cannot check.
    missing = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            called = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "CheckpointWriter"
            if called and "provenance" not in {k.arg for k in node.keywords}:
                missing.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert missing == []


def test_a_writer_without_provenance_writes_no_manifest_and_copy_files_leaves_the_sources_out(tmp_path):
    source = tmp_path / "source"
    with CheckpointWriter(source, provenance=Provenance("test", "none")) as writer:
        writer.add("a", torch.ones(2))
        writer.write_json("config.json", {})
    assert (source / MANIFEST_NAME).is_file()
    with CheckpointWriter(tmp_path / "copy") as writer:
        writer.add("a", torch.ones(2))
        copied = writer.copy_files(source)
    assert copied == ["config.json"]  # the source's manifest describes the source
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["config.json", "model.safetensors"]


def test_an_input_gone_before_close_fails_the_write_and_publishes_nothing(tmp_path):
    provenance = Provenance("test", "none", {}, (tmp_path / "gone",))
    with (
        pytest.raises(WeightkitError, match="gone is neither a file nor a directory"),
        CheckpointWriter(tmp_path / "out", provenance=provenance) as writer,
    ):
        writer.add("a", torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_config_that_is_not_plain_json_is_refused_when_the_provenance_is_made():
    with pytest.raises(TypeError, match="not plain JSON"):
        Provenance("compress", "rtn", {"dtype": torch.float16})


# -- every verb's outputs ---------------------------------------------------------------------------------


def test_compress_rtn_manifest_hashes_and_config_round_trip_and_reproducible(llama_dir, tmp_path):
    config = RTNConfig(bits=4, group_size=16)
    out = compress_checkpoint(llama_dir, tmp_path / "out", config, progress=False)
    manifest = _manifest(out, "compress", "rtn", [llama_dir])
    assert config_from_dict("compress", manifest["config"]) == config
    first = (out / MANIFEST_NAME).read_bytes()
    compress_checkpoint(llama_dir, out, config, progress=False, overwrite=True)
    # No timestamp, no output path: the same run gives the same bytes (the reproducibility tests hash it).
    assert (out / MANIFEST_NAME).read_bytes() == first
    assert str(tmp_path) not in first.decode()


def test_compress_gptq_manifest_lists_the_calibration_file(llama_dir, text_file, tmp_path):
    config = GPTQConfig(bits=4, group_size=16, calib_samples=4, calib_max_length=32)
    out = compress_checkpoint(llama_dir, tmp_path / "out", config, text_file, progress=False)
    manifest = _manifest(out, "compress", "gptq", [llama_dir, text_file])
    assert config_from_dict("compress", manifest["config"]) == config


def test_compress_stages_manifest_records_every_stage_as_run(llama_dir, tmp_path):
    configs = [MagnitudeConfig(sparsity=0.5), GPTQConfig(bits=4, group_size=16, calib_samples=2)]
    out = compress_checkpoint(llama_dir, tmp_path / "out", configs, progress=False)
    manifest = _manifest(out, "compress", "magnitude + gptq", [llama_dir])
    stages = [config_from_dict("compress", stage) for stage in manifest["config"]["stages"]]
    # GPTQ after pruning runs with keep_zeros: the manifest holds what ran.
    assert stages == [configs[0], dataclasses.replace(configs[1], keep_zeros=True)]


def test_merge_manifest_is_a_recipe_that_reads_back_into_the_same_merge(llama_dir, tunes, tmp_path):
    from weightkit.merge import merge
    from weightkit.merge.recipe import merge_recipe_from_dict

    config = config_from_dict("merge", {"method": "ties", "density": 0.5})
    models = [tunes[0], {"model": str(tunes[1]), "parameters": {"weight": 0.3}}]
    out = tmp_path / "out"
    merge(llama_dir, models, config, out, dtype=torch.float16, progress=False)
    manifest = _manifest(out, "merge", "ties", [llama_dir, *tunes])
    recipe = merge_recipe_from_dict(manifest["config"])
    assert recipe.config == config and recipe.base == llama_dir and recipe.dtype == torch.float16
    assert recipe.models == [
        {"model": tunes[0], "parameters": {}},
        {"model": tunes[1], "parameters": {"weight": 0.3}},
    ]


def test_export_dense_manifest_describes_the_export_not_the_copied_source(llama_dir, tmp_path):
    from weightkit.quantized.dense import export_dense

    svd = compress_checkpoint(llama_dir, tmp_path / "svd", SVDConfig(ratio=0.5), progress=False)
    out = tmp_path / "dense"
    export_dense(svd, out)
    manifest = _manifest(out, "export", "dense", [svd])
    assert manifest["config"] == {}
    # The input's own manifest is bookkeeping about the input, not one of its files.
    assert MANIFEST_NAME not in manifest["inputs"][0]["files"]
    assert json.loads((svd / MANIFEST_NAME).read_text())["verb"] == "compress"


def test_adapt_manifest_holds_the_adapter_and_training_configs(llama_dir, text_file, tmp_path):
    from weightkit.adapt import LoRAConfig
    from weightkit.adapt.trainer import finetune

    adapter = LoRAConfig(rank=2, alpha=4, dropout=0.1)
    out = tmp_path / "adapter"
    finetune(llama_dir, adapter, out, TRAIN, data=text_file, progress=False)
    manifest = _manifest(out, "adapt", "lora", [llama_dir, text_file])
    assert config_from_dict("adapt", manifest["config"]["adapter"]) == adapter
    assert TrainConfig(**manifest["config"]["train"]) == TRAIN
    assert manifest["config"]["data"] == str(text_file)
    assert "adapter_model.safetensors" in manifest["files"]


def test_train_manifest_and_its_checkpoints_hash_the_inputs_once(llama_dir, text_file, tmp_path, monkeypatch):
    from weightkit.train.trainer import train_model

    hashed, input_record = [], manifest_module._input_record

    def counting(path, skip):
        hashed.append(path)
        return input_record(path, skip)

    monkeypatch.setattr(manifest_module, "_input_record", counting)
    train = dataclasses.replace(TRAIN, save_every=1)
    out = tmp_path / "trained"
    train_model(llama_dir, out, train, optimizer="adamw", data=text_file, progress=False)
    # A checkpoint after step 1, the output after step 2: the inputs are hashed for the first only.
    assert hashed == [str(llama_dir), str(text_file)]
    manifest = _manifest(out, "train", "adamw", [llama_dir, text_file])
    assert TrainConfig(**manifest["config"]["train"]) == train
    assert manifest["config"]["optimizer"] == "adamw"
    checkpoint = next((tmp_path / "trained-checkpoints").iterdir())
    _manifest(checkpoint, "train", "adamw", [llama_dir, text_file])  # checkpoints carry one too


def test_an_output_written_inside_its_input_is_not_an_input_file(tmp_path):
    model = save_tiny(tiny_llama(seed=0), tmp_path / "model", tiny_tokenizer(128))
    before = _expected_files(model, hidden=False)
    out = compress_checkpoint(model, model / "rtn", RTNConfig(bits=4, group_size=16), progress=False)
    manifest = read_manifest(out)
    assert manifest["inputs"][0]["files"] == before
    assert check_inputs(manifest, out) == []  # the output inside the input is not an added input file


def test_extract_lora_and_merge_adapter_manifests(llama_dir, tunes, tmp_path):
    from weightkit.adapt.merged_reader import merge_adapter_checkpoint
    from weightkit.merge.extract_lora import extract_lora

    adapter = tmp_path / "adapter"
    with pytest.warns(UserWarning, match="not in the adapter"):  # the noised norms and embeddings
        extract_lora(llama_dir, tunes[0], adapter, rank=2, modules_to_save="none", seed=4, progress=False)
    manifest = _manifest(adapter, "extract-lora", "lora", [llama_dir, tunes[0]])
    assert manifest["config"] == {
        "rank": 2,
        "modules_to_save": "none",
        "dtype": None,
        "svd": "auto",
        "seed": 4,
    }
    merged = tmp_path / "merged"
    merge_adapter_checkpoint(llama_dir, adapter, merged, progress=False)
    _manifest(merged, "merge-adapter", "lora", [llama_dir, adapter])
