"""The one-line setting ``weightkit compress`` prints in its summary table exists for every method it offers
(a method the summary does not know would fail after its output is written)."""

import pytest

from weightkit.cli.compress import _METHODS, _setting
from weightkit.registry import config_from_dict

REQUIRED = {"recursive": {"blocks": 1}}  # fields without a default
# What each structural method's line must name (the quantizers print their grid: "int4 sym g128" ...).
NAMED = {
    "bitstack": "bitstack",
    "svd": "svd",
    "welore": "welore",
    "recursive": "recursive",
    "dictionary": "dictionary",
    "foldgpt": "foldgpt",
    "magnitude": "sparse",
    "random": "sparse",
    "wanda": "sparse",
    "sparsegpt": "sparse",
}


@pytest.mark.parametrize("method", _METHODS)
def test_every_method_has_a_summary_line(method):
    config = config_from_dict("compress", {"method": method, **REQUIRED.get(method, {})})
    line = _setting(config)
    assert isinstance(line, str) and line
    assert NAMED.get(method, "") in line


def test_recipe_stages_are_summarised_in_order():
    stages = [
        config_from_dict("compress", {"method": "sparsegpt", "sparsity": "2:4"}),
        config_from_dict("compress", {"method": "gptq", "bits": 4}),
    ]
    line = _setting(stages)
    assert line.startswith("2:4 sparse + ") and "int4" in line


def test_the_cli_list_of_data_free_methods_is_the_registry_s():
    """The CLI names its data-free methods without importing the methods (a fast --help); they must be exactly
    the registered configs that take no calibration fields."""
    from weightkit.cli.compress import _DATA_FREE
    from weightkit.compress.quant.config import CalibrationFields
    from weightkit.registry import lookup

    for method in _METHODS:
        assert (method in _DATA_FREE) == (
            not issubclass(lookup("compress", method).config_cls, CalibrationFields)
        )
