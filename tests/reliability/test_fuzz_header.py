"""Issue 18, item 2: fuzzed safetensors files are read exactly or refused with weightkit's own error.

Property tests (hypothesis) over whole files: arbitrary bytes, and headers built field by field with valid
and invalid dtypes, shapes (negative, huge), data offsets (overlapping, out of range, gaps), metadata,
tensor names (lone surrogates, duplicates) and length fields. A file is either refused by
``read_safetensors_header`` with a ``WeightkitError`` naming it, or read by ``CheckpointReader`` tensor by
tensor with exactly the dtype, shape and bytes the header promised. Parsing never allocates much more than
the header itself. Settings (derandomized, ``WEIGHTKIT_FUZZ_EXAMPLES``) are in tests/conftest.py.
"""

import json
import math
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from weightkit.checkpoint import CheckpointReader
from weightkit.checkpoint.header import SAFETENSORS_DTYPES, read_safetensors_header
from weightkit.errors import WeightkitError

# Any JSON value: what a hostile header may put where a dtype, shape, offset pair or metadata belongs.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
# Names a header may hold: ordinary ones, and strings Python's json accepts but that are no UTF-8 text.
NAMES = st.text(max_size=6) | st.sampled_from(["\ud800", "a\udfff", "__metadata__", ""])
DTYPES = st.sampled_from(sorted(SAFETENSORS_DTYPES)) | JSON_VALUES
DIMS = st.integers(0, 4) | st.integers(-3, -1) | st.integers(2**31, 2**70) | st.just(2**64)
SHAPES = st.lists(DIMS, max_size=3) | JSON_VALUES


def _dtype_size(code) -> int | None:
    return SAFETENSORS_DTYPES[code].itemsize if isinstance(code, str) and code in SAFETENSORS_DTYPES else None


@st.composite
def safetensors_files(draw) -> bytes:
    """A file built field by field; each field is right (consistent with the others) or drawn at random."""
    entries, cursor = [], 0
    for _ in range(draw(st.integers(0, 3))):
        name, dtype, shape = draw(NAMES), draw(DTYPES), draw(SHAPES)
        size = _dtype_size(dtype)
        nbytes = None
        if size and isinstance(shape, list) and all(type(d) is int for d in shape):
            nbytes = math.prod(shape) * size
        if nbytes is not None and 0 <= nbytes <= 64 and draw(st.booleans()):
            offsets = [cursor, cursor + nbytes]  # where a valid file puts it
        else:
            offsets = draw(
                st.lists(st.integers(-2, 80) | st.just(2**64), min_size=2, max_size=2) | JSON_VALUES
            )
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 9)) == 0:
            entry[draw(st.text(max_size=3))] = draw(JSON_VALUES)  # a field safetensors does not define
        entries.append((name, entry))
        if isinstance(offsets, list) and len(offsets) == 2 and type(offsets[1]) is int and offsets[1] < 2**20:
            cursor = max(cursor, offsets[1])
    if draw(st.booleans()):
        metadata = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2) | JSON_VALUES)
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", metadata))
    # Written pair by pair, so a name may occur twice (json.dumps of a dict could not say that).
    header = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries) + "}").encode()
    header += b" " * draw(st.integers(0, 7))  # safetensors pads the header with spaces to 8 bytes
    length = len(header) + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 2**63, -len(header)]))
    data = draw(st.binary(min_size=cursor, max_size=cursor)) + draw(st.sampled_from([b"", b"", b"x"]))
    if draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(0, len(data)))]  # truncated
    return max(length, 0).to_bytes(8, "little", signed=False)[:8] + header + data


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-header") / "model.safetensors"


def _read_or_refuse(path: Path, content: bytes) -> None:
    """The property: refused by name with ``WeightkitError``, or every tensor reads back exactly."""
    path.write_bytes(content)
    tracemalloc.start()
    try:
        tensors, _ = read_safetensors_header(path)
    except WeightkitError as err:
        assert str(path) in str(err)
        return
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # The header is parsed in a few copies at most; nothing sized by a length or shape in it.
        assert peak < 20 * len(content) + 200_000
    with CheckpointReader(path) as reader:
        assert reader.names() == list(tensors)
        for name, info in tensors.items():
            tensor = reader.get(name)
            assert tensor.dtype == info.dtype and tuple(tensor.shape) == info.shape
            stored = content[info.start : info.end]
            assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == stored


