"""Issue 18, item 2: a fuzzed PEFT ``adapter_config.json`` is read as saved or refused with weightkit's error.

A real LoRA adapter for a tiny Llama (rank 2 on q_proj and v_proj, saved by weightkit in PEFT's format) has
its ``adapter_config.json`` rewritten with PEFT's fields set to values of the wrong type or range, unknown
``peft_type``s, fields PEFT has and weightkit does not honour, and unknown fields; or replaced by any JSON,
or by bytes that are no JSON. Every reader of adapters (``load_adapter``, merge's ``model+adapter`` reader
``LoRAMergedReader``, ``weightkit inspect``'s ``adapter_metrics``) must load it or raise ``WeightkitError``
naming the adapter; never another exception. Settings (derandomized, ``WEIGHTKIT_FUZZ_EXAMPLES``) are in
tests/conftest.py.
"""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from weightkit.adapt import LoRAConfig, LoRAMergedReader, adapt, load_adapter, save_adapter
from weightkit.errors import WeightkitError
from weightkit.inspect.adapter import adapter_metrics
from weightkit.testing import save_tiny, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 9)
    | st.integers()
    | st.floats()
    | st.sampled_from(
        ["LORA", "BONE", "none", "all", "pissa", "gaussian", "q_proj", "re:(", "(", "all-linear"]
    )
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["q_proj", "v_proj", "(", "re:.*"]) | st.text(max_size=3), inner, max_size=2
        )
    ),
    max_leaves=5,
)
# The fields of a PEFT LoraConfig that a saved adapter_config.json may hold, and a few from other methods.
PEFT_FIELDS = [
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "use_rslora", "use_dora", "init_lora_weights", "bias", "lora_bias", "fan_in_fan_out",
    "modules_to_save", "layers_to_transform", "layers_pattern", "task_type", "inference_mode",
    "megatron_config", "loftq_config", "trainable_token_indices", "target_parameters", "use_qalora",
    "alora_invocation_tokens",
]  # fmt: skip


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path, dict]:
    """The tiny Llama, its directory, a LoRA adapter directory for it, and the adapter's saved config."""
    root = tmp_path_factory.mktemp("fuzz-adapter")
    model = tiny_llama()
    model_dir = save_tiny(model, root / "model")
    adapted = adapt(tiny_llama(), LoRAConfig(rank=2, alpha=4, targets=["re:.*(q|v)_proj"]))
    with torch.no_grad():  # a non-zero B: the adapter changes the weights
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=torch.Generator().manual_seed(0))
    adapter_dir = save_adapter(adapted, root / "adapter")
    return model, model_dir, adapter_dir, json.loads((adapter_dir / "adapter_config.json").read_text())


def _read_or_refused(adapter, content: bytes) -> None:
    model, model_dir, adapter_dir, _ = adapter
    (adapter_dir / "adapter_config.json").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warning about the adapter's layout is an answer, not a failure
        for read in (
            lambda: adapter_metrics(adapter_dir),
            lambda: LoRAMergedReader(model_dir, adapter_dir).close(),
            lambda: load_adapter(copy.deepcopy(model), adapter_dir),
        ):
            try:
                read()
            except WeightkitError as err:
                assert str(adapter_dir) in str(err)


REMOVABLE = ["r", "lora_alpha", "peft_type", "target_modules"]


@given(changes=st.dictionaries(st.sampled_from(PEFT_FIELDS) | st.text(max_size=6), VALUES, max_size=3),
       removed=st.lists(st.sampled_from(REMOVABLE), max_size=1))  # fmt: skip
def test_fuzzed_peft_fields_are_read_or_refused(adapter, changes, removed):
    saved = {k: v for k, v in adapter[3].items() if k not in removed}
    _read_or_refused(adapter, json.dumps({**saved, **changes}).encode())


@given(content=VALUES.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40))
def test_any_json_or_bytes_is_read_or_refused(adapter, content):
    _read_or_refused(adapter, content)


# -- regression tests for what the fuzzing found -----------------------------------------------------------

READERS = {
    "load_adapter": lambda model, model_dir, adapter_dir: load_adapter(copy.deepcopy(model), adapter_dir),
    "merged_reader": lambda model, model_dir, adapter_dir: LoRAMergedReader(model_dir, adapter_dir).close(),
    "inspect": lambda model, model_dir, adapter_dir: adapter_metrics(adapter_dir),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": "2"}, "r = '2': expected an integer >= 1"),
        ({"r": 2.5}, "r = 2.5: expected an integer >= 1"),
        ({"lora_alpha": "x"}, "lora_alpha = 'x': expected a finite number"),
        ({"lora_dropout": "x"}, "lora_dropout = 'x': expected a number in"),
        ({"rank_pattern": [1]}, r"rank_pattern = \[1\]: expected a mapping of patterns to integers"),
        ({"rank_pattern": {"(": 2}}, "rank_pattern: '\\(' is not a regular expression"),
        ({"exclude_modules": "("}, "exclude_modules: '\\(' is not a regular expression"),
        ({"modules_to_save": "lm_head"}, "modules_to_save = 'lm_head': expected a list of names"),
        ({"use_dora": "yes"}, "use_dora = 'yes': expected true or false"),
        ({"lora_alpha": None}, "a LoRA adapter needs lora_alpha"),
    ],
)
def test_wrong_peft_field_types_are_named_by_every_reader(adapter, reader, changes, message):
    """Before the fix: crashes (ValueError, TypeError, AttributeError, re.error) or silent coercion
    (int("2"), int(2.5)) or a field ignored by one reader and refused by another."""
    model, model_dir, adapter_dir, saved = adapter
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**saved, **changes}))
    with pytest.raises(WeightkitError, match=message):
        READERS[reader](model, model_dir, adapter_dir)


@pytest.mark.parametrize("reader", ["load_adapter", "merged_reader"])
@pytest.mark.parametrize("changes", [{"r": 3}, {"rank_pattern": {"q_proj": 3}}, {"r": 10**8}])
def test_a_rank_that_is_not_the_factors_rank_is_refused(adapter, reader, changes):
    """Before the fix the merge reader scaled by alpha / r with the config's r whatever the factors' rank
    (a silently different merge), and load_adapter built rank-r layers before comparing shapes (r = 10^8:
    12.8 GB per layer, the process was killed)."""
    model, model_dir, adapter_dir, saved = adapter
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**saved, **changes}))
    with pytest.raises(WeightkitError, match=r"lora_A.weight has shape \(2, 32\), not rank"):
        READERS[reader](model, model_dir, adapter_dir)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_an_adapter_config_that_is_no_json_is_refused(adapter, reader):
    model, model_dir, adapter_dir, _ = adapter
    (adapter_dir / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": 2,')
    with pytest.raises(WeightkitError, match="adapter_config.json is corrupt: cannot parse it as JSON"):
        READERS[reader](model, model_dir, adapter_dir)


def test_the_unchanged_adapter_still_reads_the_same(adapter):
    """The checks refuse nothing weightkit saves: the adapter as saved loads, merges and inspects."""
    model, model_dir, adapter_dir, saved = adapter
    (adapter_dir / "adapter_config.json").write_text(json.dumps(saved))
    loaded = load_adapter(copy.deepcopy(model), adapter_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    with LoRAMergedReader(model_dir, adapter_dir) as merged:
        layer = loaded.get_submodule("model.layers.0.self_attn.q_proj")
        layer.merge()
        torch.testing.assert_close(merged.get(name), layer.base_layer.weight.detach())
    assert adapter_metrics(adapter_dir).summary["modules"] == 4
