"""The cloud buffer: health-checked idle hosts, sized by a linear program (OR-Tools GLOP).

- `lp`: how many idle hosts to keep per host type (`solve`, `BufferSizer` re-solves live).
- `hosts`: the host lifecycle state machine and the `Provider` protocol (`StaticProvider`).
- `kubernetes`: `KubernetesProvider`, GPU nodes held by balloon pods (import it from its module;
  it needs the `kubernetes` client, `pip install 'fastboot[router]'`).
- `health`: the two tiers of health checks (short on boot/assignment, deep on idle hosts).
- `manager`: `BufferManager`, which keeps the buffer at its targets and hands hosts out.
- `agents`: `AgentClient`, the client of each host's agent (`AgentEndpoint`: where it is and
  its token; `ReplicaInfo`: its answers), which the router places through too.
- `placement`: `BufferedPlacement`, the router's placement over hosts taken from the buffer
  (import it and `agents` from their modules).

docs/buffer.md writes the model and the lifecycle down.
"""

from fastboot.buffer.health import (
    CheckResult,
    HealthCheck,
    Outcome,
    assign_check,
    deep_check,
    short_check,
)
from fastboot.buffer.hosts import Host, HostSpec, HostState, Provider, StaticProvider
from fastboot.buffer.lp import (
    BufferPlan,
    BufferProblem,
    BufferSizer,
    HostType,
    ModelDemand,
    PlanStatus,
    SupplyPool,
    solve,
)
from fastboot.buffer.manager import BufferConfig, BufferEvent, BufferManager

__all__ = [
    "BufferConfig",
    "BufferEvent",
    "BufferManager",
    "BufferPlan",
    "BufferProblem",
    "BufferSizer",
    "CheckResult",
    "HealthCheck",
    "Host",
    "HostSpec",
    "HostState",
    "HostType",
    "ModelDemand",
    "Outcome",
    "PlanStatus",
    "Provider",
    "StaticProvider",
    "SupplyPool",
    "assign_check",
    "deep_check",
    "short_check",
    "solve",
]
