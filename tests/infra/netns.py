"""Two real hosts on one machine: network namespaces joined by a veth pair, each with an address of its own.

Processes started with ``Hosts.command(i, argv)`` run inside host ``i``'s namespace: they see only its
loopback and its veth (named ``IFNAME`` in both), and reach the other host at its address, over a real
(virtual) link. Each host also has a hostname of its own (a UTS namespace per command), which
``/etc/netns/<ns>/hosts`` (bind-mounted over /etc/hosts by ``ip netns exec``) resolves to its address, so
torchrun's rendezvous finds which host it runs on and what address the others reach it at. The filesystem
is shared, as a cluster's shared filesystem would be. Everything made here
(namespaces, and with them the veth pair) is removed on the way out, also when the test fails; a run killed
outright leaves namespaces named ``dt-host-<pid>-*``, which the next run removes.

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
_PREFIX = "dt-host-"


@dataclass(frozen=True)
class Hosts:
    namespaces: tuple[str, ...]
    addresses: tuple[str, ...]
    hostnames: tuple[str, ...]
    ifname: str = IFNAME

    def command(self, host: int, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        """``argv`` run as host ``host``: in its namespace, under its hostname, with ``env`` (gloo bound to the
        veth)."""
        env = {"GLOO_SOCKET_IFNAME": self.ifname, **(env or {})}
        inner = f"hostname {self.hostnames[host]} && exec env {shlex.join([f'{k}={v}' for k, v in env.items()])} " \
                f"{shlex.join(argv)}"
        return ["ip", "netns", "exec", self.namespaces[host], "unshare", "--uts", "--", "sh", "-c", inner]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _remove_stale() -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        if name.startswith(_PREFIX):
            pid = name[len(_PREFIX):].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _delete([name])


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
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
        # One veth pair, one end in each namespace, both ends named IFNAME there.
        a, b = f"dtv{os.getpid() % 10**6}a", f"dtv{os.getpid() % 10**6}b"
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        for end, name, address in ((a, names[0], addresses[0]), (b, names[1], addresses[1])):
            _ip("link", "set", end, "netns", name)
            _ip("-n", name, "link", "set", end, "name", IFNAME)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
            _ip("-n", name, "link", "set", IFNAME, "up")
            _ip("-n", name, "link", "set", "lo", "up")
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
