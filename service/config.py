"""Configuration of the server (flags + environment) and of clients (flags, env, file).

Server settings, each a ``python -m zerotrain.service serve`` flag with an environment
variable as its fallback (the flag wins):

=========================  ==============================  ==========================
flag                       environment                     default
=========================  ==============================  ==========================
``--address``              ``ZEROTRAIN_LISTEN_ADDRESS``    ``127.0.0.1:50051``
``--metrics-port``         ``ZEROTRAIN_METRICS_PORT``      ``9464`` (0: any free port;
                                                           -1: no metrics endpoint)
``--data-dir``             ``ZEROTRAIN_DATA_DIR``          ``~/.local/share/zerotrain``
``--ray-address``          ``ZEROTRAIN_RAY_ADDRESS``       empty: start an embedded
                                                           local Ray head
``--ray-num-cpus``         ``ZEROTRAIN_RAY_NUM_CPUS``      all CPUs (embedded head)
``--tokens-file``          ``ZEROTRAIN_TOKENS_FILE``       required unless
                                                           ``--insecure-no-auth``
``--tls-cert/--tls-key``   ``ZEROTRAIN_TLS_CERT/_KEY``     plaintext
``--tls-client-ca``        ``ZEROTRAIN_TLS_CLIENT_CA``     no client certificates
``--ingest-address``       ``ZEROTRAIN_INGEST_ADVERTISE``  the bound address
``--ingest-ca``            ``ZEROTRAIN_INGEST_CA_FILE``    ``--tls-cert`` (the CA file
                                                           workers verify us with)
``--ingest-port``          ``ZEROTRAIN_INGEST_PORT``       0 (any free port); with
                                                           mutual TLS, workers report
                                                           on this ReportMetrics-only,
                                                           server-TLS port
``--health-port``          ``ZEROTRAIN_HEALTH_PORT``       ``50052``: plaintext
                                                           ``grpc.health.v1`` only, on
                                                           the host of ``--address``,
                                                           outside the API's budget
                                                           (0: any free port; -1: off)
``--max-streams-per-``     ``ZEROTRAIN_MAX_STREAMS_PER_``  ``16`` open WatchJob /
``principal``              ``PRINCIPAL``                   StreamLogs per principal
``--max-calls-per-``       ``ZEROTRAIN_MAX_CALLS_PER_``    ``16`` unary calls in flight
``principal``              ``PRINCIPAL``                   per principal
``--max-streams``          ``ZEROTRAIN_MAX_STREAMS``       ``64`` open streams of all
                                                           principals together
``--min-cpus-per-worker``  ``ZEROTRAIN_MIN_CPUS_PER_``     ``0.5``: smallest
                           ``WORKER``                      ``scaling.cpus_per_worker``
``--max-workers-per-job``  ``ZEROTRAIN_MAX_WORKERS_PER_``  ``64``: largest
                           ``JOB``                         ``scaling.num_workers``
``--metrics-grace-s``      ``ZEROTRAIN_METRICS_GRACE_S``   ``60``: a job's own last
                                                           records are still accepted
                                                           this long after it ended
``--no-metrics-warning-s`` ``ZEROTRAIN_NO_METRICS_``       ``300``: warn when a job has
                           ``WARNING_S``                   run this long without a
                                                           metrics record
``--reinitialize-store``   (none)                          off: refuse to start over a
                                                           used data dir whose
                                                           ``jobs.db`` is empty, missing
                                                           or unreadable
``--allow-custom-tasks``   ``ZEROTRAIN_ALLOW_CUSTOM_TASKS``  off
``--insecure-no-auth``     ``ZEROTRAIN_INSECURE_NO_AUTH``  off (forces a loopback bind)
=========================  ==============================  ==========================

Every path setting is made absolute (``~`` expanded) when the config is built,
so nothing depends on the working directory of the service or of a worker.

Client settings (``JobClient`` and ``trainctl``), first found wins: explicit
arguments/flags, then ``ZEROTRAIN_ADDRESS``, ``ZEROTRAIN_TOKEN``,
``ZEROTRAIN_CA``, ``ZEROTRAIN_CLIENT_CERT``, ``ZEROTRAIN_CLIENT_KEY``, then the
file ``$ZEROTRAIN_CONFIG`` or ``~/.config/zerotrain/config.yaml`` with keys
``address``, ``token``, ``ca``, ``client_cert``, ``client_key``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_HEALTH_PORT",
    "DEFAULT_METRICS_PORT",
    "ClientConfig",
    "ConfigError",
    "ServerConfig",
    "default_client_config_path",
    "default_data_dir",
    "env_flag",
    "load_client_config",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_METRICS_PORT = 9464
DEFAULT_HEALTH_PORT = 50052
_PATH_FIELDS = ("data_dir", "tokens_file", "tls_cert", "tls_key", "tls_client_ca", "ingest_ca")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag or variable and the rule."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/zerotrain`` (``~/.local/share/zerotrain``)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "zerotrain"


def default_client_config_path() -> Path:
    """``$ZEROTRAIN_CONFIG``, else ``$XDG_CONFIG_HOME/zerotrain/config.yaml``."""
    if os.environ.get("ZEROTRAIN_CONFIG"):
        return Path(os.environ["ZEROTRAIN_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "zerotrain" / "config.yaml"


def _check_address(value: str, name: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: must be host:port with a port in 0..65535, got {value!r}")
    return value


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """A boolean environment variable (1/true/yes/on or 0/false/no/off/empty)."""
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name}: must be one of 1/true/yes/on or 0/false/no/off, got {raw!r}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``python -m zerotrain.service serve`` needs (see the module docstring)."""

    address: str = DEFAULT_ADDRESS
    metrics_port: int = DEFAULT_METRICS_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    ray_address: str = ""
    ray_num_cpus: int | None = None
    tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    ingest_address: str = ""
    ingest_ca: Path | None = None
    ingest_port: int = 0
    allow_custom_tasks: bool = False
    insecure_no_auth: bool = False
    health_port: int = DEFAULT_HEALTH_PORT
    max_streams_per_principal: int = 16
    max_calls_per_principal: int = 16
    max_streams: int = 64
    min_cpus_per_worker: float = 0.5
    max_workers_per_job: int = 64
    metrics_grace_s: float = 60.0
    no_metrics_warning_s: float = 300.0
    reinitialize_store: bool = False

    def __post_init__(self) -> None:
        for name in _PATH_FIELDS:  # relative paths would depend on the cwd of each process
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(os.path.abspath(Path(value).expanduser())))
        errors = []
        for check in (
            lambda: _check_address(self.address, "--address"),
            lambda: self.ingest_address and _check_address(self.ingest_address, "--ingest-address"),
        ):
            try:
                check()
            except ConfigError as exc:
                errors.append(str(exc))
        if not 0 <= self.ingest_port <= 65535:
            errors.append(f"--ingest-port: must be in 0..65535, got {self.ingest_port}")
        if not -1 <= self.metrics_port <= 65535:
            errors.append(f"--metrics-port: must be in -1..65535, got {self.metrics_port}")
        if not -1 <= self.health_port <= 65535:
            errors.append(f"--health-port: must be in -1..65535, got {self.health_port}")
        for flag, value in (
            ("--max-streams-per-principal", self.max_streams_per_principal),
            ("--max-calls-per-principal", self.max_calls_per_principal),
            ("--max-streams", self.max_streams),
            ("--max-workers-per-job", self.max_workers_per_job),
        ):
            if not 1 <= value <= 1024:
                errors.append(f"{flag}: must be in 1..1024, got {value}")
        if self.max_streams_per_principal > self.max_streams:
            errors.append(
                f"--max-streams-per-principal: must be <= --max-streams ({self.max_streams}), "
                f"got {self.max_streams_per_principal}"
            )
        if not 0 < self.min_cpus_per_worker <= 1024:
            errors.append(
                f"--min-cpus-per-worker: must be in (0, 1024], got {self.min_cpus_per_worker}"
            )
        for flag, seconds in (
            ("--metrics-grace-s", self.metrics_grace_s),
            ("--no-metrics-warning-s", self.no_metrics_warning_s),
        ):
            if not 0 < seconds <= 86_400:
                errors.append(f"{flag}: must be in (0, 86400] seconds, got {seconds}")
        if self.ray_num_cpus is not None and self.ray_num_cpus < 1:
            errors.append(f"--ray-num-cpus: must be >= 1, got {self.ray_num_cpus}")
        if (self.tls_cert is None) != (self.tls_key is None):
            errors.append("--tls-cert/--tls-key: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            errors.append("--tls-client-ca: needs --tls-cert and --tls-key (mutual TLS is TLS)")
        if self.tokens_file is None and not self.insecure_no_auth:
            errors.append(
                "--tokens-file: required (or pass --insecure-no-auth to run without "
                "authentication on loopback only)"
            )
        if self.tokens_file is not None and self.insecure_no_auth:
            errors.append("--insecure-no-auth: cannot be combined with --tokens-file")
        if errors:
            raise ConfigError("; ".join(errors))

    @staticmethod
    def env_defaults(env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Settings taken from the environment (for flags that were not given)."""
        env = os.environ if env is None else env
        out: dict[str, Any] = {}

        def path(name: str) -> Path | None:
            return Path(env[name]).expanduser() if env.get(name) else None

        def integer(name: str) -> int | None:
            if not env.get(name):
                return None
            try:
                return int(env[name])
            except ValueError:
                raise ConfigError(f"{name}: must be an integer, got {env[name]!r}") from None

        for key, name in (
            ("address", "ZEROTRAIN_LISTEN_ADDRESS"),
            ("ray_address", "ZEROTRAIN_RAY_ADDRESS"),
            ("ingest_address", "ZEROTRAIN_INGEST_ADVERTISE"),
        ):
            if env.get(name):
                out[key] = env[name]
        def number(name: str) -> float | None:
            if not env.get(name):
                return None
            try:
                return float(env[name])
            except ValueError:
                raise ConfigError(f"{name}: must be a number, got {env[name]!r}") from None

        for key, name in (("metrics_port", "ZEROTRAIN_METRICS_PORT"),
                          ("ray_num_cpus", "ZEROTRAIN_RAY_NUM_CPUS"),
                          ("ingest_port", "ZEROTRAIN_INGEST_PORT"),
                          ("health_port", "ZEROTRAIN_HEALTH_PORT"),
                          ("max_streams_per_principal", "ZEROTRAIN_MAX_STREAMS_PER_PRINCIPAL"),
                          ("max_calls_per_principal", "ZEROTRAIN_MAX_CALLS_PER_PRINCIPAL"),
                          ("max_streams", "ZEROTRAIN_MAX_STREAMS"),
                          ("max_workers_per_job", "ZEROTRAIN_MAX_WORKERS_PER_JOB")):  # fmt: skip
            if (value := integer(name)) is not None:
                out[key] = value
        for key, name in (("min_cpus_per_worker", "ZEROTRAIN_MIN_CPUS_PER_WORKER"),
                          ("metrics_grace_s", "ZEROTRAIN_METRICS_GRACE_S"),
                          ("no_metrics_warning_s", "ZEROTRAIN_NO_METRICS_WARNING_S")):  # fmt: skip
            if (real := number(name)) is not None:
                out[key] = real
        for key, name in (
            ("data_dir", "ZEROTRAIN_DATA_DIR"),
            ("tokens_file", "ZEROTRAIN_TOKENS_FILE"),
            ("tls_cert", "ZEROTRAIN_TLS_CERT"),
            ("tls_key", "ZEROTRAIN_TLS_KEY"),
            ("tls_client_ca", "ZEROTRAIN_TLS_CLIENT_CA"),
            ("ingest_ca", "ZEROTRAIN_INGEST_CA_FILE"),
        ):
            if (file := path(name)) is not None:
                out[key] = file
        for key, name in (
            ("allow_custom_tasks", "ZEROTRAIN_ALLOW_CUSTOM_TASKS"),
            ("insecure_no_auth", "ZEROTRAIN_INSECURE_NO_AUTH"),
        ):
            if env.get(name):
                out[key] = env_flag(env, name)
        return out


@dataclass(frozen=True)
class ClientConfig:
    """Where and how a client connects."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def tls(self) -> bool:
        """Whether the channel uses TLS (a CA was given)."""
        return self.ca is not None


def load_client_config(
    *,
    address: str | None = None,
    token: str | None = None,
    ca: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> ClientConfig:
    """Resolve client settings: arguments, then environment, then the config file."""
    env = os.environ if env is None else env
    path = Path(config_file) if config_file else default_client_config_path()
    file_values: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(
                f"client config {path}: cannot parse ({type(exc).__name__})"
            ) from None
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"client config {path}: must be a mapping of settings")
        file_values = dict(loaded or {})
        unknown = sorted(set(file_values) - {"address", "token", "ca", "client_cert", "client_key"})
        if unknown:
            raise ConfigError(f"client config {path}: unknown keys {unknown}")
    elif config_file:
        raise ConfigError(f"client config {path}: no such file")

    def pick(arg: Any, env_name: str, key: str) -> Any:
        for value in (arg, env.get(env_name), file_values.get(key)):
            if value not in (None, ""):
                return value
        return None

    resolved_address = pick(address, "ZEROTRAIN_ADDRESS", "address") or DEFAULT_ADDRESS
    _check_address(str(resolved_address), "address")

    def as_path(value: Any) -> Path | None:
        return Path(str(value)).expanduser() if value else None

    config = ClientConfig(
        address=str(resolved_address),
        token=pick(token, "ZEROTRAIN_TOKEN", "token"),
        ca=as_path(pick(ca, "ZEROTRAIN_CA", "ca")),
        client_cert=as_path(pick(client_cert, "ZEROTRAIN_CLIENT_CERT", "client_cert")),
        client_key=as_path(pick(client_key, "ZEROTRAIN_CLIENT_KEY", "client_key")),
    )
    if (config.client_cert is None) != (config.client_key is None):
        raise ConfigError("client_cert/client_key: give both or neither")
    if config.client_cert is not None and config.ca is None:
        raise ConfigError("client_cert: needs ca (mutual TLS is TLS)")
    return config
