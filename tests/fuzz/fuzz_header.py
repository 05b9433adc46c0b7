"""Coverage-guided fuzzing (atheris) of the safetensors header parser and the checkpoint reader.

An input is the header JSON followed by the data section, split after the input's last ``}``: the target
writes the 8-byte length field itself, so mutations of the JSON reach the parser instead of mostly breaking
the length. An input starting with ``RAW`` is written as the whole file, length field included, to fuzz that
too. ``read_safetensors_header`` must return a valid header or raise ``WeightkitError``; a file whose header
passed must then open in ``CheckpointReader`` and give every tensor with the dtype and shape the header
promised. Anything else (another exception, a hang past libFuzzer's
``-timeout``, memory past ``-rss_limit_mb``) is a finding. Run through ``run.sh``.
"""

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["weightkit"]):
    import torch
    from safetensors.torch import save_file

    from weightkit.checkpoint import CheckpointReader
    from weightkit.checkpoint.header import read_safetensors_header
    from weightkit.errors import WeightkitError

_FILE = Path(tempfile.mkdtemp(prefix="fuzz-header-")) / "model.safetensors"


def safetensors_file(data: bytes) -> bytes:
    """The file an input stands for (see the module docstring)."""
    if data.startswith(b"RAW"):
        return data[3:]
    header_length = data.rfind(b"}") + 1
    return header_length.to_bytes(8, "little") + data


def seed_corpus(corpus: Path) -> None:
    """Valid files for libFuzzer to mutate (as inputs: without the length field), several dtypes, an empty
    tensor, metadata."""
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.bfloat16),
        "c": torch.zeros(0, 5, dtype=torch.int8),
        "d": torch.tensor([True, False]),
    }
    for i, name in enumerate(tensors):
        save_file({name: tensors[name]}, corpus / f"seed{i}")
    save_file(tensors, corpus / "seed-all", metadata={"format": "pt", "k": "v"})
    for seed in list(corpus.iterdir()):
        valid = seed.read_bytes()
        (corpus / f"{seed.name}-raw").write_bytes(b"RAW" + valid)
        seed.write_bytes(valid[8:])


def test_one_input(data: bytes) -> None:
    _FILE.write_bytes(safetensors_file(data))
    try:
        tensors, _ = read_safetensors_header(_FILE)
    except WeightkitError:
        return
    with CheckpointReader(_FILE) as reader:
        for name, info in tensors.items():
            tensor = reader.get(name)
            if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
                raise AssertionError(
                    f"{name}: header says {info.dtype} {info.shape}, read {tensor.dtype} "
                    f"{tuple(tensor.shape)}"
                )


if __name__ == "__main__":
    from fuzz_common import prepare

    atheris.Setup(prepare(sys.argv, seed_corpus), test_one_input)
    atheris.Fuzz()
