"""Calibration and evaluation text: local files, or real English prose that ships with Python.

Calibration (GPTQ, AWQ, EVA, Wanda ...) and evaluation (perplexity, embedding fidelity) need text.
Without network access, the one corpus every machine has is the standard library itself: its
docstrings are English prose written by people. ``stdlib_docstrings("calib")`` and
``stdlib_docstrings("eval")`` come from disjoint sets of modules, so a model calibrated on one is
evaluated on text it has not seen.

Users bring their own text as ``.txt`` (passages separated by blank lines), ``.jsonl`` or ``.json``.
"""

import functools
import hashlib
import importlib
import inspect
import json
import random
import re
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from weightkit.errors import WeightkitError

__all__ = ["STDLIB_MODULES", "stdlib_docstrings", "load_texts", "calibration_texts", "tokenize_batches"]

# A fixed, sorted list of pure-Python standard-library modules (or pure-Python parts of packages)
# with substantial documentation. Fixed rather than discovered (pkgutil) so the corpus does not
# depend on what else is installed, and free of modules that print, open windows or a browser on
# import (this, antigravity, turtle, idlelib) or that were removed between Python 3.10 and 3.13
# (distutils, imp, asyncore, cgi, pipes ...). A module that fails to import is skipped.
STDLIB_MODULES: tuple[str, ...] = tuple(
    """
    argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues
    asyncio.streams asyncio.subprocess asyncio.tasks base64 bdb bisect calendar cmd code codecs codeop
    collections colorsys concurrent.futures configparser contextlib copy copyreg csv dataclasses datetime
    decimal difflib dis doctest email.charset email.feedparser email.generator email.header
    email.headerregistry email.message email.parser email.policy email.utils enum filecmp fileinput
    fnmatch fractions ftplib functools getopt getpass gettext glob gzip hashlib heapq hmac html
    html.parser http.client http.cookiejar http.cookies http.server imaplib importlib importlib.abc
    importlib.metadata importlib.resources importlib.util inspect io ipaddress json json.decoder
    json.encoder keyword linecache locale logging logging.config logging.handlers lzma mailbox mimetypes
    modulefinder multiprocessing.connection multiprocessing.managers multiprocessing.pool
    multiprocessing.process multiprocessing.queues multiprocessing.synchronize netrc ntpath numbers
    opcode operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath
    pprint profile pstats pydoc queue quopri random re reprlib rlcompleter runpy sched secrets selectors
    shelve shlex shutil signal site smtplib socket socketserver ssl stat statistics string stringprep
    subprocess symtable sysconfig tabnanny tarfile tempfile textwrap threading timeit token tokenize
    trace traceback tracemalloc types typing unittest.case unittest.loader unittest.main unittest.mock
    unittest.result unittest.runner unittest.suite urllib.parse urllib.request urllib.response
    urllib.robotparser uuid warnings wave weakref webbrowser wsgiref.handlers wsgiref.headers
    wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom.expatbuilder xml.dom.minidom
    xml.dom.pulldom xml.etree.ElementPath xml.etree.ElementTree xml.sax.expatreader xml.sax.handler
    xml.sax.saxutils xml.sax.xmlreader xmlrpc.client xmlrpc.server zipapp zipfile zipimport
    """.split()  # noqa: SIM905 - a block of names reads better than 184 quoted strings
)

_SPLITS = ("calib", "eval")


def _split_of(module_name: str) -> str:
    """``"eval"`` for about a third of the modules, ``"calib"`` for the rest.

    A cryptographic hash rather than ``hash()``: the builtin is salted per process for strings, so it
    would move modules between splits from one run to the next.
    """
    digest = hashlib.sha256(module_name.encode("utf-8")).digest()
    return "eval" if digest[0] % 3 == 0 else "calib"


def _own_docstring(obj: Any) -> str | None:
    # ``inspect.getdoc`` would fall back to the docstring of a base class or overridden method, so the
    # same inherited text would turn up under many modules; only text written for this object counts.
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


def _defined_in(obj: Any, module_name: str) -> bool:
    # Skip re-exports (``os`` re-exports ``posixpath``; ``asyncio`` everything) so each docstring is
    # attributed to the module that defines it. ``pathlib``/``zipfile`` became packages in 3.12-3.13,
    # so their classes live in private submodules: accept those too.
    owner = getattr(obj, "__module__", None)
    return isinstance(owner, str) and (owner == module_name or owner.startswith(module_name + "._"))


