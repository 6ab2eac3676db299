"""launchers/: the Helm chart, the systemd units and the Containerfile, checked offline with the
real tools (helm, kubectl and hadolint from scripts/kube-tools; systemd-analyze; the Kubernetes
1.37 schemas of kubernetes-validate). Nothing here talks to a cluster: there is none to talk to."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import referencing
import yaml

import fastboot.buffer.kubernetes as provider
from fastboot.router.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "launchers" / "kubernetes" / "chart" / "fastboot"
SYSTEMD = ROOT / "launchers" / "systemd"
CONTAINERFILE = ROOT / "launchers" / "container" / "Containerfile"
TOOLS = Path(os.environ.get("FASTBOOT_TOOLS") or Path.home() / ".cache/fastboot/kube-tools") / "bin"
KUBERNETES = "1.37.0"
RELEASE, NAMESPACE = "fastboot", "fleet"
AGENT_PORT = 8700

#: Two host types (one replacing nothing: the default's h100-80g is overridden, not dropped),
#: the ServiceMonitor, API keys, an existing token Secret and most agent options.
TWO_TYPES: dict[str, Any] = {
    "hostTypes": {
        "h100-80g": {"gpus": 8, "maxNodes": 16},
        "l4-24g": {
            "gpus": 1,
            "maxNodes": None,  # unknown: the provider's supply is None
            "gpuResource": "nvidia.com/gpu",
            "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
            "tolerations": [],
        },
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "agentToken": {"existingSecret": "my-agent-token", "key": "agent-token"},
    "agent": {"slots": 4, "onlyHealthyNodes": True, "extraArgs": ["--replica-cpus", "8"]},
    "router": {
        "apiKeysSecret": "router-keys",
        # 64 MiB: Go prints it as 6.7108864e+07 unless the chart writes whole numbers as integers.
        "settings": {"tick_s": 1, "prefix_imbalance": 16, "max_body_bytes": 64 << 20},
        "timeouts": {"first_byte_s": 60},
        "models": {
            "example": None,
            "llama-8b": {"snapshot": "3f2a9c", "max_replicas": 4, "concurrency": 32},
            "qwen-7b": {"snapshot": "77aa01", "target_utilization": 0.5},
        },
        "buffer": {"hostType": "l4-24g", "target": 2},
    },
}


# --- tools ---------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A tool from scripts/kube-tools; its absence fails the test (CI runs scripts/setup)."""
    path = TOOLS / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run scripts/kube-tools (scripts/setup runs it)")
    return str(path)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


class StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice (PyYAML keeps the last one silently; the API server
    rejects it)."""


def _no_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {twice}", node.start_mark
        )
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@cache
def _render(values_yaml: str) -> tuple[dict[str, Any], ...]:
    argv = [tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values:
        values.write(values_yaml)
        values.flush()
        out = run(*argv, "--values", values.name).stdout
    return tuple(d for d in yaml.load_all(out, Loader=StrictLoader) if d)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm template` of the chart, parsed (a fresh copy each call)."""
    return copy.deepcopy(list(_render(yaml.safe_dump(values) if values else "")))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in the rendered chart"
    return found[0]


def container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


VALUE_SETS = pytest.mark.parametrize("values", [None, TWO_TYPES], ids=["defaults", "two-types"])


def test_tools_are_the_current_ones() -> None:
    # Debian's kubectl is 1.20; the checks below need the 1.37 one from scripts/kube-tools.
    assert run(tool("helm"), "version", "--short").stdout.startswith("v4.")
    assert "v1.37." in run(tool("kubectl"), "version", "--client").stdout


# --- the chart: lint, schemas --------------------------------------------------------------


@VALUE_SETS
def test_helm_lint(values: dict[str, Any] | None, tmp_path: Path) -> None:
    argv = [tool("helm"), "lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if values:
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        argv += ["--values", str(tmp_path / "values.yaml")]
    run(*argv)


def test_helm_lint_fails_on_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "fastboot"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: {{ .Values.nothing.here }\n")
    assert run(tool("helm"), "lint", "--strict", str(broken), check=False).returncode != 0


def _definitions() -> referencing.Resource[Any]:
    """kubernetes-validate's strict 1.37 definitions (ObjectMeta, LabelSelector, ...)."""
    contents = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES}-local-strict/_definitions.json", KUBERNETES
    )
    return referencing.Resource.from_contents(contents)


DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."
DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
#: monitoring.coreos.com/v1 ServiceMonitor, written for this test from prometheus-operator's API
#: reference (https://prometheus-operator.dev/docs/api-reference/api/#monitoring.coreos.com/v1.ServiceMonitor)
#: for the fields a chart sets; unknown fields are errors, as in the strict Kubernetes schemas.
#: kubernetes-validate has no schemas for custom resources.
SERVICE_MONITOR: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"$ref": DEFS + "ObjectMeta"},
        "spec": {
            "type": "object",
            "required": ["selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {"$ref": DEFS + "LabelSelector"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["integer", "string"]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def validate(doc: dict[str, Any]) -> None:
    """Strict schema validation: Kubernetes' own for built-in kinds, else SERVICE_MONITOR."""
    if doc["kind"] == "ServiceMonitor":
        registry: referencing.Registry[Any] = _definitions() @ referencing.Registry()
        jsonschema.Draft202012Validator(SERVICE_MONITOR, registry=registry).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@VALUE_SETS
def test_every_document_passes_the_kubernetes_schemas(values: dict[str, Any] | None) -> None:
    docs = render(values)
    kinds = sorted({d["kind"] for d in docs})
    expected = [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Deployment",
        "PriorityClass", "Role", "RoleBinding", "Secret", "Service", "ServiceAccount",
    ]  # fmt: skip
    if values:
        expected = sorted({*expected, "ServiceMonitor"} - {"Secret"})  # an existing Secret
    assert kinds == expected
    for doc in docs:
        validate(doc)
        if doc["kind"] not in ("PriorityClass", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


@pytest.mark.parametrize("kind", ["DaemonSet", "ServiceMonitor"])
def test_validation_refuses_unknown_fields(kind: str) -> None:
    doc = one(render(TWO_TYPES), kind)
    validate(doc)
    if kind == "DaemonSet":
        container(doc)["readinesProbe"] = {"periodSeconds": 10}
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(doc)
    else:
        doc["spec"]["endpoints"][0]["intervall"] = "30s"
        with pytest.raises(jsonschema.ValidationError):
            validate(doc)


# --- the chart: what its parts must agree on -----------------------------------------------


API_KEYS = "/etc/fastboot/api-keys/keys"  # where the router pod mounts its API keys


def router_config(docs: list[dict[str, Any]], tmp_path: Path) -> Any:
    """The rendered router.toml through the router's own loader (the API keys file, when the
    config names one, moved into tmp_path)."""
    (tmp_path / "keys").write_text("k1\n")
    path = tmp_path / "router.toml"
    toml = one(docs, "ConfigMap")["data"]["router.toml"]
    path.write_text(toml.replace(API_KEYS, str(tmp_path / "keys")))
    return load_config(path)


@VALUE_SETS
def test_router_config_is_what_the_provider_needs(
    values: dict[str, Any] | None, tmp_path: Path
) -> None:
    docs = render(values)
    config = router_config(docs, tmp_path)
    settings = config.buffer.kubernetes
    assert config.buffer.provider == "kubernetes"
    assert (config.host, settings.namespace, settings.agent_port) == ("0.0.0.0", NAMESPACE, 8700)
    assert settings.kubeconfig == ""  # in-cluster
    types = (values or {}).get("hostTypes", {"h100-80g": {"maxNodes": 8}})
    assert dict(settings.max_nodes) == {
        t: s["maxNodes"] for t, s in types.items() if s.get("maxNodes") is not None
    }
    assert config.buffer.host_type == ("l4-24g" if values else "h100-80g")
    balloons = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} - {
        "fastboot-router"
    }
    assert balloons == {settings.deployment(t) for t in types}

    agent = one(docs, "DaemonSet")
    selector = dict(term.split("=") for term in settings.agent_selector.split(","))
    assert selector.items() <= agent["spec"]["template"]["metadata"]["labels"].items()
    token = next(v for v in agent["spec"]["template"]["spec"]["volumes"] if v["name"] == "token")
    assert token["secret"]["secretName"] == settings.token_secret
    assert token["secret"]["items"][0]["key"] == settings.token_key
    if values:
        assert (settings.token_secret, settings.token_key) == ("my-agent-token", "agent-token")
        assert [m.name for m in config.models] == ["llama-8b", "qwen-7b"]
        assert config.models[0].max_replicas == 4 and config.models[1].target_utilization == 0.5
        assert (config.tick_s, config.prefix_imbalance, config.timeouts.first_byte_s) == (1, 16, 60)
        assert config.max_body_bytes == 64 << 20
    else:
        secret = one(docs, "Secret", settings.token_secret)
        assert len(secret["data"][settings.token_key]) >= 48  # a random token, base64


def test_router_config_keeps_api_keys_in_their_secret(tmp_path: Path) -> None:
    docs = render(TWO_TYPES)
    toml = one(docs, "ConfigMap")["data"]["router.toml"]
    assert f'api_key_file = "{API_KEYS}"' in toml
    assert router_config(docs, tmp_path).api_keys == frozenset({"k1"})
    assert "api_key_file" not in one(render(), "ConfigMap")["data"]["router.toml"]
    router = one(docs, "Deployment", "fastboot-router")
    mounts = {m["name"]: m["mountPath"] for m in container(router)["volumeMounts"]}
    assert f"{mounts['api-keys']}/keys" == API_KEYS
    volumes = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"] == {
        "secretName": "router-keys",
        "items": [{"key": "keys", "path": "keys"}],
    }


def rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in rule.items() if k != "resourceNames"} for rule in doc["rules"]]


