"""The package's layering (DESIGN.md): an import never points up, and one verb never imports another.

Layers, top to bottom: the CLI, the demo and the package root; the verbs (adapt, compress, merge, eval,
train, inspect); what several verbs share (models, quantized, runtime, recipe, registry, select, data,
linalg, testing); and at the bottom checkpoint, errors and progress. Function-local imports count too: they
are where an upward import used to hide.
"""

import ast
from pathlib import Path

import weightkit

SRC = Path(weightkit.__file__).parent
BOTTOM = {"errors", "progress", "checkpoint"}
SHARED = {
    "arch",
    "quantized",
    "registry",
    "select",
    "data",
    "recipe",
    "models",
    "runtime",
    "testing",
    "linalg",
}
VERBS = {"adapt", "compress", "merge", "eval", "train", "inspect"}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return 0 if top in BOTTOM else 1 if top in SHARED else 2 if top in VERBS else 3


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name.startswith("weightkit.")]


def test_no_import_points_up_or_across_verbs():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        for target in _imports(path):
            here, there = _layer(module), _layer(target)
            across = here == there == 2 and module.split(".")[1] != target.split(".")[1]
            if there > here or across:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def _module_name(path: Path) -> str:
    return ".".join(("weightkit", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def test_no_module_imports_itself_through_others():
    # A circle (a package's __init__ importing a module that imports the package back, even inside a
    # function) only works in one import order. The package root is left out: it is the API's facade,
    # importing the verbs on first use, and reads nothing else.
    modules = {_module_name(path): path for path in SRC.rglob("*.py")}
    imports = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from weightkit.adapt import layer" imports a module; "... import adapt" the package.
                targets.update(
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                )
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        imports[name] = {t for t in targets if t in modules and t not in (name, "weightkit")}

    def circle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for target in imports[node]:
                if target == start:
                    return path
                if target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
        return None

    circles = [" -> ".join(c) for name in sorted(imports) if (c := circle_from(name))]
    assert not circles, "\n".join(circles)
