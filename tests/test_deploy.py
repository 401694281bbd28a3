"""The deployment as shipped: Dockerfile, compose.yaml (and deploy/compose/), deploy/kubernetes/.

Nothing here builds an image or starts a cluster. What is checked without them: the Dockerfile
passes hadolint with no finding at all; compose.yaml and the manifests are well-formed (the
manifests through the Kubernetes client's typed models, strictly: a misspelt field fails); they
agree with the proxy (the flags of `safeedit serve`, the paths it serves, its port, its config
model, its policies); and the config the compose replicas mount serves as two replicas on the
PostgreSQL and Redis of this machine, with one chain that verifies against its anchors.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import shlex
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import redis
import yaml
from kubernetes.client import ApiClient
from starlette.routing import Route

from guard.cli import build_parser
from guard.core.config import Config, hash_key, load_config
from guard.core.policy import POLICIES_DIR
from guard.core.policy.loader import load, read_files
from guard.judges.remote import RemoteOptions
from tests.conftest import AUDITOR_KEY, CLIENT_KEY
from tests.servers import serve
from tests.services import PG_DSN, REDIS_URL, drop_schemas, require_postgres, require_redis

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "config.yaml"
NGINX = ROOT / "deploy" / "compose" / "nginx.conf"
K8S = ROOT / "deploy" / "kubernetes"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
HADOLINT = Path(sys.executable).parent / "hadolint"
PROXIES = ("proxy-a", "proxy-b")

# Served by the proxy whatever the Host (guard.http.middleware.hosts.UNCHECKED_PATHS): what probes may use.
PROBE_PATHS = {"/healthz", "/readyz"}


def env_names(section: Any) -> set[str]:
    """Every environment variable a config section names (`*_env` options), at any depth."""
    if isinstance(section, Mapping):
        found = {v for k, v in section.items() if k.endswith("_env") and isinstance(v, str)}
        return found.union(*(env_names(v) for v in section.values()))
    if isinstance(section, list):
        return set().union(*(env_names(v) for v in section))
    return set()


def serve_args(argv: list[str]) -> Any:
    """`argv` as `safeedit serve` parses it (SystemExit on an unknown flag)."""
    return build_parser().parse_args(["serve", *argv])


# --- Dockerfile -------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in dockerfile():
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def exec_form(args: str) -> list[str]:
    value = yaml.safe_load(args)  # a JSON array is YAML
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "style", *args],
                          cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)


def test_the_dockerfile_has_no_hadolint_finding() -> None:
    careless = hadolint("-", stdin="FROM python\nRUN pip install requests\n")
    assert careless.returncode != 0 and "DL3006" in careless.stdout  # the linter does lint
    result = hadolint("Dockerfile")
    assert (result.returncode, result.stdout.strip()) == (0, ""), result.stdout + result.stderr


def test_the_image_is_multi_stage_with_cpu_torch_and_a_cuda_switch() -> None:
    builder, runtime = stages()
    assert builder[0][1].endswith("AS builder") and runtime[0][1].startswith("python:3.11-slim")
    args = dict(a[1].split("=", 1) for a in builder if a[0] == "ARG" and "=" in a[1])
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={args['TORCH_VERSION']}" in pins  # the version the project pins
    assert any("--index-url \"${TORCH_INDEX}\"" in a[1] for a in builder if a[0] == "RUN")
    # the runtime stage gets the venv, not the sources or a compiler
    copies = [a[1] for a in runtime if a[0] == "COPY"]
    assert copies == ["--from=builder /opt/safeedit /opt/safeedit"]


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, p.removeprefix("**/"))
               for p in patterns for prefix in prefixes)


def test_the_build_context_holds_everything_the_wheel_is_built_from() -> None:
    builder = stages()[0]
    copied = [src for a in builder if a[0] == "COPY" for src in a[1].split()[:-1]]
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    needed = {"pyproject.toml", project["project"]["readme"], "policies",  # guard/policies links it
              *(f"{m}.py" for m in setuptools["py-modules"]),
              *(p.rstrip("*") for p in setuptools["packages"]["find"]["include"])}
    assert needed <= set(copied)
    for secret_or_state in (".env", ".venv", "var", ".git"):
        assert dockerignored(secret_or_state)


def test_the_container_runs_safeedit_serve_as_a_non_root_user() -> None:
    runtime = stages()[-1]
    last = {name: args for name, args in runtime}  # the last of each instruction wins
    user = last["USER"].split(":")[0]
    uid = next(a[1].split("=")[1] for a in runtime if a[0] == "ARG" and a[1].startswith("UID="))
    assert user in ("${UID}", uid) and int(uid) > 0
    assert exec_form(last["ENTRYPOINT"]) == ["safeedit", "serve"]
    args = serve_args(exec_form(last["CMD"]))
    assert (args.host, args.config) == ("0.0.0.0", "/etc/safeedit/config.yaml")
    health = exec_form(last["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert health[:2] == ["python", "-c"] and "SAFEEDIT_HEALTH_URL" in health[2]
    url = re.search(r"SAFEEDIT_HEALTH_URL=(\S+)", last["ENV"])
    assert url and urlsplit(url[1]).path in PROBE_PATHS
    assert urlsplit(url[1]).port == int(last["EXPOSE"]) == Config().server.port


# --- compose.yaml -----------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        value = env.get(name)
        unset_or_empty = not value if op and op.startswith(":") else value is None
        if op and op.endswith("?") and unset_or_empty:
            raise KeyError(f"{name}: {arg}")
        if op and op.endswith("-") and unset_or_empty:
            return arg
        return value or ""
    return _VARIABLE.sub(one, text)


def example_env() -> dict[str, str]:
    """.env.example as compose reads it: NAME=value lines, comments skipped."""
    env = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def filled_env() -> dict[str, str]:
    return {k: v or f"test-{k.lower()}-0123456789" for k, v in example_env().items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), filled_env()))


def test_compose_refuses_to_start_until_the_secrets_are_filled_in() -> None:
    referenced = {m["name"] for m in _VARIABLE.finditer(COMPOSE.read_text())}
    assert referenced <= example_env().keys(), "variables missing from .env.example"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(COMPOSE.read_text(), example_env())  # blank, as shipped


def test_compose_services_are_well_formed(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*PROXIES, "lb", "postgres", "redis", "judge"}
    for name, service in services.items():
        if "build" in service:
            assert (ROOT / service["build"]["context"] / "Dockerfile").is_file()
        else:  # an official image, pinned to a version
            repo, _, tag = service["image"].rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, name
        for port in service.get("ports", []):
            host, container = str(port).split(":")
            assert 0 < int(host) < 65536 and 0 < int(container) < 65536, port
        for key, value in (service.get("environment") or {}).items():
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key) and isinstance(value, str), (name, key)
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}: not in the repository"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
            assert target.startswith("/")
        for dependency, how in (service.get("depends_on") or {}).items():
            assert dependency in services
            assert how["condition"] in ("service_started", "service_healthy")
            if how["condition"] == "service_healthy":
                assert services[dependency]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
        assert service.get("profiles", []) == (["gpu"] if name == "judge" else [])
    devices = services["judge"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_the_replicas_are_one_deployment_sharing_one_database(compose: dict[str, Any]) -> None:
    a, b = (compose["services"][p] for p in PROXIES)
    assert a == b
    dsn = urlsplit(a["environment"]["SAFEEDIT_AUDIT_DSN"])
    db = compose["services"]["postgres"]["environment"]
    assert (dsn.hostname, dsn.username, dsn.password, dsn.path) == (
        "postgres", db["POSTGRES_USER"], db["POSTGRES_PASSWORD"], f"/{db['POSTGRES_DB']}")
    # the anchors' database is created when the data volume is first initialised
    anchors = urlsplit(a["environment"]["SAFEEDIT_ANCHOR_DSN"]).path.lstrip("/")
    init = ROOT / "deploy" / "compose" / "postgres-init"
    assert anchors != db["POSTGRES_DB"]
    assert any(f"CREATE DATABASE {anchors};" in f.read_text() for f in init.glob("*.sql"))
    args = serve_args(a["command"])
    mounts = dict(v.split(":")[:2][::-1] for v in a["volumes"])
    assert mounts[args.config] == "./deploy/compose/config.yaml"
    raw = yaml.safe_load(COMPOSE_CONFIG.read_text())
    assert mounts[raw["policy_paths"][0]] == "./policies"
    # compose waits for the drain before it kills a replica
    grace = float(a["stop_grace_period"].removesuffix("s"))
    assert grace > raw["server"]["drain_timeout_s"]


def test_the_replicas_config_loads_and_names_only_variables_compose_sets(
        compose: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE_CONFIG.read_text())
    config = load_config(None, raw)
    environment = compose["services"]["proxy-a"]["environment"]
    assert env_names(raw) <= environment.keys()
    assert config.audit["kind"] == "postgres" and not config.open_mode
    assert urlsplit(config.limits.redis_url).hostname == "redis"
    hosts = config.server.hosts()
    for name in ("localhost:8000", "lb:8000", "proxy-a:8000", "proxy-b:8000"):
        assert hosts.allows(name), name
    assert not hosts.allows("attacker.example")


def nginx_directives() -> list[list[str]]:
    text = re.sub(r"#.*", "", NGINX.read_text())
    return [statement.split() for statement in re.split(r"[;{}]", text) if statement.strip()]


def test_nginx_balances_both_replicas_at_the_port_they_serve(compose: dict[str, Any]) -> None:
    config = load_config(None, yaml.safe_load(COMPOSE_CONFIG.read_text()))
    directives = nginx_directives()
    upstream = {d[1] for d in directives if d[0] == "server" and len(d) > 1}
    assert upstream == {f"{p}:{config.server.port}" for p in PROXIES}
    listen = {d[1] for d in directives if d[0] == "listen"}
    lb = compose["services"]["lb"]
    assert listen == {port.split(":")[1] for port in lb["ports"]}
    body = next(d[1] for d in directives if d[0] == "client_max_body_size")
    assert int(body.removesuffix("m")) * 1_000_000 >= config.server.max_upload_bytes
    assert ["proxy_buffering", "off"] in directives  # streams reach the client as they come
    health = urlsplit(lb["healthcheck"]["test"][-1]).path
    assert ["location", "=", health] in directives


def test_the_gpu_judge_serves_what_the_remote_judge_asks_for(compose: dict[str, Any]) -> None:
    command = compose["services"]["judge"]["command"]
    flags = dict(zip(command[::2], command[1::2], strict=True))
    # the judge asks for top_logprobs (default 5, at most 20) at every verdict token
    limit = RemoteOptions.model_fields["top_logprobs"].metadata
    most = max(getattr(m, "le", 0) or 0 for m in limit)
    assert int(flags["--max-logprobs"]) >= most
    assert yaml.safe_load(flags["--limit-mm-per-prompt"]) == {"image": 1}
    raw = yaml.safe_load(COMPOSE_CONFIG.read_text())
    assert raw["judge"]["kind"] == "builtin"  # the gpu profile is opt-in


# --- deploy/kubernetes ------------------------------------------------------------------------

def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((path.name, doc))
    return found


def model_name(doc: Mapping[str, Any]) -> str:
    version = doc["apiVersion"].rpartition("/")[2]
    return version[0].upper() + version[1:] + doc["kind"]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def differences(sent: Any, kept: Any, path: str = "") -> list[str]:
    """Where the typed model's round trip differs from the manifest (a dropped field, mostly)."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        return [d for k in sent.keys() | kept.keys()
                for d in differences(sent.get(k), kept.get(k), f"{path}.{k}")]
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        return [d for i, (x, y) in enumerate(zip(sent, kept, strict=True))
                for d in differences(x, y, f"{path}[{i}]")]
    return [] if sent == kept else [f"{path}: {sent!r} became {kept!r}"]


