"""A thin asynchronous JSON client for the Kubernetes API, with a request counter.

Why not the official client: its generated models weigh tens of megabytes and hide the request
count. The operator needs a handful of verbs on a handful of kinds, and the fleet benchmark needs
to know exactly how many requests (and how many writes) each reconcile costs, so every request goes
through `KubeClient.request`, which counts it by verb.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import json
import os
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import yaml

from .recent import Recent

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

# (apiVersion, kind) -> plural resource name. Only the kinds the operator reads or writes.
PLURALS = {
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("coordination.k8s.io/v1", "Lease"): "leases",
    ("llmserve.io/v1alpha1", "LLMService"): "llmservices",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproutes",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkersets",
}
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FIELD_MANAGER = "llmserve-operator"


class ConfigError(Exception):
    """The cluster credentials cannot be loaded; the message says which file or field is wrong."""


class ApiError(Exception):
    """A non-2xx answer from the API server, with the server's own Status reason and message."""

    def __init__(self, status: int, reason: str, message: str, method: str, path: str,
                 retry_after: float | None = None):
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message
        self.retry_after = retry_after  # seconds, from the server's Retry-After header

    @property
    def retryable(self) -> bool:
        """Conflicts, throttling and server-side failures are worth retrying; a 4xx is not."""
        return self.status in (409, 429) or self.status >= 500

    @property
    def refused(self) -> bool:
        """The API server will not take this write as it stands (invalid, forbidden, unknown kind):
        retrying it unchanged cannot help, and the cause belongs in the LLMService's status."""
        return not self.retryable and self.status >= 400


class NotLeading(Exception):
    """A write attempted after this replica lost (or released) the leader lease: refused locally,
    so two replicas never write the same objects."""


def retry_after_seconds(value: str | None) -> float | None:
    """The Retry-After header as seconds (the API server sends delta-seconds), or None."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


@dataclass
class ClusterConfig:
    """Where the API server is and how to authenticate; loaded from a kubeconfig or in-cluster."""

    server: str
    ca_data: bytes | None = None
    insecure: bool = False
    token: str | None = None
    token_path: Path | None = None  # in-cluster tokens rotate; re-read the file
    cert_data: bytes | None = None
    key_data: bytes | None = None
    namespace: str = "default"

    def bearer(self) -> str | None:
        if self.token_path is not None:
            return self.token_path.read_text().strip()
        return self.token


def _data(entry: dict, key: str, base: Path) -> bytes | None:
    """Read a kubeconfig `<key>-data` (base64) or `<key>` (file path relative to the kubeconfig)."""
    if entry.get(f"{key}-data"):
        return base64.b64decode(entry[f"{key}-data"])
    if entry.get(key):
        path = Path(os.path.expanduser(entry[key]))
        return (path if path.is_absolute() else base / path).read_bytes()
    return None


def load_kubeconfig(path: Path, context: str | None = None) -> ClusterConfig:
    """The current (or named) context of one kubeconfig file."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    name = context or doc.get("current-context")
    by_name = lambda section: {e.get("name"): e.get(section[:-1]) or {} for e in doc.get(section) or []}  # noqa: E731
    contexts, clusters, users = by_name("contexts"), by_name("clusters"), by_name("users")
    if name not in contexts:
        raise ConfigError(f"kubeconfig {path} has no context {name!r}")
    ctx = contexts[name]
    cluster, user = clusters.get(ctx.get("cluster")), users.get(ctx.get("user"), {})
    if not cluster or not cluster.get("server"):
        raise ConfigError(f"kubeconfig {path}: context {name!r} names no cluster with a server")
    if user.get("exec") or user.get("auth-provider"):
        raise ConfigError(f"kubeconfig {path}: exec and auth-provider credentials are not supported; "
                          "use a token or a client certificate")
    try:
        return ClusterConfig(
            server=cluster["server"].rstrip("/"),
            ca_data=_data(cluster, "certificate-authority", path.parent),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            token=user.get("token") or None,
            cert_data=_data(user, "client-certificate", path.parent),
            key_data=_data(user, "client-key", path.parent),
            namespace=ctx.get("namespace") or "default",
        )
    except OSError as exc:
        raise ConfigError(f"kubeconfig {path}: {exc}") from exc


def load_config(kubeconfig: str | None = None) -> ClusterConfig:
    """Explicit kubeconfig, else $KUBECONFIG, else the in-cluster service account, else ~/.kube/config."""
    explicit = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if explicit:
        return load_kubeconfig(Path(explicit))
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT_DIR / "token").exists():
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        return ClusterConfig(
            server=f"https://{host}:{port}",
            ca_data=(SERVICE_ACCOUNT_DIR / "ca.crt").read_bytes(),
            token_path=SERVICE_ACCOUNT_DIR / "token",
            namespace=(SERVICE_ACCOUNT_DIR / "namespace").read_text().strip(),
        )
    default = Path.home() / ".kube" / "config"
    if default.exists():
        return load_kubeconfig(default)
    raise ConfigError("no cluster credentials: pass --kubeconfig, set KUBECONFIG, or run in a pod")


def _ssl_context(config: ClusterConfig) -> ssl.SSLContext | bool:
    if config.insecure:
        return False
    ctx = ssl.create_default_context(cadata=config.ca_data.decode() if config.ca_data else None)
    if config.cert_data and config.key_data:
        # ssl only loads client certificates from files; keep them for the blink of the load.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert.write_bytes(config.cert_data)
            key.touch(mode=0o600)
            key.write_bytes(config.key_data)
            ctx.load_cert_chain(cert, key)
    return ctx


def resource_path(api_version: str, kind: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    """The REST path of a kind (collection, or one object and optionally its subresource)."""
    plural = PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


def object_path(obj: dict, subresource: str | None = None) -> str:
    meta = obj["metadata"]
    return resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], subresource)


