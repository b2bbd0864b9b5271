"""The compression gate: how close a compressed causal LM must stay to its ORIGINAL teacher.

Measured on held-out text, teacher-forced, position by position (at least `MIN_POSITIONS`):
- mean KL divergence KL(teacher || candidate) of the next-token distributions, in nats: sees
  every probability the model moves, not only the argmax, so it does not flip on near-ties;
- perplexity change: candidate perplexity / teacher perplexity - 1 on the actual next tokens;
- confident top-1 agreement: the share of positions where the teacher's top-1 probability is at
  least `CONFIDENT` whose top-1 the candidate keeps. At those positions the top-1/top-2 margin
  is large, so a disagreement is a real change, not rounding noise on a near-tie (the old gate's
  failures on weight-only int8 all sat at margins below 0.5 logits).

Thresholds are fixed per method family (`FAMILIES`), chosen before any method was measured,
with the reason beside each. A refusal names the metric, its value and the threshold.

numpy only (no torch), so it is unit-testable; `evaluate.py` feeds it logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

MIN_POSITIONS = 2000
# Teacher top-1 probability from which a position counts as confident. At p >= 0.5 the top-1
# is more likely than all other tokens together, so its margin over the runner-up is large.
CONFIDENT = 0.5
# Fewer confident positions than this and confident agreement is too noisy to gate on
# (standard error above ~0.01 at an agreement of 0.95).
MIN_CONFIDENT_POSITIONS = 400


@dataclass(frozen=True)
class Thresholds:
    family: str
    max_mean_kl: float          # nats per position
    max_ppl_increase: float     # relative: 0.02 = perplexity may rise by 2 %
    min_confident_agreement: float
    reason: str

    def check(self, metrics: dict) -> list[str]:
        """Refusals of `metrics` against these thresholds (empty: passed), each naming the
        metric, its value and the threshold."""
        failures = []
        if metrics["positions"] < MIN_POSITIONS:
            failures.append(f"positions {metrics['positions']} < {MIN_POSITIONS} (too few to judge)")
        if metrics["confident_positions"] < MIN_CONFIDENT_POSITIONS:
            failures.append(f"confident_positions {metrics['confident_positions']} < "
                            f"{MIN_CONFIDENT_POSITIONS} (evaluation text too unlike the teacher's)")
        if metrics["mean_kl"] > self.max_mean_kl:
            failures.append(f"mean_kl {metrics['mean_kl']:.4f} > {self.max_mean_kl}")
        if metrics["ppl_increase"] > self.max_ppl_increase:
            failures.append(f"ppl_increase {metrics['ppl_increase']:.4f} > {self.max_ppl_increase}")
        if metrics["confident_agreement"] < self.min_confident_agreement:
            failures.append(f"confident_agreement {metrics['confident_agreement']:.4f} < "
                            f"{self.min_confident_agreement}")
        return failures

    def as_dict(self) -> dict:
        return asdict(self)


# Fixed on 2026-11-29 before any compressed model was measured. Ordered from the gentlest
# family to the harshest; a chain of methods is judged by its harshest member (`family_of`).
FAMILIES = {
    "quantization-8bit": Thresholds(
        "quantization-8bit", max_mean_kl=0.01, max_ppl_increase=0.015, min_confident_agreement=0.98,
        reason="8-bit weights with per-channel or per-block scales round each weight by at most "
               "1/254 of its group's range; published 8-bit results (LLM.int8(), SmoothQuant, "
               "GPTQ at 8 bits) change perplexity by well under 1 %. The thresholds leave room "
               "for a small model but refuse a broken scale or a wrongly quantized layer."),
    "quantization-4bit": Thresholds(
        "quantization-4bit", max_mean_kl=0.05, max_ppl_increase=0.06, min_confident_agreement=0.95,
        reason="4-bit weights (16 levels per group) cost a few percent of perplexity even with "
               "GPTQ/AWQ at group size 128 on 7B models, more on small ones. 6 % and a KL of 0.05 "
               "nats is what a user would not notice in chat; beyond it answers visibly drift."),
    "sparsity": Thresholds(
        "sparsity", max_mean_kl=0.15, max_ppl_increase=0.20, min_confident_agreement=0.90,
        reason="50 % / 2:4 sparsity without retraining: SparseGPT reports +10-30 % perplexity on "
               "models below 1B parameters and magnitude pruning more. 20 % is the most we accept "
               "without a repair step (distillation) to recover it."),
    "structured": Thresholds(
        "structured", max_mean_kl=0.35, max_ppl_increase=0.35, min_confident_agreement=0.85,
        reason="dropping layers or narrowing MLPs makes a different, smaller model, normally "
               "repaired by distillation; it is judged as a student: clearly worse is accepted "
               "for its speed, but 85 % of the teacher's confident answers must survive and "
               "perplexity may rise by at most a third."),
}

# Which family each method belongs to (distillation repairs; it is judged by what it repairs).
METHOD_FAMILY = {
    "quantize-int8": "quantization-8bit",
    "quantize-int4": "quantization-4bit",
    "prune-2of4": "sparsity",
    "sparsegpt-2of4": "sparsity",
    "drop-layers": "structured",
    "narrow-mlp": "structured",
    "distill": None,
    "w8a8": "quantization-8bit",
    "w8a8-fp8": "quantization-8bit",
    "w4a16": "quantization-4bit",
}
_ORDER = list(FAMILIES)


def family_of(methods: list[str]) -> Thresholds:
    """The thresholds for a chain of methods: those of its harshest family."""
    families = [METHOD_FAMILY[m] for m in methods if METHOD_FAMILY.get(m)]
    if not families:
        raise ValueError(f"no gate family for methods {methods}: distillation alone changes nothing "
                         "to judge against a teacher; combine it with a structural method")
    return FAMILIES[max(families, key=_ORDER.index)]


def _exp(x: float) -> float:
    """exp that saturates to inf (a destroyed model's perplexity) instead of raising."""
    return math.exp(x) if x < 700 else math.inf


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class GateStats:
    """Running sums over batches of positions; `metrics()` turns them into the gate's numbers.
    Accumulated so a 49k-token vocabulary never needs all positions' logits in memory at once."""

    positions: int = 0
    kl_sum: float = 0.0
    teacher_nll_sum: float = 0.0
    candidate_nll_sum: float = 0.0
    agree: int = 0
    confident: int = 0
    confident_agree: int = 0

    def update(self, teacher_logits: np.ndarray, candidate_logits: np.ndarray,
               targets: np.ndarray) -> None:
        """teacher_logits, candidate_logits: [N, vocab] for N positions; targets: [N] the token
        that actually follows each position."""
        if teacher_logits.shape != candidate_logits.shape:
            raise ValueError(f"logit shapes differ: {teacher_logits.shape} vs {candidate_logits.shape}")
        if teacher_logits.shape[0] != len(targets):
            raise ValueError(f"{teacher_logits.shape[0]} positions but {len(targets)} targets")
        log_t, log_c = _log_softmax(teacher_logits), _log_softmax(candidate_logits)
        p_t = np.exp(log_t)
        rows = np.arange(len(targets))
        top_t, top_c = log_t.argmax(-1), log_c.argmax(-1)
        confident = p_t[rows, top_t] >= CONFIDENT
        self.positions += len(targets)
        self.kl_sum += float((p_t * (log_t - log_c)).sum())
        self.teacher_nll_sum -= float(log_t[rows, targets].sum())
        self.candidate_nll_sum -= float(log_c[rows, targets].sum())
        self.agree += int((top_t == top_c).sum())
        self.confident += int(confident.sum())
        self.confident_agree += int((top_t == top_c)[confident].sum())

    def metrics(self) -> dict:
        if not self.positions:
            raise ValueError("no positions evaluated")
        n = self.positions
        ppl_t = _exp(self.teacher_nll_sum / n)
        ppl_c = _exp(self.candidate_nll_sum / n)
        agreement = self.confident_agree / self.confident if self.confident else 0.0
        stderr = math.sqrt(agreement * (1 - agreement) / self.confident) if self.confident else 0.0
        return {
            "positions": n,
            "mean_kl": self.kl_sum / n,
            "teacher_ppl": ppl_t,
            "candidate_ppl": ppl_c,
            "ppl_increase": _exp((self.candidate_nll_sum - self.teacher_nll_sum) / n) - 1,
            "top1_agreement": self.agree / n,
            "confident_positions": self.confident,
            "confident_agreement": agreement,
            "confident_agreement_stderr": stderr,
        }


def verdict(metrics: dict, thresholds: Thresholds) -> dict:
    """The gate's record: metrics, thresholds and outcome (written into the lineage)."""
    failures = thresholds.check(metrics)
    return {"metrics": metrics, "thresholds": thresholds.as_dict(), "passed": not failures,
            "failures": failures}