def test_every_manifest_is_a_valid_kubernetes_object_without_unknown_fields() -> None:
    client = ApiClient()
    seen = set()
    for name, doc in manifests():
        if doc["kind"] == "Kustomization":
            for resource in doc["resources"]:
                assert (K8S / resource).is_file(), f"{name}: {resource} does not exist"
            continue
        seen.add(doc["kind"])
        # the typed models refuse missing required fields; unknown (misspelt) fields they drop,
        # which the round trip shows
        model = client._ApiClient__deserialize(doc, model_name(doc))  # type: ignore[attr-defined]
        kept = client.sanitize_for_serialization(model)
        assert differences(doc, kept) == [], f"{name}: {doc['kind']}"
    assert {"Namespace", "Deployment", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "ConfigMap"} <= seen
    listed = set(next(d for _, d in manifests() if d["kind"] == "Kustomization")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_strict_check_catches_a_misspelt_field() -> None:
    client = ApiClient()
    doc = of_kind("Deployment")[0]
    typo = {**doc, "spec": {**doc["spec"], "replica": 3}}
    model = client._ApiClient__deserialize(typo, "V1Deployment")  # type: ignore[attr-defined]
    assert differences(typo, client.sanitize_for_serialization(model)) == [
        ".spec.replica: 3 became None"]


def container() -> dict[str, Any]:
    (deployment,) = of_kind("Deployment")
    (proxy,) = deployment["spec"]["template"]["spec"]["containers"]
    return proxy


def k8s_config() -> dict[str, Any]:
    (config_map,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "safeedit-config"]
    return yaml.safe_load(config_map["data"]["config.yaml"])


def test_the_deployment_probes_paths_the_proxy_serves_on_its_port() -> None:
    from proxy import routes

    served = {route.path for route in routes() if isinstance(route, Route)}
    proxy = container()
    raw = k8s_config()
    (port,) = proxy["ports"]
    assert port["containerPort"] == load_config(None, raw).server.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = proxy[probe]["httpGet"]
        assert get["path"] in served and get["path"] in PROBE_PATHS
        assert get["port"] in (port["name"], port["containerPort"])
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"  # a DB outage is not a restart
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (service,) = of_kind("Service")
    assert service["spec"]["selector"].items() <= \
        of_kind("Deployment")[0]["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] in (
        [port["name"]], [port["containerPort"]])
    args = serve_args(proxy["args"])
    mounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
    assert mounts[args.config]["subPath"] == "config.yaml"
    assert raw["policy_paths"] == ["/etc/safeedit/policies"] and "/etc/safeedit/policies" in mounts


def test_the_pods_run_locked_down_and_drain_before_they_are_killed() -> None:
    (deployment,) = of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    proxy = container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = next(a[1].split("=")[1] for a in stages()[-1] if a[0] == "ARG" and "UID=" in a[1])
    assert pod["securityContext"]["runAsUser"] == int(uid)  # the image's user
    security = proxy["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = next(m for m in proxy["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= proxy["resources"][kind].keys()
    # preStop sleep (endpoints removed), then SIGTERM: the drain, all within the grace period
    pre_stop = proxy["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = load_config(None, k8s_config()).server.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain
    for ref in proxy["env"]:
        assert "secretKeyRef" in ref["valueFrom"], f"{ref['name']}: a value, not a reference"
    assert deployment["spec"]["replicas"] == 2


def test_the_budget_and_autoscaler_target_the_deployment() -> None:
    (deployment,) = of_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (pdb,) = of_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= deployment["spec"]["replicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_the_config_map_loads_with_its_policies_and_names_only_the_secrets_given(
        tmp_path: Path) -> None:
    raw = k8s_config()
    config = load_config(None, raw)
    assert not config.open_mode and config.audit["kind"] == "postgres"
    given = {e["name"] for e in container()["env"]}
    assert env_names(raw) <= given
    (policies,) = [c for c in of_kind("ConfigMap")
                   if c["metadata"]["name"] == "safeedit-policies"]
    for name, text in policies["data"].items():
        (tmp_path / name).write_text(text)
    loaded = load(read_files([POLICIES_DIR, tmp_path]))
    assert loaded.problems == []
    used = {config.policy, *(config.tenant_policy(t) for t in config.tenants)}
    assert used - {None} <= loaded.policies.keys()
    (service,) = of_kind("Service")
    assert config.server.hosts().allows(service["metadata"]["name"])


# --- the docs ---------------------------------------------------------------------------------

def test_the_guide_is_linked_and_its_vllm_command_fits_the_remote_judge() -> None:
    assert "docs/deploy.md" in (ROOT / "README.md").read_text()
    text = DEPLOY_DOC.read_text()
    commands = [" ".join(block.replace("\\\n", " ").split())
                for block in re.findall(r"```sh\n(.*?)```", text, re.S) if "vllm serve" in block]
    lora = next(c for c in commands if "--enable-lora" in c)
    words = shlex.split(lora[lora.index("vllm serve"):])
    assert words[2] == "Qwen/Qwen2.5-VL-7B-Instruct"
    module = words[words.index("--lora-modules") + 1].split("=")[0]
    assert int(words[words.index("--max-logprobs") + 1]) >= 20
    assert {"--limit-mm-per-prompt", "--max-model-len"} <= set(words)
    judges = [yaml.safe_load(block)["judge"]
              for block in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: remote" in block]
    ipr = next(j for j in judges if j.get("profile") == "ipr")
    options = RemoteOptions.model_validate({k: v for k, v in ipr.items() if k != "kind"})
    assert options.model == module  # the judge asks vLLM for the adapter by its module name


# --- the compose config, served ---------------------------------------------------------------

@pytest.fixture
def replicas_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """deploy/compose/config.yaml as an operator fills it in, pointed at this machine's
    PostgreSQL (fresh schemas) and Redis (a prefix of its own) instead of the compose services."""
    require_postgres(PG_DSN)
    require_redis(REDIS_URL)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    prefix = f"safeedit-test:{uuid.uuid4().hex[:12]}:"
    for name, value in {"SAFEEDIT_AUDIT_DSN": PG_DSN, "SAFEEDIT_ANCHOR_DSN": PG_DSN,
                        "SAFEEDIT_CHECKPOINT_KEY": "test-checkpoint-key-0123456789",
                        "SAFEEDIT_SESSION_KEY": "test-session-key-0123456789"}.items():
        monkeypatch.setenv(name, value)
    raw = yaml.safe_load(COMPOSE_CONFIG.read_text())
    raw["keys"] = [{**raw["keys"][0], "hash": hash_key(CLIENT_KEY)},
                   {**raw["keys"][1], "hash": hash_key(AUDITOR_KEY)}]
    raw["audit"]["schema"] = schema
    raw["audit"]["anchor"]["schema"] = f"{schema}_anchors"
    raw["image_store"]["schema"] = schema
    raw["limits"].update(redis_url=REDIS_URL, key_prefix=prefix)
    raw["policy_paths"] = [str(ROOT / "policies")]  # the folder compose mounts there
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    yield path

    asyncio.run(drop_schemas(PG_DSN, schema))  # and its _anchors, _anchors_labels...
    with redis.Redis.from_url(REDIS_URL) as client:
        mine = list(client.scan_iter(match=prefix + "*"))
        if mine:
            client.delete(*mine)


def wait_ready(base: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        resp = httpx.get(f"{base}/readyz", timeout=10)
        if resp.status_code == 200:
            return
        assert time.monotonic() < deadline, resp.text
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_the_compose_config_serves_as_two_replicas_with_one_verified_chain(
        replicas_config: Path) -> None:
    from proxy import create_app

    config = load_config(replicas_config)
    with serve(create_app(config)) as a, serve(create_app(config)) as b:
        for base in (a, b):
            wait_ready(base)
        ids = []
        for base in (a, b):
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0)
            raw = client.images.with_raw_response.generate(model="gpt-image-1",
                                                           prompt="a lighthouse at dusk")
            data = raw.parse().data
            assert data and data[0].b64_json
            ids.append(raw.headers["x-guard-trace-id"])
        # an image link minted by one replica points at the load balancer and works on the other
        client = openai.OpenAI(base_url=f"{a}/v1", api_key=CLIENT_KEY, max_retries=0)
        data = client.images.generate(model="gpt-image-1", prompt="a harbour",
                                      response_format="url").data
        assert data and data[0].url
        link = urlsplit(data[0].url)
        assert f"{link.scheme}://{link.netloc}" == config.server.public_url
        image = httpx.get(f"{b}{link.path}?{link.query}", timeout=10)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG"), image.text
        # one audit log: each replica shows the other's trace
        for base, trace_id in ((b, ids[0]), (a, ids[1])):
            resp = httpx.get(f"{base}/v1/guard/traces/{trace_id}", timeout=10,
                             headers={"authorization": f"Bearer {AUDITOR_KEY}"})
            assert resp.status_code == 200 and resp.json()["decision"] == "passed", resp.text
    # both replicas have stopped and anchored the head: the chain checks out against it
    result = subprocess.run(
        [sys.executable, "-m", "guard.cli", "audit", "verify", "--json", "--config",
         str(replicas_config)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = yaml.safe_load(result.stdout)
    assert report["ok"] and report["traces"] == 3 and report["anchors"] >= 1, report
