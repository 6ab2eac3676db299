"""KubernetesProvider against a recorded-API fake (tests/unit/k8s_fakes.py): a real HTTP server on
127.0.0.1 that the official client talks to. What is asserted is what the client sends (method,
path, query, Content-Type, body), what the provider hands out, and that every request stays inside
RBAC_RULES. No real cluster has run this (docs/buffer.md says what that leaves open)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes import client

from fastboot.buffer.health import CheckResult, Outcome
from fastboot.buffer.hosts import HostId, HostSpec, HostState
from fastboot.buffer.kubernetes import (
    RBAC_RULES,
    KubernetesProvider,
    KubernetesSettings,
    label_value,
)
from fastboot.buffer.manager import BufferConfig, BufferManager
from fastboot.errors import ConfigError, DependencyError, HostError
from fastboot.router.app import Router
from fastboot.router.config import (
    BufferSection,
    ModelConfig,
    RouterConfig,
    config_from_dict,
    load_config,
)
from fastboot.router.testing import FakeAgent, FakeEngine, completion_body
from tests.unit.http_fakes import running
from tests.unit.k8s_fakes import API_TOKEN, FakeCluster, Request

NS = "fastboot"
SCALE = f"/apis/apps/v1/namespaces/{NS}/deployments/fastboot-balloon-h100/scale"
DEPLOYMENT = f"/apis/apps/v1/namespaces/{NS}/deployments/fastboot-balloon-h100"
PODS = f"/api/v1/namespaces/{NS}/pods"
SECRET = f"/api/v1/namespaces/{NS}/secrets/fastboot-agent-token"
BALLOONS = "app.kubernetes.io/name=fastboot-balloon,fastboot.dev/host-type=h100"
#: What the official client sends for a dict body (it turns json-patch+json, the first of the
#: operation's content types, into a strategic merge patch when the body is not a list).
STRATEGIC = "application/strategic-merge-patch+json"
COST = "controller.kubernetes.io/pod-deletion-cost"


def outside_rbac(requests: list[Request]) -> list[tuple[str, str, str, str | None]]:
    """Requests RBAC_RULES would not allow (namespaced rules in NS only)."""
    allowed = set()
    for scope, rules in RBAC_RULES.items():
        for rule in rules:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        allowed.add((group, resource, verb, NS if scope == "namespaced" else None))
    return sorted({r.rbac() for r in requests} - allowed, key=str)


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    """A fake cluster with an h100 balloon Deployment; after each test, every request it got
    must be one RBAC_RULES allows, so the chart's RBAC cannot drift from the code."""
    fake = FakeCluster(NS)
    fake.add_deployment("h100")
    yield fake
    assert outside_rbac(fake.requests) == []


def provider(url: str, **settings: Any) -> KubernetesProvider:
    configuration = client.Configuration(host=url)
    configuration.api_key = {"authorization": API_TOKEN}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    fast = {"poll_s": 0.01, "acquire_timeout_s": 5.0, **settings}
    return KubernetesProvider(KubernetesSettings(**fast), client.ApiClient(configuration))


def serve(cluster: FakeCluster, body: Callable[[str], Awaitable[None]]) -> None:
    with running(cluster.server()) as url:
        asyncio.run(asyncio.wait_for(body(url), 20))


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_acquire_scales_up_and_hands_out_the_node_with_its_agent(cluster: FakeCluster) -> None:
    cluster.add_node("n1", agent_ip="10.0.0.7")

    async def main(url: str) -> None:
        k8s = provider(url, max_nodes={"h100": 3})
        assert k8s.supply("h100") == 3
        spec = await k8s.acquire("h100")
        assert spec == HostSpec("n1", "http://10.0.0.7:8700", "agent-token", "h100", "gpu")
        assert spec.token == "agent-token"  # base64-decoded from the Secret
        calls = cluster.calls()
        assert calls[:7] == [
            ("GET", SCALE),
            ("PATCH", SCALE),
            ("GET", DEPLOYMENT),
            ("GET", PODS),
            ("GET", "/api/v1/nodes/n1"),
            ("GET", PODS),
            ("GET", SECRET),
        ]
        scale_up, balloons, agents = cluster.requests[1], cluster.requests[3], cluster.requests[5]
        assert scale_up.content_type == STRATEGIC
        assert scale_up.body == {"spec": {"replicas": 1}}
        assert balloons.query == {"labelSelector": BALLOONS}
        assert agents.query == {
            "labelSelector": "app.kubernetes.io/name=fastboot-agent",
            "fieldSelector": "spec.nodeName=n1",
        }
        assert {r.authorization for r in cluster.requests} == {f"Bearer {API_TOKEN}"}
        assert k8s.supply("h100") == 2
        assert k8s.supply("a100") is None  # no max configured: unknown

        # A second host is a second node (its kind from the node's label), never n1 again.
        cluster.add_node("n2", kind="cpu", agent_ip="10.0.0.8")
        second = await k8s.acquire("h100")
        assert second is not None
        assert (second.name, second.address, second.kind) == ("n2", "http://10.0.0.8:8700", "cpu")
        assert cluster.replicas["fastboot-balloon-h100"] == 2
        assert k8s.supply("h100") == 1

    serve(cluster, main)