@dataclass
class RequestStats:
    """Requests made through one client, by HTTP verb; the benchmark reads these."""

    by_verb: collections.Counter = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self.by_verb.values())

    @property
    def writes(self) -> int:
        return sum(n for verb, n in self.by_verb.items() if verb in WRITE_VERBS)


class KubeClient:
    """Async JSON requests against one API server. Use as `async with KubeClient(config) as c`."""

    def __init__(self, config: ClusterConfig, *, field_manager: str = FIELD_MANAGER,
                 timeout: float = 30.0, user_agent: str = "llmserve-operator", max_inflight: int = 16):
        self.config = config
        self.field_manager = field_manager
        self.stats = RequestStats()
        self.recent = Recent()  # shared by scoped() views: what this operator wrote
        # Writes are refused while this returns False (leader election sets it; scoped() views share it).
        self.may_write: Callable[[], bool] = lambda: True
        self._outer_stats: tuple[RequestStats, ...] = ()
        self._timeout = timeout
        self._max_inflight = max_inflight
        self._inflight: asyncio.Semaphore | None = None
        self._user_agent = user_agent
        self._session = None

    async def __aenter__(self) -> KubeClient:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=_ssl_context(self.config), limit=self._max_inflight),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"User-Agent": self._user_agent, "Accept": "application/json"},
        )
        # Requests beyond the limit wait here, before their timeout starts: a burst of reconciles
        # queues instead of timing out in the connection pool.
        self._inflight = asyncio.Semaphore(self._max_inflight)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    def scoped(self) -> KubeClient:
        """A view sharing this client's connections whose `stats` count only its own requests
        (which still count in this client's stats too): the cost of one reconcile."""
        view = copy.copy(self)
        view.stats, view._outer_stats = RequestStats(), (*self._outer_stats, self.stats)
        return view

    async def request(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                      content_type: str = "application/json", extra_headers: dict | None = None) -> dict:
        """One request; returns the decoded JSON body or raises ApiError (or a network error)."""
        import aiohttp

        if method in WRITE_VERBS and not self.may_write():
            raise NotLeading(f"{method} {path}: not the leader (lease lost or released)")
        for stats in (self.stats, *self._outer_stats):
            stats.by_verb[method] += 1
        headers = {"Content-Type": content_type, **(extra_headers or {})}
        if token := self.config.bearer():
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body)
        try:
            async with self._inflight, self._session.request(method, self.config.server + path, params=params,
                                                             data=data, headers=headers) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ApiError(503, "Unreachable", f"{type(exc).__name__}: {exc}", method, path) from exc
        payload = json.loads(text) if text and text.lstrip().startswith("{") else {}
        if resp.status >= 400:
            raise ApiError(resp.status, payload.get("reason") or resp.reason or "",
                           payload.get("message") or text.strip(), method, path,
                           retry_after=retry_after_seconds(resp.headers.get("Retry-After")))
        return payload

    async def get(self, path: str, params: dict | None = None) -> dict | None:
        """The object at `path`, or None when it does not exist."""
        try:
            return await self.request("GET", path, params=params)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def apply(self, obj: dict, subresource: str | None = None, *, replacing: dict | None = None) -> dict:
        """Server-side apply `obj` under our field manager, taking over conflicting fields.
        `replacing`: the object as observed before, so `recent` can stand in for the watch until
        it delivers the result. A `metadata.resourceVersion` in `obj` makes the write conditional
        (409 Conflict if the object changed since)."""
        result = await self.request(
            "PATCH", object_path(obj, subresource), body=obj,
            params={"fieldManager": self.field_manager, "force": "true"},
            content_type="application/apply-patch+yaml",
        )
        if replacing is not None:
            self.recent.remember(replacing, result)
        return result

    async def delete(self, obj: dict) -> bool:
        """Delete exactly this object (uid precondition), letting the garbage collector cascade.
        Returns False when it was already gone (or replaced by another object of the same name)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
                "preconditions": {"uid": obj["metadata"]["uid"]}}
        try:
            await self.request("DELETE", object_path(obj), body=body)
        except ApiError as exc:
            if exc.status == 404 or (exc.status == 409 and "Precondition" in exc.message):
                return False
            raise
        finally:
            self.recent.drop(obj)
        return True

    async def create(self, obj: dict, *, remember: bool = False) -> dict:
        """POST `obj`; 409 AlreadyExists if the name is taken. `remember`: let `recent` stand in
        for the watch until it delivers the new object."""
        meta = obj["metadata"]
        result = await self.request("POST", resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
                                    body=obj, params={"fieldManager": self.field_manager})
        if remember:
            self.recent.remember(None, result)
        return result

    async def list_uids(self, api_version: str, kind: str, params: dict | None = None,
                        namespace: str | None = None) -> set[str]:
        """The uids of every object of a kind, in one namespace or all (metadata only: a fraction
        of the bytes of a full list)."""
        payload = await self.request(
            "GET", resource_path(api_version, kind, namespace), params=params,
            extra_headers={"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,"
                                     "application/json"})
        return {item["metadata"]["uid"] for item in payload.get("items") or []}

    async def update(self, obj: dict) -> dict:
        """PUT with the object's resourceVersion: fails with 409 if anyone wrote it since we read it."""
        return await self.request("PUT", object_path(obj), body=obj,
                                  params={"fieldManager": self.field_manager})


def now_rfc3339(micro: bool = False) -> str:
    """Current UTC time as Kubernetes writes it (Time, or MicroTime when `micro`)."""
    t = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return f"{stamp}.{int(t % 1 * 1e6):06d}Z" if micro else f"{stamp}Z"
