"""The rollout state machine and the replica split (llmserve.operator.rollout), without I/O.

`Cluster` plays the part of Kubernetes between two reconciles: each tick, the pods the plan asks
for become ready, as far as the GPUs allow (pods beyond `capacity` stay Pending). The status goes
through a JSON round trip each tick, as it does through the API server, so anything the machine
forgot to keep in the status would be lost exactly as in an operator restart.
"""

import json
from datetime import datetime, timedelta, timezone

import pytest

from llmserve.operator import rollout as r
from llmserve.operator.analysis import FAIL, INCONCLUSIVE, PASS, Criteria, Measurement, Verdict

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
GOOD = Measurement(requests=100, failures=0, p99_ms=20)


def serving(version: int, image: str = "tritonserver:25.08") -> dict:
    return {"model": {"name": "m", "version": version, "repository": "pvc://models/repo"},
            "runtime": {"image": image}}


V1, V2, V3 = serving(1), serving(2), serving(3)
R1, R2, R3 = (r.revision_name(s) for s in (V1, V2, V3))


def passing() -> Verdict:
    return Verdict(PASS, "fine", GOOD, GOOD)


def failing(fatal: bool = False) -> Verdict:
    bad = Measurement(requests=100, failures=100 if fatal else 30, p99_ms=20)
    return Verdict(FAIL, f"error rate {bad.error_rate:.2%} > 1.00%", bad, GOOD, fatal=fatal)


class Cluster:
    """Ready pods per revision, following the plan's replicas one tick later, within `capacity`."""

    def __init__(self, policy: r.Policy, replicas: int, capacity: int | None = None):
        self.policy, self.replicas, self.capacity = policy, replicas, capacity
        self.now = T0
        self.ready: dict[str, int] = {}
        self.status = json.loads(json.dumps(r.plan(policy, V1, replicas, None, r.Observed(), T0).status))
        self.ready[R1] = replicas
        self.plans: list[r.Plan] = []

    def observed(self) -> r.Observed:
        stable = self.status["stable"]["revision"]
        canary = (self.status.get("canary") or {}).get("revision")
        return r.Observed(self.ready.get(stable, 0), self.ready.get(canary, 0) if canary else 0)

    def tick(self, spec: dict = V2, seconds: float = 1.0, verdict=None, action=None, gateway=True) -> r.Plan:
        self.now += timedelta(seconds=seconds)
        plan = r.plan(self.policy, spec, self.replicas, self.status, self.observed(), self.now,
                      verdict=verdict, action=action, gateway=gateway)
        self.check_invariants(plan)
        self.status = json.loads(json.dumps(plan.status))
        self.plans.append(plan)
        wanted = {plan.stable.name: plan.split.stable}
        if plan.canary:
            wanted[plan.canary.name] = plan.split.canary
        # Scale-downs free GPUs first; then pods start as far as the capacity allows.
        self.ready = {rev: min(n, wanted.get(rev, 0)) for rev, n in self.ready.items() if wanted.get(rev)}
        for rev, n in wanted.items():
            room = n - self.ready.get(rev, 0)
            if self.capacity is not None:
                room = min(room, self.capacity - sum(self.ready.values()))
            self.ready[rev] = self.ready.get(rev, 0) + max(0, room)
        return plan

    def check_invariants(self, plan: r.Plan) -> None:
        seen = self.observed()
        cut = plan.split
        assert cut.stable + cut.canary <= self.replicas + self.policy.max_surge, "GPU budget exceeded"
        if cut.canary_weight:  # the canary's share never exceeds what its ready pods carry
            assert seen.canary_ready > 0
            share = cut.canary_weight / (cut.canary_weight + cut.stable_weight)
            assert share <= seen.canary_ready / self.replicas + 1e-9
        if plan.canary is None or plan.stable.name == self.status["stable"]["revision"]:
            # stable is never asked to shrink below what the canary's ready pods do not cover
            assert cut.stable >= self.replicas - seen.canary_ready

    def run(self, until, limit: int = 200, **kwargs) -> r.Plan:
        for _ in range(limit):
            plan = self.tick(**kwargs)
            if until(plan):
                return plan
        raise AssertionError(f"not reached in {limit} ticks; status: {self.status}")


