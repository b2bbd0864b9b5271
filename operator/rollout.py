"""Canary rollout of model revisions: the state machine and the replica split, as pure functions.

`plan()` takes what the spec asks for, the rollout state the LLMService's status holds, what was
observed (ready pods per track, an analysis verdict, a manual action) and the time, and returns
the next state: replicas and traffic weights per track, the status blocks, history entries and
Events. It does no I/O and reads no clock, so every rule below has a unit test, and since the
whole state lives in the status, an operator killed at any point resumes the same rollout at the
same step (issue 6 item 5).

Identity. A *revision* is `v<version>-<hash>` of the serving spec (spec.model, spec.runtime,
spec.predictor): a changed version, image, GPU count or artifact digest is a new revision and
starts a rollout; an operator upgrade that renders pods differently is not (its Deployments roll
in place). Each revision has its own Deployment; the pods carry the revision, never the track,
because which revision is stable changes at promotion and a pod-template label change would
restart every GPU pod (Argo Rollouts likewise selects by pod-template hash, not by role).

Phases: Progressing (steps) -> Promoting -> Complete, with Paused (manual) and Aborted aside.
- A step holds `weight` percent of traffic on the canary for `pause`. The step is *reached* when
  the canary's ready pods carry its full share; its pause runs from then, and with analysis on it
  also needs a passing check made after it was reached: inconclusive is never success.
- Analysis runs every `interval` once the canary has any weight. A failed check counts; at
  `failureLimit` failed checks, or at once when every canary request failed, the rollout aborts:
  canary weight 0 and replicas 0, stable back to all replicas, Degraded with the measured values,
  a Warning Event and a history entry. Aborted stays until the spec changes or `resume` retries.
- After the last step the canary takes all replicas (surge-bounded, stable drains as canary pods
  become ready), then becomes the stable revision: a history entry, the old Deployment removed.
- A canary that does not become ready within the progress deadline aborts (CanaryNotReady), so a
  crash-looping or unplaceable version is reported instead of hanging.
- Spec back to the stable revision cancels the rollout; a third revision supersedes the canary.
- Manual actions (annotation `rollout.llmserve.io/action: <verb>[:<nonce>]`, each value handled
  once, remembered in status so GitOps re-applies are harmless): promote (skip the remaining steps
  and analysis), pause / resume (steps stop advancing; analysis keeps guarding), abort. `resume`
  on an aborted rollout retries it from the first step. `undo` is a spec change (`undo_spec`).

Replicas and GPUs (`split`): the canary never gets weight its ready pods cannot carry (kserve
#5983: 503s from a canary that was not ready), stable never shrinks below its share or below what
the canary's ready pods do not cover, and both tracks together never exceed replicas + maxSurge
pods (kserve#4748, kuberay#1476: no double capacity), so a rollout completes on a cluster with
room for only `maxSurge` extra GPUs' worth of pods.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .analysis import FAIL, INCONCLUSIVE, PASS, Criteria, Verdict
from .units import parse_duration

PROGRESSING, PAUSED, PROMOTING, ABORTED, COMPLETE = "Progressing", "Paused", "Promoting", "Aborted", "Complete"
ACTIVE = (PROGRESSING, PAUSED, PROMOTING)
PROMOTED = "Promoted"  # history outcomes: PROMOTED or ABORTED

# Not under `llmserve.io/`: kopf keeps its bookkeeping there and leaves every annotation with that
# prefix out of the object's "essence", so a change of this one would trigger no handler.
ACTION_ANNOTATION = "rollout.llmserve.io/action"
PROMOTE, PAUSE, RESUME, ABORT = "promote", "pause", "resume", "abort"
ACTIONS = (PROMOTE, PAUSE, RESUME, ABORT)

HISTORY_LIMIT = 10
SERVING_FIELDS = ("model", "runtime", "predictor")  # the spec sections a revision is made of


# ----------------------------------------------------------------------------------- identity

def serving_spec(spec: dict) -> dict:
    """The part of an LLMService spec that defines what its pods serve (and nothing else:
    replicas, autoscaling and rollout settings change no pod)."""
    return {key: spec[key] for key in SERVING_FIELDS if spec.get(key)}


# The values the CRD defaults inside the serving sections (charts/llmserve/templates/crd.yaml).
# The API server adds a default to every stored object when it reads it, so a chart upgrade that
# introduces one would change every serving spec; a field holding its default is therefore hashed
# as if it were absent, and a new default changes no revision (no rollout restarting every GPU
# pod). tests/integration/test_operator.py checks this table against the installed CRD.
SERVING_DEFAULTS = {"runtime": {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "startupTimeout": "10m",
                                "shmSize": "256Mi"}}


def _without_defaults(serving: dict) -> dict:
    out = {}
    for section, fields in serving.items():
        defaults = SERVING_DEFAULTS.get(section, {})
        kept = {k: v for k, v in fields.items() if k not in defaults or v != defaults[k]} \
            if isinstance(fields, dict) else fields
        if kept:
            out[section] = kept
    return out


def revision_name(serving: dict) -> str:
    """`v<version>-<6 hex>`: readable, and distinct for any change of the serving spec that is not
    merely a default spelled out."""
    canonical = json.dumps(_without_defaults(serving), sort_keys=True, separators=(",", ":"))
    return f"v{serving['model']['version']}-{hashlib.sha256(canonical.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class Revision:
    """One servable revision: what the status records of a track and of a history entry."""

    name: str
    version: int
    spec: dict  # serving_spec() snapshot: enough to render its Deployment again, or to undo to it
    sha256: str | None = None

    @classmethod
    def of(cls, serving: dict) -> Revision:
        model = serving["model"]
        return cls(revision_name(serving), int(model["version"]), serving, model.get("sha256") or None)

    @classmethod
    def from_status(cls, block: dict | None) -> Revision | None:
        if not block or not block.get("revision") or not block.get("spec"):
            return None
        return cls(block["revision"], int(block["version"]), block["spec"], block.get("sha256"))

    def to_status(self) -> dict:
        out = {"version": self.version, "revision": self.name}
        if self.sha256:
            out["sha256"] = self.sha256
        return out


# ------------------------------------------------------------------------------------- policy

@dataclass(frozen=True)
class Step:
    weight: int  # percent of traffic on the canary, 1..100
    pause: float = 0.0  # seconds to hold it once reached


@dataclass(frozen=True)
class Policy:
    """`spec.rollout`, typed and defaulted."""

    steps: tuple[Step, ...] = (Step(100),)
    max_surge: int = 1
    analysis: Criteria | None = None
    progress_deadline: float = 900.0  # seconds for the canary to reach a step's weight

    @classmethod
    def from_spec(cls, section: dict | None, progress_deadline: float) -> Policy:
        section = section or {}
        steps = tuple(Step(int(s["weight"]), parse_duration(s.get("pause") or "0s"))
                      for s in section.get("steps") or [])
        return cls(steps=steps or (Step(100),), max_surge=int(section.get("maxSurge", 1)),
                   analysis=Criteria.from_spec(section.get("analysis")), progress_deadline=progress_deadline)


# -------------------------------------------------------------------------------------- split

@dataclass(frozen=True)
class Split:
    """Replicas per track and the traffic weights that go with them.

    `stable_weight` / `canary_weight` are relative (HTTPRoute backendRef weights): the canary's
    share of traffic is canary_weight / (stable_weight + canary_weight).
    """

    stable: int
    canary: int
    stable_weight: int
    canary_weight: int
    reached: bool  # the canary's ready pods carry its whole share of the requested weight

    @property
    def canary_percent(self) -> int:
        total = self.stable_weight + self.canary_weight
        return self.canary_weight * 100 // total if total else 0


def split(replicas: int, weight: int, canary_ready: int, max_surge: int) -> Split:
    """Split an LLMService's `replicas` between stable and canary for `weight` percent of traffic.

    The one place that turns (replicas, weight) into per-track replicas: the rollout and the
    autoscaler (which only changes `replicas`) both go through it, so they cannot fight.
    - The canary needs ceil(replicas x weight%) pods, stable ceil(replicas x (100 - weight)%).
    - Stable keeps every pod the canary's *ready* pods do not replace, so ready capacity never
      drops below `replicas`; it shrinks only as canary pods become ready.
    - The canary gets at most `replicas + max_surge` minus stable's pods: the GPU budget.
    - The canary's weight is capped by what its ready pods carry (each pod 1/replicas of the
      traffic), so a canary that is not ready gets no traffic.
    """
    if replicas <= 0:
        return Split(0, 0, 1, 0, reached=weight == 0)
    want_canary = math.ceil(replicas * weight / 100)
    want_stable = math.ceil(replicas * (100 - weight) / 100)
    held = min(canary_ready, want_canary)
    stable = max(want_stable, replicas - held)
    canary = min(want_canary, max(0, replicas + max_surge - stable))
    canary_weight = min(weight * replicas, 100 * held)
    stable_weight = 100 * replicas - canary_weight
    divisor = math.gcd(stable_weight, canary_weight) or 1
    return Split(stable, canary, stable_weight // divisor, canary_weight // divisor, reached=held == want_canary)


# ---------------------------------------------------------------------------------- the machine

@dataclass(frozen=True)
class Observed:
    """Ready pods of each track's revision, as the Deployments report them."""

    stable_ready: int = 0
    canary_ready: int = 0


