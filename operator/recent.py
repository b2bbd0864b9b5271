"""What the operator itself just wrote, until its watch delivers it.

The watch indexes lag the operator's own writes by a moment. A reconcile that runs in that moment
(another child's event, a pod update) would compare against the object as it was before the
write, write the same change again and post its Event twice; worse, for the LLMService's status it
would compute the next state from a rollout state older than the one it wrote (the rollout would
restart at step 0).

`Recent` remembers, per object, the object the API server returned for the latest write and every
resourceVersion that write superseded: the version it was based on and the versions of the
operator's earlier writes of the same object. While the index shows one of those versions it is
stale and the written object is used instead; any other version is the latest write itself or
something newer, so the index wins and the entry is dropped. Only equality of resourceVersions is
used, never their order (they are opaque). With several writes in flight and a watch lagging
behind all of them, the index can show any of the superseded versions, and each one is recognised.

Objects the operator created are remembered too (the index has nothing yet), so the next run does
not try to create them again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

Key = tuple[str, str, str]  # (kind, namespace, name)


def key_of(obj: dict) -> Key:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


@dataclass
class _Entry:
    written: dict
    superseded: set[str] = field(default_factory=set)
    at: float = field(default_factory=time.monotonic)


class Recent:
    def __init__(self) -> None:
        self._writes: dict[Key, _Entry] = {}

    def remember(self, before: dict | None, after: dict) -> None:
        """`after` (returned by the API server) replaced `before` (as observed; None: created)."""
        key = key_of(after)
        entry = self._writes.get(key)
        superseded = set(entry.superseded) | {entry.written["metadata"].get("resourceVersion")} if entry else set()
        if before is not None:
            superseded.add(before["metadata"].get("resourceVersion"))
        superseded.discard(after["metadata"].get("resourceVersion"))
        superseded.discard(None)
        self._writes[key] = _Entry(after, superseded)

    def fresh(self, observed: dict) -> dict:
        """`observed`, or what we wrote over it if the index has not caught up yet."""
        key = key_of(observed)
        entry = self._writes.get(key)
        if entry is None:
            return observed
        if observed["metadata"].get("resourceVersion") in entry.superseded:
            return entry.written
        del self._writes[key]
        return observed

    def unseen(self, namespace: str, label: str, service: str, kind: str, seen: set[str]) -> list[dict]:
        """Objects of `kind` labelled `label=service` that we created and the index does not show yet."""
        return [e.written for (k, ns, name), e in self._writes.items()
                if k == kind and ns == namespace and name not in seen
                and (e.written["metadata"].get("labels") or {}).get(label) == service]

    def drop(self, obj: dict) -> None:
        """Forget one object (deleted by us, or found gone)."""
        self._writes.pop(key_of(obj), None)

    def forget(self, namespace: str, service: str) -> None:
        """Drop what is remembered about a deleted LLMService and its children (named `<service>`
        or `<service>-...`; a neighbour sharing the prefix only loses a cache entry)."""
        for key in [k for k in self._writes if k[1] == namespace
                    and (k[2] == service or k[2].startswith(f"{service}-"))]:
            del self._writes[key]

    def retain(self, live_uids: set[str], kinds: set[str], listed_at: float) -> None:
        """Drop entries of `kinds` written before a full list started (`time.monotonic()`) whose
        object the list does not show: deleted while the watch was down, nothing else would ever
        drop them."""
        for key in [k for k, e in self._writes.items() if k[0] in kinds and e.at < listed_at
                    and e.written["metadata"].get("uid") not in live_uids]:
            del self._writes[key]

    def __len__(self) -> int:
        return len(self._writes)