def test_past_the_deadline_the_pending_balloon_is_scaled_away(cluster: FakeCluster) -> None:
    cluster.schedule = False  # the cloud has no capacity: the balloon stays Pending

    async def main(url: str) -> None:
        k8s = provider(url, acquire_timeout_s=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await k8s.acquire("h100") is None
        assert 0.2 <= loop.time() - started < 3
        last = cluster.since(len(cluster.requests) - 4)
        assert [(r.method, r.path) for r in last] == [
            ("GET", PODS),
            ("PATCH", f"{PODS}/{last[1].path.rsplit('/', 1)[1]}"),
            ("GET", SCALE),
            ("PATCH", SCALE),
        ]
        assert last[1].path.rsplit("/", 1)[1].startswith("fastboot-balloon-h100-")
        assert last[1].content_type == STRATEGIC
        assert last[1].body == {"metadata": {"annotations": {COST: "-1000"}}}
        assert last[3].body == {"spec": {"replicas": 0}}
        assert cluster.replicas["fastboot-balloon-h100"] == 0
        assert cluster.balloons() == []

    serve(cluster, main)


def test_unhealthy_quarantined_or_cordoned_nodes_are_never_handed_out(
    cluster: FakeCluster,
) -> None:
    # Balloons already Running on four nodes that must not be handed out (a NoSchedule taint,
    # a removed label or a cordon does not evict a running balloon).
    cluster.add_node("sick", healthy=False)
    cluster.add_node("fenced", taints=[{"key": "fastboot.dev/quarantined", "effect": "NoSchedule"}])
    cluster.add_node("cordoned", unschedulable=True)
    cluster.add_node("no-agent", agent_ready=False)
    cluster.add_deployment("h100", balloons_on=("sick", "fenced", "cordoned", "no-agent"))

    async def main(url: str) -> None:
        k8s = provider(url, acquire_timeout_s=0.3)
        assert await k8s.acquire("h100") is None
        read = {r.path for r in cluster.requests if r.path.startswith("/api/v1/nodes/")}
        assert read == {f"/api/v1/nodes/{n}" for n in ("sick", "fenced", "cordoned", "no-agent")}
        assert cluster.replicas["fastboot-balloon-h100"] == 4  # the extra one scaled back
        assert sorted(p["spec"]["nodeName"] for p in cluster.balloons()) == sorted(
            ["sick", "fenced", "cordoned", "no-agent"]
        )

        cluster.add_node("fresh")  # the autoscaler delivers a healthy node
        spec = await k8s.acquire("h100")
        assert spec is not None and spec.name == "fresh"

        # An agent that turns Ready while acquire polls: its node is handed out then.
        mark = len(cluster.requests)
        task = asyncio.create_task(k8s.acquire("h100"))
        asked = {"labelSelector": "app.kubernetes.io/name=fastboot-agent"}
        asked["fieldSelector"] = "spec.nodeName=no-agent"
        await until(lambda: any(r.query == asked for r in cluster.since(mark)), "an agent look")
        assert not task.done()
        cluster.set_agent_ready("no-agent", True)
        spec = await task
        assert spec is not None and spec.name == "no-agent"

    serve(cluster, main)


def test_release_marks_that_nodes_balloon_then_scales_down(cluster: FakeCluster) -> None:
    cluster.add_node("n1")
    cluster.add_node("n2")

    async def main(url: str) -> None:
        k8s = provider(url, max_nodes={"h100": 3})
        first, second = await k8s.acquire("h100"), await k8s.acquire("h100")
        assert first is not None and second is not None
        assert {first.name, second.name} == {"n1", "n2"}
        assert k8s.supply("h100") == 1
        on_first = next(p for p in cluster.balloons() if p["spec"]["nodeName"] == first.name)
        mark = len(cluster.requests)
        await k8s.release(first)
        sent = cluster.since(mark)
        assert [(r.method, r.path) for r in sent] == [
            ("GET", PODS),
            ("PATCH", f"{PODS}/{on_first['metadata']['name']}"),
            ("GET", SCALE),
            ("PATCH", SCALE),
        ]
        assert sent[1].content_type == STRATEGIC
        assert sent[1].body == {"metadata": {"annotations": {COST: "-1000"}}}
        assert sent[3].body == {"spec": {"replicas": 1}}
        # The ReplicaSet removed exactly the marked pod; the other node keeps its balloon.
        assert [p["spec"]["nodeName"] for p in cluster.balloons()] == [second.name]
        assert k8s.supply("h100") == 2

    serve(cluster, main)


def test_a_release_racing_a_pending_balloon_hands_the_node_to_the_waiting_acquire(
    cluster: FakeCluster,
) -> None:
    """The ReplicaSet removes an unscheduled pod before it looks at deletion costs, so a release
    while another acquire's balloon is Pending removes that one: the released node's balloon
    stays, the waiting acquire takes it and clears its -1000 mark."""
    cluster.add_node("n1")

    async def main(url: str) -> None:
        k8s = provider(url)
        first = await k8s.acquire("h100")
        assert first is not None and first.name == "n1"
        cluster.schedule = False
        mark = len(cluster.requests)
        waiting = asyncio.create_task(k8s.acquire("h100"))
        await until(lambda: ("GET", PODS) in cluster.calls(mark), "the waiting acquire's look")
        await k8s.release(first)
        again = await waiting
        assert again is not None and again.name == "n1"
        (balloon,) = cluster.balloons()
        assert balloon["spec"]["nodeName"] == "n1"
        assert COST not in balloon["metadata"]["annotations"]
        assert cluster.replicas["fastboot-balloon-h100"] == 1
        cleared = [r for r in cluster.since(mark) if r.method == "PATCH" and "/pods/" in r.path]
        assert [r.body for r in cleared] == [
            {"metadata": {"annotations": {COST: "-1000"}}},
            {"metadata": {"annotations": {COST: None}}},
        ]

    serve(cluster, main)


def test_quarantine_untaints_health_taints_and_cordons_keeping_other_taints(
    cluster: FakeCluster,
) -> None:
    gpu_taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    cluster.add_node("n1", taints=[gpu_taint])
    reason = "short: xid 79 (GPU has fallen off the bus)!"

    async def main(url: str) -> None:
        k8s = provider(url, acquire_timeout_s=0.2)
        spec = await k8s.acquire("h100")
        assert spec is not None
        # Someone else taints the node between our read and our patch: 409, read again, retry.
        maintenance = {"key": "example.com/maintenance", "effect": "NoSchedule"}
        cluster.race_taint = maintenance
        mark = len(cluster.requests)
        await k8s.quarantine(spec, reason)
        sent = cluster.since(mark)
        node_path = "/api/v1/nodes/n1"
        assert [(r.method, r.path) for r in sent] == [
            ("GET", node_path),
            ("PATCH", node_path),  # 409: the node changed
            ("GET", node_path),
            ("PATCH", node_path),
        ]
        patch = sent[3]
        assert patch.content_type == STRATEGIC
        fence = {
            "key": "fastboot.dev/quarantined",
            "value": "short-xid-79-GPU-has-fallen-off-the-bus",
            "effect": "NoSchedule",
        }
        assert patch.body == {
            "metadata": {
                "resourceVersion": patch.body["metadata"]["resourceVersion"],
                "labels": {"fastboot.dev/health": None},
                "annotations": {"fastboot.dev/quarantine-reason": reason},
            },
            "spec": {"unschedulable": True, "taints": [gpu_taint, maintenance, fence]},
        }
        node = cluster.nodes["n1"]
        assert "fastboot.dev/health" not in node["metadata"]["labels"]
        assert node["spec"]["unschedulable"] is True
        # A router restarted after the quarantine (nothing remembered) does not hand n1 out,
        # though its balloon still runs there.
        assert [p["spec"]["nodeName"] for p in cluster.balloons()] == ["n1"]
        assert await provider(url, acquire_timeout_s=0.2).acquire("h100") is None

    serve(cluster, main)


def test_label_value_is_a_valid_label_value() -> None:
    assert label_value("agent: 401 (bad token)") == "agent-401-bad-token"
    long = label_value("x" * 62 + " tail")
    assert long == "x" * 62 and len(long) <= 63
    assert label_value("") == label_value("!!!") == "unspecified"
    assert label_value("a" * 70) == "a" * 63


def test_the_manager_fences_a_host_it_quarantines(cluster: FakeCluster) -> None:
    cluster.add_node("n1")

    async def failing(spec: HostSpec) -> CheckResult:
        return CheckResult("short", Outcome.FAIL, "nvml: 2 uncorrectable ECC errors")

    async def main(url: str) -> None:
        k8s = provider(url, acquire_timeout_s=0.2)
        manager = BufferManager(
            k8s, failing, failing, BufferConfig(targets={"h100": 1}, provision_retry_s=60)
        )
        async with manager:
            await until(lambda: cluster.nodes["n1"]["spec"]["unschedulable"], "the cordon")
            (host,) = manager.hosts.values()
            assert host.state is HostState.QUARANTINED
        taints = cluster.nodes["n1"]["spec"]["taints"]
        assert taints == [
            {
                "key": "fastboot.dev/quarantined",
                "value": "short-nvml-2-uncorrectable-ECC-errors",
                "effect": "NoSchedule",
            }
        ]

    serve(cluster, main)


def test_every_api_call_used_is_in_rbac_rules_and_errors_name_the_call(
    cluster: FakeCluster,
) -> None:
    cluster.add_node("n1")

    async def main(url: str) -> None:
        k8s = provider(url, acquire_timeout_s=0.1)
        spec = await k8s.acquire("h100")
        assert spec is not None
        assert await k8s.acquire("h100") is None  # deadline: annotate + scale down
        await k8s.quarantine(spec, "test")
        await k8s.release(spec)
        used = {r.rbac() for r in cluster.requests}
        assert used == {
            ("", "pods", "list", NS),
            ("", "pods", "patch", NS),
            ("apps", "deployments", "get", NS),
            ("apps", "deployments/scale", "get", NS),
            ("apps", "deployments/scale", "patch", NS),
            ("", "secrets", "get", NS),
            ("", "nodes", "get", None),
            ("", "nodes", "patch", None),
        }
        assert outside_rbac(cluster.requests) == []
        assert {r.path for r in cluster.requests if "/secrets/" in r.path} == {SECRET}

        cluster.forbid.add(("PATCH", SCALE))
        with pytest.raises(HostError, match=r"patch scale failed with 403.*RBAC_RULES"):
            await k8s.acquire("h100")
        cluster.secret = {}
        cluster.forbid.clear()
        with pytest.raises(HostError, match="has no key 'token'"):
            await provider(url, acquire_timeout_s=0.1)._token()

    serve(cluster, main)


def test_without_the_client_or_a_cluster_the_errors_say_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"in-cluster service account.*set"):
        KubernetesProvider(KubernetesSettings())  # not in a pod here
    with pytest.raises(ConfigError, match="cannot configure the Kubernetes client from"):
        KubernetesProvider(KubernetesSettings(kubeconfig=str(tmp_path / "absent")))
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    with pytest.raises(DependencyError, match=r"pip install 'fastboot\[router\]'"):
        KubernetesProvider(KubernetesSettings())


