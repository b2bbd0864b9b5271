"""Does an observed object already hold everything we would apply? Pure comparison.

This is the "compare" of get -> compare -> apply: the operator writes a child only when one of the
fields it renders differs from what the API server returned. Fields others set (defaults, other
field managers, status) are ignored, matching server-side apply, which would leave them alone too.

Lists of named items (containers, ports, volumes, mounts) are matched by name, so an item another
manager added is tolerated exactly as server-side apply tolerates it; other lists are atomic and
must match element by element. Resource quantities compare by value because the API server
canonicalizes them.
"""

from __future__ import annotations

from .units import same_quantity

_QUANTITY_MAPS = frozenset({"limits", "requests"})
# sizeLimit of an emptyDir; value/averageValue of an HPA metric target (the API server rewrites
# "0.5" as "500m").
_QUANTITY_FIELDS = frozenset({"sizeLimit", "value", "averageValue"})


def _named(items: list) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def differences(desired: object, observed: object, path: str = "", quantity: bool = False) -> list[str]:
    """Paths (``spec.replicas``, ``spec.template.spec.containers[tritonserver].image``) where
    `observed` does not hold the value `desired` asks for; empty when nothing needs writing."""
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return [path or "."]
        out: list[str] = []
        for key, want in desired.items():
            sub = f"{path}.{key}" if path else key
            if key not in observed:
                out.append(sub)
            else:
                out += differences(want, observed[key], sub,
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
                out += differences(item, by_name[item["name"]], sub) if item["name"] in by_name else [sub]
            return out
        if len(desired) != len(observed):
            return [path]
        return [d for i, (w, o) in enumerate(zip(desired, observed)) for d in differences(w, o, f"{path}[{i}]")]
    if quantity:
        return [] if same_quantity(desired, observed) else [path]
    return [] if desired == observed else [path]
