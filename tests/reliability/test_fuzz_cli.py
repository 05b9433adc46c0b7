"""Issue 18, item 2: any command line ends with a message and exit code 0, 1 or 2, never a traceback.

Property test (hypothesis) over every subcommand but ``demo`` (which runs a real job on the bundled model):
its positionals and options, read from the command's own argparse parser, get generated values (numbers
out of range, NaN, huge, negative, wrong types, empty strings, odd paths and patterns, the options' own
choices). ``weightkit.cli.main`` runs in-process. Models point at a directory whose weights are corrupt or
at nothing, so every command stops at the latest when it opens the model: what runs is the parsing and
validation of the options, which must end in exit 2 (argparse), 1 (``error: ...``, a ``WeightkitError``)
or 0. Settings (derandomized, ``WEIGHTKIT_FUZZ_EXAMPLES``) are in tests/conftest.py.
"""

import argparse
import contextlib
import io
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given
from hypothesis import strategies as st

from weightkit.cli import _parser, main
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_PARSER, _SUB = _parser()
COMMANDS = sorted(name for name in _SUB.choices if name != "demo")
WORDS = st.sampled_from(
    ["0", "1", "-1", "2", "4", "2.5", "1e309", "nan", "inf", "-inf", "99999999999999999999", "0x10", "", "-",
     "abc", "re:(", "re:.*", "2:4", "4:8", "{}", "[1]", "true", "a=b", "bits=4", "rank=x", "rank=1,2",
     "cpu", "cuda:9", "meta", "1GB", "0B", "-5MB", "rtn", "gptq,rtn", "lora", "all-linear", "/", "/dev/null"]
)  # fmt: skip


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Paths for positionals: a model directory with corrupt weights, a merge recipe naming it, nothing."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    broken = save_tiny(tiny_llama(), root / "broken", tiny_tokenizer())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # header cut short
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(broken), str(broken)]}))
    return {"broken": str(broken), "recipe": str(recipe), "missing": str(root / "missing"), "out": str(root)}


NUMBERS = st.sampled_from(["0", "1", "-1", "2", "8", "0.5", "2.5", "1e309", "nan", "inf", "-inf", "1e-300",
                           "99999999999999999999"])  # fmt: skip


def _value(draw, action: argparse.Action):
    """Mostly what the option takes (one of its choices, a number), so most command lines pass argparse."""
    if action.choices and draw(st.booleans()):
        return draw(st.sampled_from(sorted(action.choices)))
    if action.type in (int, float) and draw(st.integers(0, 3)):
        return draw(NUMBERS)
    return draw(WORDS | st.text(max_size=6))


@st.composite
def command_lines(draw, paths: dict[str, str]) -> list[str]:
    command = draw(st.sampled_from(COMMANDS))
    actions = [a for a in _SUB.choices[command]._actions if not isinstance(a, argparse._HelpAction)]
    argv = [command]
    for action in actions:
        if action.option_strings:
            continue
        path = st.sampled_from([paths["broken"], paths["broken"], paths["recipe"], paths["missing"], ""])
        argv.append(draw(path if draw(st.integers(0, 5)) else WORDS))
    options = [a for a in actions if a.option_strings]
    for action in draw(st.lists(st.sampled_from(options), max_size=5, unique_by=id)):
        flag = draw(st.sampled_from(action.option_strings))
        if flag in ("-o", "--output"):
            argv += [flag, f"{paths['out']}/out-{draw(st.integers(0, 10**6))}"]
        elif action.nargs == 0:
            argv.append(flag)
        else:
            count = draw(st.integers(1, 2)) if action.nargs == "+" else 1
            argv += [flag, *(_value(draw, action) for _ in range(count))]
    return argv


@given(data=st.data())
def test_any_command_line_ends_with_an_exit_code_and_a_message(paths, data):
    argv = data.draw(command_lines(paths))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
            code = exit_.code
    event(f"exit {code}")  # --hypothesis-show-statistics: how many got past argparse
    assert code in (0, 1, 2), (argv, code)
    if code == 1:
        assert "error:" in out.getvalue() + err.getvalue(), argv
    if code == 2:
        assert "usage:" in err.getvalue(), argv


def test_a_device_is_no_model_directory(paths, capsys):
    """Found by the property test: /dev/null as a model was listed as a directory (NotADirectoryError)."""
    assert main(["align", "/dev/null", paths["broken"], "-o", f"{paths['out']}/aligned"]) == 1
    assert "/dev/null is neither a checkpoint file nor a model directory" in capsys.readouterr().err


def test_a_broken_model_directory_is_refused_by_name(paths):
    """The fixture the property test relies on: its model stops a command when it opens the weights."""
    err = io.StringIO()
    with contextlib.redirect_stdout(err), contextlib.redirect_stderr(err):
        code = main(["compress", paths["broken"], "-o", f"{paths['out']}/q", "--method", "rtn"])
    assert code == 1
    assert "model.safetensors is corrupt" in " ".join(err.getvalue().split())
    assert not Path(f"{paths['out']}/q").exists()