def phase(plan: r.Plan) -> str:
    return plan.status["rollout"]["phase"]


def reasons(plans) -> list[str]:
    return [reason for plan in plans for _, reason, _ in plan.events]


# ------------------------------------------------------------------------------------ split

def test_split_without_a_canary_keeps_every_replica_on_stable():
    assert r.split(4, 0, 0, 1) == r.Split(4, 0, 1, 0, reached=True)


def test_split_gives_no_weight_to_a_canary_that_is_not_ready():
    cut = r.split(4, 50, 0, 1)
    assert (cut.stable, cut.canary, cut.canary_weight, cut.reached) == (4, 1, 0, False)


def test_split_shrinks_stable_only_by_the_canary_pods_that_are_ready():
    cut = r.split(4, 50, 1, 1)
    assert (cut.stable, cut.canary, cut.canary_percent, cut.reached) == (3, 2, 25, False)
    cut = r.split(4, 50, 2, 1)
    assert (cut.stable, cut.canary, cut.canary_percent, cut.reached) == (2, 2, 50, True)


def test_split_caps_weight_at_the_step_even_when_the_canary_holds_more():
    cut = r.split(3, 10, 1, 1)  # one pod is a third of the capacity; the step asks for 10%
    assert (cut.stable, cut.canary, cut.canary_weight, cut.stable_weight) == (3, 1, 1, 9)


def test_split_respects_the_surge_budget_at_every_weight():
    for replicas in range(1, 9):
        for surge in (1, 2):
            for weight in range(0, 101, 5):
                for ready in range(0, replicas + 1):
                    cut = r.split(replicas, weight, ready, surge)
                    assert cut.stable + cut.canary <= replicas + surge
                    assert cut.stable + min(ready, cut.canary) >= replicas  # capacity never drops


def test_split_of_zero_replicas_routes_nothing_anywhere():
    assert r.split(0, 50, 0, 1) == r.Split(0, 0, 1, 0, reached=False)


# ----------------------------------------------------------------------------- identity, policy

def test_revision_changes_with_anything_pods_serve_and_nothing_else():
    assert R1.startswith("v1-") and R2.startswith("v2-") and R1 != r.revision_name(serving(1, "other:1"))
    spec = {**V1, "replicas": 3, "rollout": {"steps": [{"weight": 10}]}, "autoscaling": {"maxReplicas": 4}}
    assert r.revision_name(r.serving_spec(spec)) == R1


def test_policy_from_spec_parses_steps_and_analysis():
    policy = r.Policy.from_spec({"steps": [{"weight": 10, "pause": "30s"}, {"weight": 50}], "maxSurge": 2,
                                 "analysis": {"interval": "5s", "failureLimit": 3, "maxErrorRate": "0.01",
                                              "maxP99Latency": "500ms"}}, progress_deadline=600)
    assert policy.steps == (r.Step(10, 30.0), r.Step(50, 0.0)) and policy.max_surge == 2
    assert policy.analysis == Criteria(interval=5.0, failure_limit=3, max_error_rate=0.01, max_p99_ms=500.0)
    assert r.Policy.from_spec(None, 600) == r.Policy(progress_deadline=600)


# ------------------------------------------------------------------------------- the machine

def test_first_revision_is_stable_at_once_and_recorded():
    plan = r.plan(r.Policy(), V1, 2, None, r.Observed(), T0)
    assert plan.canary is None and plan.split.stable == 2
    assert plan.status["rollout"] == {"phase": r.COMPLETE, "revision": R1}
    assert [(h["revision"], h["outcome"]) for h in plan.status["history"]] == [(R1, r.PROMOTED)]


