"""Offline text for calibration, distillation and the gate.

The default corpus is the Python Language Reference as CPython ships it: the module
`pydoc_data.topics` of the standard library (79 topics, ~465,000 characters of English prose
with code), present wherever Python is, so no download is needed. Topics are split by a hash of
their name into a held-out part (the gate only) and a training part (calibration and
distillation), so the gate never sees text a student was trained on.

A text file can replace it (`--corpus FILE`): its paragraphs (blank-line separated) are split
the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DEFAULT_CORPUS = "python-reference"
HELD_OUT_EVERY = 3  # one part in three is held out for the gate


def _documents(corpus: str) -> dict[str, str]:
    if corpus == DEFAULT_CORPUS:
        from pydoc_data.topics import topics

        return dict(topics)
    path = Path(corpus)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"corpus {corpus}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"corpus {corpus}: not UTF-8 text") from None
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"corpus {corpus}: no text")
    return {f"{i}:{p[:40]}": p for i, p in enumerate(paragraphs)}


def is_held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def split(corpus: str = DEFAULT_CORPUS) -> tuple[str, str]:
    """(training text, held-out text) of a corpus, deterministic."""
    docs = _documents(corpus)
    train = [docs[k] for k in sorted(docs) if not is_held_out(k)]
    held = [docs[k] for k in sorted(docs) if is_held_out(k)]
    if not held or not train:  # a tiny file: split by halves instead
        texts = [docs[k] for k in sorted(docs)]
        half = max(1, len(texts) // 2)
        train, held = texts[:half], texts[half:] or texts[:half]
    return "\n\n".join(train), "\n\n".join(held)


def windows(ids: list[int], length: int, count: int) -> list[list[int]]:
    """Up to `count` non-overlapping windows of `length` tokens, spread evenly over `ids`."""
    available = len(ids) // length
    if available == 0:
        return []
    step = max(1, available // count)
    starts = [i * step * length for i in range(min(count, available))]
    return [ids[s:s + length] for s in starts]
