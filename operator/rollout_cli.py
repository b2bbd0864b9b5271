"""`llmserve rollout status | promote | pause | resume | abort | undo NAME [-n NAMESPACE]`.

kubectl-plugin style control of an LLMService's canary rollout, with the caller's kubeconfig.
promote / pause / resume / abort write the annotation `rollout.llmserve.io/action:
<verb>:<nonce>`, the same request a GitOps tool makes by committing the annotation; the operator
acts on each value once and records it in `status.rollout.handledAction`. `undo` is a spec change
(the model/runtime/predictor of the previous promoted revision, from `status.history`), which
starts a rollout back to it; in a GitOps setup change the spec in the repository instead.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone

VERBS = {
    "promote": "skip the remaining steps and analysis: move every replica to the canary and make it stable",
    "pause": "stop advancing through the steps (analysis keeps guarding the canary)",
    "resume": "continue a paused rollout, or retry an aborted one from its first step",
    "abort": "send all traffic back to stable and scale the canary to zero",
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rollout", help="canary rollouts of an LLMService: status and manual control")
    sub = parser.add_subparsers(dest="rollout_command", required=True, metavar="COMMAND")
    commands = {"status": "show the rollout: phase, step, weights, last analysis, history", **VERBS,
                "undo": "go back to the previous promoted revision (cancels a rollout under way)"}
    for verb, text in commands.items():
        cmd = sub.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        cmd.add_argument("name", help="the LLMService")
        cmd.add_argument("-n", "--namespace", help="its namespace (default: the kubeconfig context's)")
        cmd.add_argument("--kubeconfig", help="credentials file (default: $KUBECONFIG, ~/.kube/config)")
        cmd.set_defaults(func=_run, verb=verb)


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from ..cli import CommandError
    from .kube import ApiError, ConfigError, KubeClient, load_config

    try:
        config = load_config(args.kubeconfig)
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc

    async def main() -> str:
        async with KubeClient(config, field_manager="llmserve-cli", user_agent="llmserve-cli") as client:
            return await _command(client, args.verb, args.namespace or config.namespace, args.name)

    try:
        print(asyncio.run(main()))
    except (ApiError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    return 0


async def _command(client, verb: str, namespace: str, name: str) -> str:
    from . import rollout
    from .kube import resource_path
    from .spec import API_VERSION, KIND

    path = resource_path(API_VERSION, KIND, namespace, name)
    obj = await client.get(path)
    if obj is None:
        raise ValueError(f"LLMService {namespace}/{name} not found")
    status = obj.get("status") or {}
    phase = (status.get("rollout") or {}).get("phase", rollout.COMPLETE)
    if verb == "status":
        return describe(obj, datetime.now(timezone.utc))
    if verb == "undo":
        serving, what = rollout.undo_spec(status)
        ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": obj["metadata"]["resourceVersion"]}]
        for key in rollout.SERVING_FIELDS:
            if key in serving:
                ops.append({"op": "add", "path": f"/spec/{key}", "value": serving[key]})
            elif key in obj["spec"]:
                ops.append({"op": "remove", "path": f"/spec/{key}"})
        await client.request("PATCH", path, body=ops, content_type="application/json-patch+json")
        return f"{name}: spec set back to the {what}; the operator rolls it out"
    allowed = {"promote": rollout.ACTIVE + (rollout.ABORTED,), "pause": (rollout.PROGRESSING,),
               "resume": (rollout.PAUSED, rollout.ABORTED), "abort": rollout.ACTIVE}[verb]
    if phase not in allowed:
        raise ValueError(f"cannot {verb} {name}: its rollout is {phase} (possible when {' or '.join(allowed)})")
    value = f"{verb}:{time.time_ns()}"
    patch = {"metadata": {"annotations": {rollout.ACTION_ANNOTATION: value}}}
    await client.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
    return f"{name}: {verb} requested ({rollout.ACTION_ANNOTATION}={value}); rollout was {phase}"


def describe(obj: dict, now: datetime) -> str:
    """A person's view of the rollout state in `obj`'s status (pure: unit-tested)."""
    from .rollout import parse_stamp

    meta, status = obj["metadata"], obj.get("status") or {}
    ro = status.get("rollout") or {}
    lines = [f"{meta['name']} ({meta['namespace']}): rollout {ro.get('phase', 'not started')}"
             + (f" of {ro['revision']}" if ro.get("phase") not in (None, "Complete") else "")]
    steps = len(((obj.get("spec") or {}).get("rollout") or {}).get("steps") or [None])
    if ro.get("phase") in ("Progressing", "Paused"):
        lines[0] += f", step {ro.get('step', 0) + 1}/{steps}"
    for track in ("stable", "canary"):
        block = status.get(track)
        if block:
            lines.append(f"  {track:<7} {block.get('revision', '?'):<12} {block.get('deployment', ''):<28} "
                         f"{block.get('readyReplicas', 0)}/{block.get('replicas', 0)} ready   "
                         f"weight {block.get('weight', 0)}%")
    check = ro.get("lastCheck")
    if check:
        ago = (now - parse_stamp(check["time"])).total_seconds()
        lines.append(f"  last check {ago:.0f}s ago: {check['result']}: {check['message']}")
    if "failedChecks" in ro:
        limit = (((obj.get("spec") or {}).get("rollout") or {}).get("analysis") or {}).get("failureLimit")
        lines.append(f"  failed checks: {ro['failedChecks']}" + (f" of {limit} allowed" if limit else ""))
    if ro.get("phase") == "Aborted":
        lines.append(f"  aborted ({ro.get('reason')}): {ro.get('message')}")
    for cond in status.get("conditions") or []:
        if cond["status"] == "True" or cond["type"] == "Ready":
            lines.append(f"  {cond['type']}={cond['status']} ({cond['reason']}): {cond['message']}")
    history = status.get("history") or []
    if history:
        lines.append("history (newest last):")
        lines += [f"  {h.get('time', '')}  {h.get('outcome', ''):<8} {h.get('revision', '')}: {h.get('message', '')}"
                  for h in history]
    return "\n".join(lines)
