"""The compression gate's metrics and thresholds (pure numpy), and the offline corpus split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmserve.compress import corpus, gate


def _logits(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64))


def test_identical_models_have_zero_kl_and_full_agreement():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 11)) * 4
    stats = gate.GateStats()
    stats.update(logits, logits.copy(), rng.integers(0, 11, 50))
    m = stats.metrics()
    assert m["mean_kl"] == pytest.approx(0, abs=1e-12)
    assert m["ppl_increase"] == pytest.approx(0, abs=1e-12)
    assert m["top1_agreement"] == 1.0
    assert m["confident_agreement"] == (1.0 if m["confident_positions"] else 0.0)


def test_kl_and_perplexity_match_hand_computation():
    teacher = _logits([[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]])
    candidate = _logits([[0.25, 0.5, 0.25], [0.8, 0.1, 0.1]])
    targets = np.array([0, 1])
    stats = gate.GateStats()
    stats.update(teacher, candidate, targets)
    m = stats.metrics()
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    kl1 = 0.9 * math.log(0.9 / 0.8) + 2 * 0.05 * math.log(0.05 / 0.1)
    assert m["mean_kl"] == pytest.approx((kl0 + kl1) / 2)
    assert m["teacher_ppl"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.05)) / 2))
    assert m["candidate_ppl"] == pytest.approx(math.exp(-(math.log(0.25) + math.log(0.1)) / 2))
    assert m["ppl_increase"] == pytest.approx(m["candidate_ppl"] / m["teacher_ppl"] - 1)


def test_confident_agreement_ignores_near_ties():
    # Position 0: a teacher near-tie (0.45 / 0.44) that the candidate flips: not confident.
    # Position 1: a confident teacher (0.9) that the candidate keeps. Position 2: one it flips.
    teacher = _logits([[0.45, 0.44, 0.11], [0.9, 0.05, 0.05], [0.7, 0.2, 0.1]])
    candidate = _logits([[0.44, 0.45, 0.11], [0.85, 0.1, 0.05], [0.3, 0.6, 0.1]])
    stats = gate.GateStats()
    stats.update(teacher, candidate, np.array([0, 0, 0]))
    m = stats.metrics()
    assert m["top1_agreement"] == pytest.approx(1 / 3)
    assert m["confident_positions"] == 2
    assert m["confident_agreement"] == pytest.approx(0.5)
    assert m["confident_agreement_stderr"] == pytest.approx(math.sqrt(0.25 / 2))


def test_batches_accumulate_like_one_pass():
    rng = np.random.default_rng(1)
    t, c = rng.normal(size=(40, 7)) * 3, rng.normal(size=(40, 7)) * 3
    targets = rng.integers(0, 7, 40)
    whole, parts = gate.GateStats(), gate.GateStats()
    whole.update(t, c, targets)
    parts.update(t[:15], c[:15], targets[:15])
    parts.update(t[15:], c[15:], targets[15:])
    for key, value in whole.metrics().items():
        assert parts.metrics()[key] == pytest.approx(value)


def test_large_logits_stay_finite():
    teacher = np.array([[1000.0, 0.0, -1000.0]])
    candidate = np.array([[0.0, 1000.0, -1000.0]])
    stats = gate.GateStats()
    stats.update(teacher, candidate, np.array([0]))
    m = stats.metrics()
    assert math.isfinite(m["mean_kl"]) and m["mean_kl"] > 900
    assert m["ppl_increase"] == math.inf
    assert gate.FAMILIES["structured"].check(m | {"confident_positions": 900, "positions": 2048})


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logit shapes differ"):
        gate.GateStats().update(np.zeros((2, 3)), np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="targets"):
        gate.GateStats().update(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0]))


def _metrics(**overrides) -> dict:
    base = {"positions": 2048, "confident_positions": 900, "mean_kl": 0.001,
            "ppl_increase": 0.001, "confident_agreement": 0.999}
    return base | overrides


def test_refusal_names_metric_value_and_threshold():
    limits = gate.FAMILIES["quantization-8bit"]
    assert limits.check(_metrics()) == []
    failures = limits.check(_metrics(mean_kl=0.5, confident_agreement=0.9))
    assert failures == ["mean_kl 0.5000 > 0.01", "confident_agreement 0.9000 < 0.98"]
    assert limits.check(_metrics(ppl_increase=0.2)) == ["ppl_increase 0.2000 > 0.015"]


def test_too_few_positions_are_refused():
    limits = gate.FAMILIES["structured"]
    failures = limits.check(_metrics(positions=1999, confident_positions=10))
    assert failures[0].startswith("positions 1999 < 2000")
    assert failures[1].startswith("confident_positions 10 < 400")


def test_families_are_ordered_from_gentle_to_harsh():
    fams = list(gate.FAMILIES.values())
    for gentle, harsh in zip(fams, fams[1:]):
        assert gentle.max_mean_kl < harsh.max_mean_kl
        assert gentle.max_ppl_increase < harsh.max_ppl_increase
        assert gentle.min_confident_agreement > harsh.min_confident_agreement
        assert harsh.reason


def test_chain_is_judged_by_its_harshest_method():
    assert gate.family_of(["quantize-int8"]).family == "quantization-8bit"
    assert gate.family_of(["quantize-int8", "prune-2of4"]).family == "sparsity"
    assert gate.family_of(["drop-layers", "distill", "quantize-int4"]).family == "structured"
    with pytest.raises(ValueError, match="distillation alone"):
        gate.family_of(["distill"])


def test_verdict_records_failures():
    record = gate.verdict(_metrics(mean_kl=1.0), gate.FAMILIES["sparsity"])
    assert record["passed"] is False
    assert record["failures"] == ["mean_kl 1.0000 > 0.15"]
    assert record["thresholds"]["family"] == "sparsity"


def test_corpus_split_is_deterministic_and_disjoint():
    train, held = corpus.split()
    assert corpus.split() == (train, held)
    assert len(held) > 50_000 and len(train) > 50_000
    assert held[:2000] not in train


def test_windows_spread_over_the_text():
    ids = list(range(100))
    assert corpus.windows(ids, 10, 3) == [list(range(0, 10)), list(range(30, 40)),
                                          list(range(60, 70))]
    assert corpus.windows(ids, 10, 50) == [list(range(i, i + 10)) for i in range(0, 100, 10)]
    assert corpus.windows(ids, 200, 2) == []


def test_teacher_logits_are_computed_once_per_window():
    from llmserve.compress import evaluate

    calls = []

    def teacher(ids):
        calls.append(ids)
        return np.zeros((len(ids), 3))

    cache = {}
    run = evaluate.memoized(teacher, cache, "sha")
    run([1, 2]), run([1, 2]), run([3])
    assert calls == [[1, 2], [3]]
    assert evaluate.memoized(teacher, cache, "other")([1, 2]) is not None and len(calls) == 3