def test_good_rollout_walks_the_steps_and_promotes_within_the_surge_budget():
    policy = r.Policy(steps=(r.Step(25, 10), r.Step(50, 10)), max_surge=1)
    bed = Cluster(policy, replicas=4)
    first = bed.tick()
    assert phase(first) == r.PROGRESSING and first.split.canary_weight == 0 and first.split.canary == 1
    done = bed.run(lambda p: phase(p) == r.COMPLETE, seconds=2)
    assert done.stable.name == R2 and done.canary is None and done.split == r.Split(4, 0, 1, 0, True)
    assert "canary" not in done.status and done.status["stable"]["spec"] == V2
    assert [(h["revision"], h["outcome"]) for h in done.status["history"]] == [(R1, r.PROMOTED), (R2, r.PROMOTED)]
    assert reasons(bed.plans).count("RolloutStepReached") == 2
    assert reasons(bed.plans)[-2:] == ["RolloutPromoting", "RolloutPromoted"]
    weights = [p.split.canary_percent for p in bed.plans if p.canary]
    assert max(weights) == 75 and sorted(set(weights)) == [0, 25, 50, 75]


def test_rollout_completes_with_room_for_one_extra_pod_only():
    bed = Cluster(r.Policy(steps=(r.Step(50, 1),)), replicas=3, capacity=4)
    done = bed.run(lambda p: phase(p) == r.COMPLETE)
    assert done.stable.name == R2 and sum(bed.ready.values()) == 3


def test_canary_that_never_becomes_ready_gets_no_weight_and_aborts_at_the_deadline():
    bed = Cluster(r.Policy(steps=(r.Step(50, 1),), progress_deadline=55), replicas=2, capacity=2)
    plans = [bed.tick(seconds=10) for _ in range(6)]
    assert all(p.split.canary_weight == 0 and phase(p) == r.PROGRESSING for p in plans)
    aborted = bed.tick(seconds=10)
    assert phase(aborted) == r.ABORTED and aborted.status["rollout"]["reason"] == "CanaryNotReady"
    assert aborted.degraded[0] == "RolloutAborted" and "0/1 canary pods ready" in aborted.degraded[1]


def test_steps_wait_for_a_passing_check_made_at_their_weight():
    policy = r.Policy(steps=(r.Step(50, 0),), analysis=Criteria(interval=5, max_error_rate=0.01))
    bed = Cluster(policy, replicas=2)
    bed.tick()
    reached = bed.tick()
    assert reached.status["rollout"]["stepReachedAt"] and phase(reached) == r.PROGRESSING
    for _ in range(3):  # no verdict, then an inconclusive one: never success
        assert phase(bed.tick()) == r.PROGRESSING
    inconclusive = bed.tick(verdict=Verdict(INCONCLUSIVE, "canary served 2 requests"))
    assert phase(inconclusive) == r.PROGRESSING and "AnalysisInconclusive" in reasons([inconclusive])
    assert phase(bed.tick(verdict=passing())) == r.PROMOTING


def test_a_pass_in_the_reconcile_that_reaches_a_step_does_not_count_for_it():
    policy = r.Policy(steps=(r.Step(50, 0),), analysis=Criteria(interval=5))
    bed = Cluster(policy, replicas=2)
    bed.tick()
    plan = bed.tick(verdict=passing())  # the check's window saw the previous weight
    assert plan.status["rollout"]["stepReachedAt"] and phase(plan) == r.PROGRESSING