@VALUE_SETS
def test_rbac_is_exactly_what_the_provider_calls(values: dict[str, Any] | None) -> None:
    docs = render(values)
    role, cluster_role = one(docs, "Role"), one(docs, "ClusterRole")
    assert rules(role) == provider.RBAC_RULES["namespaced"]
    assert rules(cluster_role) == provider.RBAC_RULES["cluster"]
    secret_name = "my-agent-token" if values else "fastboot-agent-token"
    names = {tuple(r["resources"]): r.get("resourceNames") for r in role["rules"]}
    assert names == {
        ("pods",): None,
        ("deployments",): None,
        ("deployments/scale",): None,
        ("secrets",): [secret_name],
    }
    assert "resourceNames" not in cluster_role["rules"][0]

    account = one(docs, "Deployment", "fastboot-router")["spec"]["template"]["spec"]
    subject = {"kind": "ServiceAccount", "name": account["serviceAccountName"]}
    pairs = ((one(docs, "RoleBinding"), role), (one(docs, "ClusterRoleBinding"), cluster_role))
    for binding, target in pairs:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": target["kind"],
            "name": target["metadata"]["name"],
        }
        assert binding["subjects"] == [{**subject, "namespace": NAMESPACE}]
    one(docs, "ServiceAccount", account["serviceAccountName"])


def scrape(doc: dict[str, Any]) -> dict[str, str]:
    annotations = doc["spec"]["template"]["metadata"]["annotations"]
    return {
        k.removeprefix("prometheus.io/"): v for k, v in annotations.items() if "prometheus" in k
    }


