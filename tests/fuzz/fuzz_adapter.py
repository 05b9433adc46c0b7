"""Coverage-guided fuzzing (atheris) of the readers of PEFT's ``adapter_config.json``.

A tiny Llama and a LoRA adapter for it (rank 2 on q_proj and v_proj) are saved once; each input replaces the
adapter's ``adapter_config.json`` and goes through the three readers: ``weightkit inspect``'s
``adapter_metrics``, merge's ``model+adapter`` reader (``LoRAMergedReader``) and ``load_adapter`` (into a
fresh copy of the model). Each must succeed or raise ``WeightkitError``; anything else is a finding. Run
through ``run.sh``.
"""

import contextlib
import copy
import json
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["weightkit"]):
    import torch

    from weightkit.adapt import LoRAConfig, LoRAMergedReader, adapt, load_adapter, save_adapter
    from weightkit.errors import WeightkitError
    from weightkit.inspect.adapter import adapter_metrics
    from weightkit.testing import save_tiny, tiny_llama

_DIR = Path(tempfile.mkdtemp(prefix="fuzz-adapter-"))
_MODEL = tiny_llama()
_MODEL_DIR = save_tiny(_MODEL, _DIR / "model")
_ADAPTER_DIR = _DIR / "adapter"
_adapted = adapt(tiny_llama(), LoRAConfig(rank=2, alpha=4, targets=["re:.*(q|v)_proj"]))
with torch.no_grad():  # non-zero B, so the adapter changes the weights
    for name, parameter in _adapted.named_parameters():
        if "lora_B" in name:
            parameter.normal_()
save_adapter(_adapted, _ADAPTER_DIR)
_SAVED = json.loads((_ADAPTER_DIR / "adapter_config.json").read_text())


def seed_corpus(corpus: Path) -> None:
    variants = [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"re:.*v_proj": 8.0}},
        {"init_lora_weights": "gaussian", "lora_dropout": 0.1, "bias": "none"},
        {"peft_type": "BONE"},
        {"exclude_modules": ["v_proj"], "modules_to_save": None},
    ]
    for i, change in enumerate(variants):
        (corpus / f"seed{i}.json").write_text(json.dumps({**_SAVED, **change}))


def test_one_input(data: bytes) -> None:
    (_ADAPTER_DIR / "adapter_config.json").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a layout warning is an answer, not a finding
        for read in (
            lambda: adapter_metrics(_ADAPTER_DIR),
            lambda: LoRAMergedReader(_MODEL_DIR, _ADAPTER_DIR).close(),
            lambda: load_adapter(copy.deepcopy(_MODEL), _ADAPTER_DIR),
        ):
            with contextlib.suppress(WeightkitError):
                read()


if __name__ == "__main__":
    from fuzz_common import prepare

    atheris.Setup(prepare(sys.argv, seed_corpus), test_one_input)
    atheris.Fuzz()
