"""`llmserve rollout status` output, from a status the operator wrote (pure formatting)."""

from datetime import datetime, timezone

from llmserve.cli import build_parser
from llmserve.operator.rollout_cli import describe

OBJ = {
    "metadata": {"name": "chat", "namespace": "team-a"},
    "spec": {"rollout": {"steps": [{"weight": 10}, {"weight": 50}], "analysis": {"failureLimit": 2}}},
    "status": {
        "stable": {"revision": "v1-aaaaaa", "deployment": "chat-v1-aaaaaa", "replicas": 3, "readyReplicas": 3,
                   "weight": 67},
        "canary": {"revision": "v2-bbbbbb", "deployment": "chat-v2-bbbbbb", "replicas": 2, "readyReplicas": 1,
                   "weight": 33},
        "rollout": {"phase": "Progressing", "revision": "v2-bbbbbb", "step": 1, "failedChecks": 1,
                    "lastCheck": {"time": "2026-01-01T00:00:00.000Z", "result": "Fail",
                                  "message": "error rate 3.00% > 1.00%"}},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Available", "message": "4/4 ready"},
                       {"type": "Degraded", "status": "False", "reason": "Healthy", "message": ""}],
        "history": [{"time": "2025-12-31T00:00:00.000Z", "outcome": "Promoted", "revision": "v1-aaaaaa",
                     "message": "first revision v1-aaaaaa"}],
    },
}


def test_status_shows_phase_step_tracks_last_check_and_history():
    text = describe(OBJ, datetime(2026, 1, 1, 0, 0, 12, tzinfo=timezone.utc))
    lines = text.splitlines()
    assert lines[0] == "chat (team-a): rollout Progressing of v2-bbbbbb, step 2/2"
    assert lines[1].split() == ["stable", "v1-aaaaaa", "chat-v1-aaaaaa", "3/3", "ready", "weight", "67%"]
    assert lines[2].split()[:2] == ["canary", "v2-bbbbbb"] and lines[2].endswith("weight 33%")
    assert "  last check 12s ago: Fail: error rate 3.00% > 1.00%" in lines
    assert "  failed checks: 1 of 2 allowed" in lines
    assert "  Ready=True (Available): 4/4 ready" in lines and not any("Degraded" in line for line in lines)
    assert lines[-1].split()[:3] == ["2025-12-31T00:00:00.000Z", "Promoted", "v1-aaaaaa:"]


def test_every_verb_is_a_command():
    parser = build_parser()
    for verb in ("status", "promote", "pause", "resume", "abort", "undo"):
        args = parser.parse_args(["rollout", verb, "chat", "-n", "team-a"])
        assert (args.verb, args.name, args.namespace) == (verb, "chat", "team-a")
