"""The architectures every verb is tested on (tests/test_architectures.py), and what each verb does with
them; bench/tables.py turns this into the README's architectures x verbs table.

A cell is ``"yes"`` (tested to work: outputs load in transformers / PEFT and match), or the reason the
verb refuses the architecture by name (the test checks the refusal and its message).
"""

ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "phi3",
    "mixtral",
    "gpt2",
    "gpt_neox",
    "opt",
    "falcon",
    "bert",
    "roberta",
    "t5",
    "vit",
)

VERBS = (
    "adapt",
    "merge-adapter",
    "compress rtn",
    "compress gptq/awq",
    "merge",
    "extract-lora",
    "eval",
    "fisher",
)

_CONV1D = (
    "GPT-2's Conv1D layers are not Linear layers, which compressed-tensors (and so transformers) quantizes"
)
_ONE_LIST = "an encoder-decoder has two lists of blocks: method rtn"
_TEXT = "calibration is on text: method rtn"
_NOT_LM = "needs an output distribution over tokens (causal LMs)"
_NOT_EVAL = "eval measures causal LMs and text encoders"
_NOT_TRAINED = "weightkit adapt's trainer is for text models (the Python API adapts any model)"


def expected(architecture: str, verb: str) -> str:
    """``"yes"`` or the reason ``verb`` refuses ``architecture``."""
    task = {"bert": "encoder", "roberta": "encoder", "t5": "seq2seq", "vit": "vision"}.get(
        architecture, "causal-lm"
    )
    if verb.startswith("compress") and architecture == "gpt2":
        return _CONV1D
    if verb == "compress gptq/awq" and task in ("seq2seq", "vision"):
        return _ONE_LIST if task == "seq2seq" else _TEXT
    if verb == "fisher" and task != "causal-lm":
        return _NOT_LM
    if verb == "eval" and task in ("seq2seq", "vision"):
        return _NOT_EVAL
    return "yes"
