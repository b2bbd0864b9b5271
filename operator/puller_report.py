"""What a pod's model puller reported about the version it verified and installed.

`llmserve pull --termination-message` (llmserve.artifacts.report) writes the model, version,
manifest sha256 and a compact lineage as JSON to the init container's termination message; the
kubelet copies it into the pod's status, which the operator's pod watch already holds, so reading
it costs no request. It is container output: `parse()` trusts nothing, keeps only the known fields
of the expected types and sizes (the CRD's status schema holds the same bounds), and answers None
for anything else.
"""

from __future__ import annotations

import json
import math
import re

from .render import PULLER_CONTAINER

MAX_MESSAGE_BYTES = 4096  # what the kubelet keeps of one container's termination message
MAX_METHODS = 16
MAX_ENTRIES = 16  # parameters of a method, metrics of the gate
MAX_TEXT = 128

_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def message_of(pod: dict) -> str | None:
    """The termination message of the puller's successful run (the current one, or the last
    before the pod's init containers ran again)."""
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if not isinstance(cs, dict) or cs.get("name") != PULLER_CONTAINER:
            continue
        for state in (cs.get("state"), cs.get("lastState")):
            terminated = (state or {}).get("terminated") if isinstance(state, dict) else None
            if isinstance(terminated, dict) and terminated.get("exitCode") == 0:
                return terminated.get("message")
    return None


def _is_name(value) -> bool:
    return isinstance(value, str) and bool(_NAME.fullmatch(value))


def _is_sha256(value) -> bool:
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _methods(raw) -> list[dict]:
    out = []
    for method in raw[:MAX_METHODS] if isinstance(raw, list) else []:
        if not isinstance(method, dict) or not _is_name(method.get("name")):
            continue
        params = method.get("params") if isinstance(method.get("params"), dict) else {}
        kept = {k: params[k] for k in sorted(k for k in params if _is_name(k))[:MAX_ENTRIES]
                if isinstance(params[k], str) and len(params[k]) <= MAX_TEXT}
        out.append({"name": method["name"], "params": kept})
    return out


def _gate(raw) -> dict | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("passed"), bool):
        return None
    out = {"passed": raw["passed"]}
    if _is_name(raw.get("family")):
        out["family"] = raw["family"]
    metrics = raw.get("metrics") if isinstance(raw.get("metrics"), dict) else {}
    out["metrics"] = {k: metrics[k] for k in sorted(k for k in metrics if _is_name(k))[:MAX_ENTRIES]
                      if _is_number(metrics[k])}
    return out


def _lineage(raw) -> dict | None:
    if not isinstance(raw, dict):
        return None
    out = {"methods": _methods(raw.get("methods"))}
    for key in ("sourceSha256", "teacherSha256"):
        if _is_sha256(raw.get(key)):
            out[key] = raw[key]
    if (gate := _gate(raw.get("gate"))) is not None:
        out["gate"] = gate
    if raw.get("truncated") is True:
        out["truncated"] = True
    return out


def parse(message) -> dict | None:
    """{version, manifestSha256[, variant][, lineage]} from a puller's termination message, or
    None when it is not one (empty, too long, not JSON, a failed pull's text, garbage)."""
    if not isinstance(message, str) or not message or len(message.encode("utf-8", "replace")) > MAX_MESSAGE_BYTES:
        return None
    try:
        raw = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    version, sha = raw.get("version"), raw.get("manifestSha256")
    if not (isinstance(version, int) and not isinstance(version, bool) and 0 < version < 2**63) or not _is_sha256(sha):
        return None
    out = {"version": version, "manifestSha256": sha}
    if _is_name(raw.get("variant")):
        out["variant"] = raw["variant"]
    if (lineage := _lineage(raw.get("lineage"))) is not None:
        out["lineage"] = lineage
    return out


def served_model(pods: list[dict], revision: str, version: int, previous: dict | None) -> dict | None:
    """What the puller of a ready pod of `revision` installed (the first pod by name, so the status
    does not depend on the order pods were seen), else what `previous` (the last status) said for
    that revision: a restarting pod does not erase it."""
    reports = [p for p in pods if p["revision"] == revision and p["ready"] and not p["deleting"]
               and p.get("model") and p["model"]["version"] == version]
    if reports:
        return min(reports, key=lambda p: p["name"])["model"]
    for block in ((previous or {}).get("stable"), (previous or {}).get("canary")):
        if isinstance(block, dict) and block.get("revision") == revision and block.get("model"):
            return block["model"]
    return None
