"""metav1.Condition bookkeeping, generic over condition types.

`lastTransitionTime` moves only when a condition's status flips, so `kubectl wait` and people see
when something actually changed, and an unchanged condition never makes the status differ (which
would be a write per reconcile).
"""

from __future__ import annotations

from dataclasses import dataclass

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str  # CamelCase, machine-readable
    message: str = ""


def merge(previous: list[dict] | None, wanted: list[Condition], *, generation: int, now: str) -> list[dict]:
    """The new conditions list: `wanted` in order, keeping each previous `lastTransitionTime` whose
    status did not change. Conditions of types not in `wanted` are dropped."""
    before = {c.get("type"): c for c in previous or []}
    out = []
    for cond in wanted:
        old = before.get(cond.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == cond.status else None
        out.append({
            "type": cond.type,
            "status": cond.status,
            "observedGeneration": generation,
            "lastTransitionTime": since or now,
            "reason": cond.reason,
            "message": cond.message,
        })
    return out


def find(conditions: list[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict] | None, type_: str) -> bool:
    cond = find(conditions, type_)
    return bool(cond) and cond.get("status") == TRUE
