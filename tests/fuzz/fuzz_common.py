"""What the atheris targets share: a seeded corpus directory in front of libFuzzer's arguments."""

from collections.abc import Callable
from pathlib import Path


def prepare(argv: list[str], seed: Callable[[Path], None]) -> list[str]:
    """``argv`` for ``atheris.Setup``: the first non-option argument is the corpus directory (created and
    seeded by ``seed`` when empty), so a fresh run starts from valid inputs rather than from nothing; or
    input files (a crash-* file) to run once, left as they are."""
    corpora = [arg for arg in argv[1:] if not arg.startswith("-")]
    if corpora and not Path(corpora[0]).is_file():
        corpus = Path(corpora[0])
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            seed(corpus)
    return argv
