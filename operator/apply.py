"""The one write path for children: compare -> create or server-side apply, and only for children
we control.

A child is written only when a field we render differs from what the API server holds
(`drift.differences`), so a steady state makes no writes at all. A child the watch cache does not
hold is created with a POST, without a GET first: the cache of a watched kind is complete, and a
POST never overwrites anything (409 AlreadyExists when the name is taken, and only then is the
object read to tell a lagging cache from someone else's object). Updates use server-side apply
with one field manager and `force`, which takes back fields someone edited by hand while leaving
fields other managers added alone. An object that exists under a child's name but is not
controlled by this LLMService (no controller ownerReference with its uid) is never written or
deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .drift import differences, foreign_items
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


async def ensure(client: KubeClient, desired: dict, observed: dict | None, owner_uid: str, *,
                 watched: bool = True) -> Outcome:
    """Make the child match `desired`. `observed`: the child from the watch cache (may lag), or
    None. `watched`: whether the cache holds this kind at all (an unwatched kind is read first)."""
    try:
        if observed is None and not watched:
            observed = await client.get(object_path(desired))
        if observed is None:
            try:
                return Outcome(CREATED, await client.create(desired, remember=True), ["created"])
            except ApiError as exc:
                if exc.status != 409:
                    raise
                observed = await client.get(object_path(desired))  # taken: a lagging cache, or not ours
                if observed is None:
                    raise
        if not controlled_by(observed, owner_uid):
            return Outcome(CONFLICT, observed, message=f"{describe(desired)} already exists and is not "
                           "controlled by this LLMService; rename or delete it")
        drifted = differences(desired, observed, foreign=foreign_items(observed, client.field_manager))
        if not drifted:
            return Outcome(UNCHANGED, observed)
        if _created_by_post(observed, client.field_manager):
            observed = await _adopt_created_fields(client, observed)
        return Outcome(UPDATED, await client.apply(desired, replacing=observed), drifted)
    except ApiError as exc:
        if not exc.refused:
            raise
        # Refused (invalid affinity passed through, forbidden, unknown kind): retrying the same
        # write cannot help; the message goes to the status and the run is retried with backoff.
        return Outcome(INVALID, None, message=f"{describe(desired)}: {exc.status} {exc.reason}: {exc.message}")


def _created_by_post(obj: dict, manager: str) -> bool:
    return any(e.get("manager") == manager and e.get("operation") == "Update" and not e.get("subresource")
               for e in (obj.get("metadata") or {}).get("managedFields") or [])


def _merge_fields(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, sub in b.items():
        out[key] = _merge_fields(out.get(key) or {}, sub)
    return out


async def _adopt_created_fields(client: KubeClient, observed: dict) -> dict:
    """Move the fields our POST created from its `Update` managedFields entry into our `Apply`
    entry (what client-go's csaupgrade does), once per child, before its first apply: otherwise
    the Update entry would keep owning what we stop rendering and server-side apply would never
    remove it. Conditional on the resourceVersion (409 if the object moved meanwhile)."""
    current = await client.get(object_path(observed))
    if current is None:
        raise ApiError(409, "Conflict", "deleted while being updated", "GET", object_path(observed))
    entries = current["metadata"].get("managedFields") or []
    ours = [e for e in entries if e.get("manager") == client.field_manager and not e.get("subresource")]
    fields: dict = {}
    for entry in ours:
        fields = _merge_fields(fields, entry.get("fieldsV1") or {})
    apply_entry = {"manager": client.field_manager, "operation": "Apply",
                   "apiVersion": current["apiVersion"], "fieldsType": "FieldsV1", "fieldsV1": fields}
    if ours and ours[0].get("time"):
        apply_entry["time"] = ours[0]["time"]
    patch = [{"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]},
             {"op": "replace", "path": "/metadata/managedFields",
              "value": [e for e in entries if e not in ours] + [apply_entry]}]
    try:
        adopted = await client.request("PATCH", object_path(current), body=patch,
                                       content_type="application/json-patch+json")
        client.recent.remember(observed, adopted)  # the index may still show the version before this
        return adopted
    except ApiError as exc:  # the resourceVersion test failed: someone wrote it meanwhile, run again
        if exc.status == 422:
            raise ApiError(409, "Conflict", exc.message, "PATCH", object_path(current)) from exc
        raise