@VALUE_SETS
def test_agent_daemonset(values: dict[str, Any] | None) -> None:
    docs = render(values)
    agent = one(docs, "DaemonSet")
    pod, main = agent["spec"]["template"]["spec"], container(agent)
    args = main["args"]
    assert args[:2] == ["agent", "--listen"] and args[2] == f"0.0.0.0:{AGENT_PORT}"
    assert main["ports"] == [{"name": "api", "containerPort": AGENT_PORT, "protocol": "TCP"}]
    probe = " ".join(main["readinessProbe"]["exec"]["command"])
    assert f"http://127.0.0.1:{AGENT_PORT}/v1/health" in probe
    token_file = args[args.index("--token-file") + 1]
    assert f'"Authorization: Bearer $(cat {token_file})"' in probe  # the API checks the token
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert token_file == f"{mounts['token']}/token"
    assert scrape(agent) == {"scrape": "false", "port": str(AGENT_PORT), "path": "/metrics"}
    assert main["securityContext"] == {"privileged": True} and pod["hostPID"] is True
    host_paths = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {
        "state": {"path": "/var/lib/fastboot", "type": "DirectoryOrCreate"},
        "fuse": {"path": "/dev/fuse", "type": "CharDevice"},
    }
    assert mounts["state"] == "/var/lib/fastboot" and mounts["fuse"] == "/dev/fuse"
    assert {"name": "FASTBOOT_HOME", "value": "/var/lib/fastboot"} in main["env"]
    if values:
        assert pod["nodeSelector"]["fastboot.dev/health"] == "ok"
        assert args[args.index("--slots") + 1] == "4" and args[-2:] == ["--replica-cpus", "8"]
    else:
        assert "fastboot.dev/health" not in pod["nodeSelector"] and "--slots" not in args
    # One image runs both.
    assert main["image"] == container(one(docs, "Deployment", "fastboot-router"))["image"]


