"""English text for perplexity: gensim's Lee background corpus (read as a file; gensim is not imported)."""
from pathlib import Path

from .models import _package_file

__all__ = ["lee_corpus_path", "lee_corpus_text"]

_INSTALL = "pip install --no-deps gensim==4.4.0"


def lee_corpus_path() -> Path:
    """Path of ``gensim/test/test_data/lee_background.cor`` (SkipReason when gensim is absent)."""
    return _package_file("gensim", "test/test_data/lee_background.cor", _INSTALL)


def lee_corpus_text() -> str:
    """The corpus as one string: one document per line, joined with newlines."""
    return lee_corpus_path().read_text(encoding="utf-8", errors="replace")
