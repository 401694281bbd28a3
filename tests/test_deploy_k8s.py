"""The Kubernetes manifests as `kubectl kustomize` renders them: the base (deploy/kubernetes) and
the production overlay (deploy/overlays/production, with deploy/components/monitoring).

Every rendered object of a built-in kind goes through the Kubernetes client's typed models
strictly (tests/test_deploy.py's round trip: a misspelt field fails); the ServiceMonitor, a CRD
the client has no model for, is checked field by field. Then what must agree: the Ingress with
the Service and the paths the proxy serves, the NetworkPolicy with the pods, their port and the
peers the config names, the ServiceMonitor with /metrics, the overlay's config with its Secret
references. And no shipped file talks about how it was made."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes.client import ApiClient
from starlette.routing import Route

from guard.core.config import Config, load_config
from tests.test_deploy import differences, env_names, model_name, serve_args

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
PRODUCTION = ROOT / "deploy" / "overlays" / "production"
KUBECTL = shutil.which("kubectl")
POD_LABELS = {"app.kubernetes.io/name": "safeedit-guard"}


def render(folder: Path) -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations)")
    result = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=["base", "production"])
def rendered(request: pytest.FixtureRequest) -> dict[tuple[str, str], dict[str, Any]]:
    docs = render(BASE if request.param == "base" else PRODUCTION)
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def production() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render(PRODUCTION)}


def one(objects: Mapping[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for (k, _), d in objects.items() if k == kind]
    return found


def config_of(objects: Mapping[tuple[str, str], dict[str, Any]]) -> tuple[dict[str, Any], Config]:
    raw = yaml.safe_load(objects[("ConfigMap", "safeedit-config")]["data"]["config.yaml"])
    return raw, load_config(None, raw)


def proxy_container(objects: Mapping[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_every_rendered_object_is_valid_and_in_the_namespace(rendered) -> None:  # type: ignore[no-untyped-def]
    client = ApiClient()
    for (kind, name), doc in rendered.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "safeedit", (kind, name)
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked below
        model = client._ApiClient__deserialize(doc, model_name(doc))  # type: ignore[attr-defined]
        assert differences(doc, client.sanitize_for_serialization(model)) == [], (kind, name)
    assert {"Ingress", "NetworkPolicy"} <= {kind for kind, _ in rendered}


def test_the_ingress_routes_the_public_host_to_the_served_paths(rendered) -> None:  # type: ignore[no-untyped-def]
    from proxy import routes

    served = {r.path for r in routes() if isinstance(r, Route)}
    ingress, service = one(rendered, "Ingress"), one(rendered, "Service")
    _, config = config_of(rendered)
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == urlsplit(config.server.public_url).hostname
    assert config.server.hosts().allows(rule["host"])
    assert [rule["host"]] == ingress["spec"]["tls"][0]["hosts"]
    ports = {p["name"] for p in service["spec"]["ports"]}
    paths = rule["http"]["paths"]
    for path in paths:
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"] and backend["port"]["name"] in ports
        if path["pathType"] == "Exact":
            assert path["path"] in served
        else:
            assert any(p == path["path"] or p.startswith(path["path"] + "/") for p in served)
    routed = {p["path"] for p in paths}
    assert {"/v1", "/guard"} <= routed
    # operations' paths stay inside the cluster
    assert not routed & {"/metrics", "/healthz", "/readyz", "/"}
    notes = ingress["metadata"]["annotations"]
    body = int(notes["nginx.ingress.kubernetes.io/proxy-body-size"].removesuffix("m"))
    assert body * 1_000_000 >= config.server.max_upload_bytes
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # streams


def test_the_network_policy_fences_the_pods(rendered) -> None:  # type: ignore[no-untyped-def]
    policy = one(rendered, "NetworkPolicy")["spec"]
    pods = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"], pods)
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    # in: only the ingress controller and Prometheus, only on the pods' port
    (rule,) = policy["ingress"]
    (container_port,) = proxy_container(rendered)["ports"]
    assert [p["port"] for p in rule["ports"]] == [container_port["name"]]
    namespaces = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for peer in rule["from"]}
    assert namespaces == {"ingress-nginx", "monitoring"}
    assert all("podSelector" in peer for peer in rule["from"])  # not the whole namespace
    # out: DNS both ways, and a port for each peer the config names
    allowed = {(p["port"], p.get("protocol", "TCP")) for e in policy["egress"] for p in e["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (6379, "TCP"), (443, "TCP")} <= allowed
    _, config = config_of(rendered)
    redis = urlsplit(config.limits.redis_url)
    assert (redis.port or 6379, "TCP") in allowed
    internet = [e for e in policy["egress"] if any("ipBlock" in peer for peer in e["to"])]
    for rule in internet:  # the cluster's own ranges only through the rules above
        for peer in rule["to"]:
            assert "10.0.0.0/8" in peer["ipBlock"]["except"]
        assert [p["port"] for p in rule["ports"]] == [443]


def test_the_service_monitor_scrapes_metrics_on_the_service_port(production) -> None:  # type: ignore[no-untyped-def]
    from proxy import routes

    monitor = one(production, "ServiceMonitor")
    service = one(production, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert "/metrics" in {r.path for r in routes() if isinstance(r, Route)}
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert re.fullmatch(r"\d+s", endpoint["interval"])


def test_the_production_overlay(production) -> None:  # type: ignore[no-untyped-def]
    deployment = one(production, "Deployment")
    container = proxy_container(production)
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 3
    hpa, pdb = one(production, "HorizontalPodAutoscaler"), one(production, "PodDisruptionBudget")
    assert hpa["spec"]["minReplicas"] >= replicas and hpa["spec"]["maxReplicas"] > replicas
    assert 1 < pdb["spec"]["minAvailable"] < replicas
    repo, _, tag = container["image"].rpartition(":")
    assert repo.startswith("registry.example.com/") and tag not in ("", "latest")
    base = proxy_container({(d["kind"], d["metadata"]["name"]): d for d in render(BASE)})
    for kind in ("requests", "limits"):
        assert container["resources"][kind] != base["resources"][kind]
    # the config: the PostgreSQL audit log with anchors elsewhere, traces to a collector
    raw, config = config_of(production)
    assert config.audit["kind"] == "postgres" and config.audit["anchor"]["kind"] == "postgres"
    assert config.audit["dsn_env"] != config.audit["anchor"]["dsn_env"]
    assert config.audit.get("checkpoint_key_env") or config.audit.get("checkpoint_keys_env")
    assert not config.open_mode and config.telemetry.exporter == "otlp"
    env = {e["name"]: e for e in container["env"]}
    for name in env_names(raw):  # every secret the config names comes from the Secret
        assert "secretKeyRef" in env[name]["valueFrom"], name
    for name, entry in env.items():  # and a plain value is never a secret
        assert "secretKeyRef" in entry.get("valueFrom", {}) or name.startswith("OTEL_"), name
    collector = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"])
    allowed = {p["port"] for e in one(production, "NetworkPolicy")["spec"]["egress"]
               for p in e["ports"]}
    assert collector.port in allowed
    args = serve_args(container["args"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[args.config]["subPath"] == "config.yaml"
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mounts[args.config]["name"])
    assert volume["configMap"]["name"] == "safeedit-config"
    drain = config.server.drain_timeout_s
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > drain


# Words that belong to how a file was made, not to what it is for.
DEVELOPMENT_NOTES = re.compile(
    r"\bissue\s*#?\d+|\blanding\b|\bTODO\b|\bFIXME\b|\bXXX\b|\bfor now\b"
    r"|\blead engineer\b|\bthis session\b", re.I)


def shipped_files() -> list[Path]:
    files = [p for folder in ("deploy", "examples") for p in (ROOT / folder).rglob("*")
             if p.is_file()]
    return [*files, ROOT / "Dockerfile", ROOT / "compose.yaml", ROOT / ".env.example",
            ROOT / "guard" / "cli" / "config.example.yaml"]


def test_shipped_files_hold_no_notes_about_their_making() -> None:
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in shipped_files()
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if DEVELOPMENT_NOTES.search(line)]
    assert found == []
