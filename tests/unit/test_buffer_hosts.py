"""Host lifecycle state machine and the static provider."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fastboot.buffer.hosts import TRANSITIONS, Host, HostSpec, HostState, StaticProvider
from fastboot.errors import IllegalTransitionError, UsageError

S = HostState


def test_the_whole_life_of_a_host_is_recorded() -> None:
    host = Host(HostSpec("h1", "http://127.0.0.1:1"))
    path = [S.CHECKING, S.IDLE, S.CHECKING, S.IDLE, S.ASSIGNED, S.DRAINING, S.RELEASED]
    for state in path:
        host.move(state, f"to {state.value}")
    assert host.state is S.RELEASED
    assert [t.after for t in host.history] == path
    assert host.history[0].before is S.PROVISIONING
    assert host.reason == "to released"


@pytest.mark.parametrize(
    ("start", "to"),
    [
        (S.IDLE, S.PROVISIONING),
        (S.PROVISIONING, S.ASSIGNED),  # never assigned without a check
        (S.CHECKING, S.ASSIGNED),
        (S.ASSIGNED, S.IDLE),  # back to the buffer only through draining + a check
        (S.QUARANTINED, S.ASSIGNED),
        (S.QUARANTINED, S.IDLE),
        (S.QUARANTINED, S.CHECKING),
        (S.RELEASED, S.CHECKING),
    ],
)
def test_illegal_moves_raise(start: HostState, to: HostState) -> None:
    host = Host(HostSpec("h1", "http://x"), state=start)
    with pytest.raises(IllegalTransitionError, match=f"from {start.value} to {to.value}"):
        host.move(to)
    assert host.state is start and host.history == []


def test_quarantine_is_reachable_from_every_live_state_and_says_why() -> None:
    live = [s for s in S if s not in (S.QUARANTINED, S.RELEASED)]
    assert all(S.QUARANTINED in TRANSITIONS[s] for s in live)
    host = Host(HostSpec("h1", "http://x"), state=S.IDLE)
    host.move(S.QUARANTINED, "nvml: GPU 0: 2 uncorrectable ECC errors")
    with pytest.raises(IllegalTransitionError, match="uncorrectable ECC"):
        host.move(S.ASSIGNED)
    assert TRANSITIONS[S.QUARANTINED] == frozenset({S.RELEASED})


def test_static_provider_hands_out_each_host_once(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("s3cret\n")
    provider = StaticProvider.from_config(
        [
            {"address": "http://10.0.0.1:8700/", "token_file": "tok", "host_type": "small"},
            {"name": "b", "address": "http://10.0.0.2:8700", "token": "t2", "host_type": "small"},
            {"name": "g", "address": "http://10.0.0.3:8700", "kind": "gpu", "host_type": "h100"},
        ],
        base=tmp_path,
    )
    first = provider.hosts[0]
    assert (first.name, first.address, first.token) == ("http://10.0.0.1:8700",) * 2 + ("s3cret",)
    assert "s3cret" not in repr(first)

    async def scenario() -> list[str | None]:
        got = [await provider.acquire("small") for _ in range(3)]
        assert provider.supply("small") == 0 and provider.supply("h100") == 1
        assert got[0] is not None
        await provider.release(got[0])
        again = await provider.acquire("small")
        return [s.name if s else None for s in [*got, again]]

    assert asyncio.run(scenario()) == ["http://10.0.0.1:8700", "b", None, "http://10.0.0.1:8700"]


def test_static_provider_config_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs an address"):
        StaticProvider.from_config([{"token": "x"}])
    with pytest.raises(UsageError, match="kind must be cpu or gpu"):
        StaticProvider.from_config([{"address": "http://a", "kind": "tpu"}])
    with pytest.raises(UsageError, match="cannot read token_file"):
        StaticProvider.from_config([{"address": "http://a", "token_file": str(tmp_path / "no")}])
    with pytest.raises(UsageError, match="distinct names"):
        StaticProvider([HostSpec("a", "http://a"), HostSpec("a", "http://b")])
    path = tmp_path / "hosts.yaml"
    path.write_text("hosts:\n  - {address: 'http://127.0.0.1:8700', local: true}\n")
    assert StaticProvider.from_file(path).hosts[0].local
    path.write_text("nodes: []\n")
    with pytest.raises(UsageError, match="top-level `hosts:` list"):
        StaticProvider.from_file(path)