def test_failure_limit_failed_checks_abort_and_restore_stable():
    policy = r.Policy(steps=(r.Step(50, 60),), analysis=Criteria(interval=5, failure_limit=2, max_error_rate=0.01))
    bed = Cluster(policy, replicas=2)
    bed.tick(), bed.tick()
    first = bed.tick(verdict=failing())
    assert phase(first) == r.PROGRESSING and first.status["rollout"]["failedChecks"] == 1
    assert "AnalysisFailed" in reasons([first])
    aborted = bed.tick(verdict=failing())
    assert phase(aborted) == r.ABORTED
    assert aborted.split == r.Split(2, 0, 1, 0, True)  # weight 0, canary scaled to 0, stable whole
    assert aborted.status["canary"]["weight"] == 0 and aborted.status["canary"]["replicas"] == 0
    assert "error rate 30.00%" in aborted.degraded[1] and "2 of 2 allowed failed checks" in aborted.degraded[1]
    assert ("Warning", "RolloutAborted") in [(t, reason) for t, reason, _ in aborted.events]
    last = aborted.status["history"][-1]
    assert (last["revision"], last["outcome"], last["reason"]) == (R2, r.ABORTED, "AnalysisFailed")
    assert "spec" not in last
    later = bed.tick(seconds=600)  # aborted stays aborted: no retry loop
    assert phase(later) == r.ABORTED and later.events == [] and later.split.canary == 0


def test_every_request_failing_aborts_on_the_first_check():
    policy = r.Policy(steps=(r.Step(50, 60),), analysis=Criteria(interval=5, failure_limit=5))
    bed = Cluster(policy, replicas=2)
    bed.tick(), bed.tick()
    aborted = bed.tick(verdict=failing(fatal=True))
    assert phase(aborted) == r.ABORTED and "fail fast" in aborted.status["rollout"]["message"]


def test_analysis_is_due_one_interval_after_the_canary_gets_weight_then_every_interval():
    policy = r.Policy(steps=(r.Step(50, 60),), analysis=Criteria(interval=5))
    bed = Cluster(policy, replicas=2)
    bed.tick()
    assert r.analysis_due(policy, V2, bed.status, bed.now + timedelta(seconds=100)) is None  # no weight yet
    weighted = bed.tick()
    assert weighted.split.canary_weight and weighted.requeue_after == 5
    assert r.analysis_due(policy, V2, bed.status, bed.now + timedelta(seconds=4.9)) is None
    assert r.analysis_due(policy, V2, bed.status, bed.now + timedelta(seconds=5)) == R2
    assert r.analysis_due(policy, V3, bed.status, bed.now + timedelta(seconds=5)) is None  # another revision
    bed.tick(seconds=5, verdict=passing())
    assert r.analysis_due(policy, V2, bed.status, bed.now + timedelta(seconds=4)) is None
    assert r.analysis_due(policy, V2, bed.status, bed.now + timedelta(seconds=5)) == R2


def test_requeue_after_names_the_end_of_the_pause():
    bed = Cluster(r.Policy(steps=(r.Step(50, 30), r.Step(100, 0))), replicas=2)
    bed.tick(), bed.tick()
    assert bed.tick(seconds=10).requeue_after == pytest.approx(20)


def test_pause_holds_the_step_resume_continues_and_actions_apply_once():
    bed = Cluster(r.Policy(steps=(r.Step(50, 1), r.Step(100, 0))), replicas=2)
    bed.tick(), bed.tick()
    paused = bed.tick(action="pause")
    assert phase(paused) == r.PAUSED and paused.progressing[1] == "RolloutPaused"
    for _ in range(5):
        assert phase(bed.tick(seconds=10, action="pause")) == r.PAUSED  # same value: handled already
    resumed = bed.tick(action="resume")
    assert phase(resumed) == r.PROGRESSING and "RolloutResumed" in reasons([resumed])
    assert bed.run(lambda p: phase(p) == r.COMPLETE, action="resume").stable.name == R2


def test_promote_skips_the_remaining_steps_and_analysis():
    policy = r.Policy(steps=(r.Step(10, 3600), r.Step(50, 3600)), analysis=Criteria(interval=60))
    bed = Cluster(policy, replicas=3)
    bed.tick()
    promoting = bed.tick(action="promote:1")
    assert phase(promoting) == r.PROMOTING
    assert bed.run(lambda p: phase(p) == r.COMPLETE, action="promote:1").stable.name == R2


