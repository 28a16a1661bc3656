"""A real MLflow tracking server backed by a real PostgreSQL server, both on loopback ports.

``PostgresServer.running()`` runs initdb and postgres from Debian's packages
(/usr/lib/postgresql/<version>/bin) in a temp datadir. postgres refuses to run as root, so as
root both run as the ``postgres`` system user, which owns the datadir; as any other user they
run as that user. ``MlflowServer.running(backend_store_uri=...)`` runs ``mlflow server`` with
one worker and an artifact store in a temp dir, and yields once ``/health`` answers; with
``admin_password`` it runs MLflow's basic-auth app with the repository's own docker/mlflow-auth.ini (its
user store moved into the temp dir), as the team's compose file does. Both are stopped by PID and their
temp dirs removed on the way out.

Fixtures: ``postgres_server`` (session), ``mlflow_server`` (session, on top of it) and
``mlflow_auth_server`` (session, sqlite stores: the login is what it is for).
"""

from __future__ import annotations

import base64
import contextlib
import glob
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from infra import skip_or_fail
from infra.daemons import DaemonError, free_port, spawn, stop, wait_until

PG_USER, PG_PASSWORD, PG_DB = "mlflow", "mlflow-test-only", "mlflow"
AUTH_INI = Path(__file__).resolve().parents[2] / "docker" / "mlflow-auth.ini"


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _run_as() -> str | None:
    """The user to run postgres as: ``postgres`` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        raise DaemonError("running as root but there is no 'postgres' user to run PostgreSQL as") from None


@dataclass
class PostgresServer:
    root: Path
    port: int

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the test database, as ``mlflow server --backend-store-uri`` wants it."""
        # psycopg2 named explicitly: SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, which is not a dependency.
        return f"postgresql+psycopg2://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{PG_DB}"

    @classmethod
    @contextlib.contextmanager
    def running(cls, *, timeout_s: float = 60.0) -> Iterator["PostgresServer"]:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise DaemonError("PostgreSQL is not installed (apt-get install postgresql)")
        user = _run_as()
        root = Path(tempfile.mkdtemp(prefix="pg-server-"))
        root.chmod(0o755)  # the postgres user must be able to reach its datadir inside
        server = cls(root=root, port=free_port())
        daemons = []
        try:
            data, sock = server._init(bin_dir, user, timeout_s)
            daemons.append(spawn("postgres", [
                str(bin_dir / "postgres"), "-D", str(data), "-p", str(server.port), "-k", str(sock),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off",
            ], log=root / "pg" / "postgres.log", pid_file=data / "postmaster.pid", user=user, cwd=root,
                # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to leave.
                stop_signal=signal.SIGINT))
            ready = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(server.port)]
            wait_until(lambda: subprocess.run(ready).returncode == 0, what="postgres", timeout_s=timeout_s,
                       daemons=tuple(daemons), interval_s=0.2)
            subprocess.run([str(bin_dir / "createdb"), "-h", str(sock), "-p", str(server.port), "-U", PG_USER,
                            PG_DB], check=True, capture_output=True, timeout=timeout_s, user=user, cwd=root)
            yield server
        finally:
            stop(daemons, timeout_s=15)
            shutil.rmtree(root, ignore_errors=True)

    def _init(self, bin_dir: Path, user: str | None, timeout_s: float) -> tuple[Path, Path]:
        pg = self.root / "pg"
        pg.mkdir(mode=0o700)
        data, sock = pg / "data", pg / "sock"
        sock.mkdir(mode=0o700)
        pw_file = pg / "pw"
        pw_file.write_text(PG_PASSWORD + "\n")
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (pg, sock, pw_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        # Password auth over TCP (as mlflow connects); trust only on the private socket, for createdb.
        subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pw_file}",
                        "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, timeout=timeout_s, user=user, cwd=self.root)
        return data, sock


@dataclass
class MlflowServer:
    url: str
    artifacts: Path
    admin: tuple[str, str] | None = None
    """(user, password) of the basic-auth app's admin; None without the app."""

    @classmethod
    @contextlib.contextmanager
    def running(cls, *, backend_store_uri: str | None = None, admin_password: str | None = None,
                timeout_s: float = 120.0) -> Iterator["MlflowServer"]:
        """``backend_store_uri`` None: a sqlite store in the server's temp dir."""
        root = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
        port = free_port()
        server = cls(url=f"http://127.0.0.1:{port}", artifacts=root / "artifacts")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                "--backend-store-uri", backend_store_uri or f"sqlite:///{root}/store.db",
                "--artifacts-destination", str(server.artifacts), "--workers", "1"]
        if admin_password is not None:
            ini = root / "basic_auth.ini"
            ini.write_text(re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{root}/basic_auth.db",
                                  AUTH_INI.read_text()))
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                       MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
            args += ["--app-name", "basic-auth"]
            server.admin = ("admin", admin_password)
        daemons = [spawn("mlflow", args, log=root / "mlflow.log", env=env, cwd=root)]
        try:
            wait_until(server.healthy, what="mlflow server /health", timeout_s=timeout_s, daemons=tuple(daemons),
                       interval_s=0.3)
            yield server
        finally:
            stop(daemons, timeout_s=15)
            shutil.rmtree(root, ignore_errors=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: dict | None = None, *,
                auth: tuple[str, str] | None = None) -> tuple[int, dict]:
        """(HTTP status, JSON body or {}) of one REST call, as ``auth`` (user, password) or anonymously."""
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read()
        try:
            return status, json.loads(text or b"{}")
        except ValueError:
            return status, {}

    def add_user(self, username: str, password: str) -> None:
        status, body = self.request("POST", "/api/2.0/mlflow/users/create",
                                    {"username": username, "password": password}, auth=self.admin)
        assert status == 200, (status, body)


def _unavailable_reason() -> str | None:
    if postgres_bin_dir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' user to run PostgreSQL as"
    for module in ("mlflow", "psycopg2"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[mlflow,test]')"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL server with an empty ``mlflow`` database; skipped without the packages."""
    reason = _unavailable_reason()
    if reason:
        skip_or_fail(reason)
    with PostgresServer.running() as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_auth_server() -> Iterator[MlflowServer]:
    """A running ``mlflow server --app-name basic-auth`` whose admin is ``server.admin``."""
    for module in ("mlflow", "flask_wtf"):
        if importlib.util.find_spec(module) is None:
            skip_or_fail(f"{module} is not installed (pip install -e '.[mlflow,test]')")
    with MlflowServer.running(admin_password="admin-" + secrets.token_hex(12)) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(postgres_server: PostgresServer) -> Iterator[MlflowServer]:
    """A running ``mlflow server`` whose backend store is ``postgres_server``."""
    with MlflowServer.running(backend_store_uri=postgres_server.uri) as server:
        yield server