def _module_docstrings(module: types.ModuleType) -> list[str]:
    """Docstrings of a module, its functions, classes and their methods/properties, in definition order."""
    docs = [_own_docstring(module)]
    for obj in list(vars(module).values()):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not _defined_in(obj, module.__name__):
            continue
        docs.append(_own_docstring(obj))
        if inspect.isclass(obj):
            for member in list(vars(obj).values()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    docs.append(_own_docstring(member))
    return [doc for doc in docs if doc]


def _drop_doctests(doc: str) -> str:
    """Remove interactive examples (paragraphs starting with ``>>>``): code and its output, not prose."""
    paragraphs = re.split(r"\n\s*\n", doc)
    return "\n\n".join(p for p in paragraphs if not p.lstrip().startswith(">>>"))


def _cut(text: str, max_chars: int) -> str:
    """At most ``max_chars``: end after the last full sentence, else at the last space, else hard."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    # Prefer a sentence end, but not one so early that most of the passage would be thrown away.
    sentence_end = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    if sentence_end >= max_chars // 2:
        return head[: sentence_end + 1]
    space = head.rfind(" ")
    return head[:space] if space > 0 else head


@functools.lru_cache(maxsize=8)
def _collect(min_chars: int, max_chars: int) -> dict[str, tuple[str, ...]]:
    passages: dict[str, list[str]] = {split: [] for split in _SPLITS}
    # Deduplicated across both splits, first module (in sorted order) wins: the same text (a
    # docstring copied between modules) can never be in both calib and eval.
    seen: set[str] = set()
    for name in STDLIB_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # a module missing on this platform/version: the corpus is what remains
            continue
        for doc in _module_docstrings(module):
            text = " ".join(_drop_doctests(doc).split())
            if len(text) < min_chars:
                continue
            text = _cut(text, max_chars)
            if text not in seen:
                seen.add(text)
                passages[_split_of(name)].append(text)
    return {split: tuple(texts) for split, texts in passages.items()}


def stdlib_docstrings(split: str = "calib", *, min_chars: int = 200, max_chars: int = 2000) -> list[str]:
    """English passages from the docstrings of Python's standard library; no network, deterministic.

    Walks :data:`STDLIB_MODULES` in order and collects module, class, function and method docstrings
    written in each module (interactive ``>>>`` examples removed, whitespace collapsed to single spaces).
    Passages shorter than ``min_chars`` are dropped, longer than ``max_chars`` cut at a sentence or
    word boundary, and duplicates removed. Modules are assigned to ``"calib"`` or ``"eval"`` by a
    stable hash of their name, so the two splits share no module and no passage. With the defaults
    this gives about 850-900 calibration and 400-430 evaluation passages on Python 3.10-3.13.

    Args:
        split: ``"calib"`` (about two thirds of the modules) or ``"eval"`` (the held-out rest).
        min_chars: Shortest passage kept, in characters (after whitespace normalisation).
        max_chars: Longest passage; longer ones are cut.

    Returns:
        The passages, in a stable order (module order, then definition order within a module).

    Raises:
        WeightkitError: Unknown ``split`` or inconsistent lengths.
    """
    if split not in _SPLITS:
        raise WeightkitError(f"unknown split {split!r}: expected 'calib' or 'eval'")
    if min_chars < 1 or max_chars < min_chars:
        raise WeightkitError(
            f"need 1 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}"
        )
    return list(_collect(min_chars, max_chars)[split])


def _texts_from_json_value(value: Any, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get(field), str):
        return value[field]
    raise WeightkitError(f"{where}: expected a string or an object with a string {field!r} field")


def load_texts(path: str | Path, *, field: str = "text") -> list[str]:
    """Passages of text from a local file.

    * ``.txt``: passages separated by blank lines; a file without blank lines is one passage per line.
    * ``.jsonl``: one JSON value per line, an object whose ``field`` is the text (or a bare string).
    * ``.json``: a list of strings, or of objects with ``field``.

    Passages that are empty or only whitespace are dropped.

    Args:
        path: The file.
        field: The key holding the text in JSON objects.

    Returns:
        The passages, in file order.

    Raises:
        WeightkitError: The file is missing or unreadable, its extension unknown, a JSON line is bad
            (the message names file and line) or it holds no text.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise WeightkitError(f"{path}: unknown text file type {path.suffix!r}; use .txt, .jsonl or .json")
    if not path.is_file():
        raise WeightkitError(f"{path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise WeightkitError(f"{path}: cannot read as UTF-8 text ({err})") from err

    if suffix == ".txt":
        if re.search(r"\n[ \t]*\n", content):
            texts = re.split(r"\n[ \t]*\n", content)
        else:
            texts = content.splitlines()
    elif suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise WeightkitError(f"{path}, line {number}: invalid JSON ({err.msg})") from err
            texts.append(_texts_from_json_value(value, field, f"{path}, line {number}"))
    else:
        try:
            values = json.loads(content)
        except json.JSONDecodeError as err:
            raise WeightkitError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(values, list):
            raise WeightkitError(f"{path}: expected a JSON list of strings or of objects with {field!r}")
        texts = [_texts_from_json_value(v, field, f"{path}, item {i}") for i, v in enumerate(values)]

    texts = [text.strip() for text in texts if text.strip()]
    if not texts:
        raise WeightkitError(f"{path}: no text found")
    return texts


def calibration_texts(source: str | Path | None, n: int, *, seed: int = 0) -> list[str]:
    """``n`` passages for calibration, chosen deterministically.

    Args:
        source: A text file (see :func:`load_texts`), or ``None`` for the standard-library docstrings
            (``stdlib_docstrings("calib")``).
        n: How many passages. If the source has fewer, all of them are returned (in source order);
            the caller reports the count.
        seed: Seed of the shuffle that picks the ``n`` passages.

    Returns:
        The passages.

    Raises:
        WeightkitError: ``n`` is not positive, or the source has no text.
    """
    if n < 1:
        raise WeightkitError(f"number of calibration texts must be at least 1, got {n}")
    name = "the standard-library docstrings" if source is None else str(source)
    try:
        texts = stdlib_docstrings("calib") if source is None else load_texts(source)
    except WeightkitError as err:
        if "no text found" in str(err):
            raise WeightkitError(f"no calibration text in {name}") from err
        raise
    if not texts:
        raise WeightkitError(f"no calibration text in {name}")
    if len(texts) <= n:
        return texts
    return random.Random(seed).sample(texts, n)


def _pad_id(tokenizer: Any) -> int:
    # A padding id is only ever seen under attention_mask 0 (and masked out of statistics), so
    # any valid id will do when the tokenizer has none: eos, else 0.
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def tokenize_batches(
    tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int, by_length: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``texts`` into right-padded batches ``{"input_ids", "attention_mask"}``.

    Each text is truncated to ``max_length`` tokens. Padding is always on the right, whatever the
    tokenizer's ``padding_side``: with left padding a causal LM would see shifted positions for the
    shorter texts of a batch and score them differently than alone. Padded positions have
    ``attention_mask == 0`` so callers can leave them out of statistics. The tokenizer is not
    modified (a tokenizer without a pad token pads with eos, else 0).

    Args:
        tokenizer: A Hugging Face tokenizer (anything callable as ``tokenizer(list_of_str, truncation=...,
            max_length=...)`` returning ``input_ids``).
        texts: The passages.
        max_length: Most tokens per text (and never more than the tokenizer's ``model_max_length``).
        batch_size: Texts per batch (the last batch may be smaller).
        by_length: batch texts of similar length together (shortest first), which wastes less
            compute on padding; for statistics that do not depend on order, such as calibration.

    Returns:
        One dict of ``torch.long`` tensors of shape ``[batch, longest_in_batch]`` per batch.
    """
    if max_length < 1 or batch_size < 1:
        raise WeightkitError(
            f"max_length and batch_size must be at least 1, got {max_length} and {batch_size}"
        )
    pad_id = _pad_id(tokenizer)
    # Never past what the tokenizer says the model takes (weightkit.models.load_tokenizer sets it).
    max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length))
    all_ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if texts else []
    order = list(range(len(all_ids)))
    if by_length:
        order.sort(key=lambda i: len(all_ids[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        ids = [all_ids[i] for i in order[start : start + batch_size]]
        width = max((len(row) for row in ids), default=0)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches
