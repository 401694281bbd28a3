"""The operators' config: server, keys, policies, backends and routes, judge, audit, telemetry.

Vendor options live with their adapter: a backend, judge or store section is `{kind: ..., ...}`
and the rest of the section is validated by that kind's own `from_config`.
With no file at all, `load_config(None)` gives the embedded defaults: the demo backend for every
model, the builtin judge, `policies/default.yaml`, SQLite under ./var/, no telemetry export.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from guard.errors import ConfigError
from guard.hosts import TrustedHosts, host_name, pattern_name

Role = Literal["client", "auditor", "admin"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyConfig(_Strict):
    id: str = Field(description="Key id, recorded in traces instead of the key itself.")
    hash: str = Field(description="`sha256:<hex>` of the key; the key itself is never stored.")
    role: Role = Field("client", description="client: images API; auditor: traces; admin: all.")
    tenant: str = Field("default", description="Tenant the key belongs to.")
    policy: str | None = Field(None, description="Policy id for this key (else the tenant's).")
    may_choose_policy: bool = Field(
        False, description="Whether the key may pick a policy per request (x-guard-policy).")

    @field_validator("hash")
    @classmethod
    def _hash_shape(cls, value: str) -> str:
        algo, _, hexdigest = value.partition(":")
        if algo != "sha256" or len(hexdigest) != 64:
            raise ValueError("must be 'sha256:' followed by 64 hex digits (safeedit key hash)")
        return value

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(self.hash, hash_key(key))


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(1_000_000, ge=1024,
                                description="Largest JSON body accepted (413 above).")
    max_upload_bytes: int = Field(
        50_000_000, ge=1024,
        description="Largest multipart body for /v1/images/edits, and so the largest image.")
    public_url: str | None = Field(
        None, description="The proxy's URL as clients reach it (http(s)://host[:port][/path]): "
        "image links and redirects use it, and its host is trusted.")
    trusted_hosts: list[Annotated[str, AfterValidator(pattern_name)]] | None = Field(
        None, description="Host names the proxy answers to (the `Host` header, any port): names, "
        "IP addresses, `*.example.com` for subdomains, or `*` for any (only with keys). Default: "
        "the bind address and localhost, 127.0.0.1, ::1. Others get a 400, so a web page that "
        "points its own DNS name at the proxy (DNS rebinding) cannot use it.")

    @field_validator("public_url")
    @classmethod
    def _public_url_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not host_name(parts.netloc):
                raise ValueError("must be an http(s) URL with a host, e.g. https://guard.example")
        return value

    def hosts(self) -> TrustedHosts:
        return TrustedHosts.for_server(self.trusted_hosts, self.host, self.public_url)


class RouteConfig(_Strict):
    backend: str
    model: str | None = Field(None, description="Model name sent to the backend (default: as asked).")


class GuardConfig(_Strict):
    enabled: bool = Field(True, description="false = passthrough: no judging, traces still kept.")


class TelemetryConfig(_Strict):
    exporter: Literal["none", "console", "otlp"] = "none"
    endpoint: str | None = Field(None, description="OTLP/HTTP endpoint, e.g. http://otel:4318.")
    service_name: str = "safeedit-guard"


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    keys: list[KeyConfig] = Field(default_factory=list)
    policy: str = Field("default", description="Default policy id.")
    policy_paths: list[str] = Field(default_factory=list,
                                    description="Extra policy files or folders.")
    tenants: dict[str, str] = Field(default_factory=dict, description="tenant -> policy id.")
    policy_reload_s: float = Field(2.0, ge=0, description="Seconds between checks of the policy files for changes; 0 turns the watcher off (POST /v1/guard/policies/reload still works).")
    backends: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"demo": {"kind": "demo"}})
    routes: dict[str, RouteConfig] = Field(
        default_factory=lambda: {"*": RouteConfig(backend="demo")},
        description="Request `model` -> backend; `*` matches any model.")
    fallback: str | None = Field(None, description="Backend tried when the routed one is down.")
    judge: dict[str, Any] = Field(default_factory=lambda: {"kind": "builtin"})
    audit: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "sqlite", "path": "var/audit.db"})
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)

    @model_validator(mode="after")
    def _any_host_needs_keys(self) -> Config:
        if self.open_mode and self.server.trusted_hosts and "*" in self.server.trusted_hosts:
            raise ValueError("server.trusted_hosts: '*' (any host) needs API keys; in open mode "
                             "(no `keys:`) the proxy answers to the names listed only")
        return self

    @field_validator("backends")
    @classmethod
    def _backend_kinds(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, section in value.items():
            if not isinstance(section, dict) or "kind" not in section:
                raise ValueError(f"backend {name!r} needs a `kind`")
        return value

    def model_post_init(self, _context: Any) -> None:
        ids = [k.id for k in self.keys]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"key ids must be unique; repeated: {', '.join(duplicated)}")
        # One key under two ids would make its principal (role, tenant, policy) ambiguous.
        by_hash: dict[str, list[str]] = {}
        for key in self.keys:
            by_hash.setdefault(key.hash.lower(), []).append(key.id)
        shared = [" and ".join(ids) for ids in by_hash.values() if len(ids) > 1]
        if shared:
            raise ValueError(f"keys must be unique; the same key hash is configured for "
                             f"{'; '.join(shared)}")
        for model, route in self.routes.items():
            if route.backend not in self.backends:
                raise ValueError(f"route {model!r} names unknown backend {route.backend!r}")
        if self.fallback is not None and self.fallback not in self.backends:
            raise ValueError(f"fallback names unknown backend {self.fallback!r}")

    @property
    def open_mode(self) -> bool:
        """No keys configured: loopback only, any key accepted."""
        return not self.keys


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping")
        raw = loaded or {}
    raw.update(overrides or {})
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError.from_validation(str(path or "config"), exc) from exc
