"""Does an observed object already hold everything we would apply? Pure comparison.

This is the "compare" of observe -> compare -> apply: the operator writes a child only when one of
the fields it renders differs from what the API server returned. Fields others set (defaults,
other field managers, status) are ignored, matching server-side apply, which would leave them
alone too.

Lists of named items (containers, ports, volumes, mounts, HTTPRoute backendRefs) are compared as a
whole: a missing or different item is drift, and so is an item on the server that we do not
render (a backend, port, volume or container the operator stopped rendering: server-side apply
removes it when we apply without it). The one exception is an item another field manager owns
(`metadata.managedFields`): server-side apply leaves it alone, so it is not ours to remove (an
injected sidecar or volume). Other lists are atomic and must match element by element. Resource
quantities compare by value because the API server canonicalizes them.
"""

from __future__ import annotations

import json

from .units import same_quantity

_QUANTITY_MAPS = frozenset({"limits", "requests"})
# sizeLimit of an emptyDir; value/averageValue of an HPA metric target (the API server rewrites
# "0.5" as "500m").
_QUANTITY_FIELDS = frozenset({"sizeLimit", "value", "averageValue"})

Foreign = dict[str, list[dict]]  # list path -> key fields of the items other managers own


def _named(items: list) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _item_path(path: str, key: dict) -> str:
    return f"{path}[{key['name']}]" if "name" in key else f"{path}[{json.dumps(key, sort_keys=True)}]"


def _walk_fields(fields: dict, path: str, out: Foreign) -> None:
    for entry, sub in fields.items():
        if entry.startswith("f:"):
            name = entry[2:]
            _walk_fields(sub, f"{path}.{name}" if path else name, out)
        elif entry.startswith("k:"):
            key = json.loads(entry[2:])
            out.setdefault(path, []).append(key)
            _walk_fields(sub, _item_path(path, key), out)


def foreign_items(obj: dict, manager: str) -> Foreign:
    """Items of keyed lists that field managers other than `manager` own in `obj`, by list path
    (`spec.template.spec.containers[tritonserver].ports` -> [{"containerPort": 8000, ...}])."""
    out: Foreign = {}
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != manager and not entry.get("subresource"):
            _walk_fields(entry.get("fieldsV1") or {}, "", out)
    return out


def _owned_by_others(item: dict, keys: list[dict]) -> bool:
    return any(all(item.get(k) == v for k, v in key.items()) for key in keys)


def differences(desired: object, observed: object, path: str = "", quantity: bool = False,
                foreign: Foreign | None = None) -> list[str]:
    """Paths (``spec.replicas``, ``spec.template.spec.containers[tritonserver].image``) where
    `observed` does not hold the value `desired` asks for, or holds a list item we do not render
    (``spec.rules[0].backendRefs[demo-canary]``); empty when nothing needs writing. `foreign`:
    `foreign_items()` of the observed object."""
    foreign = foreign or {}
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return [path or "."]
        out: list[str] = []
        for key, want in desired.items():
            sub = f"{path}.{key}" if path else key
            if key not in observed:
                out.append(sub)
            else:
                out += differences(want, observed[key], sub, foreign=foreign,
                                   quantity=path.rsplit(".", 1)[-1] in _QUANTITY_MAPS or key in _QUANTITY_FIELDS)
        return out
    if isinstance(desired, list):
        if not isinstance(observed, list):
            return [path]
        if _named(desired) and _named(observed):
            by_name = {item["name"]: item for item in observed}
            out = []
            for item in desired:
                sub = f"{path}[{item['name']}]"
                out += differences(item, by_name[item["name"]], sub, foreign=foreign) if item["name"] in by_name \
                    else [sub]
            wanted = {item["name"] for item in desired}
            out += [f"{path}[{item['name']}]" for item in observed
                    if item["name"] not in wanted and not _owned_by_others(item, foreign.get(path, []))]
            return out
        if len(desired) != len(observed):
            return [path]
        return [d for i, (w, o) in enumerate(zip(desired, observed))
                for d in differences(w, o, f"{path}[{i}]", foreign=foreign)]
    if quantity:
        return [] if same_quantity(desired, observed) else [path]
    return [] if desired == observed else [path]
