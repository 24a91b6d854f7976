"""Configuration: read once from the environment at start-up, validated, immutable."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasGenerator, BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from smtp_relay.policy import DomainAllowlist, PolicyError, RelayPolicy
from smtp_relay.pool import IDLE_SECONDS, MAX_MESSAGES_PER_CONNECTION, POOL_SIZE

DEFAULT_PASSWORD = "password"
MAX_WORKERS = 64
_MASK = "********"

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _boolean(value: Any) -> Any:
    """The documented spellings only, in any case: pydantic would also take t/f/y/n, and `RELAY_TLS_VERIFY=n`
    should not turn verification off by a typo."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError("must be true/false, 1/0, yes/no or on/off")


def _host(value: Any) -> Any:
    """A host name or an IP address: nothing that could break a log line, an error message or a command."""
    if not isinstance(value, str) or not value:
        return value
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    if len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError("must be a host name (international names in their xn-- form) or an IP address")
    return value


def _domain_name(value: Any) -> Any:
    """A host name, not an address: it is said in EHLO, where an address needs brackets (RFC 5321 4.1.3)."""
    if isinstance(value, str) and value.strip():
        try:
            ipaddress.ip_address(value.strip())
        except ValueError:
            return value
        raise ValueError("must be a host name (a FQDN such as relay.example.com), not an address")
    return value


