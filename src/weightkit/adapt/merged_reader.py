"""A checkpoint read with a PEFT LoRA adapter merged into it: mergekit's ``model+lora`` merge references.

mergekit reads ``path/to/model+path/to/adapter`` by loading the model, merging the adapter with PEFT's
``merge_and_unload`` and saving the result to a cache directory (``--lora-merge-cache``) before the merge
starts. weightkit merges each adapted tensor as it is read (:class:`LoRAMergedReader`), with the LoRA layers
weightkit loads PEFT adapters into (tested equal to PEFT's), so nothing is written and there is nothing to
cache. As in mergekit (transformers loads the model in its own dtype), each merged tensor is rounded to
the checkpoint's dtype. The merge engine finds this reader through the registry (kind ``"reader"``), as
it finds merge methods, so the merge verb does not import the adapt verb.

What the adapter holds besides its factors is applied as PEFT's ``merge_and_unload`` applies it: modules in
``modules_to_save`` take their saved tensors, ``bias="all"``/``"lora_only"`` the saved biases,
``lora_bias`` adds to the layer's bias. The adapter's config is read as :func:`weightkit.load` reads it:
every field honoured or refused by name.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from weightkit.adapt.layer import adapter_keys
from weightkit.adapt.lora import LoRAConv2d, LoRAEmbedding, LoRALinear
from weightkit.adapt.peft_format import check_lora_ranks, lora_config_from_peft
from weightkit.checkpoint import CheckpointReader, CheckpointWriter, ModelCard, Provenance
from weightkit.checkpoint.files import PEFT_ADAPTER_WEIGHTS, PEFT_KEY_PREFIX, read_adapter_config
from weightkit.errors import WeightkitError
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import refuse_quantized
from weightkit.registry import register

__all__ = ["LoRAReference", "LoRAMergedReader", "merge_adapter_checkpoint"]

# The suffixes of an adapted module's tensors in a PEFT LoRA file.
_FACTORS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
            "lora_magnitude_vector")  # fmt: skip


@dataclass
class LoRAReference:
    """The adapter of a ``model+adapter`` reference (registered as reader ``"model+lora"``)."""

    adapter: str


class LoRAMergedReader(CheckpointReader):
    """A checkpoint whose tensors read as if a PEFT LoRA adapter had been merged into the model.

    Args:
        path: the model (as :class:`~weightkit.checkpoint.CheckpointReader` takes it).
        adapter_dir: a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        allow_pickle: as for :class:`~weightkit.checkpoint.CheckpointReader`.

    Raises:
        WeightkitError: not a LoRA adapter, a config field weightkit does not honour, or tensors that do not
            fit the model.
    """

    def __init__(self, path: str | Path, adapter_dir: str | Path, *, allow_pickle: bool = False) -> None:
        super().__init__(path, allow_pickle=allow_pickle)
        self.adapter_dir = Path(adapter_dir)
        saved = read_adapter_config(self.adapter_dir)
        if saved.get("peft_type") != "LORA":
            raise WeightkitError(
                f"{self.adapter_dir}: a {saved.get('peft_type')} adapter; model+adapter references take LoRA "
                "adapters (merge other types with `weightkit merge-adapter` first)"
            )
        with CheckpointReader(self.adapter_dir / PEFT_ADAPTER_WEIGHTS) as reader:
            tensors = {name.removeprefix(PEFT_KEY_PREFIX): reader.get(name) for name in reader.names()}
        # Whole tensors the adapter replaces: modules_to_save, and trained biases (bias="all"/"lora_only").
        self._replaced = {k: v for k, v in tensors.items() if not k.endswith(_FACTORS)}
        self._factors: dict[str, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            for suffix in _FACTORS:
                if key.endswith("." + suffix):
                    self._factors.setdefault(key.removesuffix("." + suffix), {})[suffix] = tensor
        self._config = lora_config_from_peft(saved, sorted(self._factors), self.adapter_dir)
        check_lora_ranks(self._config, tensors, self.adapter_dir)
        self._transposed: set[str] = set()  # modules stored in x out (GPT-2's Conv1D)
        self._model_name: dict[str, str] = {}  # checkpoint module name -> the model's, where they differ
        if saved.get("fan_in_fan_out") or any(f"{m}.weight" not in self for m in self._factors):
            self._match_model_names()
        # An unconverted PiSSA/OLoRA adapter's base is a residual re-derived from the model: not done here.
        if self._config.init != "kaiming":
            raise WeightkitError(
                f"{self.adapter_dir}: an unconverted {self._config.init} adapter; load it with "
                "weightkit.load and save the merged model (or save the adapter converted) to merge it"
            )
        for name in self._replaced:
            name = name.replace(".base_layer.", ".")
            if name not in self:
                raise WeightkitError(
                    f"{self.adapter_dir}: the adapter saves {name}, which {path} does not have"
                )
        missing = [f"{m}.weight" for m in self._factors if f"{m}.weight" not in self]
        if missing:
            raise WeightkitError(
                f"{self.adapter_dir}: the adapter adapts {missing[0]}, which {path} does not have"
            )

    def _match_model_names(self) -> None:
        """Re-key the adapter by checkpoint names where the model's names differ (transformers renames some
        architectures' tensors on load, e.g. ViT's), and note which layers are GPT-2 ``Conv1D`` (weights
        stored ``in x out``, PEFT's ``fan_in_fan_out``). Both need the model's modules, built on the meta
        device."""
        from transformers.pytorch_utils import Conv1D

        from weightkit.arch import model_task
        from weightkit.models import CheckpointNames, model_auto_class, skeleton

        if self.config is None:
            raise WeightkitError(f"{self.directory} has no config.json, needed to place the adapter's layers")
        model = skeleton(self.directory, model_auto_class(model_task(self.config)))
        modules = dict(model.named_modules())
        names = CheckpointNames(model, self.names())
        factors = {}
        for module, tensors in self._factors.items():
            if module not in modules:
                raise WeightkitError(
                    f"{self.adapter_dir}: the adapter adapts {module}.weight, which {self.path} does not have"
                )
            in_ckpt = names.to_ckpt(f"{module}.weight").removesuffix(".weight")
            factors[in_ckpt] = tensors
            self._model_name[in_ckpt] = module
            if isinstance(modules[module], Conv1D):
                self._transposed.add(in_ckpt)
        self._factors = factors
        self._replaced = {names.to_ckpt(n.replace(".base_layer.", ".")): t for n, t in self._replaced.items()}

    def changed_names(self) -> set[str]:
        """The checkpoint tensors the adapter changes (weights it adapts or replaces, biases it trains)."""
        names = {name.replace(".base_layer.", ".") for name in self._replaced}
        for module, factors in self._factors.items():
            names.add(f"{module}.weight")
            if "lora_B.bias" in factors:
                names.add(f"{module}.bias")
        return names & set(self.names())

    def get(self, name: str) -> Tensor:
        return self._merged(name, super().get(name))

    def read_into(self, name: str, out: Tensor) -> Tensor:
        tensor = super().read_into(name, out)
        merged = self._merged(name, tensor)
        return tensor if merged is tensor else tensor.copy_(merged)

    def _merged(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` (checkpoint tensor ``name``) as the model with the adapter merged holds it."""
        module, _, kind = name.rpartition(".")
        # A saved whole tensor replaces the model's (a saved embedding table is the base of its factors).
        saved = self._replaced.get(name, self._replaced.get(f"{module}.base_layer.{kind}"))
        if saved is not None:
            tensor = saved.to(tensor.dtype)
        factors = self._factors.get(module)
        if factors is None or kind not in ("weight", "bias"):
            return tensor
        model_module = self._model_name.get(module, module)
        if kind == "bias":
            lora_bias = factors.get("lora_B.bias")
            if lora_bias is None:
                return tensor
            merged = tensor.float() + lora_bias.float() * self._config.scaling_for(model_module)
        elif module in self._transposed:
            merged = _merged_weight(tensor.float().T, factors, self._config, model_module).T
        else:
            merged = _merged_weight(tensor.float(), factors, self._config, model_module)
        return merged.to(self.dtype(name)).to(tensor.dtype)


def _merged_weight(weight: Tensor, factors: dict[str, Tensor], config, module: str) -> Tensor:
    """``weight`` with one module's LoRA (or DoRA) update merged in, by weightkit's LoRA layer for it."""
    if "lora_embedding_A" in factors:
        layer = LoRAEmbedding(nn.Embedding(*weight.shape, _weight=weight))
    elif factors["lora_A.weight"].ndim == 4:
        base = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False, device="meta")
        base.weight = nn.Parameter(weight, requires_grad=False)
        layer = LoRAConv2d(base)
    else:
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        base.weight = nn.Parameter(weight, requires_grad=False)
        layer = LoRALinear(base)
    rank = (factors.get("lora_A.weight", factors.get("lora_embedding_A"))).shape[0]
    kwargs = {"dora": config.dora, "dtype": torch.float32}
    layer.add_adapter("adapter", rank=rank, scaling=config.scaling_for(module), **kwargs)
    state = layer.state_dict(keep_vars=True)
    with torch.no_grad():
        for short, full in adapter_keys(layer, "adapter").items():
            if short not in factors:
                raise WeightkitError(f"the adapter lacks {module}.{short}")
            state[full].copy_(factors[short].reshape(state[full].shape))
        layer.merge()
    return layer.base_layer.weight.detach()


