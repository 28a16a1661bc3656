"""A real SLURM cluster, with accounting, started from Debian's packages: one node, or two real hosts.

``SlurmCluster.running()`` brings up, in one temp dir and on loopback ports:

    munged -> mariadbd (private datadir) -> slurmdbd -> slurmctld -> slurmd

and yields once ``sinfo`` shows the node idle and ``sacct`` answers. ``running(hosts=bridged_hosts(2, ...))``
runs one slurmd in each host's network namespace instead (nodes ``dt-node0``, ``dt-node1``, each at its own
address): the controller listens on the root namespace's address on the hosts' bridge, the head node of this
cluster, while munged, mariadbd and slurmdbd stay on loopback, where only the controller talks to them (munge
goes through a socket file, which every namespace sees). A TaskProlog points gloo at each host's veth. ``SLURM_CONF`` is exported
for the clients (sbatch, sacct, scontrol) that submitit calls. Accounting is not optional:
submitit reads job states from ``sacct``, and without it a cancelled job never reaches
``done()``. On the way out, jobs are cancelled, every daemon is stopped by the PID in its pid
file, and the temp dir is removed, also when the body raised.

Needs root (SlurmUser=root; jobs run as root) and the packages slurm-wlm, slurmctld, slurmd,
slurm-client, slurmdbd, munge and mariadb-server. ``slurm_cluster`` is the pytest fixture.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from infra import skip_or_fail
from infra.daemons import Daemon, DaemonError, free_port, log_tail, port_open, spawn, stop, wait_until
from infra.netns import Hosts, bridged_hosts

BINARIES = ("munged", "mungekey", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd", "slurmctld", "slurmd",
            "sbatch", "srun", "sinfo", "squeue", "sacct", "sacctmgr", "scontrol", "scancel")
CLUSTER_NAME = "disttrain"
PARTITION = "debug"
DB_USER, DB_PASSWORD, DB_NAME = "slurm", "slurm-test-only", "slurm_acct_db"


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "the private SLURM cluster needs root (SlurmUser=root)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"SLURM/munge/mariadb binaries missing: {', '.join(missing)} (apt-get install slurm-wlm slurmctld "
                "slurmd slurm-client slurmdbd munge mariadb-server)")
    return None


@dataclass
class SlurmCluster:
    root: Path
    """Temp dir holding every config, state, spool, pid, log and socket file."""
    hostname: str
    cpus: int
    ports: dict[str, int]
    daemons: list[Daemon] = field(default_factory=list)
    partition: str = PARTITION
    hosts: Hosts | None = None
    """The compute hosts (network namespaces); None: one node, this machine, on loopback."""

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.hosts.hostnames if self.hosts else (self.hostname,)

    @property
    def controller_address(self) -> str:
        return self.hosts.root_address if self.hosts and self.hosts.root_address else "127.0.0.1"

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def cli(self, *argv: str, timeout_s: float = 30.0, check: bool = True) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        done = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def logs(self) -> str:
        """Tails of every daemon log, for failure messages."""
        return "\n".join(f"--- {d.name}:\n{log_tail(d.log, n_lines=15)}" for d in self.daemons)

    @classmethod
    @contextlib.contextmanager
    def running(cls, *, start_timeout_s: float = 60.0, hosts: Hosts | None = None) -> Iterator["SlurmCluster"]:
        reason = unavailable_reason()
        if reason:
            raise DaemonError(reason)
        root = Path(tempfile.mkdtemp(prefix="slurm-cluster-"))
        root.chmod(0o755)  # munged insists that its socket's directories are not private to one user
        cluster = cls(root=root, hostname=controller_name(), cpus=len(os.sched_getaffinity(0)),
                      ports={name: free_port() for name in ("mariadb", "slurmdbd", "slurmctld", "slurmd")},
                      hosts=hosts)
        previous_conf = os.environ.get("SLURM_CONF")
        try:
            cluster._start(start_timeout_s)
            os.environ["SLURM_CONF"] = str(cluster.conf)
            yield cluster
        finally:
            if previous_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous_conf
            cluster._shutdown()
            shutil.rmtree(root, ignore_errors=True)

    # --- start -------------------------------------------------------------------------------

    def _start(self, timeout_s: float) -> None:
        for sub in ("etc", "munge", "mysql", "state", "spool", "run", "log", "tmp"):
            (self.root / sub).mkdir(mode=0o755)
        self._start_munge(timeout_s)
        self._start_mariadb(timeout_s)
        self._write_configs()
        self._start_slurmdbd(timeout_s)
        self._start_slurm(timeout_s)

    def _start_munge(self, timeout_s: float) -> None:
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        self.daemons.append(spawn("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.root / 'run' / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        ], log=self.root / "log" / "munged.out", pid_file=self.root / "run" / "munged.pid"))
        wait_until(self.munge_socket.exists, what="the munge socket", timeout_s=timeout_s,
                   daemons=tuple(self.daemons))

    def _start_mariadb(self, timeout_s: float) -> None:
        datadir, sock = self.root / "mysql", self.root / "run" / "mysqld.sock"
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                        "--auth-root-authentication-method=socket", "--skip-test-db", "--skip-name-resolve"],
                       check=True, capture_output=True, timeout=timeout_s)
        pid_file = self.root / "run" / "mariadbd.pid"
        self.daemons.append(spawn("mariadbd", [
            "mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root", "--bind-address=127.0.0.1",
            f"--port={self.ports['mariadb']}", f"--socket={sock}", f"--pid-file={pid_file}", "--skip-name-resolve",
            "--skip-log-bin", "--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=0",
            f"--log-error={self.root / 'log' / 'mariadbd.log'}",
        ], log=self.root / "log" / "mariadbd.out", pid_file=pid_file))
        wait_until(lambda: port_open(self.ports["mariadb"]), what="mariadbd", timeout_s=timeout_s,
                   daemons=tuple(self.daemons))
        sql = (f"CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}';"
               f"CREATE DATABASE {DB_NAME};"
               f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1';")
        subprocess.run(["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root", "-e", sql],
                       check=True, capture_output=True, timeout=timeout_s)

    def _write_configs(self) -> None:
        r = self.root
        # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
        auth = ["AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=10"]
        dbd = [
            *auth, f"DbdHost={self.hostname}", "DbdAddr=127.0.0.1", f"DbdPort={self.ports['slurmdbd']}",
            "SlurmUser=root", f"PidFile={r}/run/slurmdbd.pid", f"LogFile={r}/log/slurmdbd.log",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={self.ports['mariadb']}", f"StorageUser={DB_USER}", f"StoragePass={DB_PASSWORD}",
            f"StorageLoc={DB_NAME}",
        ]
        memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
        addresses = self.hosts.addresses if self.hosts else ("127.0.0.1",)
        nodes = [f"NodeName={name} NodeAddr={address} CPUs={self.cpus} RealMemory={memory_mb} State=UNKNOWN"
                 for name, address in zip(self.nodes, addresses)]
        prolog = []
        if self.hosts:  # every task runs on a host: gloo must use its veth, not the loopback its name may map to
            script = r / "etc" / "task_prolog.sh"
            script.write_text(f"#!/bin/sh\necho export GLOO_SOCKET_IFNAME={self.hosts.ifname}\n")
            script.chmod(0o755)
            prolog = [f"TaskProlog={script}"]
        slurm = [
            f"ClusterName={CLUSTER_NAME}", f"SlurmctldHost={self.hostname}({self.controller_address})",
            f"SlurmctldPort={self.ports['slurmctld']}", f"SlurmdPort={self.ports['slurmd']}",
            *auth, "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root", "MpiDefault=none",
            # %n: each node's slurmd its own spool, pid and log file on the shared filesystem.
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n", f"TmpFS={r}/tmp",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log", *prolog,
            # No systemd or cgroups here: track processes by parentage, bind nothing.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1", "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={self.ports['slurmdbd']}",
            # The slurmctld <-> slurmdbd link ignores AuthInfo; it reads the munge socket from here.
            f"AccountingStoragePass={self.munge_socket}",
            "JobRequeue=1", "MinJobAge=2", "KillWait=60", "ReturnToService=2", "MailProg=/bin/true",
            *nodes,
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        dbd_conf = r / "etc" / "slurmdbd.conf"
        dbd_conf.write_text("\n".join(dbd) + "\n")
        dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read: it holds the DB password
        self.conf.write_text("\n".join(slurm) + "\n")

    def _start_slurmdbd(self, timeout_s: float) -> None:
        self.daemons.append(spawn("slurmdbd", ["slurmdbd", "-D"], log=self.root / "log" / "slurmdbd.out",
                                  pid_file=self.root / "run" / "slurmdbd.pid", env=self.env()))
        wait_until(lambda: port_open(self.ports["slurmdbd"]), what="slurmdbd", timeout_s=timeout_s,
                   daemons=tuple(self.daemons))
        self.cli("sacctmgr", "-i", "add", "cluster", CLUSTER_NAME)

    def _start_slurm(self, timeout_s: float) -> None:
        env = self.env()
        self.daemons.append(spawn("slurmctld", ["slurmctld", "-D", "-i"], log=self.root / "log" / "slurmctld.out",
                                  pid_file=self.root / "run" / "slurmctld.pid", env=env))
        for i, node in enumerate(self.nodes):
            (self.root / "spool" / node).mkdir()
            argv = ["slurmd", "-D", "-N", node]
            if self.hosts:  # in the host's namespace, under its hostname
                argv = self.hosts.command(i, argv, env={"SLURM_CONF": str(self.conf)})
            self.daemons.append(spawn(f"slurmd-{node}", argv, log=self.root / "log" / f"slurmd-{node}.out",
                                      pid_file=self.root / "run" / f"slurmd-{node}.pid", env=env))
        wait_until(self._node_idle, what=f"nodes {', '.join(self.nodes)} idle in sinfo", timeout_s=timeout_s,
                   daemons=tuple(self.daemons), interval_s=0.2)
        wait_until(self._sacct_answers, what="sacct", timeout_s=timeout_s, daemons=tuple(self.daemons))

    def _node_idle(self) -> bool:
        out = self.cli("sinfo", "--noheader", "--Node", "--format=%N %t", check=False, timeout_s=5)
        return all(f"{node} idle" in out for node in self.nodes)

    def _sacct_answers(self) -> bool:
        done = subprocess.run(["sacct", "--noheader", "--allusers", "--starttime=now-1hour"], env=self.env(),
                              capture_output=True, text=True, timeout=10)
        return done.returncode == 0

    # --- stop --------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Cancel jobs, then stop the daemons in reverse start order. Never raises."""
        running = {d.name for d in self.daemons if d.proc.poll() is None}
        if "slurmctld" in running and any(name.startswith("slurmd-") for name in running):
            with contextlib.suppress(Exception):
                self.cli("scancel", f"--cluster={CLUSTER_NAME}", "--full", "--user=root", check=False, timeout_s=10)
                wait_until(lambda: not self.cli("squeue", "--noheader", check=False, timeout_s=5).strip(),
                           what="cancelled jobs to end", timeout_s=10, interval_s=0.2)
        # The slurmds and slurmctld together, then what they depend on.
        for group in (("slurmd-", "slurmctld"), ("slurmdbd",), ("mariadbd",), ("munged",)):
            try:
                stop([d for d in self.daemons if d.name.startswith(group)], timeout_s=10)
            except Exception as err:  # keep going: the remaining daemons must stop too
                print(f"stopping {group} failed: {err!r}", file=sys.stderr)


def controller_name() -> str:
    return socket.gethostname().split(".")[0]


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running private SLURM cluster of two hosts (network namespaces) for the whole session, which every
    SLURM test shares; skipped without root or the packages."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    with bridged_hosts(2, root_name=controller_name()) as hosts, SlurmCluster.running(hosts=hosts) as cluster:
        yield cluster