@dataclass
class Plan:
    """What the LLMService should look like next."""

    stable: Revision
    canary: Revision | None  # None: no canary Deployment should exist
    split: Split
    status: dict  # "stable", "canary" (when a canary exists), "rollout", "history"
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    progressing: tuple[str, str, str] | None = None  # (status, reason, message) while a rollout runs
    degraded: tuple[str, str] | None = None  # (reason, message) after an abort
    requeue_after: float | None = None  # seconds until a pause ends or a check is due


def stamp(t: datetime) -> str:
    """RFC 3339 UTC with milliseconds: pauses and intervals can be a few seconds long."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def parse_action(value: str) -> str:
    """The verb of an action annotation value (`promote` or `promote:<nonce>`)."""
    verb = value.split(":", 1)[0].strip().lower()
    if verb not in ACTIONS:
        raise ValueError(f"unknown rollout action {value!r}: use one of {', '.join(ACTIONS)} (optionally "
                         "followed by :<nonce> to repeat one)")
    return verb


def analysis_due(policy: Policy, serving: dict, status: dict | None, now: datetime) -> str | None:
    """The canary revision to check now, if a check is due: analysis on, a rollout of the revision
    the spec asks for under way, its canary has had weight, and an interval has passed since it
    got weight or since the last check."""
    rollout = (status or {}).get("rollout") or {}
    since = _check_clock(rollout)
    due = (policy.analysis is not None and rollout.get("phase") in (PROGRESSING, PAUSED) and since is not None
           and rollout.get("revision") == revision_name(serving)
           and (now - since).total_seconds() >= policy.analysis.interval)
    return rollout["revision"] if due else None


def _check_clock(rollout: dict) -> datetime | None:
    stamps = [rollout.get("weightSince"), (rollout.get("lastCheck") or {}).get("time")]
    stamps = [parse_stamp(s) for s in stamps if s]
    return max(stamps) if stamps and rollout.get("weightSince") else None


def _history_entry(rev: Revision, outcome: str, now: datetime, reason: str, message: str) -> dict:
    entry = {**rev.to_status(), "outcome": outcome, "time": stamp(now), "reason": reason, "message": message}
    if outcome == PROMOTED:
        entry["spec"] = rev.spec  # what `undo` goes back to
    return entry


def _prune(history: list[dict]) -> list[dict]:
    """The newest HISTORY_LIMIT entries, but never losing the two newest promotions (undo needs
    the one before the current stable, however many aborted rollouts came since)."""
    promoted = [i for i, h in enumerate(history) if h.get("outcome") == PROMOTED][-2:]
    keep = set(range(len(history) - HISTORY_LIMIT, len(history))) | set(promoted)
    return [h for i, h in enumerate(history) if i in keep]


class _Machine:
    """One application of the rules; `plan()` is its only user."""

    def __init__(self, policy: Policy, target: Revision, replicas: int, status: dict | None,
                 observed: Observed, now: datetime):
        status = status or {}
        self.policy, self.target, self.replicas, self.observed, self.now = policy, target, replicas, observed, now
        self.stable = Revision.from_status(status.get("stable"))
        self.rollout = dict(status.get("rollout") or {})
        self.history = list(status.get("history") or [])
        self.events: list[tuple[str, str, str]] = []

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    # -- transitions ---------------------------------------------------------------------------
    def start(self, retry: bool = False) -> None:
        handled = self.rollout.get("handledAction")
        self.rollout = {"phase": PROGRESSING, "revision": self.target.name, "version": self.target.version, "step": 0,
                        "startedAt": stamp(self.now), "stepStartedAt": stamp(self.now), "failedChecks": 0}
        if handled:
            self.rollout["handledAction"] = handled
        steps = ", ".join(f"{s.weight}%" for s in self.policy.steps)
        verb = "retrying" if retry else "starting"
        self.event("Normal", "RolloutStarted", f"{verb} rollout of {self.target.name} (stable "
                   f"{self.stable.name}): steps {steps}" + (", analysis on" if self.policy.analysis else ""))

    def finish(self, outcome: str, reason: str, message: str, *, type_: str = "Warning") -> None:
        """End the rollout of the target: recorded in history, announced as an Event."""
        self.history.append(_history_entry(self.target, outcome, self.now, reason, message))
        self.history = _prune(self.history)
        self.event(type_, f"Rollout{outcome}", message)

    def abort(self, reason: str, message: str) -> None:
        self.rollout.update(phase=ABORTED, reason=reason, message=message)
        self.finish(ABORTED, reason, f"aborted rollout of {self.target.name} ({reason}): {message}")

    def cancel(self, why: str) -> None:
        """The spec moved away from an active rollout's revision before it finished."""
        if self.rollout.get("phase") in ACTIVE:
            revision = self.rollout["revision"]
            self.history.append({"version": self.rollout.get("version", 0), "revision": revision,
                                 "outcome": ABORTED, "time": stamp(self.now), "reason": "Superseded",
                                 "message": f"rollout of {revision} cancelled: {why}"})
            self.history = _prune(self.history)
            self.event("Normal", "RolloutCancelled", f"rollout of {revision} cancelled: {why}")

    def act(self, value: str | None) -> None:
        """Apply a manual action annotation value, once."""
        if not value or value == self.rollout.get("handledAction"):
            return
        self.rollout["handledAction"] = value
        try:
            verb = parse_action(value)
        except ValueError as exc:
            self.event("Warning", "UnknownRolloutAction", str(exc))
            return
        phase = self.rollout.get("phase")
        if verb == PROMOTE and phase in (PROGRESSING, PAUSED, ABORTED):
            self.rollout.update(phase=PROMOTING, step=len(self.policy.steps), stepStartedAt=stamp(self.now))
            for key in ("stepReachedAt", "reason", "message"):
                self.rollout.pop(key, None)
            self.event("Normal", "RolloutPromoteRequested",
                       f"promoting {self.target.name} on request, skipping the remaining steps and analysis")
        elif verb == PAUSE and phase == PROGRESSING:
            self.rollout["phase"] = PAUSED
            self.event("Normal", "RolloutPaused", f"rollout of {self.target.name} paused at step "
                       f"{self.rollout['step'] + 1}/{len(self.policy.steps)}; analysis keeps running")
        elif verb == RESUME and phase == PAUSED:
            self.rollout["phase"] = PROGRESSING
            self.rollout["stepStartedAt"] = stamp(self.now)  # the progress deadline restarts
            self.event("Normal", "RolloutResumed", f"rollout of {self.target.name} resumed")
        elif verb == RESUME and phase == ABORTED:
            self.start(retry=True)
        elif verb == ABORT and phase in ACTIVE:
            self.abort("ManualAbort", "aborted on request")
        else:
            what = f"the rollout of {self.target.name} is {phase}" if phase != COMPLETE else "no rollout is under way"
            self.event("Normal", "RolloutActionIgnored", f"{verb}: nothing to do, {what}")

    def judge(self, verdict: Verdict | None) -> None:
        if verdict is None or self.rollout.get("phase") not in (PROGRESSING, PAUSED):
            return
        previous = (self.rollout.get("lastCheck") or {}).get("result")
        self.rollout["lastCheck"] = {"time": stamp(self.now), **verdict.to_status()}
        if verdict.result == PASS:
            self.rollout["lastPassedAt"] = stamp(self.now)
        elif verdict.result == INCONCLUSIVE:
            if previous != INCONCLUSIVE:
                self.event("Warning", "AnalysisInconclusive", f"{self.target.name}: {verdict.message}")
        elif verdict.result == FAIL:
            failed = self.rollout.get("failedChecks", 0) + 1
            self.rollout["failedChecks"] = failed
            limit = self.policy.analysis.failure_limit  # a verdict exists only when analysis is on
            if verdict.fatal:
                self.abort("AnalysisFailed", f"fail fast, {verdict.message}")
            elif failed >= limit:
                self.abort("AnalysisFailed", f"{failed} of {limit} allowed failed checks; last: {verdict.message}")
            else:
                self.event("Warning", "AnalysisFailed", f"{self.target.name} check {failed}/{limit} failed: "
                           f"{verdict.message}")

    def weight(self) -> int:
        phase = self.rollout.get("phase")
        if phase == PROMOTING:
            return 100
        if phase in (PROGRESSING, PAUSED):
            return self.policy.steps[self.rollout["step"]].weight
        return 0

    def seconds_since(self, key: str) -> float:
        return (self.now - parse_stamp(self.rollout[key])).total_seconds()

    def advance(self) -> Split:
        """Move through steps as far as the observed state allows; returns the split to apply."""
        while True:
            phase = self.rollout.get("phase")
            cut = split(self.replicas, self.weight(), self.observed.canary_ready, self.policy.max_surge)
            if phase not in ACTIVE:
                return cut
            if cut.canary_weight and not self.rollout.get("weightSince"):
                self.rollout["weightSince"] = stamp(self.now)
            if phase == PROMOTING:
                if cut.reached:
                    self.promote()
                    continue
            elif cut.reached and not self.rollout.get("stepReachedAt"):
                self.rollout["stepReachedAt"] = stamp(self.now)
                self.event("Normal", "RolloutStepReached", f"{self.target.name} serves {cut.canary_percent}% "
                           f"(step {self.rollout['step'] + 1}/{len(self.policy.steps)}, weight "
                           f"{self.weight()}%)")
            if (not cut.reached and phase != PAUSED and not self.rollout.get("stepReachedAt")
                    and self.seconds_since("stepStartedAt") > self.policy.progress_deadline):
                self.abort("CanaryNotReady", f"{self.observed.canary_ready}/{cut.canary} canary pods ready "
                           f"after {self.policy.progress_deadline:.0f}s (see the Degraded reasons of its pods)")
                continue
            if phase == PROGRESSING and self.step_done():
                self.rollout["step"] += 1
                self.rollout["stepStartedAt"] = stamp(self.now)
                self.rollout.pop("stepReachedAt", None)
                if self.rollout["step"] == len(self.policy.steps):
                    self.rollout["phase"] = PROMOTING
                    self.event("Normal", "RolloutPromoting", f"{self.target.name} passed all "
                               f"{len(self.policy.steps)} steps; moving every replica to it")
                continue
            return cut

    def step_done(self) -> bool:
        reached = self.rollout.get("stepReachedAt")
        if not reached:
            return False
        step = self.policy.steps[self.rollout["step"]]
        if self.seconds_since("stepReachedAt") < step.pause:
            return False
        passed = self.rollout.get("lastPassedAt")
        # A pass counts only if made after the step was reached: its window saw this weight.
        return self.policy.analysis is None or (passed is not None and parse_stamp(passed) > parse_stamp(reached))

    def promote(self) -> None:
        started = parse_stamp(self.rollout["startedAt"])
        took = (self.now - started).total_seconds()
        old = self.stable
        self.finish(PROMOTED, "Promoted", f"promoted {self.target.name} (was {old.name}) after {took:.0f}s",
                    type_="Normal")
        self.stable = self.target
        self.observed = Observed(stable_ready=self.observed.canary_ready)  # the old stable is going away
        self.rollout = {"phase": COMPLETE, "revision": self.target.name,
                        **{k: self.rollout[k] for k in ("handledAction",) if k in self.rollout}}

    # -- outputs -------------------------------------------------------------------------------
    def requeue_after(self) -> float | None:
        """Seconds until time alone changes the plan: a pause ends, a check is due, a deadline."""
        phase, times = self.rollout.get("phase"), []
        if phase == PROGRESSING and self.rollout.get("stepReachedAt"):
            step = self.policy.steps[self.rollout["step"]]
            left = step.pause - self.seconds_since("stepReachedAt")
            if left > 0:  # a pause already over waits for the next check below, not for 0 s
                times.append(left)
        if phase in (PROGRESSING, PROMOTING) and not self.rollout.get("stepReachedAt"):
            times.append(self.policy.progress_deadline - self.seconds_since("stepStartedAt") + 0.001)
        clock = _check_clock(self.rollout)
        if self.policy.analysis and phase in (PROGRESSING, PAUSED) and clock is not None:
            times.append(self.policy.analysis.interval - (self.now - clock).total_seconds())
        return max(0.0, min(times)) if times else None

    def track_status(self, rev: Revision, replicas: int, ready: int, percent: int) -> dict:
        return {**rev.to_status(), "replicas": replicas, "readyReplicas": ready, "weight": percent}


