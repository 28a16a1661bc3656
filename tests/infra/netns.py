"""Two real hosts on one machine: network namespaces joined by a veth pair, each with an address of its own.

Processes started with ``Hosts.command(i, argv)`` run inside host ``i``'s namespace: they see only its
loopback and its veth (named ``IFNAME`` in both), and reach the other host at its address, over a real
(virtual) link. Each host also has a hostname of its own (a UTS namespace per command), which
``/etc/netns/<ns>/hosts`` (bind-mounted over /etc/hosts for the command) resolves to its address, so
torchrun's rendezvous finds which host it runs on and what address the others reach it at. The filesystem
is shared, as a cluster's shared filesystem would be. Everything made here
(namespaces, and with them the veth pair) is removed on the way out, also when the test fails; a run killed
outright leaves namespaces named ``dt-host-<pid>-*``, which the next run removes.

``bridged_hosts(n)`` makes ``n`` hosts on a bridge in the root namespace instead, which has an address on
it too (``Hosts.root_address``): daemons of the root namespace (a SLURM controller) and the hosts reach each
other there, as a cluster's head node and its compute nodes do. Its subnet is another than ``two_hosts``', so
both can exist at once.

Needs root (CAP_NET_ADMIN) and iproute2's ``ip``; ``make test`` runs as root and installs iproute2.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from infra import skip_or_fail

IFNAME = "dt0"
SUBNET = "10.213.77"  # a private /24 of our own; traffic goes only between the two namespaces
BRIDGED_SUBNET = "10.213.78"  # bridged_hosts: the hosts at .1, .2, ..., the root namespace at .254
_PREFIX = "dt-host-"
_BRIDGE_PREFIX = "dtbr"


@dataclass(frozen=True)
class Hosts:
    namespaces: tuple[str, ...]
    addresses: tuple[str, ...]
    hostnames: tuple[str, ...]
    ifname: str = IFNAME
    root_address: str | None = None
    """bridged_hosts: the root namespace's address on the hosts' bridge."""

    def command(self, host: int, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        """``argv`` run as host ``host``: in its namespace, under its hostname, with ``env`` (gloo bound to the
        veth)."""
        env = {"GLOO_SOCKET_IFNAME": self.ifname, **(env or {})}
        # Not `ip netns exec`: it also remounts /sys for the namespace, which hides /sys/fs/cgroup, and slurmd
        # will not start without it. The host's /etc/hosts is bind-mounted here instead, in a mount namespace
        # of the command's own (private: nothing leaks to the machine).
        hosts_file = Path("/etc/netns") / self.namespaces[host] / "hosts"
        inner = (f"mount --bind {shlex.quote(str(hosts_file))} /etc/hosts && hostname {self.hostnames[host]} && "
                 f"exec env {shlex.join([f'{k}={v}' for k, v in env.items()])} {shlex.join(argv)}")
        return ["nsenter", f"--net=/run/netns/{self.namespaces[host]}", "unshare", "--mount", "--uts", "--",
                "sh", "-c", inner]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _remove_stale() -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        if name.startswith(_PREFIX):
            pid = name[len(_PREFIX):].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _delete([name])
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        pid = name[len(_BRIDGE_PREFIX):]
        if name.startswith(_BRIDGE_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "link", "delete", name], capture_output=True)


def _add_namespaces(names: Sequence[str], hosts_file: str, made: list[str]) -> None:
    for name in names:
        _ip("netns", "add", name)
        made.append(name)
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts_file)


def _join(end: str, name: str, address: str) -> None:
    """Move veth ``end`` into namespace ``name`` as IFNAME with ``address``, and bring it and lo up."""
    _ip("link", "set", end, "netns", name)
    _ip("-n", name, "link", "set", end, "name", IFNAME)
    _ip("-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
    _ip("-n", name, "link", "set", IFNAME, "up")
    _ip("-n", name, "link", "set", "lo", "up")


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        skip_or_fail("two hosts need root and iproute2's `ip` (network namespaces)")
    _remove_stale()
    names = tuple(f"{_PREFIX}{os.getpid()}-{i}" for i in range(2))
    addresses = tuple(f"{SUBNET}.{i + 1}" for i in range(2))
    hostnames = tuple(f"dt-host{i}" for i in range(2))
    hosts_file = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(addresses, hostnames))
    made: list[str] = []
    try:
        _add_namespaces(names, hosts_file, made)
        # One veth pair, one end in each namespace, both ends named IFNAME there.
        a, b = f"dtv{os.getpid() % 10**6}a", f"dtv{os.getpid() % 10**6}b"
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        for end, name, address in ((a, names[0], addresses[0]), (b, names[1], addresses[1])):
            _join(end, name, address)
    except subprocess.CalledProcessError as err:
        _delete(made)
        skip_or_fail(f"cannot make network namespaces here ({err.stderr.strip()})")
    try:
        yield Hosts(names, addresses, hostnames)
    finally:
        _delete(made)


def _delete(names: Sequence[str]) -> None:
    for name in names:  # deleting a namespace deletes the veth end in it, and with it the pair
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


@contextlib.contextmanager
def bridged_hosts(n: int, *, root_name: str) -> Iterator[Hosts]:
    """``n`` hosts ``dt-node0``.. on a bridge whose root-namespace end has ``Hosts.root_address``, which the
    hosts know as ``root_name``. The bridge and the namespaces (with their veths) are removed on the way out."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        skip_or_fail("bridged hosts need root and iproute2's `ip` (network namespaces)")
    _remove_stale()
    pid = os.getpid()
    names = tuple(f"{_PREFIX}{pid}-b{i}" for i in range(n))
    addresses = tuple(f"{BRIDGED_SUBNET}.{i + 1}" for i in range(n))
    hostnames = tuple(f"dt-node{i}" for i in range(n))
    root_address, bridge = f"{BRIDGED_SUBNET}.254", f"{_BRIDGE_PREFIX}{pid}"
    hosts_file = (f"127.0.0.1 localhost\n{root_address} {root_name}\n"
                  + "".join(f"{a} {h}\n" for a, h in zip(addresses, hostnames)))
    made: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{root_address}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        _add_namespaces(names, hosts_file, made)
        for i, (name, address) in enumerate(zip(names, addresses)):
            outer, inner = f"dtb{pid % 10**6}-{i}", f"dtb{pid % 10**6}-{i}n"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _join(inner, name, address)
    except subprocess.CalledProcessError as err:
        _delete(made)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
        skip_or_fail(f"cannot make bridged network namespaces here ({err.stderr.strip()})")
    try:
        yield Hosts(names, addresses, hostnames, root_address=root_address)
    finally:
        _delete(made)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
