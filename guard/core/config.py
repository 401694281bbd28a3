"""The operators' config: server, keys, policies, backends and routes, judge, audit, telemetry,
provenance.

Vendor options live with their adapter: a backend, judge or store section is `{kind: ..., ...}`
and the rest of the section is validated by that kind's own `from_config`.
With no file at all, `load_config(None)` gives the embedded defaults: the demo backend for every
model, the builtin judge, `policies/default.yaml`, SQLite under ./var/, no telemetry export.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
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

from guard.support.errors import ConfigError
from guard.support.hosts import TrustedHosts, host_name, pattern_name
from guard.support.telemetry import TelemetryConfig
from guard.support.yamlfile import load_unique

log = logging.getLogger("safeedit.config")

Role = Literal["client", "auditor", "admin"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Limits of one key or one tenant; None (the default) means no limit."""

    requests_per_minute: int | None = Field(
        None, ge=1, description="Images requests admitted in any 60 seconds (a sliding window).")
    images_per_day: int | None = Field(
        None, ge=1, description="Images asked for (the sum of `n`) per UTC day.")
    max_concurrent: int | None = Field(None, ge=1, description="Images requests in flight at once.")

    def over(self, defaults: Limits) -> Limits:
        """These limits where given (an explicit null included), `defaults` for the rest."""
        return defaults.model_copy(update={f: getattr(self, f) for f in self.model_fields_set})

    @property
    def limited(self) -> bool:
        return any(getattr(self, f) is not None for f in Limits.model_fields)


class LimitsConfig(Limits):
    """`limits:`: where the counts live, what to do without them, and every key's defaults."""

    redis_url: str | None = Field(
        None, description="Redis shared by all replicas (redis://host:port/db); without it the "
        "counts are this process's own.")
    on_unavailable: Literal["closed", "open"] = Field(
        "closed", description="Redis unreachable: closed = refuse with a 503, open = serve "
        "uncounted (guard_quota_unavailable_total counts those requests).")
    key_prefix: str = Field("safeedit:limits:", min_length=1,
                            description="Prefix of every Redis key the limits use.")
    timeout_s: float = Field(0.5, gt=0, description="Redis connect and command timeout.")
    slot_lease_s: float = Field(
        30.0, gt=0, description="A `max_concurrent` slot is a lease renewed every third of this "
        "while its request runs: a slot never released (a replica that died mid-request, Redis "
        "down as the request ended) is free again this long after its last renewal. Replaces "
        "`concurrency_ttl_s`, still accepted (with a deprecation warning) as this.")

    @model_validator(mode="before")
    @classmethod
    def _old_lease_name(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "concurrency_ttl_s" in raw:
            raw = dict(raw)
            old = raw.pop("concurrency_ttl_s")
            log.warning("limits.concurrency_ttl_s is deprecated: it is read as "
                        "limits.slot_lease_s%s", ", which is also set and wins"
                        if "slot_lease_s" in raw else "")
            raw.setdefault("slot_lease_s", old)
        return raw

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @property
    def defaults(self) -> Limits:
        return Limits.model_validate({f: getattr(self, f) for f in Limits.model_fields})


class TenantConfig(_Strict):
    policy: str | None = Field(None, description="The tenant's policy id (else the default).")
    limits: Limits = Field(default_factory=Limits,
                           description="Limits shared by all the tenant's keys together.")


class KeyConfig(_Strict):
    id: str = Field(description="Key id, recorded in traces instead of the key itself.")
    hash: str = Field(description="`sha256:<hex>` of the key; the key itself is never stored.")
    role: Role = Field("client", description="client: images API; auditor: traces; admin: all.")
    tenant: str = Field("default", description="Tenant the key belongs to.")
    policy: str | None = Field(None, description="Policy id for this key (else the tenant's).")
    may_choose_policy: bool = Field(
        False, description="Whether the key may pick a policy per request (x-guard-policy).")
    limits: Limits = Field(
        default_factory=Limits,
        description="This key's limits; a limit given here (null = none) replaces the default "
        "under `limits:`, one not given keeps it.")

    @field_validator("hash")
    @classmethod
    def _hash_shape(cls, value: str) -> str:
        algo, _, hexdigest = value.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
            raise ValueError("must be 'sha256:' followed by 64 hex digits (safeedit key hash)")
        return f"sha256:{hexdigest.lower()}"  # as hash_key writes it, so that it can match

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(self.hash, hash_key(key))


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)") from None


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
    trusted_proxies: list[Annotated[str, AfterValidator(_network)]] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Reverse proxies (addresses or CIDRs) whose X-Forwarded-For counts: the "
        "client is the right-most forwarded address that is not one of them. From anyone else "
        "the header is ignored. Whatever is limited per client address (failed sign-ins) uses "
        "that client. Default: loopback only, as uvicorn's.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long requests in flight may still run: the "
        "proxy goes unready and answers new requests 503 (Retry-After) meanwhile, then stops. "
        "Keep it under the orchestrator's grace period before SIGKILL.")
    default_response_format: Literal["url", "b64_json"] | None = Field(
        None, description="What a request that names no `response_format` gets: null answers "
        "as OpenAI does per model (links for dall-e-2, dall-e-3 and no model; base64 for any "
        "other); `url` or `b64_json` for every model except gpt-image-*, which answer base64 "
        "only, as their clients expect.")

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


