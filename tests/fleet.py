"""A fleet of real hosts on this machine, for the host-loss test and benchmarks/fleet_faults.py.

Each "host" is a network namespace with a veth to this one and a real `fastboot agent` inside,
its replicas in namespaces of their own behind it. The network is laid out as a routed cluster
is (a host-gateway CNI): each host's replica subnet is routed to that host, the host forwards,
and replicas answer the router's network through their host (`--replica-route`). The router is
a real `fastboot router` process on this namespace's loopback, taking its hosts from a buffer
(StaticProvider over the agents).

Faults: `kill` (SIGKILL the agent and every process of its replicas: a crashed or powered-off
host), `cut` (the host drops every packet from its veth: a partition; nothing is reset,
connections just go silent) and `heal`. `restart` starts the agent again on the same state
dir, as systemd would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastboot.agent.replicas import kill_namespace, processes_in
from fastboot.host import netns
from fastboot.host.proctree import tree_pids
from tests.agents import Agent, start_agent
from tests.engine_process import EngineProcess, engine_process, log_tail, processes_mentioning

#: Hosts' links, one /30 each (not the agents' 10.213/16, nor other tests' 10.214, 10.215.77).
LINKS = "10.215.78.0/24"
PORT = 8700
#: What a cut drops in the host's namespace, both ways: the agent's packets and its replicas'.
PARTITION_RULES = (
    ("INPUT", "-i"),
    ("OUTPUT", "-o"),
    ("FORWARD", "-i"),
    ("FORWARD", "-o"),
)
NETNS, LINK, AGENT = "fbflt-", "fbflth", "fl"


def replica_subnet(index: int) -> str:
    return f"10.216.{index}.0/24"


@dataclass
class FleetHost:
    index: int
    link: netns.Link
    snapshots: Path
    work: Path
    agent: Agent | None = None

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def url(self) -> str:
        return f"http://{self.link.ip}:{PORT}"

    def replica_namespaces(self) -> list[str]:
        return netns.ours(f"fb-{AGENT}{self.index}-")

    def replica_links(self) -> list[str]:
        """The replicas' veths, which live in the host's namespace."""
        shown = subprocess.run(
            ["ip", "-n", self.link.netns, "-o", "link", "show"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        prefix = f"fb{AGENT}{self.index}h"
        return [line.split(":")[1].strip() for line in shown.splitlines() if prefix in line]

    def replica_processes(self) -> list[int]:
        """Processes still in any of its replicas' namespaces."""
        return [p for n in self.replica_namespaces() for p in processes_in(netns.NETNS_DIR / n)]

    def start(self) -> Agent:
        self.agent = start_agent(
            self.snapshots,
            self.work / f"state{self.index}",
            self.work / f"agent{self.index}.log",
            name=f"{AGENT}{self.index}",
            listen_host=self.link.ip,
            port=PORT,
            slots=1,
            prefix=["ip", "netns", "exec", self.link.netns],
            subnet=replica_subnet(self.index),
            extra=["--replica-route", LINKS],
            # A restart keeps the token the router was configured with.
            token=self.agent.token if self.agent is not None else None,
        )
        return self.agent

    def kill(self) -> None:
        """SIGKILL the agent and every process of its replicas, all at once."""
        assert self.agent is not None
        pids = set(tree_pids(self.agent.proc.pid))
        for name in self.replica_namespaces():
            pids |= set(processes_in(netns.NETNS_DIR / name))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.agent.proc.wait()

    def cut(self) -> None:
        """A partition: the host's namespace drops every packet on its veth, both ways, the
        agent's (INPUT, OUTPUT) and its replicas' (FORWARD). Silent (no reset, no ICMP) and local:
        the link stays up, so this namespace's routes to the host stay and nothing addressed to
        it ever takes the default route off the machine (a veth set down removes them: traffic
        to the host then left for the real network, and a stranger answered 404)."""
        for chain, way in PARTITION_RULES:
            self._iptables("-I", chain, way, "eth0", "-j", "DROP")

    def heal(self) -> None:
        for chain, way in PARTITION_RULES:
            self._iptables("-D", chain, way, "eth0", "-j", "DROP")

    def _iptables(self, *rule: str) -> None:
        argv = ["ip", "netns", "exec", self.link.netns, "iptables", "-w", *rule]
        subprocess.run(argv, check=True, capture_output=True)


def leftovers(work: Path) -> dict[str, list[str]]:
    """What the fleet must not leave behind: namespaces, links, routes, agent processes."""
    routes = subprocess.run(
        ["ip", "route", "show", "10.216.0.0/16"], capture_output=True, text=True, check=False
    ).stdout.split("\n")
    return {
        "netns": netns.ours(NETNS) + netns.ours(f"fb-{AGENT}"),
        "links": netns.host_links(LINK),
        "routes": [r for r in routes if r.strip()],
        "agents": processes_mentioning(f"--state-dir {work}/"),
    }


