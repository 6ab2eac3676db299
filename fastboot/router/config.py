"""The router's configuration: frozen dataclasses, loaded from one TOML or YAML file.

Every default names where it came from (docs/router.md has the table); a file may set any field.
The file's shape:

    [router]                      # RouterConfig fields (all optional)
    port = 8080
    api_key_file = "/etc/fastboot/router.keys"
    [router.timeouts]             # TimeoutConfig fields
    first_byte_s = 120

    [models.tiny]                 # one table per public model name: ModelConfig fields
    snapshot = "3f2a9c"
    snapshots = ["7be104"]        # for hosts "3f2a9c" does not fit (another CPU baseline)
    max_replicas = 4

    [[agents]]                    # AgentEndpoint fields (fastboot.buffer.agents)
    url = "http://10.0.0.5:8700"
    token_file = "/etc/fastboot/agent.token"

    [buffer]                      # BufferSection: hosts from a buffer instead of [[agents]]
    provider = "kubernetes"       # or "static" (the default) with hosts_file = "hosts.yaml"
    host_type = "h100"
    [buffer.kubernetes]           # KubernetesSettings fields (fastboot.buffer.kubernetes)
    max_nodes = {h100 = 16}

YAML has the same keys (`router:`, `models:`, `agents:`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastboot.buffer.agents import AgentEndpoint
from fastboot.buffer.kubernetes import KubernetesSettings
from fastboot.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class ModelConfig:
    """One public model name and how its replicas are made, sized and fed."""

    #: The name clients send as `model` (and /v1/models lists).
    name: str
    #: Snapshot id (or a unique prefix) the agents restore for this model.
    snapshot: str
    #: More snapshots of the model, for hosts `snapshot` does not fit (other CPUs: one per
    #: `--fastboot-cpu-baseline`, other GPUs), in order of preference after it: each agent
    #: restores the first one it holds that its host can restore.
    snapshots: tuple[str, ...] = ()
    #: The name the engine serves, when it differs from `name`; None: as the agent reports it.
    served_model_name: str | None = None
    #: Replicas kept at all times (0 allows scale to zero).
    min_replicas: int = 0
    #: Replicas never exceeded (Ray Serve's max_replicas default is 1).
    max_replicas: int = 1
    #: Hard cap of in-flight requests per replica; beyond it requests wait in the router's queue
    #: (Knative containerConcurrency, Ray max_ongoing_requests). Size it to the engine's batch.
    concurrency: int = 16
    #: Autoscaler target = concurrency x this (Knative container-concurrency-target-percentage 70).
    target_utilization: float = 0.7
    #: Averaging window of the stable mode (Knative stable-window 60 s).
    stable_window_s: float = 60.0
    #: Averaging window of the panic mode (Knative: 10 % of the stable window, 6 s).
    panic_window_s: float = 6.0
    #: Panic when the panic window's demand reaches this x the ready capacity (Knative 200 %).
    panic_threshold: float = 2.0
    #: A scale-down takes effect only once no higher count was wanted for this long, including
    #: the last replica (Ray Serve downscale_delay_s 600 s: GPU replicas are slow to bring back).
    scale_down_delay_s: float = 600.0
    #: Remove the last replica when idle for scale_down_delay_s (needs min_replicas = 0;
    #: Knative enable-scale-to-zero true).
    scale_to_zero: bool = True
    #: At most current/this replicas are kept per step when scaling down (Knative 2.0).
    max_scale_down_rate: float = 2.0
    #: Requests waiting per model before 429 + Retry-After (anchors: 1,000; Knative holds 10,000).
    queue_max: int = 1000
    #: Longest a request waits for a replica before 503 (Knative revision timeout 300 s).
    queue_deadline_s: float = 300.0
    #: A replica that is not ready this long after placement is failed and replaced
    #: (Knative progress-deadline 600 s).
    boot_timeout_s: float = 600.0

    @property
    def candidates(self) -> tuple[str, ...]:
        """snapshot, then snapshots: what a placement offers an agent."""
        return (self.snapshot, *self.snapshots)

    @property
    def floor(self) -> int:
        """The fewest replicas this model may have."""
        return self.min_replicas if self.scale_to_zero else max(1, self.min_replicas)

    @property
    def target_per_replica(self) -> float:
        """In-flight requests per replica the autoscaler aims for."""
        return max(self.concurrency * self.target_utilization, 1e-9)


@dataclass(frozen=True)
class TimeoutConfig:
    """Timeouts on every upstream call (a hung replica must never hang the router)."""

    #: TCP connect to a replica (anchors §9.1: 2 s; vLLM production-stack #749).
    connect_s: float = 2.0
    #: Dispatch -> first response byte. Non-streaming answers arrive only when generation ends,
    #: so this is above the anchors' 30-60 s for streams.
    first_byte_s: float = 120.0
    #: Longest silence between two chunks of a response (anchors §9.1: 60 s).
    idle_s: float = 60.0
    #: Agent API calls other than the ready long poll.
    agent_s: float = 10.0
    #: Seconds between liveness probes of each agent that runs routed replicas (fastboot's
    #: choice: a lost host costs at most this plus `host_lost_s` of misrouted requests).
    host_probe_s: float = 0.5
    #: An agent silent this long (no answer to any probe; an error answer counts as alive) has
    #: lost its host: its replicas are replaced elsewhere and their requests aborted. Above a
    #: few probe intervals, so one dropped probe on a loaded host is not a loss.
    host_lost_s: float = 2.0


@dataclass(frozen=True)
class BufferSection:
    """Take agents from a buffer of health-checked idle hosts instead of a fixed list
    (fastboot.buffer; docs/buffer.md)."""

    #: YAML file with a top-level `hosts:` list (name, address, token or token_file, ...);
    #: the static provider only.
    hosts_file: str = ""
    #: Host type the models run on (the buffer keeps `target` idle hosts of it).
    host_type: str = "cpu"
    #: Idle, checked hosts to keep ready.
    target: int = 1
    #: Where hosts come from: "static" (hosts_file) or "kubernetes" (balloon pods).
    provider: str = "static"
    #: The Kubernetes provider's settings ([buffer.kubernetes]).
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)


@dataclass(frozen=True)
class RouterConfig:
    """The whole router: where it listens, what it serves, which agents it uses."""

    #: Models by public name.
    models: tuple[ModelConfig, ...] = ()
    #: Agents, tried in order of free slots.
    agents: tuple[AgentEndpoint, ...] = ()
    #: Listen address (loopback unless set).
    host: str = "127.0.0.1"
    #: Listen port.
    port: int = 8080
    #: Accepted API keys (Authorization: Bearer KEY); empty: no key needed. Never logged.
    api_keys: frozenset[str] = field(default=frozenset(), repr=False)
    #: Largest request body accepted (413 beyond); fastboot's choice, room for embedding batches.
    max_body_bytes: int = 32 << 20
    #: Autoscaler and health tick (Knative tick-interval 2 s).
    tick_s: float = 2.0
    #: Upstream timeouts.
    timeouts: TimeoutConfig = TimeoutConfig()
    #: Characters per prefix-hash block (anchors §9.2: ~256 chars; SGLang #26263).
    prefix_block_chars: int = 256
    #: Leading blocks hashed per request (fastboot's choice: the first 2 KiB decide affinity).
    prefix_blocks: int = 8
    #: Prefix affinity applies only while max - min in-flight <= this (anchors: 8-16).
    prefix_imbalance: int = 8
    #: Seconds a prefix -> replica entry is trusted (Dynamo ApproxKvIndexer window 120 s).
    prefix_ttl_s: float = 120.0
    #: Prefix table entries kept (anchors §9.2: ~1e5).
    prefix_entries: int = 100_000
    #: Delete the replicas this router placed when it stops (default: leave them to be adopted).
    release_on_exit: bool = False
    #: Hosts from a buffer (None: the `agents` list as it is).
    buffer: BufferSection | None = None

    def model(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if model.name == name:
                return model
        return None


# --- loading -------------------------------------------------------------------------------


def load_config(path: Path) -> RouterConfig:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a RouterConfig, checking every key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read router config {path}: {exc.strerror}") from exc
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            document = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    elif path.suffix == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    else:
        raise ConfigError(f"{path}: the router config must end in .toml, .yaml or .yml")
    return config_from_dict(document, base=path.parent, source=str(path))


def config_from_dict(
    document: Mapping[str, Any], base: Path = Path("."), source: str = "config"
) -> RouterConfig:
    """Build a RouterConfig from a parsed document; relative files resolve against `base`."""
    _expect_mapping(document, source)
    _no_unknown(document, {"router", "models", "agents", "buffer"}, source)
    router = dict(document.get("router") or {})
    _expect_mapping(router, f"{source}: [router]")
    keys = set(router.pop("api_keys", None) or ())
    if key_file := router.pop("api_key_file", None):
        keys |= set(_read_lines(_resolve(base, key_file), f"{source}: router.api_key_file"))
    timeouts = _build(TimeoutConfig, router.pop("timeouts", None) or {}, f"{source}: timeouts")

    models_doc = document.get("models") or {}
    _expect_mapping(models_doc, f"{source}: [models]")
    models = []
    for name, table in models_doc.items():
        where = f"{source}: models.{name}"
        _expect_mapping(table, where)
        table = dict(table)
        if "snapshots" in table:
            table["snapshots"] = _strings(table["snapshots"], f"{where}.snapshots")
        models.append(_build(ModelConfig, {"name": str(name), **table}, where))

    agents = []
    for index, table in enumerate(document.get("agents") or ()):
        where = f"{source}: agents[{index}]"
        _expect_mapping(table, where)
        table = dict(table)
        if token_file := table.pop("token_file", None):
            lines = _read_lines(_resolve(base, token_file), f"{where}.token_file")
            table["token"] = lines[0] if lines else ""
        agents.append(_build(AgentEndpoint, table, where))

    config = _build(
        RouterConfig,
        {
            **router,
            "models": tuple(models),
            "agents": tuple(agents),
            "buffer": _buffer_section(document.get("buffer"), base, source),
            "api_keys": frozenset(keys),
            "timeouts": timeouts,
        },
        f"{source}: [router]",
    )
    validate(config, source)
    return config


def _buffer_section(table: Any, base: Path, source: str) -> BufferSection | None:
    if table is None:
        return None
    where = f"{source}: [buffer]"
    _expect_mapping(table, where)
    table = dict(table)
    kubernetes = table.pop("kubernetes", None)
    section = _build(BufferSection, table, where)
    if section.target < 0:
        raise ConfigError(f"{where}: target must be >= 0")
    if section.provider == "static":
        if kubernetes is not None:
            raise ConfigError(f'{where}: [buffer.kubernetes] needs provider = "kubernetes"')
        if not section.hosts_file:
            raise ConfigError(f"{where}: set hosts_file (a YAML file with a `hosts:` list)")
        return dataclasses.replace(section, hosts_file=str(_resolve(base, section.hosts_file)))
    if section.provider != "kubernetes":
        raise ConfigError(
            f'{where}: provider must be "static" or "kubernetes", not {section.provider!r}'
        )
    if section.hosts_file:
        raise ConfigError(f'{where}: hosts_file is for provider = "static"; remove it')
    return dataclasses.replace(section, kubernetes=_kubernetes(kubernetes or {}, base, source))


def _kubernetes(table: Any, base: Path, source: str) -> KubernetesSettings:
    where = f"{source}: [buffer.kubernetes]"
    _expect_mapping(table, where)
    table = dict(table)
    max_nodes = table.get("max_nodes", {})
    _expect_mapping(max_nodes, f"{where}.max_nodes")
    for host_type, most in max_nodes.items():
        if isinstance(most, bool) or not isinstance(most, int) or most < 0:
            raise ConfigError(f"{where}.max_nodes.{host_type} must be an integer >= 0")
    table["max_nodes"] = dict(max_nodes)
    if table.get("kubeconfig"):
        kubeconfig = _coerce(table["kubeconfig"], str, f"{where}.kubeconfig")
        table["kubeconfig"] = str(_resolve(base, kubeconfig))
    try:
        return _build(KubernetesSettings, table, where)
    except ConfigError as exc:
        if str(exc).startswith(where):
            raise
        raise ConfigError(f"{where}: {exc}") from exc  # from KubernetesSettings' own checks


def validate(config: RouterConfig, source: str = "config") -> None:
    """Raise ConfigError for values that cannot work together."""
    if not config.models:
        raise ConfigError(f"{source}: no models; add a [models.NAME] table with a snapshot")
    for model in config.models:
        where = f"{source}: models.{model.name}"
        if not model.snapshot:
            raise ConfigError(f"{where}: snapshot is empty; set the snapshot id to restore")
        if model.max_replicas < 1 or model.min_replicas < 0:
            raise ConfigError(f"{where}: need 0 <= min_replicas and 1 <= max_replicas")
        if model.min_replicas > model.max_replicas:
            raise ConfigError(f"{where}: min_replicas > max_replicas")
        if model.concurrency < 1 or model.queue_max < 0:
            raise ConfigError(f"{where}: concurrency must be >= 1 and queue_max >= 0")
        if not 0 < model.target_utilization <= 1:
            raise ConfigError(f"{where}: target_utilization must be in (0, 1]")
        if not 0 < model.panic_window_s <= model.stable_window_s:
            raise ConfigError(f"{where}: need 0 < panic_window_s <= stable_window_s")
        if model.max_scale_down_rate < 1:
            raise ConfigError(f"{where}: max_scale_down_rate must be >= 1")
    for agent in config.agents:
        if not agent.url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: agent url {agent.url!r} must start with http(s)://")
    if not 0 < config.port < 65536:
        raise ConfigError(f"{source}: port {config.port} is out of range")


def _strings(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of snapshot ids, not {value!r}")
    return tuple(value)


def _resolve(base: Path, value: object) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path


def _read_lines(path: Path, where: str) -> list[str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _expect_mapping(value: object, where: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table/mapping, not {type(value).__name__}")


def _no_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")


def _build(cls: type[T], table: Mapping[str, Any], where: str) -> T:
    """cls(**table) with every key known and every value of the declared type."""
    _expect_mapping(table, where)
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _no_unknown(table, names, where)
    values = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in table.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin in (tuple, frozenset) or dataclasses.is_dataclass(hint):
        return value  # already built by the caller
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        if value < 0:
            raise ConfigError(f"{where} must not be negative")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return value
    return value
