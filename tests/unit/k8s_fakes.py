"""A recorded-API fake of the few Kubernetes API paths the buffer's Kubernetes provider uses.

A real HTTP server on 127.0.0.1 (`running(cluster.server())`) in front of a tiny in-memory
cluster: nodes (each with an agent pod), balloon Deployments with their scale, one token Secret.
It plays the controllers the provider relies on: raising a Deployment's replicas creates balloon
pods and the "scheduler" binds each to a free healthy node of its host type (when `schedule`);
lowering them deletes pods in the ReplicaSet controller's order (unscheduled, then not Running,
then the lowest pod-deletion-cost, then the newest). Every request is recorded as the client
sent it (method, path, query, Content-Type, JSON body, Authorization).
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.unit.http_fakes import JsonHandler

API_TOKEN = "api-token"
AGENT_LABELS = {"app.kubernetes.io/name": "fastboot-agent"}
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


@dataclass(frozen=True)
class Request:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    authorization: str

    def rbac(self) -> tuple[str, str, str, str | None]:
        """(API group, resource, verb, namespace) the API server would authorize it as."""
        parts = self.path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        namespace = None
        if rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
        item = len(rest) > 1
        verbs = {"GET": "get" if item else "list", "POST": "create", "PUT": "update"}
        verbs |= {"PATCH": "patch", "DELETE": "delete" if item else "deletecollection"}
        verb = verbs[self.method]
        if self.query.get("watch") in ("true", "1"):
            verb = "watch"
        return group, resource, verb, namespace


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """A JSON merge patch (maps merge, null deletes, lists replace): what a strategic merge
    patch does to the fields the provider patches (labels, annotations, taints, unschedulable,
    replicas; Node taints have no patch merge key)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeCluster:
    """The in-memory cluster behind the fake API server."""

    def __init__(self, namespace: str = "fastboot", agent_token: str = "agent-token") -> None:
        self.namespace = namespace
        self.lock = threading.Lock()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.replicas: dict[str, int] = {}  # Deployment name -> spec.replicas
        self.secret = {"token": base64.b64encode(agent_token.encode()).decode()}
        self.requests: list[Request] = []
        #: Bind pending balloons to free healthy nodes (False: the cloud has no capacity).
        self.schedule = True
        #: (method, path) answered 403 Forbidden.
        self.forbid: set[tuple[str, str]] = set()
        #: A taint someone else adds to a node just before the next node patch (-> 409).
        self.race_taint: dict[str, str] | None = None
        self._serial = itertools.count(1)
        self._created: dict[str, int] = {}  # pod name -> creation order
        self._versions = itertools.count(100)

    # --- setting the scene ------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        host_type: str = "h100",
        *,
        healthy: bool = True,
        kind: str | None = None,
        taints: list[dict[str, str]] | None = None,
        unschedulable: bool = False,
        agent_ready: bool = True,
        agent_ip: str | None = None,
    ) -> None:
        with self.lock:
            labels = {"fastboot.dev/host-type": host_type}
            if healthy:
                labels["fastboot.dev/health"] = "ok"
            if kind is not None:
                labels["fastboot.dev/kind"] = kind
            self.nodes[name] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels, "resourceVersion": self._version()},
                "spec": {"taints": list(taints or []), "unschedulable": unschedulable},
                "status": {},
            }
            ip = agent_ip or f"10.0.0.{len(self.nodes)}"
            self.pods[f"agent-{name}"] = self._pod(f"agent-{name}", AGENT_LABELS, name, ip)
            self._set_ready(name, agent_ready)
            self._reconcile()

    def set_agent_ready(self, node: str, ready: bool) -> None:
        with self.lock:
            self._set_ready(node, ready)

    def _set_ready(self, node: str, ready: bool) -> None:
        condition = {"type": "Ready", "status": "True" if ready else "False"}
        self.pods[f"agent-{node}"]["status"]["conditions"] = [condition]

    def add_deployment(self, host_type: str, balloons_on: tuple[str, ...] = ()) -> str:
        """A balloon Deployment for `host_type`, with balloons already Running on those nodes."""
        name = f"fastboot-balloon-{host_type}"
        with self.lock:
            self.replicas[name] = len(balloons_on)
            for node in balloons_on:
                pod = self._pod(self._balloon_name(name), self._balloon_labels(host_type), node)
                self.pods[pod["metadata"]["name"]] = pod
        return name

    # --- what tests look at -------------------------------------------------------------------

    def balloons(self, host_type: str = "h100") -> list[dict[str, Any]]:
        """Balloon pods of `host_type`, oldest first."""
        with self.lock:
            return [copy.deepcopy(p) for p in self._balloons(f"fastboot-balloon-{host_type}")]

    def since(self, index: int) -> list[Request]:
        with self.lock:
            return list(self.requests[index:])

    def calls(self, start: int = 0) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.since(start)]

    def server(self) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.cluster = self  # type: ignore[attr-defined]
        return server

    # --- the API ------------------------------------------------------------------------------

    def handle(self, request: Request) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(request)
            if request.authorization != f"Bearer {API_TOKEN}":
                return _status(401, "Unauthorized")
            if (request.method, request.path) in self.forbid:
                return _status(403, f"forbidden: {request.method} {request.path}")
            if request.method not in ("GET", "PATCH"):
                return _status(405, f"the fake serves GET and PATCH only, not {request.method}")
            parts = request.path.strip("/").split("/")
            try:
                answer = self._route(request, parts)
            except KeyError as exc:
                return _status(404, f"{exc.args[0]} not found")
            self._reconcile()
            return answer

    def _route(self, request: Request, parts: list[str]) -> tuple[int, Any]:
        ns = self.namespace
        match parts:
            case ["apis", "apps", "v1", "namespaces", n, "deployments", name] if n == ns:
                return 200, self._deployment(name)
            case ["apis", "apps", "v1", "namespaces", n, "deployments", name, "scale"] if n == ns:
                if request.method == "PATCH":
                    self.replicas[name] = request.body["spec"]["replicas"]
                    self._reconcile()
                return 200, self._scale(name)
            case ["api", "v1", "namespaces", n, "pods"] if n == ns:
                return 200, {
                    "apiVersion": "v1",
                    "kind": "PodList",
                    "metadata": {"resourceVersion": self._version()},
                    "items": self._select(request.query),
                }
            case ["api", "v1", "namespaces", n, "pods", name] if n == ns:
                pod = self.pods[name]
                if request.method == "PATCH":
                    merge(pod, request.body)
                return 200, pod
            case ["api", "v1", "namespaces", n, "secrets", "fastboot-agent-token"] if n == ns:
                return 200, {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "fastboot-agent-token", "namespace": ns},
                    "data": dict(self.secret),
                }
            case ["api", "v1", "nodes", name]:
                node = self.nodes[name]
                if request.method == "PATCH":
                    if self.race_taint is not None:
                        node["spec"]["taints"].append(self.race_taint)
                        node["metadata"]["resourceVersion"] = self._version()
                        self.race_taint = None
                    wanted = request.body.get("metadata", {}).get("resourceVersion")
                    if wanted is not None and wanted != node["metadata"]["resourceVersion"]:
                        return _status(409, f"the object has been modified: node {name}")
                    merge(node, request.body)
                    node["metadata"]["resourceVersion"] = self._version()
                return 200, node
        raise KeyError(request.path)

    # --- the controllers --------------------------------------------------------------------

    def _reconcile(self) -> None:
        for name, want in self.replicas.items():
            pods = self._balloons(name)
            host_type = name.removeprefix("fastboot-balloon-")
            for _ in range(want - len(pods)):
                pod = self._pod(self._balloon_name(name), self._balloon_labels(host_type), None)
                self.pods[pod["metadata"]["name"]] = pod
            if len(pods) > want:
                for pod in sorted(pods, key=self._deletion_rank)[: len(pods) - want]:
                    del self.pods[pod["metadata"]["name"]]
            if self.schedule:
                for pod in self._balloons(name):
                    if not pod["spec"].get("nodeName") and (node := self._free_node(host_type)):
                        pod["spec"]["nodeName"] = node
                        pod["status"] = {"phase": "Running", "podIP": "10.1.0.1"}

    def _free_node(self, host_type: str) -> str | None:
        held = {
            p["spec"].get("nodeName")
            for p in self.pods.values()
            if p["metadata"]["labels"].get("app.kubernetes.io/name") == "fastboot-balloon"
        }
        for name, node in self.nodes.items():
            labels, spec = node["metadata"]["labels"], node["spec"]
            blocking = [
                t
                for t in spec["taints"]
                if t["effect"] == "NoSchedule" and t["key"] != "nvidia.com/gpu"
            ]
            if (
                name not in held
                and labels.get("fastboot.dev/host-type") == host_type
                and labels.get("fastboot.dev/health") == "ok"
                and not spec["unschedulable"]
                and not blocking
            ):
                return name
        return None

    def _balloons(self, deployment: str) -> list[dict[str, Any]]:
        host_type = deployment.removeprefix("fastboot-balloon-")
        labels = self._balloon_labels(host_type)
        return [p for p in self.pods.values() if _matches(p, labels)]

    def _select(self, query: dict[str, str]) -> list[dict[str, Any]]:
        wanted = dict(
            pair.split("=", 1) for pair in query.get("labelSelector", "").split(",") if pair
        )
        fields = dict(
            pair.split("=", 1) for pair in query.get("fieldSelector", "").split(",") if pair
        )
        return [
            p
            for p in self.pods.values()
            if _matches(p, wanted)
            and all(
                v == p["spec"].get("nodeName") for k, v in fields.items() if k == "spec.nodeName"
            )
        ]

    def _deployment(self, name: str) -> dict[str, Any]:
        if name not in self.replicas:
            raise KeyError(f"deployment {name}")
        labels = self._balloon_labels(name.removeprefix("fastboot-balloon-"))
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
            "spec": {
                "replicas": self.replicas[name],
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "hold", "image": "pause"}]},
                },
            },
        }

    def _scale(self, name: str) -> dict[str, Any]:
        if name not in self.replicas:
            raise KeyError(f"deployment {name}")
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"replicas": self.replicas[name]},
            "status": {"replicas": len(self._balloons(name))},
        }

    def _pod(
        self, name: str, labels: dict[str, str], node: str | None, ip: str = "10.1.0.1"
    ) -> dict[str, Any]:
        self._created[name] = next(self._serial)
        status = {"phase": "Running", "podIP": ip} if node else {"phase": "Pending"}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": dict(labels),
                "annotations": {},
                "resourceVersion": self._version(),
            },
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]},
            "status": status,
        }

    def _balloon_name(self, deployment: str) -> str:
        return f"{deployment}-{next(self._serial):04d}"

    @staticmethod
    def _balloon_labels(host_type: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": "fastboot-balloon", "fastboot.dev/host-type": host_type}

    def _version(self) -> str:
        return str(next(self._versions))

    def _deletion_rank(self, pod: dict[str, Any]) -> tuple[bool, bool, int, int]:
        """The ReplicaSet controller's order of deletion (first: deleted first)."""
        cost = int(pod["metadata"].get("annotations", {}).get(DELETION_COST, "0"))
        return (
            bool(pod["spec"].get("nodeName")),
            pod["status"].get("phase") == "Running",
            cost,
            -self._created[pod["metadata"]["name"]],
        )


def _matches(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(pod["metadata"]["labels"].get(k) == v for k, v in labels.items())


def _status(code: int, message: str) -> tuple[int, Any]:
    return code, {"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": message}


class _Handler(JsonHandler):
    def _serve(self) -> None:
        cluster: FakeCluster = self.server.cluster  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        request = Request(
            method=self.command,
            path=url.path,
            query=dict(parse_qsl(url.query)),
            content_type=self.headers.get("content-type", ""),
            body=json.loads(raw) if raw else None,
            authorization=self.headers.get("authorization", ""),
        )
        self._answer(*cluster.handle(request))

    # Every method is recorded (and all but GET and PATCH answer 404), so a call the provider
    # should not make shows up in the RBAC check rather than as a bare 501.
    do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _serve