# --- config ------------------------------------------------------------------------------------


def test_buffer_provider_kubernetes_is_parsed_and_checked(tmp_path: Path) -> None:
    (tmp_path / "router.toml").write_text(
        "[models.m]\n"
        'snapshot = "s"\n'
        "[buffer]\n"
        'provider = "kubernetes"\n'
        'host_type = "h100"\n'
        "target = 2\n"
        "[buffer.kubernetes]\n"
        'namespace = "gpu"\n'
        'kubeconfig = "kube/config"\n'
        "poll_s = 0.5\n"
        "max_nodes = {h100 = 16}\n"
    )
    section = load_config(tmp_path / "router.toml").buffer
    assert section == BufferSection(
        "",
        "h100",
        2,
        provider="kubernetes",
        kubernetes=KubernetesSettings(
            namespace="gpu",
            kubeconfig=str(tmp_path / "kube/config"),
            poll_s=0.5,
            max_nodes={"h100": 16},
        ),
    )
    assert section.kubernetes.deployment("h100") == "fastboot-balloon-h100"
    # Without a sub-table: the defaults.
    document: dict[str, Any] = {"models": {"m": {"snapshot": "s"}}}
    plain = config_from_dict({**document, "buffer": {"provider": "kubernetes"}}).buffer
    assert plain is not None and plain.kubernetes == KubernetesSettings()

    def bad(buffer: dict[str, Any], needle: str) -> None:
        with pytest.raises(ConfigError, match=needle):
            config_from_dict({**document, "buffer": buffer}, base=tmp_path)

    k8s = {"provider": "kubernetes"}
    bad({**k8s, "kubernetes": {"nodes": 3}}, r"\[buffer\.kubernetes\]: unknown key\(s\) nodes")
    bad({"provider": "aws"}, 'provider must be "static" or "kubernetes"')
    bad({"hosts_file": "h.yaml", "kubernetes": {}}, r'needs provider = "kubernetes"')
    bad({**k8s, "hosts_file": "h.yaml"}, 'hosts_file is for provider = "static"')
    bad({**k8s, "kubernetes": {"max_nodes": {"h100": -1}}}, r"max_nodes\.h100 must be an int")
    bad({**k8s, "kubernetes": {"poll_s": 0}}, "poll_s and acquire_timeout_s must be > 0")
    bad({**k8s, "kubernetes": {"agent_port": "8700"}}, "agent_port must be an integer")
    bad({**k8s, "kubernetes": {"balloon_name": "b-{type}"}}, "may use only {host_type}")
    bad({"target": 1}, "set hosts_file")  # the static provider, as before


