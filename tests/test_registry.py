"""The method registry: lookups work in a fresh interpreter whatever was imported first."""

import re
import subprocess
import sys

import pytest

from weightkit.errors import WeightkitError
from weightkit.registry import config_from_dict, config_to_dict, lookup, names


@pytest.mark.parametrize(
    ("kind", "method", "config_class"),
    [
        ("merge", "ties", "TaskArithmeticConfig"),
        ("compress", "gptq", "GPTQConfig"),
        ("adapt", "dora", "LoRAConfig"),
    ],
)
def test_lookup_in_a_fresh_interpreter(kind, method, config_class):
    # The README's own snippet: nothing but the registry imported. Before the fix the registry was empty
    # until the verb's package had been imported ("unknown merge method 'ties'. Known: ").
    code = (
        "from weightkit.registry import config_from_dict\n"
        f"print(type(config_from_dict({kind!r}, {{'method': {method!r}}})).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == config_class


def test_names_lists_every_kind():
    assert {"ties", "linear", "slerp"} <= set(names("merge"))
    assert {"rtn", "gptq", "awq"} <= set(names("compress"))
    assert {"lora", "eva", "bone"} <= set(names("adapt"))


def test_unknown_method_suggests_the_close_name():
    with pytest.raises(WeightkitError, match=r"Did you mean 'ties'\?"):
        lookup("merge", "tis")


def test_config_round_trips_through_a_dict():
    config = config_from_dict("merge", {"method": "ties", "density": 0.3})
    assert config_from_dict("merge", config_to_dict(config)) == config


def test_a_peer_method_not_implemented_is_named_as_such_not_guessed():
    # "nearswap", before weightkit had it, got "Did you mean 'linear'?".
    with pytest.raises(
        WeightkitError, match="'ramplus_tl': a mergekit method weightkit does not implement yet"
    ) as info:
        config_from_dict("merge", {"method": "ramplus_tl"})
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "lora", "dropout": "abc"}, "lora: dropout='abc': expected a number"),
        ({"method": "lora", "rank": 2.5}, "lora: rank=2.5: expected an integer"),
        ({"method": "lora", "rslora": "yes"}, "lora: rslora='yes': expected true or false"),
        ({"method": "lora", "rank": True}, "lora: rank=True: expected an integer"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_its_key(fields, message):
    # --option dropout=abc said "'<=' not supported between instances of 'int' and 'str'".
    with pytest.raises(WeightkitError, match=re.escape(message)):
        config_from_dict("adapt", fields)
    assert config_from_dict("adapt", {"method": "lora", "alpha": 16}).alpha == 16  # an int is a number