@given(content=st.binary(max_size=300))
def test_arbitrary_bytes_are_read_or_refused(work, content):
    _read_or_refuse(work, content)


@given(content=safetensors_files())
def test_fuzzed_headers_are_read_exactly_or_refused(work, content):
    _read_or_refuse(work, content)


@st.composite
def valid_tensors(draw) -> dict[str, torch.Tensor]:
    codes = st.sampled_from(sorted(SAFETENSORS_DTYPES))
    tensors = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=4)):
        dtype = SAFETENSORS_DTYPES[draw(codes)]
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * dtype.itemsize
        raw = torch.tensor(list(draw(st.binary(min_size=nbytes, max_size=nbytes))), dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


@given(tensors=valid_tensors())
def test_every_valid_file_parses_as_safetensors_reads_it(work, tensors):
    """No false alarm: a file written by safetensors itself parses, and agrees with safetensors' reader."""
    from safetensors.torch import save_file

    save_file(tensors, work, metadata={"format": "pt"})
    parsed, metadata = read_safetensors_header(work)
    assert metadata == {"format": "pt"}
    with safe_open(work, framework="pt") as reference:
        assert sorted(parsed) == sorted(reference.keys())
        for name, info in parsed.items():
            expected = reference.get_tensor(name)
            assert (info.dtype, info.shape) == (expected.dtype, tuple(expected.shape))
            assert info.nbytes == expected.numel() * expected.element_size()


# -- regression tests for what the fuzzing found -----------------------------------------------------------

_F32 = '"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ('{"w": {"dtype": [0, 0], "shape": [], "data_offsets": [0, 0]}}', "unsupported dtype \\[0, 0\\]"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"w": {"dtype": "F32", "shape": [' + "1" * 5000 + '], "data_offsets": [0, 4]}}', "not valid JSON"),
        ('{"w": {' + _F32 + ', "x": NaN}}', "NaN is not a JSON number"),
        ('{"w": {' + _F32 + ', "x": 1e999}}', "the number 1e999 is out of range"),
        ('{"\\ud800": {' + _F32 + "}}", "not valid JSON"),
        ('{"w": {' + _F32 + '}, "__metadata__": {"k": "\\udfff"}}', "not valid JSON"),
        ('{"w": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', "invalid shape"),
        ('{"w": {"dtype": "F32", "shape": [4611686018427387904, 4, 0], "data_offsets": [0, 0]}}',
         "overflows 64 bits"),
        ('{"w": {"dtype": "F32", "shape": [0, ' + f"{2**64}" + '], "data_offsets": [0, 0]}}',
         "overflows 64 bits"),
        ('{"w": {"dtype": "F32", "shape": [0], "data_offsets": [' + f"{2**64}, {2**64}" + "]}}",
         "invalid data_offsets"),
        ('{"w": {' + _F32 + '}, "__metadata__": 0}', "__metadata__ must map strings to strings"),
    ],
    ids=["unhashable-dtype", "deep", "huge-int", "nan", "float-overflow", "surrogate-name",
         "surrogate-metadata", "minus-zero", "size-overflow", "dim-overflow", "offset-overflow",
         "metadata-zero"],
)  # fmt: skip
def test_what_safetensors_would_refuse_is_refused_by_name(tmp_path, header, message):
    """Before the fixes: a TypeError (a list as dtype), RecursionError, ValueError (an int of 5000 digits), or
    a header passed here that safetensors then refused while reading (NaN, 1e999, lone surrogates, -0,
    sizes, dimensions or offsets beyond 64 bits: the last found by atheris), or metadata 0 read as none."""
    path = tmp_path / "bad.safetensors"
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(WeightkitError, match=message) as err:
        read_safetensors_header(path)
    assert str(path) in str(err.value)
