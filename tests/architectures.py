"""The architectures every verb is tested on (tests/test_architectures.py), and what each verb does with
them; bench/tables.py turns this into the README's architectures x verbs table.

A cell is ``"yes"`` or ``"yes: <what>"`` (tested to work: outputs load in transformers / PEFT and match),
or the reason the verb refuses the architecture by name; the test checks the refusal's message holds
:data:`REFUSALS`' words.
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
    "adapt", "adapt (train)", "merge-adapter", "compress rtn", "compress gptq/awq", "merge", "extract-lora",
    "align", "eval", "fisher",
)  # fmt: skip

# What weightkit align permutes in each architecture's blocks (tests/merge/test_align.py checks each).
ALIGNED = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma"), ("heads", "mlp")),
    "phi3": ("heads", "mlp"),  # fused qkv_proj (3 sections) and gate_up_proj (2 sections)
    "mixtral": ("heads",),  # experts copied unchanged
    "gpt2": ("heads", "mlp"),  # Conv1D: transposed, c_attn columns in 3 sections
    "gpt_neox": ("heads", "mlp"),  # query_key_value rows grouped per head
    "opt": ("heads", "mlp"),
    "falcon": ("mlp",),
    "bert": ("heads", "mlp"),
    "roberta": ("heads", "mlp"),
    "vit": ("heads", "mlp"),  # checkpoint names differ from the layout's
    "t5": ("mlp",),  # encoder and decoder
}

_CONV1D = "refused: Conv1D layers (compressed-tensors quantizes Linear)"
_IMAGES = "refused: calibrates on text; use rtn"
_NOT_LM = "refused: needs a causal LM"
_NOT_EVAL = "refused: causal LMs and text encoders only"
_NOT_TRAINED = "refused: trains text models (use the API)"

# Words the error message of each refusal contains.
REFUSALS = {
    _CONV1D: "Conv1D",
    _IMAGES: "calibrates on text",
    _NOT_LM: "only causal LMs",
    _NOT_EVAL: "cannot evaluate",
    _NOT_TRAINED: "weightkit adapt trains causal LMs on text",
}

# Quantized outputs transformers 5 loads only decompressed (CompressedTensorsConfig(run_compressed=False)):
# these models' weight initialisation reads every Linear's .weight, which packed layers do not have.
RUN_DECOMPRESSED = ("falcon", "t5")

_TASKS = {"bert": "encoder", "roberta": "encoder", "t5": "seq2seq", "vit": "vision"}


def expected(architecture: str, verb: str) -> str:
    """``"yes"`` or the reason ``verb`` refuses ``architecture`` (a key of :data:`REFUSALS`)."""
    task = _TASKS.get(architecture, "causal-lm")
    if verb.startswith("compress") and architecture == "gpt2":
        return _CONV1D
    if verb.startswith("compress") and architecture == "mixtral":
        return "yes: attention (experts are 3-D parameters in transformers 5)"
    if verb == "compress gptq/awq" and task == "vision":
        return _IMAGES
    if verb == "fisher" and task != "causal-lm":
        return _NOT_LM
    if verb == "align":
        return {("heads", "mlp"): "yes", ("heads",): "yes: heads (experts copied)"}.get(
            ALIGNED[architecture], "yes: MLP neurons (heads fixed)"
        )
    if verb == "eval" and task in ("seq2seq", "vision"):
        return _NOT_EVAL
    if verb == "adapt (train)" and task in ("seq2seq", "vision"):
        return _NOT_TRAINED
    return "yes"
