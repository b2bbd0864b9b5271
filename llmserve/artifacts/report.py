"""What the model puller reports about the version it verified and installed.

`llmserve pull --termination-message PATH` writes it to the init container's termination message
file; the kubelet copies that into the pod's status, where the operator reads it (no request of
its own) and publishes it as `status.stable.model` / `status.canary.model` of the LLMService
(llmserve.operator.status). Standard library only: it runs in the small operator image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from ..compress import lineage
from .manifest import Manifest

# Kubernetes keeps at most 4096 bytes of one container's termination message.
TERMINATION_MESSAGE_LIMIT = 4096


def _encoded(report: dict) -> str:
    # ASCII only, so characters are bytes and the limit is exact.
    return json.dumps(report, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _shrinking(full: dict) -> Iterator[dict]:
    """`full` (lineage.compact()), then ever smaller versions of it, each marked truncated: without
    the gate's metrics, without the methods' parameters, with only the newest methods, with none."""
    yield full
    gate = full.get("gate")
    smaller = {**full, "truncated": True}
    if gate:
        smaller["gate"] = {k: v for k, v in gate.items() if k != "metrics"}
        yield smaller
    methods = [{"name": m["name"]} for m in full["methods"]]
    for keep in range(len(methods), -1, -1):
        yield {**smaller, "methods": methods[len(methods) - keep:]}


def pull_report(manifest: Manifest, version: int, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The report as JSON of at most `limit` bytes: model, version, manifest sha256, variant and
    the compact lineage (lineage.compact()), shrunk step by step to fit, never cut mid-JSON."""
    data = manifest.data
    report = {"model": data.get("model"), "version": version, "manifestSha256": manifest.sha256}
    if isinstance(data.get("variant"), str):
        report["variant"] = data["variant"]
    if data.get("lineage"):
        for candidate in _shrinking(lineage.compact(data["lineage"])):
            if len(text := _encoded({**report, "lineage": candidate})) <= limit:
                return text
    return _encoded(report)