def _utf8(value: Any) -> Any:
    """Credentials go on the wire as UTF-8 (AUTH PLAIN); an environment value that is not UTF-8 cannot."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be UTF-8 text") from None
    return value


Port = Annotated[int, Field(ge=1, le=65535)]
DomainList = Annotated[tuple[str, ...], NoDecode]
Boolean = Annotated[bool, BeforeValidator(_boolean)]
Host = Annotated[str, BeforeValidator(_host)]
HostName = Annotated[str, BeforeValidator(_host), BeforeValidator(_domain_name)]
Secret = Annotated[SecretStr, BeforeValidator(_utf8)]
UserName = Annotated[str, BeforeValidator(_utf8)]


class ConfigError(Exception):
    """An invalid setting; its message is one line naming the variable and what is wrong."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class Settings(BaseSettings):
    """Every setting of the relay; field names are the environment variables in lower case.

    Only the exact (upper-case) names are read: `use_tls` or `Relay_Host` in the environment change nothing.
    """

    model_config = SettingsConfigDict(
        frozen=True,
        case_sensitive=True,
        alias_generator=AliasGenerator(validation_alias=str.upper),
        extra="ignore",
        env_file=None,
    )

    smtp_auth_username: UserName = Field("user", min_length=1)
    smtp_auth_password: Secret = SecretStr(DEFAULT_PASSWORD)
    smtp_auth_password_file: Path | None = None
    allowed_from_domains: DomainList = ("example.com",)
    allowed_to_domains: DomainList = ("example.com",)
    smtp_hostname: HostName = Field("", validate_default=True)
    listen_host: Host = "0.0.0.0"
    listen_port: Port = 1025
    use_tls: Boolean = False
    tls_cert_file: Path = Path("/etc/certs/server.crt")
    tls_key_file: Path = Path("/etc/certs/server.key")
    relay_host: Host = Field("smtp.example.com", min_length=1)
    relay_port: Port = 25
    relay_use_tls: Boolean = True
    relay_use_ssl: Boolean = False
    relay_username: UserName = ""
    relay_password: Secret = SecretStr("")
    relay_password_file: Path | None = None
    relay_tls_verify: Boolean = True
    relay_tls_ca_file: Path | None = None
    max_connections: int = Field(50, ge=1, le=100_000)
    timeout: float = Field(60.0, gt=0, le=3600, allow_inf_nan=False)
    log_file: str = "/var/log/smtp-relay.log"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    max_message_size: int = Field(26_214_400, ge=1024, le=2**31)
    auth_max_failures: int = Field(5, ge=1, le=10_000)
    auth_lockout_seconds: float = Field(300.0, ge=0, le=86_400, allow_inf_nan=False)
    relay_pool_size: int = Field(POOL_SIZE, ge=0, le=1000)
    relay_pool_idle_seconds: float = Field(IDLE_SECONDS, gt=0, le=3600, allow_inf_nan=False)
    relay_pool_max_messages: int = Field(MAX_MESSAGES_PER_CONNECTION, ge=1, le=1_000_000)
    workers: int = Field(1, ge=1, le=MAX_WORKERS)

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                return min(MAX_WORKERS, usable_cpus())
            if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_WORKERS):
                raise ValueError(f"must be a whole number from 1 to {MAX_WORKERS}, or auto")
        return value

    @field_validator("allowed_from_domains", "allowed_to_domains", mode="before")
    @classmethod
    def _split_domains(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        DomainAllowlist.parse(value)  # raises PolicyError (a ValueError) with the reason
        return value

    @field_validator("smtp_auth_password_file", "relay_password_file", "relay_tls_ca_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case_insensitive(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if value.strip().upper() in _LEVELS else value.strip().lower()

    @field_validator(
        "smtp_hostname", "listen_host", "relay_host", "smtp_auth_username", "relay_username", mode="before"
    )
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("smtp_hostname")
    @classmethod
    def _machine_name_if_empty(cls, value: str) -> str:
        """Empty means the machine's host name (a container's id): resolved here, so --check-config shows the
        name the relay will use."""
        return value or socket.gethostname() or "smtp-relay"

    @property
    def policy(self) -> RelayPolicy:
        return RelayPolicy(
            DomainAllowlist.parse(self.allowed_from_domains), DomainAllowlist.parse(self.allowed_to_domains)
        )

    @property
    def relay_tls_mode(self) -> Literal["implicit", "starttls", "none"]:
        if self.relay_use_ssl:
            return "implicit"
        return "starttls" if self.relay_use_tls else "none"

    def warnings(self) -> list[str]:
        """Settings that work but an operator should know are weak; logged at start-up."""
        found = []
        if self.smtp_auth_password.get_secret_value() == DEFAULT_PASSWORD:
            found.append("SMTP_AUTH_PASSWORD is the default 'password': change it before production use")
        for name in ("allowed_from_domains", "allowed_to_domains"):
            if "*" in getattr(self, name):
                found.append(f"{name.upper()} contains '*': any domain is allowed")
        if not self.use_tls:
            found.append("USE_TLS is off: client credentials and mail cross the network in plain text")
        if self.relay_tls_mode == "none":
            found.append("RELAY_USE_TLS and RELAY_USE_SSL are off: mail goes to the upstream in plain text")
        elif not self.relay_tls_verify:
            found.append("RELAY_TLS_VERIFY is off: the upstream's certificate and host name are not checked")
        return found

    def masked(self) -> dict[str, str]:
        """Effective settings by variable name, secrets masked, for --check-config."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = _MASK if value.get_secret_value() else ""
            elif isinstance(value, tuple):
                text = ",".join(value)
            elif value is None:
                text = ""
            else:
                text = str(value)
            shown[name.upper()] = text
        return shown


_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})


def usable_cpus() -> int:
    """The CPUs this process may use (`WORKERS=auto`): its CPU affinity, capped by a cgroup CPU quota.

    A container started with `--cpus 2` (or a Kubernetes CPU limit) on a 64-core host sees 64 CPUs in
    `os.cpu_count()`; 64 workers would then share two CPUs' worth of time.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    limits = [cgroup_cpu_limit(*texts) for texts in _cgroup_files()]
    quotas = [limit for limit in limits if limit is not None]
    if quotas:
        count = min(count, max(1, math.floor(min(quotas) + 1e-9)))  # 1.5 CPUs: one worker, never throttled
    return max(1, count)


def cgroup_cpu_limit(quota: str, period: str | None = None) -> float | None:
    """CPUs a cgroup allows: from v2 `cpu.max` ("max 100000", "150000 100000") when `period` is None, else from
    v1 `cpu.cfs_quota_us` ("-1" = none) and `cpu.cfs_period_us`. None: no limit, or unreadable."""
    fields = quota.split()
    if period is None:
        if len(fields) != 2:
            return None
        fields, period = fields[:1], fields[1]
    try:
        allowed, length = int(fields[0]), int(period)
    except (ValueError, IndexError):
        return None
    return allowed / length if allowed > 0 and length > 0 else None


def _cgroup_files(
    base: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> list[tuple[str, str | None]]:
    """The texts of the CPU quota files that apply to this process, where they exist: those of its own cgroup and
    of every parent up to the root (a systemd slice or an outer container may set the limit), v2 and v1."""
    v2, v1 = "", ""
    try:
        for line in membership.read_text(encoding="ascii", errors="replace").splitlines():
            _, controllers, path = [*line.split(":", 2), "", ""][:3]
            if not controllers:
                v2 = path
            elif "cpu" in controllers.split(","):
                v1 = path
    except OSError:
        pass
    found: list[tuple[str, str | None]] = []
    for folder in _with_parents(base, v2):
        text = _read(folder / "cpu.max")
        if text is not None:
            found.append((text, None))
    for mount in (base / "cpu", base / "cpu,cpuacct"):
        for folder in _with_parents(mount, v1):
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota is not None and period is not None:
                found.append((quota, period))
    return found


def _with_parents(mount: Path, path: str) -> list[Path]:
    """`mount`/`path` and each parent of it up to `mount` itself (`..` and empty parts are ignored)."""
    parts = [part for part in path.split("/") if part not in ("", ".", "..")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def variable_names() -> tuple[str, ...]:
    """Every environment variable the relay reads."""
    return tuple(name.upper() for name in Settings.model_fields)


def load_settings() -> Settings:
    """Read and check the environment; raise ConfigError naming the first bad variable."""
    try:
        settings = Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        variable = str(error["loc"][0]).upper() if error["loc"] else "configuration"
        message = str(error["msg"]).removeprefix("Value error, ")
        given = os.environ.get(variable)
        if given is not None and "secret" not in error["type"] and "PASSWORD" not in variable:
            message += f" (got {given!r})"
        raise ConfigError(variable, message) from None
    except PolicyError as exc:  # pragma: no cover - pydantic wraps ValueErrors; kept for safety
        raise ConfigError("ALLOWED_*_DOMAINS", str(exc)) from None
    return _checked(_with_secret_files(settings))


def _with_secret_files(settings: Settings) -> Settings:
    updates: dict[str, SecretStr] = {}
    for field, file_field in (
        ("smtp_auth_password", "smtp_auth_password_file"),
        ("relay_password", "relay_password_file"),
    ):
        path: Path | None = getattr(settings, file_field)
        if path is None:
            continue
        # An empty variable counts as unset, so compose files can pass `${RELAY_PASSWORD:-}` through.
        if field in settings.model_fields_set and getattr(settings, field).get_secret_value():
            raise ConfigError(file_field.upper(), f"set together with {field.upper()}; set only one of them")
        try:
            secret = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(file_field.upper(), f"cannot read {str(path)!r}: {_reason(exc)}") from None
        if not secret:
            raise ConfigError(file_field.upper(), f"{str(path)!r} is empty")
        updates[field] = SecretStr(secret)
    return settings.model_copy(update=updates) if updates else settings


def _checked(settings: Settings) -> Settings:
    if not settings.smtp_auth_password.get_secret_value():
        raise ConfigError("SMTP_AUTH_PASSWORD", "must not be empty")
    if settings.use_tls:
        for name in ("tls_cert_file", "tls_key_file"):
            path: Path = getattr(settings, name)
            if not path.is_file() or not os.access(path, os.R_OK):
                raise ConfigError(name.upper(), f"USE_TLS is on but {str(path)!r} is not a readable file")
    if settings.relay_tls_ca_file is not None and not settings.relay_tls_ca_file.is_file():
        raise ConfigError("RELAY_TLS_CA_FILE", f"{str(settings.relay_tls_ca_file)!r} is not a readable file")
    if settings.relay_username and not settings.relay_password.get_secret_value():
        raise ConfigError("RELAY_PASSWORD", "must be set when RELAY_USERNAME is set")
    if settings.relay_password.get_secret_value() and not settings.relay_username:
        raise ConfigError("RELAY_USERNAME", "must be set when RELAY_PASSWORD is set")
    return settings


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
