"""What the atheris targets share: a seeded corpus directory in front of libFuzzer's arguments."""

from collections.abc import Callable
from pathlib import Path


def prepare(argv: list[str], seed: Callable[[Path], None]) -> list[str]:
    """``argv`` for ``atheris.Setup``: the first non-option argument is the corpus directory (created and
    seeded by ``seed`` when empty), so a fresh run starts from valid inputs rather than from nothing."""
    corpora = [arg for arg in argv[1:] if not arg.startswith("-")]
    if corpora:
        corpus = Path(corpora[0])
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            seed(corpus)
    return argv