def plan(policy: Policy, serving: dict, replicas: int, status: dict | None, observed: Observed,
         now: datetime, *, verdict: Verdict | None = None, action: str | None = None,
         gateway: bool = False) -> Plan:
    """The next state of one LLMService's rollout.

    `serving` is `serving_spec(spec)`; `replicas` the replicas the service should have (spec or
    autoscaler); `status` the LLMService's status as last written; `verdict` a check made in this
    reconcile because `analysis_due()` said so; `action` the action annotation's value; `gateway`
    whether traffic is split by HTTPRoute weights (else by the replica ratio behind the Service).
    """
    m = _Machine(policy, Revision.of(serving), replicas, status, observed, now)
    if m.stable is None:  # the first revision of the service: nothing to roll out from
        m.stable = m.target
        m.history = _prune(m.history + [_history_entry(m.target, PROMOTED, now, "Initial",
                                                        f"first revision {m.target.name}")])
        m.rollout = {"phase": COMPLETE, "revision": m.target.name}
    if m.target.name == m.stable.name:
        if m.rollout.get("revision") != m.stable.name:
            m.cancel(f"the spec is back to the stable revision {m.stable.name}")
            m.rollout = {"phase": COMPLETE, "revision": m.stable.name,
                         **{k: m.rollout[k] for k in ("handledAction",) if k in m.rollout}}
        m.act(action)
    else:
        if m.rollout.get("revision") != m.target.name:
            m.cancel(f"the spec now asks for {m.target.name}")
            m.start()
        m.act(action)
        m.judge(verdict)
    cut = m.advance()

    phase, observed = m.rollout["phase"], m.observed
    canary = m.target if phase in ACTIVE or phase == ABORTED else None
    if gateway:
        percent = cut.canary_percent
    else:  # the entry Service spreads requests over every ready pod of both tracks
        ready = observed.stable_ready + observed.canary_ready
        percent = observed.canary_ready * 100 // ready if canary and ready else 0
    out = {"stable": {**m.track_status(m.stable, cut.stable, observed.stable_ready, 100 - percent),
                      "spec": m.stable.spec},
           "rollout": m.rollout, "history": m.history}
    if canary:
        out["canary"] = {**m.track_status(canary, cut.canary, observed.canary_ready, percent),
                         "step": min(m.rollout.get("step", 0), len(policy.steps))}
    result = Plan(m.stable, canary, cut, out, m.events, requeue_after=m.requeue_after())
    step = f"step {min(m.rollout.get('step', 0) + 1, len(policy.steps))}/{len(policy.steps)}"
    if phase == PROGRESSING:
        result.progressing = ("True", "RolloutInProgress", f"canary {canary.name} at {percent}% ({step}); "
                              f"stable {m.stable.name}" + _check_note(m.rollout))
    elif phase == PAUSED:
        result.progressing = ("True", "RolloutPaused", f"rollout of {canary.name} paused at {percent}% ({step}); "
                              "resume or promote it" + _check_note(m.rollout))
    elif phase == PROMOTING:
        result.progressing = ("True", "RolloutPromoting", f"moving every replica to {canary.name}: "
                              f"{observed.canary_ready}/{replicas} ready")
    elif phase == ABORTED:
        message = m.rollout.get("message", "")
        result.progressing = ("False", "RolloutAborted", f"rollout of {canary.name} aborted ({m.rollout.get('reason')}): "
                              f"{message}; stable {m.stable.name} serves everything")
        result.degraded = ("RolloutAborted", f"rollout of {canary.name} aborted ({m.rollout.get('reason')}): "
                           f"{message}. Change spec.model or resume to retry")
    return result


def _check_note(rollout: dict) -> str:
    check = rollout.get("lastCheck")
    return f"; last check {check['result']}: {check['message']}" if check else ""


def undo_spec(status: dict | None) -> tuple[dict, str]:
    """The serving spec `undo` writes back, and what it goes back to.

    During a rollout: the stable revision (cancelling the canary). Otherwise: the newest promoted
    revision before the stable one, from history.
    """
    status = status or {}
    stable = Revision.from_status(status.get("stable"))
    if stable is None:
        raise ValueError("the LLMService has no stable revision yet")
    rollout = status.get("rollout") or {}
    if rollout.get("phase") in ACTIVE or rollout.get("phase") == ABORTED:
        return stable.spec, f"stable revision {stable.name} (cancelling {rollout.get('revision')})"
    for entry in reversed(status.get("history") or []):
        if entry.get("outcome") == PROMOTED and entry.get("revision") != stable.name and entry.get("spec"):
            return entry["spec"], f"previous revision {entry['revision']}"
    raise ValueError(f"no revision before {stable.name} in the history")
