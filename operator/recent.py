"""What the operator itself just wrote, until its watch delivers it.

The watch indexes lag the operator's own writes by a moment. A reconcile that runs in that moment
(another child's event, a pod update) would compare against the object as it was before the
write, write the same change again and post its Event twice. `Recent` remembers, per object, the
resourceVersion a write was based on and the object the API server returned: while the index still
shows that very resourceVersion it is stale and the returned object is used instead. Any other
resourceVersion is the write itself or something newer, so the index wins and the entry is
dropped. Only equality of resourceVersions is used, never their order (they are opaque).
"""

from __future__ import annotations


def _key(obj: dict) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


class Recent:
    def __init__(self) -> None:
        self._writes: dict[tuple[str, str, str], tuple[str, dict]] = {}

    def remember(self, before: dict, after: dict) -> None:
        """`after` (returned by the API server) replaced `before` (as observed)."""
        self._writes[_key(after)] = (before["metadata"]["resourceVersion"], after)

    def fresh(self, observed: dict) -> dict:
        """`observed`, or what we wrote over it if the index has not caught up yet."""
        entry = self._writes.get(_key(observed))
        if entry is None:
            return observed
        based_on, written = entry
        if observed["metadata"].get("resourceVersion") == based_on:
            return written
        del self._writes[_key(observed)]
        return observed

    def forget(self, namespace: str, service: str) -> None:
        """Drop what is remembered about a deleted LLMService and its children (named `<service>`
        or `<service>-...`; a neighbour sharing the prefix only loses a cache entry)."""
        for key in [k for k in self._writes if k[1] == namespace
                    and (k[2] == service or k[2].startswith(f"{service}-"))]:
            del self._writes[key]

    def __len__(self) -> int:
        return len(self._writes)
