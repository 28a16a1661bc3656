"""Start daemons as child processes and stop them by PID, never by name.

A daemon runs in the foreground in its own session, with its output in a log file. Stopping
reads the PID from the daemon's own pid file (falling back to the child's PID), sends the stop
signal, waits, and sends SIGKILL after a timeout. Only PIDs whose command line we recognise are
signalled, so a recycled PID is never hit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class DaemonError(RuntimeError):
    """A daemon did not start; the message holds the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, *, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def log_tail(path: Path, *, n_lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n_lines:])
    except OSError:
        return "(no log)"


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    log: Path
    pid_file: Path | None = None
    stop_signal: int = signal.SIGTERM

    def pid(self) -> int:
        """The PID the daemon wrote to its pid file, else the child's PID."""
        if self.pid_file is not None:
            try:
                first = self.pid_file.read_text().split()[0]
                pid = int(first)
                if _cmdline(pid) and pid in (self.proc.pid, *_children(self.proc.pid)):
                    return pid
            except (OSError, IndexError, ValueError):
                pass
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise DaemonError(f"{self.name} exited with code {self.proc.returncode}; log {self.log}:\n"
                              f"{log_tail(self.log)}")


def spawn(name: str, argv: list[str], *, log: Path, pid_file: Path | None = None, env: dict | None = None,
          user: str | None = None, stop_signal: int = signal.SIGTERM, cwd: Path | None = None) -> Daemon:
    """Start ``argv`` (a foreground daemon) in its own session, output appended to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=cwd,
                                user=user, group=user if user else None, extra_groups=[] if user else None)
    return Daemon(name, proc, log, pid_file, stop_signal)


def wait_until(predicate: Callable[[], bool], *, what: str, timeout_s: float, daemons: tuple[Daemon, ...] = (),
               interval_s: float = 0.1) -> None:
    """Poll ``predicate`` until it holds; fail early if one of ``daemons`` died."""
    deadline = time.monotonic() + timeout_s
    while True:
        for daemon in daemons:
            daemon.check_alive()
        if predicate():
            return
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {d.name} ({d.log}):\n{log_tail(d.log)}" for d in daemons)
            raise DaemonError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")
        time.sleep(interval_s)


def stop(daemons: list[Daemon], *, timeout_s: float = 10.0) -> list[str]:
    """Stop ``daemons`` together (signal all, then wait); returns a note per daemon that needed SIGKILL."""
    pids = {}
    for daemon in daemons:
        if daemon.proc.poll() is None:
            pids[daemon.name] = daemon.pid()
            _signal(pids[daemon.name], daemon.stop_signal)
    deadline = time.monotonic() + timeout_s
    killed = []
    for daemon in daemons:
        if daemon.name not in pids:
            continue
        try:
            daemon.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed.append(f"{daemon.name} ignored signal {daemon.stop_signal} for {timeout_s:.0f} s; SIGKILL")
            _signal(pids[daemon.name], signal.SIGKILL)
            _signal(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait(timeout=10)
        # Anything the daemon left in its own session (a wrapper's child, a worker) goes too.
        _kill_session(daemon.proc.pid)
    return killed


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_session(sid: int) -> None:
    for pid in _pids_in_session(sid):
        _signal(pid, signal.SIGKILL)


def _pids_in_session(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    out.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
