"""Named network namespaces with a veth link to the host, one per engine.

    host netns                          netns NAME
      HOST_IF  10.213.a.b+1/30  <-veth->  eth0  10.213.a.b+2/30,  lo up

Each namespace gets its own /30 out of a /16, so the host reaches every engine at its own
address while all of them listen on the same port inside. A /30 per link (no shared bridge)
keeps replicas off each other's layer 2. Names are made by the caller from a prefix it owns, so
whoever made a namespace can find and remove all of its own after a crash (`ours`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastboot.errors import DependencyError, FastbootError

logger = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
#: Where replica links are numbered from (one /30 each: 16384 links).
DEFAULT_SUBNET = "10.213.0.0/16"
#: Linux interface names are at most 15 bytes.
IFNAMSIZ = 15


class NetworkError(FastbootError):
    """A network namespace or link could not be made or removed."""


@dataclass(frozen=True)
class Link:
    """A network namespace and its veth link to the host."""

    netns: str
    """Name under /run/netns."""
    host_if: str
    """The host end of the veth pair."""
    host_ip: str
    """The host end's address."""
    ip: str
    """The namespace end's address (eth0 inside): where the host reaches the engine."""

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.netns


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError as exc:
        raise DependencyError("`ip` (iproute2) is needed for network namespaces") from exc
    if check and result.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def addresses(subnet: str, index: int) -> tuple[str, str]:
    """(host end, namespace end) of link number index in subnet."""
    network = ipaddress.ip_network(subnet)
    if index < 0 or (index + 1) * 4 > network.num_addresses:
        raise NetworkError(f"link {index} does not fit in {subnet}")
    base = network.network_address + 4 * index
    return str(base + 1), str(base + 2)


def create(netns: str, host_if: str, subnet: str, index: int, routes: Sequence[str] = ()) -> Link:
    """Make netns with lo up and a veth to the host; on failure nothing is left behind.

    `routes` are networks the namespace answers through the host side of its link (the
    router's, when it runs on another machine): without them it reaches only its /30 peer."""
    if len(host_if) > IFNAMSIZ:
        raise NetworkError(f"interface name {host_if!r} is longer than {IFNAMSIZ} bytes")
    host_ip, ip = addresses(subnet, index)
    link = Link(netns, host_if, host_ip, ip)
    _ip("netns", "add", netns)
    try:
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", netns, "addr", "add", f"{ip}/30", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        for network in routes:
            _ip("-n", netns, "route", "add", network, "via", host_ip)
    except BaseException:
        delete(link)
        raise
    logger.debug("network namespace %s: %s <-> %s", netns, host_ip, ip)
    return link


def delete(link: Link) -> None:
    """Remove the namespace and its link (idempotent). Deleting the namespace destroys the
    veth pair with it, even while a process still holds the namespace open."""
    delete_interface(link.host_if)
    delete_netns(link.netns)


def ours(prefix: str) -> list[str]:
    """Names of network namespaces starting with prefix."""
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    return []


def host_links(prefix: str) -> list[str]:
    """Host interfaces whose names start with prefix (veth ends that outlived a crash)."""
    result = _ip("-o", "link", "show", check=False)
    names = []
    for line in result.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            name = parts[1].strip().split("@", 1)[0]
            if name.startswith(prefix):
                names.append(name)
    return names


def delete_interface(name: str) -> None:
    _ip("link", "del", name, check=False)


def delete_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        _ip("netns", "del", name, check=False)
    with contextlib.suppress(FileNotFoundError):
        (NETNS_DIR / name).unlink()  # a bind-mount point left by a failed `ip netns add`
