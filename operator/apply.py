"""The one write path: get -> compare -> server-side apply, and only for children we control.

A child is written only when a field we render differs from what the API server holds
(`drift.differences`), so a steady state makes no writes at all. Writes use server-side apply with
one field manager and `force`, which takes back fields someone edited by hand while leaving fields
other managers added alone. An object that exists under a child's name but is not controlled by
this LLMService (no controller ownerReference with its uid) is never written or deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .drift import differences
from .kube import ApiError, KubeClient, object_path

UNCHANGED, CREATED, UPDATED, CONFLICT, INVALID = "unchanged", "created", "updated", "conflict", "invalid"


@dataclass
class Outcome:
    action: str
    obj: dict | None  # the child as it is now (observed, or returned by the write)
    changed: list[str] = field(default_factory=list)  # rendered fields that had drifted
    message: str = ""


def controlled_by(obj: dict, uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller")
               for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def describe(obj: dict) -> str:
    return f"{obj['kind']} {obj['metadata']['name']}"


async def ensure(client: KubeClient, desired: dict, observed: dict | None, owner_uid: str) -> Outcome:
    """Make the child match `desired`. `observed` comes from the watch cache and may lag: when it
    is missing we read the object once before creating it, so a stale cache never makes us
    overwrite an object that is not ours."""
    if observed is None:
        observed = await client.get(object_path(desired))
        if observed is None:
            return await _write(client, desired, CREATED, [], None)
    if not controlled_by(observed, owner_uid):
        return Outcome(CONFLICT, observed, message=f"{describe(desired)} already exists and is not "
                       "controlled by this LLMService; rename or delete it")
    drifted = differences(desired, observed)
    if not drifted:
        return Outcome(UNCHANGED, observed)
    return await _write(client, desired, UPDATED, drifted, observed)


async def _write(client: KubeClient, desired: dict, action: str, drifted: list[str],
                 observed: dict | None) -> Outcome:
    try:
        return Outcome(action, await client.apply(desired, replacing=observed), drifted)
    except ApiError as exc:
        if exc.retryable:
            raise
        # 4xx: the API server refuses what the spec asks (e.g. an invalid affinity passed through).
        return Outcome(INVALID, None, message=f"{describe(desired)}: {exc.message}")