@VALUE_SETS
def test_router_deployment_service_and_monitor(
    values: dict[str, Any] | None, tmp_path: Path
) -> None:
    docs = render(values)
    config = router_config(docs, tmp_path) if not values else None
    router = one(docs, "Deployment", "fastboot-router")
    main = container(router)
    assert main["args"] == ["router", "--config", "/etc/fastboot/router/router.toml"]
    assert main["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    if config:
        assert config.port == 8080
    assert scrape(router) == {"scrape": "true", "port": "8080", "path": "/metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert router["spec"]["replicas"] == 1 and router["spec"]["strategy"] == {"type": "Recreate"}
    service = one(docs, "Service")
    assert (
        service["spec"]["selector"].items()
        <= router["spec"]["template"]["metadata"]["labels"].items()
    )
    (port,) = service["spec"]["ports"]
    assert port == {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    if values:
        monitor = one(docs, "ServiceMonitor")
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint == {"port": "http", "path": "/metrics", "interval": "30s"}
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert monitor["metadata"]["labels"]["release"] == "prometheus"


@VALUE_SETS
def test_balloons_and_priorities(values: dict[str, Any] | None) -> None:
    docs = render(values)
    types = (values or {}).get("hostTypes", {"h100-80g": {"gpus": 8}})
    for host_type, spec in types.items():
        balloon = one(docs, "Deployment", f"fastboot-balloon-{host_type}")
        pod, hold = balloon["spec"]["template"]["spec"], container(balloon)
        assert "replicas" not in balloon["spec"]  # the router's to scale
        for labels in (balloon["metadata"]["labels"], pod_labels(balloon)):
            assert labels["fastboot.dev/host-type"] == host_type
        assert pod["priorityClassName"] == "fastboot-balloon"
        assert pod["terminationGracePeriodSeconds"] == 0
        assert pod["nodeSelector"]["fastboot.dev/health"] == "ok"
        assert pod["nodeSelector"]["fastboot.dev/host-type"] == host_type
        anti = pod["affinity"]["podAntiAffinity"]
        (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        # One balloon per node whatever its type: the selector matches every balloon.
        assert term["labelSelector"]["matchLabels"].items() <= pod_labels(balloon).items()
        assert "fastboot.dev/host-type" not in term["labelSelector"]["matchLabels"]
        assert hold["image"].startswith("registry.k8s.io/pause:")
        assert hold["resources"]["requests"]["nvidia.com/gpu"] == spec["gpus"]
        assert hold["resources"]["limits"] == {"nvidia.com/gpu": spec["gpus"]}
    if values:
        l4 = one(docs, "Deployment", "fastboot-balloon-l4-24g")["spec"]["template"]["spec"]
        assert l4["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
        assert "tolerations" not in l4
    balloon_pc = one(docs, "PriorityClass", "fastboot-balloon")
    assert (balloon_pc["value"], balloon_pc["preemptionPolicy"]) == (-10, "Never")
    assert one(docs, "PriorityClass", "fastboot-replica")["value"] == 1000


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def test_chart_refuses_a_host_type_that_cannot_name_a_deployment(tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text(yaml.safe_dump({"hostTypes": {"H100_80G": {"gpus": 8}}}))
    argv = [
        tool("helm"),
        "template",
        RELEASE,
        str(CHART),
        "--values",
        str(tmp_path / "values.yaml"),
    ]
    result = run(*argv, check=False)
    assert result.returncode != 0 and "H100_80G" in result.stderr


# --- systemd -------------------------------------------------------------------------------


def fastboot_executable() -> str:
    path = Path(sys.executable).parent / "fastboot"
    assert path.is_file(), f"{path}: install fastboot into this venv (scripts/setup)"
    return str(path)


def units(tmp_path: Path, edit: str = "", to: str = "") -> Iterator[Path]:
    """The units, with ExecStart on this venv's fastboot (verify needs a real executable);
    with `edit`, only those that contain it, with it replaced by `to`."""
    for unit in sorted(SYSTEMD.glob("*.service")):
        text = unit.read_text().replace("/opt/fastboot/venv/bin/fastboot", fastboot_executable())
        if edit and edit not in text:
            continue
        copy_ = tmp_path / unit.name
        copy_.write_text(text.replace(edit, to))
        yield copy_


def verify(unit: Path) -> tuple[int, str]:
    """systemd-analyze verify's exit status and what it said about this unit. It exits 0 for a
    misspelt or unparsable assignment (ignored with a warning), so the output counts too."""
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    result = run("systemd-analyze", "verify", "--man=no", str(unit), check=False)
    said = "\n".join(
        line for line in (result.stdout + result.stderr).splitlines() if unit.name in line
    )
    return result.returncode, said


def test_systemd_units_verify(tmp_path: Path) -> None:
    found = list(units(tmp_path))
    assert [u.name for u in found] == ["fastboot-agent.service", "fastboot-router.service"]
    for unit in found:
        assert verify(unit) == (0, ""), unit.name
    agent = (SYSTEMD / "fastboot-agent.service").read_text()
    # The agent stops its replicas itself on SIGTERM; systemd only SIGKILLs what is left.
    assert re.search(r"^KillMode=mixed$", agent, re.M) and re.search(
        r"^Restart=on-failure$", agent, re.M
    )
    # No mount namespace of its own: its netns bind mounts and FUSE mounts must be the host's.
    assert not re.search(r"^(ProtectSystem|PrivateTmp|ReadWritePaths|ProtectHome)=", agent, re.M)


@pytest.mark.parametrize(
    ("edit", "to"),
    [
        ("KillMode=mixed", "KillMode=mixd"),  # a bad value: ignored with a warning, exit 0
        ("TimeoutStopSec=", "TimeoutStoSec="),  # an unknown key: the same
        ("Type=exec", "Type=exec\nExecStart=/nonexistent/fastboot router"),  # exit 1
    ],
)
def test_systemd_verify_catches_a_broken_unit(tmp_path: Path, edit: str, to: str) -> None:
    broken = list(units(tmp_path, edit, to))
    assert broken
    for unit in broken:
        assert verify(unit) != (0, ""), unit.name


# --- the Containerfile ---------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return run(tool("hadolint"), "--no-color", str(path), check=False)


def test_containerfile_lints_clean() -> None:
    result = hadolint(CONTAINERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_containerfile_lint_catches_a_bad_instruction(tmp_path: Path) -> None:
    broken = tmp_path / "Containerfile"
    broken.write_text(CONTAINERFILE.read_text() + "ADD fastboot /src/fastboot\n")
    assert "DL3020" in hadolint(broken).stdout


def test_containerfile_uses_what_the_repository_has() -> None:
    text = CONTAINERFILE.read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    # The project's own provisioning, from the installed package.
    for script in ("snapshot/provision-criu.sh", "imagefs/provision-fuse.sh"):
        assert f'"$site/{script}"' in text and (ROOT / "fastboot" / script).is_file()
    assert re.search(r"^ARG EXTRAS=.*\bgpu\b.*\bimagefs\b.*\brouter\b", text, re.M)
