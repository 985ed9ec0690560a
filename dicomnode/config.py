"""Typed configuration of the node, loaded from YAML and overridden from the command line.

Every key is documented in ``config.example.yaml``. Loading validates the whole tree: an unknown key
or a value of the wrong type raises :class:`ConfigError` naming the key path (``listener.port``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

AE_TITLE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")


class ConfigError(ValueError):
    """A configuration key is unknown, missing or has a value of the wrong type."""


@dataclass
class RemoteAE:
    """A peer the node talks to: a C-MOVE destination or a PACS."""

    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104


@dataclass
class AllowedPeer:
    """One entry of the calling AE allow-list; ``host`` empty means any host."""

    ae_title: str = ""
    host: str = ""


@dataclass
class TLSConfig:
    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    ca_certificate: str = ""
    require_client_certificate: bool = False


@dataclass
class ListenerConfig:
    max_associations: int = 16
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_pdu_bytes: int = 1048576
    processes: int = 0
    sop_classes: list[str] = field(default_factory=list)
    extra_sop_classes: list[str] = field(default_factory=list)
    duplicate_policy: Literal["keep", "replace", "reject"] = "keep"
    min_free_space_mb: int = 512
    fsync: bool = True
    power_loss_safe: bool = False
    file_mode: str = "0640"


@dataclass
class SecurityConfig:
    check_called_ae_title: bool = True
    allowed_peers: list[AllowedPeer] = field(default_factory=list)
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass
class WorkerConfig:
    enabled: bool = True
    threads: int = 0
    poll_interval_s: float = 0.25
    lease_s: float = 600.0
    max_attempts: int = 3
    retry_backoff_s: float = 30.0
    min_slices: int = 5
    batch_size: int = 32
    device: str = "auto"
    processes: int = 1
    nice: int = 19
    early: bool = True
    release_grace_s: float = 1.0


@dataclass
class ModelConfig:
    path: str = ""


@dataclass
class QRConfig:
    """Query/retrieve: move destinations, who may query and retrieve (dicomnode.qr.access), limits."""

    move_destinations: list[RemoteAE] = field(default_factory=list)
    max_find_results: int = 0
    allowed_peers: list[AllowedPeer] = field(default_factory=list)
    allow_any_peer: bool = False


@dataclass
class MiningConfig:
    pacs: RemoteAE = field(default_factory=RemoteAE)
    move_destination: RemoteAE = field(default_factory=RemoteAE)
    use_c_get: bool = False
    label_map: str = ""
    slices_per_series: int = 10
    max_concurrent_moves: int = 1
    pause_between_studies_s: float = 0.0
    timeout_s: float = 120.0
    max_results_per_query: int = 0


@dataclass
class RetrainConfig:
    enabled: bool = False
    cron: str = "0 2 * * 0"
    keywords: list[str] = field(default_factory=list)
    held_out_labels: str = ""
    train_labels: list[str] = field(default_factory=list)
    out_dir: str = ""


@dataclass
class RetentionConfig:
    """Recycling of old studies (Orthanc's MaximumStorageSize): dicomnode.receive.retention."""

    enabled: bool = False
    max_storage_mb: int = 0
    max_age_days: float = 0.0
    check_interval_s: float = 300.0


@dataclass
class ResultsConfig:
    """SR and KOS result documents (issue 14)."""

    destinations: list[RemoteAE] = field(default_factory=list)
    enabled: bool = True
    structured_report: bool = True
    key_objects: bool = True


@dataclass
class RoutingRule:
    """When a classified series contains ``region`` (at least ``min_slices``), send its slices
    (``margin_slices`` more on each side) to ``destination``."""

    region: str = ""
    destination: RemoteAE = field(default_factory=RemoteAE)
    margin_slices: int = 0
    min_slices: int = 1


@dataclass
class RoutingConfig:
    """Routing rules by anatomy (issue 14)."""

    rules: list[RoutingRule] = field(default_factory=list)


@dataclass
class HttpConfig:
    """The status page, JSON API and metrics (issue 14)."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = 8042
    #: When set, every request but /healthz needs ``Authorization: Bearer <token>`` (or ``?token=``).
    token: str = ""


@dataclass
class Config:
    ae_title: str = "DICOMNODE"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    data_dir: str = "./dicomnode-data"
    database_url: str = ""
    storage_dir: str = ""
    stable_age_s: float = 60.0
    stability_check_interval_s: float = 0.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    qr: QRConfig = field(default_factory=QRConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    # Derived values ---------------------------------------------------------------------------
    @property
    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        if self.storage_dir:
            return Path(self.storage_dir).expanduser().resolve()
        return self.resolved_data_dir / "storage"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'index.sqlite'}"

    @property
    def check_interval_s(self) -> float:
        """How often the stability job runs: the configured value, else a quarter of StableAge."""
        if self.stability_check_interval_s > 0:
            return self.stability_check_interval_s
        return min(max(self.stable_age_s / 4.0, 0.2), 10.0)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}': expected a mapping, got {type(value).__name__}")
        return _build(tp, value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{path}': {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}': expected a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{path}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{path}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{path}': expected a number, got {value!r}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{path}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{path}': unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{path}' (known keys here: {known})")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _validate_remote(remote: RemoteAE, key: str) -> None:
    if not AE_TITLE_RE.match(remote.ae_title):
        raise ConfigError(f"config key '{key}.ae_title': {remote.ae_title!r} is not a valid AE title")
    if not 0 < remote.port < 65536:
        raise ConfigError(f"config key '{key}.port': {remote.port} is not a TCP port (1-65535)")


def _validate_results(cfg: Config) -> None:
    """results.destinations and routing.rules (issue 14)."""
    for i, dest in enumerate(cfg.results.destinations):
        _validate_remote(dest, f"results.destinations[{i}]")
    if not cfg.routing.rules:
        return
    # pydicom's code dictionary takes ~0.4 s to import: only a configuration with rules pays for it
    from dicomnode.results.anatomy import REGION_CODES

    for i, rule in enumerate(cfg.routing.rules):
        key = f"routing.rules[{i}]"
        if rule.region not in REGION_CODES:
            raise ConfigError(f"config key '{key}.region': {rule.region!r} is not a region "
                              f"(one of {', '.join(REGION_CODES)})")
        _validate_remote(rule.destination, f"{key}.destination")
        if rule.margin_slices < 0:
            raise ConfigError(f"config key '{key}.margin_slices': must not be negative")
        if rule.min_slices < 1:
            raise ConfigError(f"config key '{key}.min_slices': must be at least 1")


def validate(cfg: Config) -> Config:
    """Check values that a type alone cannot; raises :class:`ConfigError` naming the key."""
    if not AE_TITLE_RE.match(cfg.ae_title):
        raise ConfigError(f"config key 'ae_title': {cfg.ae_title!r} is not a valid AE title (1-16 characters, no backslash)")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"config key 'port': {cfg.port} is not a TCP port (1-65535)")
    if cfg.stable_age_s <= 0:
        raise ConfigError("config key 'stable_age_s': must be greater than 0")
    if cfg.listener.max_associations < 1:
        raise ConfigError("config key 'listener.max_associations': must be at least 1")
    if not 4096 <= cfg.listener.max_pdu_bytes <= 64 << 20:
        raise ConfigError("config key 'listener.max_pdu_bytes': must be between 4096 and 67108864 (64 MiB)")
    try:
        file_mode = int(cfg.listener.file_mode, 8)
    except ValueError:
        file_mode = -1
    if not 0 <= file_mode <= 0o777 or not file_mode & 0o600 == 0o600:
        raise ConfigError(f"config key 'listener.file_mode': {cfg.listener.file_mode!r} is not an octal mode "
                          "between 0600 and 0777 (the owner must read and write)")
    if cfg.retention.max_storage_mb < 0 or cfg.retention.max_age_days < 0 or cfg.retention.check_interval_s <= 0:
        raise ConfigError("config keys 'retention.max_storage_mb' and 'retention.max_age_days' must be 0 (no limit) "
                          "or more, 'retention.check_interval_s' greater than 0")
    if cfg.listener.processes < 0:
        raise ConfigError("config key 'listener.processes': must be 0 (automatic) or more")
    if cfg.worker.max_attempts < 1:
        raise ConfigError("config key 'worker.max_attempts': must be at least 1")
    if cfg.worker.batch_size < 1:
        raise ConfigError("config key 'worker.batch_size': must be at least 1")
    if not 0 <= cfg.worker.nice <= 19:
        raise ConfigError("config key 'worker.nice': must be between 0 and 19")
    if cfg.worker.processes < 0 or cfg.worker.release_grace_s < 0:
        raise ConfigError("config keys 'worker.processes' and 'worker.release_grace_s': must be 0 or more")
    for i, dest in enumerate(cfg.qr.move_destinations):
        if not AE_TITLE_RE.match(dest.ae_title):
            raise ConfigError(f"config key 'qr.move_destinations[{i}].ae_title': {dest.ae_title!r} is not a valid AE title")
    for key in ("pacs", "move_destination"):
        remote = getattr(cfg.mining, key)
        if remote.ae_title and not AE_TITLE_RE.match(remote.ae_title):
            raise ConfigError(f"config key 'mining.{key}.ae_title': {remote.ae_title!r} is not a valid AE title")
        if not 0 < remote.port < 65536:
            raise ConfigError(f"config key 'mining.{key}.port': {remote.port} is not a TCP port (1-65535)")
    for key in ("slices_per_series", "max_concurrent_moves"):
        if getattr(cfg.mining, key) < 1:
            raise ConfigError(f"config key 'mining.{key}': must be at least 1")
    if cfg.mining.timeout_s <= 0:
        raise ConfigError("config key 'mining.timeout_s': must be greater than 0")
    if cfg.mining.max_results_per_query < 0 or cfg.mining.pause_between_studies_s < 0:
        raise ConfigError("config keys 'mining.max_results_per_query' and 'mining.pause_between_studies_s' "
                          "must not be negative")
    _validate_results(cfg)
    tls = cfg.security.tls
    if tls.enabled:
        for key in ("certificate", "private_key"):
            value = getattr(tls, key)
            if not value or not Path(value).is_file():
                raise ConfigError(f"config key 'security.tls.{key}': file {value!r} not found")
    return cfg


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load the YAML file at ``path`` (embedded defaults when None) and apply dotted-key ``overrides``.

    >>> load_config(None, {"port": 11113}).port
    11113
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: the top level must be a mapping of keys")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    cfg = _build(Config, data)
    return validate(cfg)
