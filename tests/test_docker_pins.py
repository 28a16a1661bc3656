"""The Docker images install exactly what CI tests: requirements/pins.txt, within pyproject's ranges.

No Docker engine runs in CI, so the Dockerfiles are parsed rather than built.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(p for p in (ROOT / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "pins.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(extras: set[str]) -> list[Requirement]:
    """pyproject's core dependencies plus those of ``extras``, self-references expanded."""
    project = _pyproject()["project"]
    reqs, todo, seen = [Requirement(r) for r in project["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in project["optional-dependencies"], f"extra [{extra}] is not in pyproject.toml"
        for text in project["optional-dependencies"][extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return reqs


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pip_installs(dockerfile: Path) -> list[list[str]]:
    """The argument lists of every ``pip install`` in the file's RUN instructions."""
    installs = []
    for word, args in _instructions(dockerfile):
        if word == "RUN":
            for command in re.split(r"&&|;", args):
                tokens = shlex.split(command)
                if tokens[:2] == ["pip", "install"]:
                    installs.append(tokens[2:])
    return installs


def _constraint_file(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg in ("-c", "--constraint"):
            return args[i + 1]
        if arg.startswith("--constraint="):
            return arg.split("=", 1)[1]
    return None


def _targets(args: list[str]) -> list[str]:
    """What is installed: positional arguments that are not option values."""
    takes_value = {"-c", "--constraint", "-r", "--requirement", "--index-url", "-i", "--extra-index-url"}
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def test_there_are_dockerfiles():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"}


def test_pins_satisfy_pyproject_ranges():
    pins = _pins()
    for req in _requirements({"all", "test"}):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency in pyproject.toml but has no pin in requirements/pins.txt"
        assert Version(pins[name]) in req.specifier, f"pin {req.name}=={pins[name]} is outside pyproject's {req}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_under_the_pins(dockerfile):
    pins = _pins()
    copied = {shlex.split(args)[-1]: shlex.split(args)[0] for word, args in _instructions(dockerfile) if word == "COPY"}
    installs = _pip_installs(dockerfile)
    assert installs, f"{dockerfile.name} installs nothing with pip"
    for args in installs:
        constraint = _constraint_file(args)
        assert constraint, f"{dockerfile.name}: pip install {' '.join(args)} has no -c requirements/pins.txt"
        assert copied.get(constraint) == "requirements/pins.txt", (
            f"{dockerfile.name}: constraint file {constraint} is not a COPY of requirements/pins.txt")
        for target in _targets(args):
            if target.startswith("."):  # the project itself, with extras: all its dependencies are pinned
                extras = set(re.findall(r"\[(.*)\]", target)[0].split(",")) if "[" in target else set()
                names = [r.name for r in _requirements(extras)]
            else:
                req = Requirement(target)
                for spec in req.specifier:
                    assert spec.operator == "==" and spec.version == pins.get(canonicalize_name(req.name)), (
                        f"{dockerfile.name} pins {target}, but requirements/pins.txt says "
                        f"{pins.get(canonicalize_name(req.name))}")
                names = [req.name]
            unpinned = [n for n in names if canonicalize_name(n) not in pins]
            assert not unpinned, f"{dockerfile.name} installs {unpinned}, which requirements/pins.txt does not pin"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_python_is_supported(dockerfile):
    bases = [args.split()[0] for word, args in _instructions(dockerfile) if word == "FROM"]
    match = re.fullmatch(r"python:(\d+\.\d+)-slim-\w+", bases[0])
    assert match, f"{dockerfile.name}: expected a python:X.Y-slim-<debian> base, got {bases[0]}"
    assert Version(match.group(1)) in SpecifierSet(_pyproject()["project"]["requires-python"])


def test_compose_builds_the_pinned_mlflow_image():
    compose = (ROOT / "docker" / "docker-compose.mlflow.yml").read_text()
    assert "dockerfile: docker/Dockerfile.mlflow" in compose
    assert "--artifacts-destination=" in compose
    assert not re.search(r"\bmlflow[=:]=?v?\d", compose), "the compose file must not pin mlflow on its own"


def test_the_team_server_needs_a_login_and_listens_on_loopback_unless_told():
    import configparser

    import yaml

    mlflow = yaml.safe_load((ROOT / "docker" / "docker-compose.mlflow.yml").read_text())["services"]["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    # Published on 127.0.0.1 unless MLFLOW_BIND_ADDRESS says otherwise; never "5000:5000" (every interface).
    assert mlflow["ports"] == ["${MLFLOW_BIND_ADDRESS:-127.0.0.1}:5000:5000"]
    env = mlflow["environment"]
    # Secrets come from the environment and compose refuses to start without them (":?"), as for the DB.
    for name, variable in (("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_ADMIN_PASSWORD"),
                           ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_SECRET_KEY")):
        assert env[name].startswith("${" + variable + ":?"), env[name]
    assert "${MLFLOW_DB_PASSWORD}" in env["MLFLOW_BACKEND_STORE_URI"]
    assert not any("PASSWORD" in str(arg) for arg in mlflow["command"]), "a password on the command line shows in ps"
    # The auth config is the one in the repository (tests/test_mlflow_auth.py runs it), its users in a volume.
    mount = next(v for v in mlflow["volumes"] if v.endswith(":" + env["MLFLOW_AUTH_CONFIG_PATH"] + ":ro"))
    ini = configparser.ConfigParser()
    ini.read(ROOT / "docker" / mount.split(":")[0])
    auth_db = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert any(v.split(":")[1] == str(Path(auth_db).parent) for v in mlflow["volumes"] if v.startswith("mlflow-"))
    assert "admin_password" not in ini["mlflow"]
