"""A throw-away network of Linux namespaces: one hub holding a bridge, N hosts on capped links.

Every host namespace has one veth (``eth0``) whose peer (``p<i>``) sits on the hub's bridge.
Both ends get a ``tc tbf`` cap, so each host's upload and download are limited to the rate.
Nothing is created in the caller's namespace, so no traffic can leave the lab. Needs root and
iproute2; ``missing_requirements()`` says what is absent.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

SUBNET = "10.77.0"
HUB_ADDRESS = f"{SUBNET}.1"
HOST_INTERFACE = "eth0"
# tbf's bucket banks idle link time: a bucket of B bytes lets B go out at once after a pause, so
# it holds a few milliseconds of traffic (at least two full frames: the kernel's tbf splits GSO
# packets to fit), not seconds of it at slow rates. The queue holds a second of traffic, enough
# for TCP to keep the link busy.
TBF_BURST_S = 0.005
TBF_MIN_BURST_BYTES = 2 * 1514
TBF_LATENCY = "1s"
CLONE_NEWNET = 0x40000000


def missing_requirements() -> list[str]:
    """What this machine lacks to build the lab (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and tc need it: run as root, e.g. with sudo)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            missing.append(f"the `{tool}` command (install iproute2, e.g. `apt-get install iproute2`)")
    return missing


def ready_for(benchmark: str) -> bool:
    """Whether the lab can run here (if not, log what it needs); from then on a SIGTERM ends the
    run as Ctrl-C does, so the lab's namespaces are taken down."""
    missing = missing_requirements()
    if missing:
        log.warning("skipping the %s: it needs %s", benchmark, "; ".join(missing))
        return False
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return True


def tbf_burst_bytes(rate_mbit: float) -> int:
    """The tbf bucket for a link of ``rate_mbit``: TBF_BURST_S of its traffic, at least two frames."""
    return max(TBF_MIN_BURST_BYTES, round(rate_mbit * 1e6 / 8 * TBF_BURST_S))


@dataclass(frozen=True)
class NetLab:
    """The plan of a lab: names, addresses and the cap; ``setup_commands`` builds it."""

    hosts: int
    rate_mbit: float | None  # None: no cap
    prefix: str = "dtlab"

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def host(self, index: int) -> str:
        return f"{self.prefix}-h{index}"

    def address(self, index: int) -> str:
        return f"{SUBNET}.{11 + index}"

    def setup_commands(self) -> list[list[str]]:
        """The ip/tc command lines that build the lab, in order."""
        hub = self.hub
        commands = [
            ["ip", "netns", "add", hub],
            ["ip", "-n", hub, "link", "set", "lo", "up"],
            ["ip", "-n", hub, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", "br0"],
            ["ip", "-n", hub, "link", "set", "br0", "up"],
        ]
        for i in range(self.hosts):
            host, peer = self.host(i), f"p{i}"
            commands += [
                ["ip", "netns", "add", host],
                ["ip", "-n", host, "link", "set", "lo", "up"],
                ["ip", "-n", hub, "link", "add", peer, "type", "veth", "peer", "name", HOST_INTERFACE, "netns", host],
                ["ip", "-n", hub, "link", "set", peer, "master", "br0"],
                ["ip", "-n", hub, "link", "set", peer, "up"],
                ["ip", "-n", host, "addr", "add", f"{self.address(i)}/24", "dev", HOST_INTERFACE],
                ["ip", "-n", host, "link", "set", HOST_INTERFACE, "up"],
            ]
            if self.rate_mbit is not None:
                commands += [self._cap(host, HOST_INTERFACE), self._cap(hub, peer)]
        return commands

    def _cap(self, namespace: str, device: str) -> list[str]:
        rate = f"{self.rate_mbit:g}mbit"
        return [
            "tc", "-n", namespace, "qdisc", "add", "dev", device, "root",
            "tbf", "rate", rate, "burst", f"{tbf_burst_bytes(self.rate_mbit)}b", "latency", TBF_LATENCY,
        ]

    def namespaces(self) -> list[str]:
        return [self.hub] + [self.host(i) for i in range(self.hosts)]

    def in_namespace(self, namespace: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]

    def tx_bytes_command(self, index: int) -> list[str]:
        """Reads the bytes host ``index`` has sent on its link."""
        return self.in_namespace(self.host(index), ["cat", f"/sys/class/net/{HOST_INTERFACE}/statistics/tx_bytes"])

    def set_link(self, index: int, up: bool) -> None:
        """Cut host ``index`` off the lab (its bridge port down), or connect it again."""
        command = ["ip", "-n", self.hub, "link", "set", f"p{index}", "up" if up else "down"]
        subprocess.run(command, check=True, capture_output=True)

    def enter(self, namespace: str) -> None:
        """Move the calling thread (and the threads and processes it starts later) into ``namespace``."""
        with open(f"/var/run/netns/{namespace}") as handle:
            if ctypes.CDLL(None, use_errno=True).setns(handle.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"cannot enter network namespace {namespace}")

    def tx_bytes(self, index: int) -> int:
        return int(subprocess.run(self.tx_bytes_command(index), check=True, capture_output=True, text=True).stdout)

    def setup(self) -> None:
        """Build the lab; on any failure remove what was made and raise."""
        self.teardown()  # leftovers of an interrupted earlier run with the same prefix
        try:
            for command in self.setup_commands():
                subprocess.run(command, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as error:
            self.teardown()
            raise RuntimeError(f"building the network lab failed at `{' '.join(error.cmd)}`: {error.stderr.strip()}") from error
        log.info("network lab %s: %d hosts, links capped at %s", self.prefix, self.hosts, self.rate_text())

    def teardown(self) -> None:
        """Delete every namespace of the lab (their veths, bridge and qdiscs go with them)."""
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        present = {line.split()[0] for line in existing.splitlines() if line.strip()}
        for namespace in self.namespaces():
            if namespace in present:
                subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    def rate_text(self) -> str:
        return "uncapped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
