"""The accuracy gate: how close an artifact's answers must be to the fp32 PyTorch model's.

Measured on an evaluation set before publishing; a version that misses a threshold is never
written. Embeddings are compared by cosine similarity. Causal LMs are compared by
- teacher-forced next-token agreement: over every position of the evaluation texts, does the
  artifact's most likely next token equal PyTorch's? Gated; it looks at many positions and is
  stable, so it is the gate's main signal.
- greedy agreement: for each prompt, the share of PyTorch's greedy continuation the artifact
  reproduces before the first divergence (end to end through the served generation loop and
  KV cache). One early divergence changes everything after it, so it is reported, and gated only
  when asked (`--min-greedy`).

numpy only, so it is unit-testable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Evaluation sets: varied length, punctuation, digits, code and non-English text, so that
# truncation, padding and rare tokens are all exercised.
EMBEDDING_TEXTS = [
    "A man is playing a guitar on stage.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "Kubernetes schedules pods onto nodes that have enough free resources.",
    "How do I reset my password?",
    "Quantization trades a little accuracy for a smaller, faster model.",
    "Le chat est assis sur le tapis.",
    "def add(a, b):\n    return a + b",
    "Prices rose 3.2% in March, the largest increase since 2021.",
    "ok",
    "The quick brown fox jumps over the lazy dog. " * 40,  # longer than the model's max length
    "Triton batches concurrent requests to keep the accelerator busy.",
    "She sold seashells by the seashore; the shells she sold were surely seashells.",
    "Error 503: the service is temporarily unavailable, please retry later.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Which of these is the capital of Australia: Sydney, Canberra or Melbourne?",
]

LM_TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums.",
    "Beautiful is better than ugly. Explicit is better than implicit.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time, there was a little robot who wanted to learn how to paint.",
    "To make a cup of tea, first boil the water, then pour it over the tea leaves.",
    "The mitochondria is the powerhouse of the cell, producing energy for the organism.",
    "In 1969, astronauts landed on the Moon for the first time in human history.",
    "Machine learning models are trained on data and evaluated on held-out examples.",
]

LM_PROMPTS = [
    "The capital of France is",
    "Beautiful is better than",
    "def add(a, b):",
    "Once upon a time",
    "The three primary colors are",
    "Water boils at",
    "Simple is better than",
    "My favourite programming language is",
]


@dataclass(frozen=True)
class Thresholds:
    min_mean_cosine: float = 0.99
    min_next_token_agreement: float = 0.98
    min_greedy_agreement: float = 0.0
    min_confident_next_token_agreement: float = 0.98

    def check(self, metrics: dict) -> list[str]:
        """Human-readable failures of `metrics` against these thresholds (empty: passed)."""
        limits = {
            "mean_cosine": self.min_mean_cosine,
            "next_token_agreement": self.min_next_token_agreement,
            "greedy_agreement": self.min_greedy_agreement,
            "confident_next_token_agreement": self.min_confident_next_token_agreement,
        }
        if metrics.get("confident_positions") == 0:
            return ["confident_positions 0: the reference is confident nowhere in the evaluation texts"]
        return [
            f"{name} {metrics[name]:.4f} < {limit}"
            for name, limit in limits.items()
            if name in metrics and metrics[name] < limit
        ]


def cosine_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Mean and worst cosine similarity between matching rows."""
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "samples": int(len(cos))}


def next_token_agreement(reference_argmax: list[np.ndarray], candidate_argmax: list[np.ndarray]) -> dict:
    """Share of positions where both models predict the same next token."""
    same = sum(int((r == c).sum()) for r, c in zip(reference_argmax, candidate_argmax))
    total = sum(len(r) for r in reference_argmax)
    return {"next_token_agreement": same / total, "positions": total}


def confident_next_token_agreement(reference_argmax: list[np.ndarray], candidate_argmax: list[np.ndarray],
                                   reference_top1: list[np.ndarray], confident: float) -> dict:
    """Next-token agreement only where the reference's top-1 probability is at least `confident`:
    there a faithful engine keeps the argmax, while a coin-flip position (two tokens nearly tied)
    may flip under any numerical change, such as quantized activations."""
    keep = [np.asarray(p) >= confident for p in reference_top1]
    same = sum(int((np.asarray(r)[k] == np.asarray(c)[k]).sum())
               for r, c, k in zip(reference_argmax, candidate_argmax, keep))
    total = sum(int(k.sum()) for k in keep)
    return {"confident_next_token_agreement": same / total if total else 0.0, "confident_positions": total}


def greedy_agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    """Per prompt, the common prefix of the two greedy continuations over the longer one."""
    shares, exact = [], 0
    for ref, cand in zip(reference, candidate):
        prefix = 0
        for a, b in zip(ref, cand):
            if a != b:
                break
            prefix += 1
        longest = max(len(ref), len(cand))
        shares.append(prefix / longest if longest else 1.0)
        exact += ref == cand
    return {"greedy_agreement": float(np.mean(shares)), "greedy_exact": f"{exact}/{len(shares)}"}