def merge_adapter_checkpoint(
    base: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
    progress: bool = True, allow_pickle: bool = False,
) -> dict:  # fmt: skip
    """``base`` with a PEFT LoRA adapter merged in, written as a Hugging Face model directory: PEFT's
    ``merge_and_unload`` + ``save_pretrained``, streamed one tensor at a time (no model is built).

    The tensors are those :class:`LoRAMergedReader` reads (equal to PEFT's merge); the base's other files
    (config, tokenizer, ...) are copied; the output is written atomically.

    Returns:
        ``{"tensors", "merged", "output"}``: tensor count, how many the adapter changed, the output path.

    Raises:
        WeightkitError: what :class:`LoRAMergedReader` refuses, or an existing ``out_dir`` without
            ``overwrite``.
    """
    refuse_quantized(
        base, verb="weightkit merge-adapter",
        instead="merge the adapter into the full-precision model, then compress the result; or apply it "
        "unmerged (weightkit.load(BASE, adapter=ADAPTER), weightkit eval BASE --adapter ADAPTER)",
    )  # fmt: skip
    merged = 0
    with LoRAMergedReader(base, adapter_dir, allow_pickle=allow_pickle) as reader:
        changed = reader.changed_names()
        # Nothing to configure: the output is decided by the two inputs.
        provenance = Provenance("merge-adapter", "lora", {}, (base, adapter_dir))
        with CheckpointWriter(out_dir, overwrite=overwrite, provenance=provenance) as writer:
            for name in track(reader.names(), "merging the adapter", enabled=progress):
                writer.add(name, reader.get(name))
                merged += name in changed
            if reader.directory is not None:
                writer.copy_files(reader.directory)
            writer.write_model_card(ModelCard("merge-adapter", "lora", [str(base), str(adapter_dir)]))
        return {"tensors": len(reader.names()), "merged": merged, "output": str(out_dir)}


def _open(path: str | Path, reference: LoRAReference, *, allow_pickle: bool = False) -> LoRAMergedReader:
    return LoRAMergedReader(path, reference.adapter, allow_pickle=allow_pickle)


register("reader", "model+lora", LoRAReference, _open)
