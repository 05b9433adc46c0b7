"""The README's mergekit table (rendered from tests/merge/mergekit_features.py) names only tests that exist,
and the methods it lists as refused are refused by name."""

import ast
from pathlib import Path

import pytest
from merge.mergekit_features import FEATURES, METHODS, REFUSED

from weightkit.errors import WeightkitError
from weightkit.registry import config_from_dict, names

ROOT = Path(__file__).parents[2]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
    }


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.name)
def test_every_test_the_table_names_exists(feature):
    assert feature.tests or feature.status == REFUSED, f"{feature.name}: no test checks it"
    for reference in feature.tests:
        path, _, function = reference.partition("::")
        assert function in _test_functions(ROOT / path), reference


def test_the_methods_listed_are_mergekits_and_weightkit_has_or_refuses_each():
    implemented = set(names("merge"))
    for method in METHODS:
        if method.status == REFUSED:
            with pytest.raises(WeightkitError, match="a mergekit method weightkit does not implement yet"):
                config_from_dict("merge", {"method": method.name})
        else:
            assert method.name in implemented, method.name
