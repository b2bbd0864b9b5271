"""Lineage of a compressed model: where it came from and what was done to it.

Written by `llmserve compress` as `LINEAGE_FILE` in the output Hugging Face directory; read by
`llmserve build`, which copies it into the version's manifest (key "lineage"). Compressing a
compressed model extends the chain: the teacher stays the first, original model, so the gate
always compares with it. No torch here: the build and the operator side can read it cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path

LINEAGE_FILE = "llmserve-lineage.json"
FORMAT = 1


class LineageError(Exception):
    pass


def read(model_dir: Path) -> dict | None:
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        lineage = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LineageError(f"{path}: unreadable lineage: {exc}") from None
    if lineage.get("format") != FORMAT or "teacher" not in lineage or "methods" not in lineage:
        raise LineageError(f"{path}: not a lineage record of format {FORMAT}")
    return lineage


def extend(parent: dict | None, source: dict, methods: list[dict]) -> dict:
    """The lineage of a model made from `source` ({"path", "sha256"}) by `methods`
    ([{"name", "params"}]); `parent` is the source's own lineage, if it has one."""
    if parent is None:
        return {"format": FORMAT, "teacher": source, "source": source, "methods": list(methods)}
    return {"format": FORMAT, "teacher": parent["teacher"], "source": source,
            "methods": [*parent["methods"], *methods]}


def method_names(lineage: dict | None) -> list[str]:
    return [m["name"] for m in (lineage or {}).get("methods", [])]


def summary(lineage: dict | None) -> str:
    """One line for people: 'teacher 1a2b3c4d5e6f: drop-layers(count=2) -> distill(steps=200)'."""
    if not lineage:
        return ""
    steps = " -> ".join(
        f"{m['name']}({','.join(f'{k}={v}' for k, v in sorted(m['params'].items()))})"
        for m in lineage["methods"])
    return f"teacher {lineage['teacher']['sha256'][:12]}: {steps}"


# The gate's metrics a status reader weighs (the full record stays in the manifest).
KEY_GATE_METRICS = ("mean_kl", "ppl_increase", "confident_agreement", "top1_agreement", "positions")


def _param_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _rounded(value):
    return value if isinstance(value, int) else float(f"{value:.4g}")


def compact(lineage: dict) -> dict:
    """The lineage in a few hundred bytes, for the model puller's termination message and from
    there the LLMService status: methods with their parameters (as text), the source and teacher
    digests, the gate's verdict with its key metrics."""
    out = {"methods": [{"name": m["name"], "params": {k: _param_text(v) for k, v in sorted(m["params"].items())}}
                       for m in lineage["methods"]],
           "sourceSha256": lineage["source"]["sha256"], "teacherSha256": lineage["teacher"]["sha256"]}
    if gate := lineage.get("gate"):
        metrics = gate.get("metrics") or {}
        out["gate"] = {"passed": bool(gate.get("passed")), "family": (gate.get("thresholds") or {}).get("family", ""),
                       "metrics": {k: _rounded(metrics[k]) for k in KEY_GATE_METRICS
                                   if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics[k], bool)}}
    return out
