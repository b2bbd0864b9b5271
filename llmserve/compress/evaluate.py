"""Runs the gate: teacher and candidate logits on held-out windows, fed to `gate.GateStats`.

The candidate is anything that maps a [1, T] token array to [T, vocab] logits: a PyTorch model
(a compressed Hugging Face directory) or an ONNX artifact's forward pass.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import corpus as corpora
from . import gate

WINDOW = 257  # tokens per window: 256 predicted positions each
LogitsFn = Callable[[list[int]], np.ndarray]


def held_out_windows(tokenizer, corpus: str, positions: int) -> list[list[int]]:
    """Enough held-out windows for `positions` predicted positions (fewer if the text is short)."""
    _, held = corpora.split(corpus)
    ids = tokenizer(held, add_special_tokens=False)["input_ids"]
    count = -(-positions // (WINDOW - 1))
    return corpora.windows(ids, WINDOW, count)


def torch_logits(model) -> LogitsFn:
    import torch

    def run(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()

    return run


def memoized(fn: LogitsFn, cache: dict, key: str) -> LogitsFn:
    """`fn` remembering its answers in `cache` under (key, tokens)."""

    def run(ids: list[int]) -> np.ndarray:
        slot = (key, tuple(ids))
        if slot not in cache:
            cache[slot] = fn(ids)
        return cache[slot]

    return run


def compare(teacher: LogitsFn, candidate: LogitsFn, windows: list[list[int]],
            progress: Callable[[str], None] | None = None) -> dict:
    stats = gate.GateStats()
    for i, ids in enumerate(windows):
        t, c = teacher(ids), candidate(ids)
        # position j predicts token j + 1: the last position has no target
        stats.update(t[:-1], c[:-1], np.asarray(ids[1:]))
        if progress:
            progress(f"gate: window {i + 1}/{len(windows)} ({stats.positions} positions)")
    return stats.metrics()
