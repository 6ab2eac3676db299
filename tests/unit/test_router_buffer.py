"""The router taking its agents from the buffer ([buffer] in its config): fakes on 127.0.0.1."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
import yaml

from fastboot.buffer.hosts import HostId, HostState
from fastboot.errors import ConfigError
from fastboot.router.app import Router
from fastboot.router.config import BufferSection, ModelConfig, RouterConfig, config_from_dict
from fastboot.router.testing import FakeAgent, FakeEngine, completion_body


def test_buffer_section_is_parsed_and_checked(tmp_path: Path) -> None:
    document = {
        "models": {"m": {"snapshot": "s"}},
        "buffer": {"hosts_file": "hosts.yaml", "target": 2},
    }
    config = config_from_dict(document, base=tmp_path)
    assert config.buffer == BufferSection(str(tmp_path / "hosts.yaml"), "cpu", 2)
    with pytest.raises(ConfigError, match="set hosts_file"):
        config_from_dict({**document, "buffer": {"target": 1}}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) size"):
        config_from_dict({**document, "buffer": {"hosts_file": "h", "size": 1}}, base=tmp_path)


def test_scale_from_zero_takes_a_checked_host_from_the_buffer_and_refills(tmp_path: Path) -> None:
    async def main() -> None:
        engine = FakeEngine()
        await engine.start()
        agents = [FakeAgent(lambda snapshot: engine.url, slots=1) for _ in range(3)]
        for agent in agents:
            await agent.start()
        hosts = [
            {"name": f"h{i}", "address": a.url, "token": a.token} for i, a in enumerate(agents)
        ]
        (tmp_path / "hosts.yaml").write_text(yaml.safe_dump({"hosts": hosts}))
        config = RouterConfig(
            models=(ModelConfig(name="m", snapshot="snap"),),
            port=0,
            buffer=BufferSection(str(tmp_path / "hosts.yaml"), "cpu", 1),
        )
        router = Router(config)
        try:
            await router.start()
            base = f"http://127.0.0.1:{router.port}"
            async with (
                aiohttp.ClientSession(base) as http,
                http.post("/v1/completions", data=completion_body("m")) as response,
            ):
                assert response.status == 200
            posted = [i for i, a in enumerate(agents) if a.posts]
            assert len(posted) == 1  # one host was taken from the buffer for the replica
            # ...and a replacement is checked into the buffer at once: one idle host again.
            manager = router.controller._buffer
            assert manager is not None
            deadline = asyncio.get_running_loop().time() + 10
            while manager.count("cpu", HostState.IDLE) != 1:
                assert asyncio.get_running_loop().time() < deadline, manager.status()
                await asyncio.sleep(0.02)
            taken = manager.hosts[HostId(f"h{posted[0]}")]
            assert taken.state is HostState.ASSIGNED
        finally:
            await router.stop()
            for agent in agents:
                await agent.stop()
            await engine.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