def test_the_router_places_a_replica_on_a_node_from_the_kubernetes_buffer(
    cluster: FakeCluster, tmp_path: Path
) -> None:
    """Controller wiring: [buffer] provider = "kubernetes" with a kubeconfig pointing at the fake;
    the node's agent pod IP is 127.0.0.1 and agent_port a FakeAgent's port."""

    async def main(url: str) -> None:
        engine = FakeEngine()
        await engine.start()
        agent = FakeAgent(lambda snapshot: engine.url, slots=1)
        await agent.start()
        cluster.add_node("n1", kind="cpu", agent_ip="127.0.0.1")
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "router", "user": {"token": API_TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "router"}}],
            "current-context": "fake",
        }
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        settings = KubernetesSettings(
            kubeconfig=str(tmp_path / "kubeconfig"),
            agent_port=int(agent.url.rsplit(":", 1)[1]),
            poll_s=0.01,
            acquire_timeout_s=5.0,
        )
        config = RouterConfig(
            models=(ModelConfig(name="m", snapshot="snap"),),
            port=0,
            buffer=BufferSection("", "h100", 1, provider="kubernetes", kubernetes=settings),
        )
        router = Router(config)
        try:
            await router.start()
            async with (
                aiohttp.ClientSession(f"http://127.0.0.1:{router.port}") as http,
                http.post("/v1/completions", data=completion_body("m")) as response,
            ):
                assert response.status == 200
            assert len(agent.posts) == 1
            manager = router.controller._buffer
            assert manager is not None
            assert manager.hosts[HostId("n1")].state is HostState.ASSIGNED
            assert ("PATCH", SCALE) in cluster.calls()
        finally:
            await router.stop()
            await agent.stop()
            await engine.stop()

    serve(cluster, main)