@contextlib.contextmanager
def fleet(snapshots: Path, work: Path, hosts: int) -> Iterator[list[FleetHost]]:
    """`hosts` hosts with healthy agents; everything removed on the way out."""
    clean: dict[str, list[str]] = {"netns": [], "links": [], "routes": [], "agents": []}
    assert leftovers(work) == clean, f"leftovers of an earlier run: {leftovers(work)}"
    made: list[FleetHost] = []
    try:
        for i in range(hosts):
            link = netns.create(f"{NETNS}{i}", f"{LINK}{i}", LINKS, i)
            made.append(FleetHost(i, link, snapshots, work))
            subprocess.run(
                ["ip", "netns", "exec", link.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                check=True,
            )
            subprocess.run(
                ["ip", "route", "replace", replica_subnet(i), "via", link.ip], check=True
            )
        with ThreadPoolExecutor(hosts) as pool:
            for future in [pool.submit(h.start) for h in made]:
                future.result()
        yield made
    finally:
        for host in made:
            if host.agent is not None and host.agent.proc.poll() is None:
                with contextlib.suppress(AssertionError):
                    host.agent.stop()
        for name in netns.ours(f"fb-{AGENT}"):  # only where an agent died with replicas
            kill_namespace(netns.NETNS_DIR / name)
            netns.delete_netns(name)
        for host in made:
            subprocess.run(
                ["ip", "route", "del", replica_subnet(host.index)],
                capture_output=True,
                check=False,
            )
            netns.delete(host.link)
    assert leftovers(work) == clean, leftovers(work)


def router_config(
    work: Path, hosts: list[FleetHost], snapshot: str, served: str, port: int, replicas: int
) -> Path:
    hosts_file = work / "hosts.yaml"
    entries = [
        {"name": h.name, "address": h.url, "token": h.agent.token if h.agent else "", "local": True}
        for h in hosts
    ]
    hosts_file.write_text(json.dumps({"hosts": entries}))  # JSON is YAML
    config = work / "router.toml"
    config.write_text(
        "\n".join(
            [
                "[router]",
                f"port = {port}",
                "tick_s = 0.5",
                "release_on_exit = true",  # a router run after this one starts from no replicas
                "[router.timeouts]",
                "host_probe_s = 0.5",
                "host_lost_s = 2.0",
                "[models.tiny]",
                f'snapshot = "{snapshot}"',
                f"served_model_name = {json.dumps(served)}",
                f"min_replicas = {replicas}",
                f"max_replicas = {replicas}",
                "concurrency = 16",
                "queue_max = 1000",
                "queue_deadline_s = 60",
                "[buffer]",
                f'hosts_file = "{hosts_file}"',
                "target = 1",
                "",
            ]
        )
    )
    return config


@contextlib.contextmanager
def router_process(config: Path, port: int, log: Path) -> Iterator[EngineProcess]:
    """A `fastboot router` process: it answers /health and lists its models at once, which is
    what engine_process waits for."""
    argv = [sys.executable, "-m", "fastboot", "router", "--config", str(config)]
    with engine_process(argv, port, log, ready_deadline_s=60) as router:
        yield router


def health(router: EngineProcess) -> dict[str, Any]:
    with urllib.request.urlopen(router.url + "/health", timeout=5) as response:
        doc: dict[str, Any] = json.loads(response.read())
    return doc


def members(router: EngineProcess, model: str = "tiny") -> list[dict[str, Any]]:
    return list(health(router)["models"][model]["members"])


def wait_for(what: str, ok: Any, deadline_s: float, log: Path, step_s: float = 0.05) -> float:
    """Poll ok() until true; seconds waited, or fail with the router's log tail."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            if ok():
                return time.monotonic() - start
        if time.monotonic() - start > deadline_s:
            raise AssertionError(f"{what}: not within {deadline_s} s\n{log_tail(log)}")
        time.sleep(step_s)


def bench(
    base_url: str,
    model: str,
    tokenizer: Path,
    prompts: int,
    rate: float,
    out: Path,
    timeout_s: float,
) -> dict[str, Any]:
    """One `vllm bench serve` run (random prompts, streamed completions) asking for `model`
    (the router's public name, or a replica's served name); its result JSON.
    Killed past timeout_s: a hung request fails the run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        *[sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve"],
        *["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions"],
        *["--model", model, "--tokenizer", str(tokenizer)],
        *["--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "16"],
        *["--num-prompts", str(prompts), "--request-rate", str(rate), "--seed", "0"],
        *["--ignore-eos", "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99,100"],
        *["--save-result", "--save-detailed", "--disable-tqdm"],
        *["--result-dir", str(out.parent), "--result-filename", out.name],
    ]
    log = out.with_suffix(".log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    with log.open("wb") as sink:
        done = subprocess.run(
            argv, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s, check=False, env=env
        )
    if done.returncode != 0:
        raise AssertionError(f"vllm bench serve exited {done.returncode}:\n{log_tail(log)}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result
