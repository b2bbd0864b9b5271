#!/usr/bin/env python3
"""Generate charts/llmserve/files/core-v1-schemas.yaml: the Kubernetes core/v1 schemas that
LLMService passes through to its pods (Affinity, Toleration, LocalObjectReference,
ResourceRequirements), for the CRD to embed (charts/llmserve/templates/crd.yaml).

Why generated: a pass-through field must be validated the way the core API validates it, and
hand-written copies drift. The structure comes verbatim from the upstream OpenAPI v3 document of
the pinned Kubernetes version; what the core API checks in Go (pkg/apis/core/validation) and the
OpenAPI document cannot say (operator enums, qualified-name keys, label values, weights, the
Exists/value rules) is added as CEL from the table below, using the apiserver's own `format`
validators. Two changes make the schemas fit a CRD: every `default` is dropped (a CRD default
would change stored objects and so the revision hash of running services), and every list, map
and string gets a bound (the API server refuses CEL rules whose estimated cost has none).

Regenerate after changing the pinned Kubernetes version (llmserve/testbed/toolchain.py) or RULES:

    ~/.cache/llmserve/venv/bin/python hack/crd_core_schemas.py            # from the Go module cache
    ~/.cache/llmserve/venv/bin/python hack/crd_core_schemas.py --openapi api__v1_openapi.json
    ~/.cache/llmserve/venv/bin/python hack/crd_core_schemas.py --check    # CI: fail if stale

The Go module cache has k8s.io/kubernetes@<version> after `hack/setup.sh` built the test bed;
`kubectl get --raw /openapi/v3/api/v1` on the test bed serves the same document.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "charts" / "llmserve" / "files" / "core-v1-schemas.yaml"
CORE, META = "io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1."
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"

# Output key -> (definition, properties to leave out: fields the operator never renders).
ROOTS = {
    "affinity": (CORE + "Affinity", ()),
    "toleration": (CORE + "Toleration", ()),
    "localObjectReference": (CORE + "LocalObjectReference", ()),
    # claims name pod-level resourceClaims, which an LLMService cannot declare.
    "resourceRequirements": (CORE + "ResourceRequirements", ("claims",)),
}

QUALIFIED = "!format.qualifiedName().validate({0}).hasValue()"
LABEL_VALUE = "!format.labelValue().validate({0}).hasValue()"
# What the core API accepts as a container resource name (validateContainerResourceName).
RESOURCE_NAME = ("k in ['cpu', 'memory', 'ephemeral-storage'] || k.startsWith('hugepages-') || "
                 "(k.contains('/') && " + QUALIFIED.format("k") + ")")
# A quantity as an int-or-string value: a non-negative integer, or a non-negative quantity string.
# resource.Quantity's own regular expression (k8s.io/apimachinery/pkg/api/resource), without the
# minus sign: resources are never negative. A pattern, not CEL: a CEL rule on every value of a map
# exceeds the API server's cost budget.
NON_NEGATIVE_QUANTITY = (r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                         r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


def as_quantity(value: str) -> str:
    """An int-or-string value as a CEL Quantity. No string(): its cost estimate is unbounded."""
    return f"(type({value}) == int ? quantity('0').add({value}) : quantity({value}))"


def rule(expr: str, message: str, field_path: str | None = None) -> dict:
    return {"rule": expr, "message": message, **({"fieldPath": field_path} if field_path else {})}


# What pkg/apis/core/validation checks, per definition: extra schema keywords (merged into a
# property's schema) and CEL rules on the definition's objects.
RULES: dict[str, dict] = {
    CORE + "Toleration": {
        "properties": {
            "key": {"maxLength": 317},
            "operator": {"enum": ["", "Equal", "Exists"]},
            "value": {"maxLength": 63},
            "effect": {"enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]},
        },
        "rules": [
            rule("!has(self.key) || self.key == '' || " + QUALIFIED.format("self.key"),
                 "must be a qualified name (a taint key such as nvidia.com/gpu)", ".key"),
            rule("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                 "operator must be Exists when key is empty (tolerate every taint)", ".operator"),
            rule("!has(self.value) || self.value == '' || (has(self.operator) && self.operator == 'Exists' ? false : "
                 + LABEL_VALUE.format("self.value") + ")",
                 "must be empty when operator is Exists, else a label value (at most 63 characters: letters, "
                 "digits, '-', '_', '.', starting and ending with a letter or digit)", ".value"),
            rule("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                 "tolerationSeconds needs effect NoExecute", ".tolerationSeconds"),
        ],
    },
    CORE + "NodeSelector": {"properties": {"nodeSelectorTerms": {"minItems": 1}}},
    CORE + "NodeSelectorTerm": {
        "rules": [
            rule("!has(self.matchFields) || self.matchFields.all(r, r.key == 'metadata.name' && "
                 "(r.operator == 'In' || r.operator == 'NotIn') && has(r.values) && size(r.values) == 1)",
                 "matchFields supports only key metadata.name with operator In or NotIn and exactly one value",
                 ".matchFields"),
        ],
    },
    CORE + "NodeSelectorRequirement": {
        "properties": {
            "key": {"maxLength": 317},
            "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]},
            "values": {"maxItems": 64, "items": {"maxLength": 63}},
        },
        "rules": [
            rule(QUALIFIED.format("self.key"), "must be a qualified name (a label key)", ".key"),
            rule("self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : "
                 "self.operator in ['Exists', 'DoesNotExist'] ? !has(self.values) || size(self.values) == 0 : "
                 "has(self.values) && size(self.values) == 1 && self.values[0].matches('^-?[0-9]+$')",
                 "values must be non-empty for In and NotIn, empty for Exists and DoesNotExist, and one "
                 "integer for Gt and Lt", ".values"),
        ],
    },
    CORE + "PreferredSchedulingTerm": {"properties": {"weight": {"minimum": 1, "maximum": 100}}},
    CORE + "WeightedPodAffinityTerm": {"properties": {"weight": {"minimum": 1, "maximum": 100}}},
    CORE + "PodAffinityTerm": {
        "properties": {
            "topologyKey": {"minLength": 1, "maxLength": 317},
            "namespaces": {"items": {"maxLength": 63}},
            "matchLabelKeys": {"items": {"maxLength": 317}},
            "mismatchLabelKeys": {"items": {"maxLength": 317}},
        },
        "rules": [
            rule(QUALIFIED.format("self.topologyKey"), "must be a qualified name (a node label key)",
                 ".topologyKey"),
            rule("!has(self.namespaces) || self.namespaces.all(n, !format.dns1123Label().validate(n).hasValue())",
                 "must be namespace names", ".namespaces"),
        ],
    },
    META + "LabelSelector": {
        "properties": {"matchLabels": {"additionalProperties": {"maxLength": 63}}},
        "rules": [
            rule("!has(self.matchLabels) || self.matchLabels.all(k, " + QUALIFIED.format("k") + " && "
                 + LABEL_VALUE.format("self.matchLabels[k]") + ")",
                 "keys must be qualified names and values label values", ".matchLabels"),
        ],
    },
    META + "LabelSelectorRequirement": {
        "properties": {
            "key": {"maxLength": 317},
            "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
            "values": {"items": {"maxLength": 63}},
        },
        "rules": [
            rule(QUALIFIED.format("self.key"), "must be a qualified name (a label key)", ".key"),
            rule("self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : "
                 "!has(self.values) || size(self.values) == 0",
                 "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist", ".values"),
        ],
    },
    CORE + "LocalObjectReference": {
        "properties": {"name": {"minLength": 1, "maxLength": 253}},
        "required": ["name"],
        "rules": [rule("!format.dns1123Subdomain().validate(self.name).hasValue()",
                       "name must be a Secret name (lowercase letters, digits, '-' and '.')", ".name")],
    },
    CORE + "ResourceRequirements": {
        # 12: what the requests <= limits rule's cost budget allows (cpu, memory, ephemeral-storage,
        # hugepages and extended resources leave room).
        "properties": {"requests": {"maxProperties": 12}, "limits": {"maxProperties": 12}},
        "rules": [
            rule(" && ".join(f"(!has(self.{m}) || self.{m}.all(k, " + RESOURCE_NAME + "))" for m in ("requests", "limits")),
                 "resource names must be cpu, memory, ephemeral-storage, hugepages-<size> or a qualified "
                 "extended resource name such as example.com/foo"),
            # Each value is checked to be a quantity by its own rule (a malformed one fails both).
            rule("!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || "
                 f"!{as_quantity('self.requests[k]')}.isGreaterThan({as_quantity('self.limits[k]')}))",
                 "requests must not exceed limits"),
        ],
    },
}

# Bounds for what RULES leaves unbounded (CEL cost estimation needs them on every list and map).
DEFAULT_MAX_ITEMS, DEFAULT_MAX_PROPERTIES, DEFAULT_MAX_LENGTH = 16, 64, 1024


def quantity_schema() -> dict:
    """resource.Quantity as CRDs spell it (controller-gen's form), non-negative."""
    return {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True,
            "maxLength": 64, "minimum": 0, "pattern": NON_NEGATIVE_QUANTITY}


def first_sentence(text: str) -> str:
    """The first sentence (kubectl explain shows it); the rest is upstream's documentation."""
    sentence = re.split(r"(?<=[a-z0-9)])\.\s+(?=[A-Z])", text.split("\n")[0])[0].strip()
    return sentence if sentence.endswith(".") else sentence + "."


class Inliner:
    """Resolves `$ref`s of one OpenAPI document into self-contained, structural CRD schemas."""

    def __init__(self, schemas: dict):
        self.schemas = schemas

    def definition(self, name: str, drop: tuple[str, ...] = ()) -> dict:
        if name == QUANTITY:
            return quantity_schema()
        source = copy.deepcopy(self.schemas[name])
        extra = RULES.get(name, {})
        out = {k: v for k, v in source.items()
               if k in ("type", "required", "x-kubernetes-map-type", "format") and v}
        if "description" in source:
            out["description"] = first_sentence(source["description"])
        if "required" in extra:
            out["required"] = sorted(set(out.get("required", [])) | set(extra["required"]))
        props = {}
        for prop, schema in (source.get("properties") or {}).items():
            if prop in drop:
                continue
            props[prop] = self.schema(schema)
            merge(props[prop], (extra.get("properties") or {}).get(prop, {}))
        if props:
            out["properties"] = props
        if "rules" in extra:
            out["x-kubernetes-validations"] = copy.deepcopy(extra["rules"])
        return out

    def schema(self, schema: dict) -> dict:
        """One property's schema: refs inlined, defaults dropped, lists/maps/strings bounded."""
        ref = schema.get("$ref") or next((s["$ref"] for s in schema.get("allOf", []) if "$ref" in s), None)
        if ref:
            out = self.definition(ref.rsplit("/", 1)[-1])
            if "description" in schema:
                out["description"] = first_sentence(schema["description"])
            return out
        out = {k: v for k, v in schema.items()
               if k in ("type", "format", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
                        "x-kubernetes-map-type", "enum")}
        if "description" in schema:
            out["description"] = first_sentence(schema["description"])
        if out.get("type") == "array":
            out["items"] = self.schema(schema["items"])
            out["maxItems"] = DEFAULT_MAX_ITEMS
        elif out.get("type") == "object" and "additionalProperties" in schema:
            out["additionalProperties"] = self.schema(schema["additionalProperties"])
            out["maxProperties"] = DEFAULT_MAX_PROPERTIES
        elif out.get("type") == "string":
            out["maxLength"] = DEFAULT_MAX_LENGTH
        return out


def merge(schema: dict, extra: dict) -> None:
    """Overlay RULES' keywords (nested for items/additionalProperties) onto a generated schema."""
    for key, value in extra.items():
        if key in ("items", "additionalProperties"):
            merge(schema[key], value)
        else:
            schema[key] = copy.deepcopy(value)


def openapi_from_module_cache() -> dict:
    sys.path.insert(0, str(ROOT))
    from llmserve.testbed.toolchain import KUBERNETES_VERSION

    cache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    path = Path(cache) / f"k8s.io/kubernetes@{KUBERNETES_VERSION}" / "api/openapi-spec/v3/api__v1_openapi.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: build the test bed first (hack/setup.sh) or pass --openapi")
    return json.loads(path.read_text())


def render(document: dict) -> str:
    inliner = Inliner(document["components"]["schemas"])
    out = {}
    for key, (name, drop) in ROOTS.items():
        schema = inliner.definition(name, drop)
        schema.pop("description", None)  # the CRD describes the field in its own words
        out[key] = schema
    header = ("# GENERATED by hack/crd_core_schemas.py from the Kubernetes core/v1 OpenAPI schema; do not edit.\n"
              "# Embedded by templates/crd.yaml. Regenerate: python hack/crd_core_schemas.py\n")
    return header + yaml.safe_dump(out, sort_keys=True, width=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--openapi", type=Path, help="api__v1_openapi.json (default: the Go module cache's)")
    parser.add_argument("--check", action="store_true", help="fail if the generated file is out of date")
    args = parser.parse_args()
    document = json.loads(args.openapi.read_text()) if args.openapi else openapi_from_module_cache()
    text = render(document)
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python hack/crd_core_schemas.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