def test_abort_on_request_then_resume_retries_from_the_first_step():
    bed = Cluster(r.Policy(steps=(r.Step(50, 60),)), replicas=2)
    bed.tick(), bed.tick()
    aborted = bed.tick(action="abort")
    assert phase(aborted) == r.ABORTED and aborted.status["history"][-1]["reason"] == "ManualAbort"
    retried = bed.tick(action="resume:2")
    assert phase(retried) == r.PROGRESSING and retried.status["rollout"]["step"] == 0
    assert "RolloutStarted" in reasons([retried])


def test_unknown_or_pointless_actions_only_post_events():
    bed = Cluster(r.Policy(), replicas=2)
    plan = bed.tick(spec=V1, action="rollback")
    assert "UnknownRolloutAction" in reasons([plan]) and plan.status["rollout"]["handledAction"] == "rollback"
    plan = bed.tick(spec=V1, action="promote")
    assert "RolloutActionIgnored" in reasons([plan]) and plan.canary is None


def test_spec_back_to_stable_cancels_and_a_third_revision_supersedes():
    bed = Cluster(r.Policy(steps=(r.Step(50, 60),)), replicas=2)
    bed.tick(), bed.tick()
    superseded = bed.tick(spec=V3)
    assert superseded.canary.name == R3 and superseded.status["history"][-1]["reason"] == "Superseded"
    assert superseded.status["history"][-1]["revision"] == R2 and superseded.status["history"][-1]["version"] == 2
    cancelled = bed.tick(spec=V1)
    assert cancelled.canary is None and phase(cancelled) == r.COMPLETE and cancelled.split.stable == 2
    assert [h["reason"] for h in cancelled.status["history"]] == ["Initial", "Superseded", "Superseded"]


def test_a_repeated_reconcile_changes_nothing():
    policy = r.Policy(steps=(r.Step(50, 60),), analysis=Criteria(interval=5))
    bed = Cluster(policy, replicas=2)
    for _ in range(3):
        bed.tick()
    again = r.plan(policy, V2, 2, bed.status, bed.observed(), bed.now, gateway=True)
    assert again.status == bed.status and again.events == []


def test_weight_reported_without_a_gateway_is_the_ready_pod_ratio():
    bed = Cluster(r.Policy(steps=(r.Step(10, 60),)), replicas=2)
    bed.tick(gateway=False)
    plan = bed.tick(gateway=False)
    assert plan.status["canary"]["weight"] == 33 and plan.status["stable"]["weight"] == 67


def test_undo_goes_back_to_the_previous_promoted_revision_or_cancels_a_rollout():
    bed = Cluster(r.Policy(steps=(r.Step(50, 1),)), replicas=2)
    with pytest.raises(ValueError, match="no revision before"):
        r.undo_spec(bed.status)
    bed.tick()
    assert r.undo_spec(bed.status) == (V1, f"stable revision {R1} (cancelling {R2})")
    bed.run(lambda p: phase(p) == r.COMPLETE)
    assert r.undo_spec(bed.status) == (V1, f"previous revision {R1}")


def test_history_keeps_the_promotions_undo_needs():
    history = [{"revision": "a", "outcome": r.PROMOTED}, {"revision": "b", "outcome": r.PROMOTED}]
    history += [{"revision": f"x{i}", "outcome": r.ABORTED} for i in range(20)]
    kept = r._prune(history)
    assert [h["revision"] for h in kept[:2]] == ["a", "b"] and len(kept) == r.HISTORY_LIMIT + 2


def test_parse_action_explains_what_it_accepts():
    assert r.parse_action("Promote:123") == r.PROMOTE
    with pytest.raises(ValueError, match="promote, pause, resume, abort"):
        r.parse_action("rollback")