class C2paConfig(_Strict):
    """`provenance.c2pa:`: the certificate chain and key C2PA manifests are signed with. With
    neither, a development chain is made at first start under `dev_dir` (readers: untrusted)."""

    cert_file: str | None = Field(
        None, description="PEM file: the signing certificate first, then its intermediates "
        "(not the root).")
    cert_env: str | None = Field(None, description="Environment variable holding that PEM chain.")
    key_file: str | None = Field(
        None, description="PEM file with the certificate's private key (EC P-256/384/521, "
        "Ed25519 or RSA), unencrypted; keep it mode 0600.")
    key_env: str | None = Field(None, description="Environment variable holding that PEM key.")
    tsa_url: str | None = Field(
        None, description="RFC 3161 timestamp authority asked at every signature (none: the "
        "manifest carries no trusted time).")
    dev_dir: str | None = Field(
        None, description="Where the development chain is made and kept when no certificate "
        "is configured (its key mode 0600); default: `keys/` beside a SQLite audit database "
        "(var/keys with the embedded defaults), else var/keys.")

    @model_validator(mode="after")
    def _one_source_each(self) -> C2paConfig:
        for what in ("cert", "key"):
            if getattr(self, f"{what}_file") and getattr(self, f"{what}_env"):
                raise ValueError(f"give {what}_file or {what}_env, not both")
        if bool(self.cert_file or self.cert_env) != bool(self.key_file or self.key_env):
            raise ValueError("a certificate needs its key and a key its certificate")
        if self.tsa_url is not None and urlsplit(self.tsa_url).scheme not in ("http", "https"):
            raise ValueError("tsa_url must be an http(s) URL")
        return self

    @property
    def configured(self) -> bool:
        return bool(self.cert_file or self.cert_env)


class ProvenanceConfig(_Strict):
    """`provenance:`: a C2PA manifest on every image the guard judged and delivers."""

    enabled: bool = Field(True, description="false: images leave without a C2PA manifest.")
    on_error: Literal["refuse", "unmarked"] = Field(
        "refuse", description="When signing fails: refuse = a 500 (code provenance_failed), "
        "no image leaves; unmarked = the image leaves without a manifest. Traced either way.")
    c2pa: C2paConfig = Field(default_factory=C2paConfig)


class ImageUrlsConfig(_Strict):
    """`moderations.image_urls:`: whether an `image_url` input may name an http(s) URL, fetched
    by the SSRF-safe fetcher (adapters.fetch) from the listed hosts only, on every redirect."""

    enabled: bool = Field(False, description="Off: only data URIs (data:image/...;base64,).")
    allow: list[Annotated[str, AfterValidator(pattern_name)]] = Field(
        default_factory=list, description="Hosts an image URL may name (and redirect to): "
        "names, `*.example.com`, or `*` for any public host.")
    allow_private: bool = Field(
        False, description="Also fetch from non-public addresses (private, loopback, ...).")
    allow_networks: list[Annotated[str, AfterValidator(_network)]] = Field(
        default_factory=list, description="Non-public networks fetched from all the same.")
    max_bytes: int = Field(20_000_000, gt=0, description="Largest image fetched.")
    timeout_s: float = Field(10.0, gt=0, description="Seconds per connection and read.")


class ModerationsConfig(_Strict):
    """`moderations:`: POST /v1/moderations (guard.pipeline.moderations)."""

    image_urls: ImageUrlsConfig = Field(default_factory=ImageUrlsConfig)


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    keys: list[KeyConfig] = Field(default_factory=list)
    policy: str = Field("default", description="Default policy id.")
    policy_paths: list[str] = Field(default_factory=list,
                                    description="Extra policy files or folders.")
    tenants: dict[str, str | TenantConfig] = Field(
        default_factory=dict, description="tenant -> policy id, or {policy, limits}.")
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
    image_store: dict[str, Any] = Field(
        default_factory=dict, description="Where image links' and retained images' bytes live "
        "({kind: local|postgres, ...}, plus link_ttl_s, link_key_env); without `kind` it "
        "follows `audit:` (PostgreSQL: the same database and schema; else a folder beside it). "
        "See guard.imagestore.")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    provenance: ProvenanceConfig = Field(default_factory=ProvenanceConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    moderations: ModerationsConfig = Field(default_factory=ModerationsConfig)

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

    def tenant_policy(self, tenant: str) -> str | None:
        found = self.tenants.get(tenant)
        return found.policy if isinstance(found, TenantConfig) else found

    def tenant_limits(self, tenant: str) -> Limits:
        found = self.tenants.get(tenant)
        return found.limits if isinstance(found, TenantConfig) else Limits()

    @property
    def keys_dir(self) -> Path:
        """Where keys made at first start live: `keys/` beside a SQLite audit database."""
        path = self.audit.get("path")
        if self.audit.get("kind") == "sqlite" and isinstance(path, str) and path != ":memory:":
            return Path(path).parent / "keys"
        return Path("var/keys")

    @property
    def open_mode(self) -> bool:
        """No keys configured: loopback only, any key accepted."""
        return not self.keys


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = load_unique(Path(path).read_text())
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
