"""A recipe's ``chat_template``: written into the merged model's tokenizer, as mergekit writes it.

mergekit loads the output's tokenizer (the reference model's), sets its ``chat_template`` and saves it
again. The value is:

- ``auto``: the template most of the input models' tokenizers have (compared without surrounding
  whitespace; none: the tokenizer is left as it is). mergekit counts over a set of models, so which of two
  equally common templates it takes is arbitrary; weightkit takes the one it meets first, in recipe order
  (base model, then the models or slice sources);
- a Jinja template, written as given.

mergekit also takes the names of templates it ships (``chatml``, ``llama3`` ...); weightkit does not
ship them and refuses the names: give the template's text instead. A tokenizer-less reference model is
refused too (mergekit logs the failure and writes the model without a tokenizer).
"""

from collections import Counter
from pathlib import Path

from weightkit.errors import WeightkitError

__all__ = ["resolve_chat_template", "save_chat_template"]

# The template names mergekit 0.1.5 ships (mergekit/_data/chat_templates).
_MERGEKIT_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def _template_of(model_dir: Path) -> str | None:
    # weightkit.models imports transformers: only a recipe with a chat template pays for it, not every merge.
    from weightkit.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: mergekit takes the default one
        template = template.get("default")
    return template.strip() if template else None


def resolve_chat_template(value: str, model_dirs: list[Path]) -> str | None:
    """The template text ``value`` stands for (None: ``auto`` found no template to write).

    Args:
        value: the recipe's ``chat_template``.
        model_dirs: the input models' directories, in recipe order (for ``auto``).

    Raises:
        WeightkitError: one of mergekit's template names, or a value that is no Jinja template.
    """
    if not isinstance(value, str):
        raise WeightkitError(f"chat_template: expected 'auto' or a Jinja template, got {value!r}")
    if value == "auto":
        templates = [t for t in map(_template_of, dict.fromkeys(model_dirs)) if t]
        return Counter(templates).most_common(1)[0][0] if templates else None
    if value in _MERGEKIT_NAMES:
        raise WeightkitError(
            f"chat_template: {value!r} names a template mergekit ships and weightkit does not; give the "
            "template's text (or 'auto' to take the input models' own)"
        )
    if len(value) < 20 or "{" not in value:  # mergekit's test for a template text
        raise WeightkitError(f"chat_template: {value!r} is neither 'auto' nor a Jinja template")
    return value


def save_chat_template(out_dir: Path, template: str) -> None:
    """Load the tokenizer written in ``out_dir``, set its chat template and save it again (mergekit's way).

    Raises:
        WeightkitError: ``out_dir`` holds no tokenizer (the reference model has none).
    """
    from weightkit.models import load_tokenizer

    tokenizer = load_tokenizer(out_dir)
    if tokenizer is None:
        raise WeightkitError(
            "chat_template: the reference model (the base model, else the first model) has no tokenizer "
            "to write it into"
        )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
