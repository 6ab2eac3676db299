"""The Kubernetes provider: buffer hosts are GPU nodes held by balloon pods.

A balloon is a `pause` pod at negative priority, one per node, in a Deployment per host type
(`fastboot-balloon-<host_type>`); launchers/kubernetes/README.md has the design.

    acquire     scale the balloon Deployment +1; wait until a balloon is Running on a node that
                is healthy (label fastboot.dev/health=ok, no fastboot.dev/quarantined taint, not
                cordoned), whose agent pod is Ready and that is not handed out already. The node
                is the host; its agent pod's IP the address. Past the deadline: scale back, None.
    release     pod-deletion-cost -1000 on that node's balloon, then scale -1: the ReplicaSet
                removes exactly that pod, and the cluster autoscaler may drain the empty node.
    quarantine  drop the health label, taint fastboot.dev/quarantined=REASON:NoSchedule, cordon.

Every call goes through the official client's sync API on a worker thread. `RBAC_RULES` is
every (API group, resource, verb) this module calls: the chart's Role and ClusterRole, and the
unit tests check that the requests made stay inside it. API errors become `HostError` here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastboot.buffer.hosts import HostSpec
from fastboot.errors import ConfigError, DependencyError, HostError

log = logging.getLogger(__name__)

#: The least-privilege RBAC of the provider (the chart renders exactly this). The Secret rule is
#: limited by resourceNames to the agents' token Secret there.
RBAC_RULES: Mapping[str, list[dict[str, list[str]]]] = {
    "namespaced": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    ],
    "cluster": [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "patch"]},
    ],
}

HOST_TYPE_LABEL = "fastboot.dev/host-type"  #: on balloon Deployments and their pods
HEALTH_LABEL = "fastboot.dev/health"  #: "ok" on nodes that passed the agent's check
KIND_LABEL = "fastboot.dev/kind"  #: "cpu" or "gpu" (default) on nodes
QUARANTINE_TAINT = "fastboot.dev/quarantined"  #: taint key; its value is the reason, shortened
REASON_ANNOTATION = "fastboot.dev/quarantine-reason"  #: the whole reason, on the node
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"  #: read by the ReplicaSet controller
#: Connect and read timeout of each API call, so a hung API server never holds a thread forever.
REQUEST_TIMEOUT_S = (5.0, 30.0)
#: Tries of the quarantine patch when the node changed between read and patch (409).
PATCH_TRIES = 3


@dataclass(frozen=True)
class KubernetesSettings:
    """Where the balloons and agents are ([buffer.kubernetes] in the router's config)."""

    #: Namespace of the balloon Deployments, the agent DaemonSet and the token Secret.
    namespace: str = "fastboot"
    #: Label selector of the agent DaemonSet's pods.
    agent_selector: str = "app.kubernetes.io/name=fastboot-agent"
    #: Port of the agent API on its pod's IP (launchers/kubernetes: --listen 0.0.0.0:8700).
    agent_port: int = 8700
    #: Secret holding the agents' bearer token.
    token_secret: str = "fastboot-agent-token"
    #: Key of the token in that Secret.
    token_key: str = "token"
    #: Balloon Deployment of a host type; `{host_type}` is replaced.
    balloon_name: str = "fastboot-balloon-{host_type}"
    #: Longest wait for a new balloon to hold a healthy node (node boot + agent check; the
    #: buffer's default boot timeout, docs/buffer.md).
    acquire_timeout_s: float = 600.0
    #: Seconds between looks at the balloon pods while acquiring.
    poll_s: float = 2.0
    #: Most nodes per host type (the node group's max size), for `supply`; absent: unknown.
    max_nodes: Mapping[str, int] = field(default_factory=dict)
    #: kubeconfig file to use; empty: the in-cluster service account.
    kubeconfig: str = ""

    def __post_init__(self) -> None:
        try:
            self.balloon_name.format(host_type="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"balloon_name {self.balloon_name!r} may use only {{host_type}}: {exc!r}"
            ) from exc
        if self.poll_s <= 0 or self.acquire_timeout_s <= 0:
            raise ConfigError("poll_s and acquire_timeout_s must be > 0")
        if not 0 < self.agent_port < 65536:
            raise ConfigError(f"agent_port {self.agent_port} is out of range")

    def deployment(self, host_type: str) -> str:
        """The balloon Deployment of `host_type`."""
        return self.balloon_name.format(host_type=host_type)


def label_value(text: str) -> str:
    """`text` as a valid label (and taint) value: at most 63 of [A-Za-z0-9._-], alphanumeric at
    both ends."""
    value = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", text))
    return value[:63].strip("-_.") or "unspecified"


def _kubernetes() -> tuple[Any, Any]:
    """The official client's `client` and `config` modules (untyped to mypy: Any)."""
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise DependencyError(
            "the Kubernetes provider needs the official Kubernetes client: "
            "pip install 'fastboot[router]'"
        ) from exc
    return client, config


def connect(settings: KubernetesSettings) -> Any:
    """An ApiClient from `settings.kubeconfig`, or from the pod's service account."""
    client, config = _kubernetes()
    try:
        if settings.kubeconfig:
            return config.new_client_from_config(config_file=settings.kubeconfig)
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except (config.ConfigException, OSError) as exc:
        where = settings.kubeconfig or "the in-cluster service account"
        raise ConfigError(
            f"cannot configure the Kubernetes client from {where}: {exc}; set "
            "[buffer.kubernetes] kubeconfig, or run the router in a pod with a service account"
        ) from exc


class KubernetesProvider:
    """Buffer hosts from balloon Deployments (see the module docstring).

    Nodes handed out are remembered in this process only: a restarted router hands out no node
    until it acquires again (docs/buffer.md, "Missing").
    """

    def __init__(self, settings: KubernetesSettings | None = None, api_client: Any = None) -> None:
        self.settings = settings or KubernetesSettings()
        client, _ = _kubernetes()
        import urllib3  # the client's transport

        self._refused: tuple[type[BaseException], ...] = (client.ApiException,)
        self._unreachable: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)
        self._api = api_client if api_client is not None else connect(self.settings)
        self._core = client.CoreV1Api(self._api)
        self._apps = client.AppsV1Api(self._api)
        self._in_use: dict[str, str] = {}  # node name -> host type
        self._selectors: dict[str, str] = {}  # host type -> its balloon pods' label selector
        self._scale_lock = asyncio.Lock()

    # --- the Provider protocol -----------------------------------------------------------------

    async def acquire(self, host_type: str) -> HostSpec | None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._scale(host_type, +1)
        try:
            while True:
                try:
                    spec = await self._claim(host_type)
                except HostError as exc:  # a transient API error: the deadline decides
                    log.warning("looking for a %s balloon: %s", host_type, exc)
                    spec = None
                if spec is not None:
                    log.info(
                        "node %s (%s) held by a balloon in %.2f s",
                        spec.name,
                        host_type,
                        loop.time() - started,
                    )
                    return spec
                if loop.time() - started >= self.settings.acquire_timeout_s:
                    break
                await asyncio.sleep(self.settings.poll_s)
        except asyncio.CancelledError:
            await asyncio.shield(self._shrink(host_type, None))
            raise
        log.warning(
            "no healthy %s node held by a balloon in %g s; scaling %s back",
            host_type,
            self.settings.acquire_timeout_s,
            self.settings.deployment(host_type),
        )
        await self._shrink(host_type, None)
        return None

    async def release(self, spec: HostSpec) -> None:
        host_type = self._in_use.get(spec.name, spec.host_type)
        try:
            await self._shrink(host_type, spec.name)
        finally:
            self._in_use.pop(spec.name, None)

    def supply(self, host_type: str) -> int | None:
        most = self.settings.max_nodes.get(host_type)
        if most is None:
            return None
        return max(0, most - sum(1 for t in self._in_use.values() if t == host_type))

    async def quarantine(self, spec: HostSpec, reason: str) -> None:
        """Take the node out of scheduling: no health label, the quarantine taint (other taints
        kept), cordoned, the reason in an annotation. Its balloon stays, so the autoscaler does
        not hand the node out again; an operator replaces it (`BufferManager.forget` releases)."""
        for attempt in range(1, PATCH_TRIES + 1):
            node = await self._call("read node", self._core.read_node, spec.name)
            taints = [
                self._api.sanitize_for_serialization(t)
                for t in (node.spec.taints or [])
                if t.key != QUARANTINE_TAINT
            ]
            taint = {"key": QUARANTINE_TAINT, "value": label_value(reason), "effect": "NoSchedule"}
            body = {
                "metadata": {
                    "resourceVersion": node.metadata.resource_version,
                    "labels": {HEALTH_LABEL: None},
                    "annotations": {REASON_ANNOTATION: reason},
                },
                "spec": {"unschedulable": True, "taints": [*taints, taint]},
            }
            try:
                await self._call("patch node", self._core.patch_node, spec.name, body)
            except HostError as exc:
                if _status(exc) == 409 and attempt < PATCH_TRIES:
                    continue  # the node changed since it was read: read it again
                raise
            log.info("node %s quarantined: %s", spec.name, reason)
            return

    # --- internals ------------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on a worker thread; API and connection errors become HostError."""
        try:
            return await asyncio.to_thread(fn, *args, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except self._refused as exc:
            status = getattr(exc, "status", None)
            hint = (
                " (the router's service account lacks a permission: compare the chart's RBAC "
                "with fastboot.buffer.kubernetes.RBAC_RULES)"
                if status == 403
                else ""
            )
            raise HostError(
                f"Kubernetes API: {what} failed with {status} {getattr(exc, 'reason', '')}: "
                f"{_api_message(exc)}{hint}"
            ) from exc
        except self._unreachable as exc:
            raise HostError(f"Kubernetes API: {what}: cannot reach the API server: {exc}") from exc

    async def _scale(self, host_type: str, delta: int) -> int:
        """Move the balloon Deployment's replicas by `delta` (never below 0); the new count."""
        name, ns = self.settings.deployment(host_type), self.settings.namespace
        async with self._scale_lock:
            scale = await self._call(
                "read scale", self._apps.read_namespaced_deployment_scale, name, ns
            )
            replicas = max(0, (scale.spec.replicas or 0) + delta)
            await self._call(
                "patch scale",
                self._apps.patch_namespaced_deployment_scale,
                name,
                ns,
                {"spec": {"replicas": replicas}},
            )
        log.debug("deployment %s/%s scaled to %d", ns, name, replicas)
        return replicas

    async def _shrink(self, host_type: str, node: str | None) -> None:
        """Scale the balloons down by one, removing the balloon on `node` (None: one not handed
        out, a Pending one first). Pod deletion cost picks the pod; the ReplicaSet still removes
        unscheduled pods before it looks at the cost (docs/buffer.md)."""
        pods = await self._balloons(host_type)
        if node is not None:
            chosen = [p for p in pods if p.spec.node_name == node]
        else:
            free = [p for p in pods if p.spec.node_name not in self._in_use]
            chosen = sorted(free, key=lambda p: _running(p))
        if chosen:
            await self._deletion_cost(chosen[0], "-1000")
        else:
            log.warning("no %s balloon found on %s; scaling down anyway", host_type, node or "-")
        await self._scale(host_type, -1)

    async def _deletion_cost(self, pod: Any, cost: str | None) -> None:
        """Set (None: remove) the balloon's pod-deletion-cost annotation."""
        await self._call(
            "annotate balloon",
            self._core.patch_namespaced_pod,
            pod.metadata.name,
            self.settings.namespace,
            {"metadata": {"annotations": {DELETION_COST: cost}}},
        )

    async def _claim(self, host_type: str) -> HostSpec | None:
        """A Running balloon on a healthy node with a Ready agent that is not handed out, now
        handed out; None if there is none yet."""
        for pod in await self._balloons(host_type):
            name = pod.spec.node_name
            if not _running(pod) or name in self._in_use:
                continue
            node = await self._call("read node", self._core.read_node, name)
            if not _healthy(node):
                continue
            agent = await self._agent(name)
            if agent is None:
                continue
            token = await self._token()
            if name in self._in_use:  # a concurrent acquire took it meanwhile
                continue
            self._in_use[name] = host_type
            if (pod.metadata.annotations or {}).get(DELETION_COST) is not None:
                # A release that raced a Pending balloon left its mark on this pod: clear it,
                # or the next scale-down could remove this node's balloon.
                await self._deletion_cost(pod, None)
            return HostSpec(
                name=name,
                address=f"http://{agent.status.pod_ip}:{self.settings.agent_port}",
                token=token,
                host_type=host_type,
                kind=(node.metadata.labels or {}).get(KIND_LABEL, "gpu"),
            )
        return None

    async def _balloons(self, host_type: str) -> list[Any]:
        """The balloon pods of `host_type` that are not being deleted."""
        selector = self._selectors.get(host_type)
        if selector is None:
            deployment = await self._call(
                "read deployment",
                self._apps.read_namespaced_deployment,
                self.settings.deployment(host_type),
                self.settings.namespace,
            )
            labels = deployment.spec.selector.match_labels or {HOST_TYPE_LABEL: host_type}
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            self._selectors[host_type] = selector
        pods = await self._call(
            "list balloons",
            self._core.list_namespaced_pod,
            self.settings.namespace,
            label_selector=selector,
        )
        return [p for p in pods.items if p.metadata.deletion_timestamp is None]

    async def _agent(self, node: str) -> Any | None:
        """The node's agent pod if it is Ready and has an IP."""
        pods = await self._call(
            "list agents",
            self._core.list_namespaced_pod,
            self.settings.namespace,
            label_selector=self.settings.agent_selector,
            field_selector=f"spec.nodeName={node}",
        )
        for pod in pods.items:
            conditions = pod.status.conditions or []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            if _running(pod) and ready and pod.status.pod_ip:
                return pod
        return None

    async def _token(self) -> str:
        secret = await self._call(
            "read token secret",
            self._core.read_namespaced_secret,
            self.settings.token_secret,
            self.settings.namespace,
        )
        raw = (secret.data or {}).get(self.settings.token_key)
        if raw is None:
            raise HostError(
                f"Secret {self.settings.namespace}/{self.settings.token_secret} has no key "
                f"{self.settings.token_key!r}; set [buffer.kubernetes] token_key"
            )
        try:
            return base64.b64decode(raw, validate=True).decode().strip()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise HostError(
                f"Secret {self.settings.token_secret}: {self.settings.token_key} is not base64 "
                f"of a UTF-8 token: {exc}"
            ) from exc


def _running(pod: Any) -> bool:
    return bool(pod.status is not None and pod.status.phase == "Running" and pod.spec.node_name)


def _healthy(node: Any) -> bool:
    labels = node.metadata.labels or {}
    taints = node.spec.taints or []
    return (
        labels.get(HEALTH_LABEL) == "ok"
        and not node.spec.unschedulable
        and not any(t.key == QUARANTINE_TAINT for t in taints)
    )


def _status(exc: HostError) -> int | None:
    return getattr(exc.__cause__, "status", None)


def _api_message(exc: BaseException) -> str:
    """The `message` of the API server's Status answer, or the raw body."""
    body = getattr(exc, "body", None) or ""
    try:
        return str(json.loads(body).get("message") or body)
    except (ValueError, AttributeError):
        return str(body)
