"""Trusted hosts over real HTTP: a request naming a host the proxy is not meant to be reached by
(a DNS-rebinding page in a local browser, a forged Host) is refused before any route runs, and
the links and redirects the proxy builds never point at such a host."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import openai
import pytest

from guard.core.config import load_config
from guard.support.errors import ConfigError
from guard.support.hosts import TrustedHosts
from tests.conftest import ADMIN_KEY, CLIENT_KEY

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
EVIL = "evil.example"


def port_of(base: str) -> int:
    port = urlsplit(base).port
    assert port is not None
    return port


def assert_untrusted(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "untrusted_host"
    assert error["param"] is None and EVIL in error["message"]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/images/generations", {"prompt": "a lighthouse"}),
    ("GET", "/v1/guard/traces", None),
    ("GET", "/v1/guard/traces/tr_x", None),
    ("POST", "/v1/guard/policies/reload", None),
    ("GET", "/v1/guard/images/x?exp=1&sig=x", None),
    ("GET", "/guard/", None),
    ("GET", "/guard/login", None),
    ("GET", "/guard", None),
    ("GET", "/openapi.json", None),
    ("GET", "/no/such/path", None),
])
def test_an_untrusted_host_is_refused_on_every_route(proxy, method, path, body) -> None:  # type: ignore[no-untyped-def]
    base = proxy()
    r = httpx.request(method, base + path, json=body, headers={**ADMIN, "host": EVIL})
    assert_untrusted(r)
    assert "location" not in r.headers


def test_open_mode_refuses_a_rebound_name_but_serves_loopback_names(proxy) -> None:  # type: ignore[no-untyped-def]
    base = proxy(keys=[])
    port = port_of(base)
    # What a page on evil.example sees after pointing its DNS name at 127.0.0.1.
    assert_untrusted(httpx.get(base + "/v1/guard/traces", headers={"host": f"{EVIL}:{port}"}))
    assert_untrusted(httpx.post(base + "/v1/guard/policies/reload", headers={"host": EVIL}))
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        r = httpx.get(base + "/v1/guard/traces", headers={"host": host})
        assert r.status_code == 200, (host, r.text)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_health_probes_answer_whatever_the_host(proxy, path) -> None:  # type: ignore[no-untyped-def]
    # Orchestrators probe, and Prometheus scrapes, by pod IP, which no config can list.
    base = proxy()
    assert httpx.get(base + path, headers={"host": "10.1.2.3:8000"}).status_code == 200


def test_configured_names_and_subdomains_are_trusted_on_any_port(proxy) -> None:  # type: ignore[no-untyped-def]
    base = proxy(server={"trusted_hosts": ["guard.internal", "*.example.com"]})
    for host in ("guard.internal", "guard.internal:8443", "api.example.com",
                 "a.b.example.com:443", "Guard.Internal."):
        r = httpx.get(base + "/v1/guard/traces", headers={**ADMIN, "host": host})
        assert r.status_code == 200, (host, r.text)
    for host in ("example.com", EVIL, "guard.internal.evil.example", "localhost",
                 "guard.internal:x", "[::1"):
        r = httpx.get(base + "/v1/guard/traces", headers={**ADMIN, "host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "untrusted_host", host


def test_the_slash_redirect_stays_on_the_trusted_host(proxy) -> None:  # type: ignore[no-untyped-def]
    base = proxy()
    host = f"localhost:{port_of(base)}"
    r = httpx.get(base + "/guard", headers={"host": host})
    assert r.status_code in (301, 307) and r.headers["location"] == f"http://{host}/guard/"


def test_with_public_url_links_and_redirects_use_it(proxy) -> None:  # type: ignore[no-untyped-def]
    base = proxy(server={"public_url": "https://guard.example.org/"})
    r = httpx.get(base + "/guard", headers={"host": f"127.0.0.1:{port_of(base)}"})
    assert r.headers["location"] == "https://guard.example.org/guard/"
    # The public name is trusted; the request arrives under it through a reverse proxy.
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0,
                           default_headers={"host": "guard.example.org"})
    url = client.images.generate(prompt="a lighthouse", response_format="url").data[0].url
    assert url and url.startswith("https://guard.example.org/v1/guard/images/")
    # The link works where the proxy really listens.
    parts = urlsplit(url)
    assert httpx.get(f"{base}{parts.path}?{parts.query}").content[:4] == b"\x89PNG"


def test_without_public_url_links_come_from_the_trusted_host(proxy) -> None:  # type: ignore[no-untyped-def]
    base = proxy(server={"trusted_hosts": ["guard.internal"]})
    client = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0,
                           default_headers={"host": "guard.internal:9000"})
    url = client.images.generate(prompt="a lighthouse", response_format="url").data[0].url
    assert url and url.startswith("http://guard.internal:9000/v1/guard/images/")
    forged = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0,
                           default_headers={"host": EVIL})
    with pytest.raises(openai.BadRequestError) as caught:
        forged.images.generate(prompt="a lighthouse", response_format="url")
    assert caught.value.code == "untrusted_host"


def test_any_host_needs_keys() -> None:
    with pytest.raises(ConfigError, match=r"trusted_hosts: '\*' \(any host\) needs API keys"):
        load_config(None, {"server": {"trusted_hosts": ["*"]}})
    keyed = load_config(None, {"server": {"trusted_hosts": ["*"]},
                               "keys": [{"id": "a", "hash": "sha256:" + "0" * 64}]})
    assert keyed.server.hosts().allows("anything.example:1234")


@pytest.mark.parametrize("pattern", ["http://guard.example", "guard.example:8000", "a/b",
                                     "*example.com", "gu*rd.example", "[::1]:80", ""])
def test_a_pattern_that_is_not_a_host_name_is_a_config_error(pattern) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="server.trusted_hosts.0"):
        load_config(None, {"server": {"trusted_hosts": [pattern]}})


@pytest.mark.parametrize(("host", "allowed"), [
    ("localhost", True), ("localhost:8000", True), ("127.0.0.1:1", True), ("[::1]", True),
    ("[::1]:8000", True), ("[0:0::1]:8000", True), ("localhost.", True),
    ("::1", False), ("localhost:", False), ("localhost:99999999", False), ("[::1]x", False),
    ("localhost.evil.example", False), ("127.0.0.1.nip.io", False), ("", False),
    ("loc alhost", False), ("localhost@evil.example", False), ("évil", False),
])
def test_default_trusted_hosts(host, allowed) -> None:  # type: ignore[no-untyped-def]
    hosts = load_config(None).server.hosts()
    assert hosts.allows(host) is allowed


def test_the_bind_address_and_public_url_host_are_trusted_by_default() -> None:
    config = load_config(None, {"server": {"host": "192.0.2.7",
                                           "public_url": "https://guard.example.org/base"}})
    hosts = config.server.hosts()
    assert hosts.allows("192.0.2.7:8000") and hosts.allows("guard.example.org")
    assert not hosts.allows("example.org")
    assert not TrustedHosts(["guard.example.org"]).allows("x.guard.example.org")
