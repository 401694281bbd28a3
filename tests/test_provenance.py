"""C2PA provenance on every delivered image, through the real openai SDK against the proxy, the
manifests read back with c2pa-python's Reader; and `safeedit verify-image` on what was delivered."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import c2pa
import httpx
import openai
import pytest

from guard.cli import main
from guard.core.config import ProvenanceConfig, load_config
from guard.provenance import (
    GUARD_LABEL,
    TRAINED_ALGORITHMIC_MEDIA,
    Facts,
    Marker,
    dev_chain,
    read_image,
)
from guard.support.errors import ConfigError
from tests.conftest import AUDITOR_KEY, E2E_POLICY, write_policy
from tests.fake_backend import png
from tests.test_proxy import sdk, trace

MAGIC = {"PNG": b"\x89PNG", "JPEG": b"\xff\xd8\xff", "WEBP": b"RIFF"}
MEDIA = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@pytest.fixture
def start(proxy, tmp_path: Path, fake_backend):  # type: ignore[no-untyped-def]
    """The proxy under the e2e policy; its development certificate in tmp_path/keys, beside
    the audit database."""
    write_policy(tmp_path, E2E_POLICY)

    def run(provenance: dict[str, Any] | None = None, **overrides: Any) -> str:
        return proxy(policy="e2e", provenance=provenance or {}, **overrides)

    return run, fake_backend[0]


def manifest(data: bytes, media_type: str = "image/png") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the active manifest, the whole store as the Reader reports it)."""
    with c2pa.Reader(media_type, io.BytesIO(data)) as reader:
        store = json.loads(reader.json())
    return store["manifests"][store["active_manifest"]], store


def assertion(active: dict[str, Any], label: str) -> Any:
    return next(a["data"] for a in active["assertions"] if a["label"] == label)


def failures(store: dict[str, Any]) -> set[str]:
    """Failure codes of the active manifest; a dev certificate is only `untrusted`."""
    return {f["code"] for f in store["validation_results"]["activeManifest"].get("failure", [])}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_refined_image_carries_its_decision_and_the_trace_both_hashes(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run, backend = start
    base = run()
    backend.plan = [["red"], ["blue"]]  # unsafe first, then regenerated from a refined prompt
    raw = sdk(base).images.with_raw_response.generate(prompt="a street at night",
                                                        model="gpt-image-1")
    delivered = base64.b64decode(raw.parse().data[0].b64_json or "")
    trace_id = raw.headers["x-guard-trace-id"]
    active, store = manifest(delivered)
    assert failures(store) == {"signingCredential.untrusted"}  # intact; the dev signer untrusted
    actions = assertion(active, "c2pa.actions.v2")["actions"]
    assert [a["action"] for a in actions] == ["c2pa.created", "c2pa.edited"]
    assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    t = trace(base, trace_id)
    facts = assertion(active, GUARD_LABEL)
    log_id = httpx.get(f"{base}/v1/guard/log/keys", timeout=10,
                       headers={"authorization": f"Bearer {AUDITOR_KEY}"}).json()["log_id"]
    assert facts == {"trace_id": trace_id, "decision": "edited", "rounds": 2,
                     "categories": ["violence"], "log_id": log_id,
                     "policy": {"id": "e2e", "version": 7, "sha256": t["policy"]["sha256"]}}
    result = t["results"][0]
    assert result["image_sha256"] == sha(png("blue"))  # as generated and judged
    assert result["delivered_sha256"] == sha(delivered) != result["image_sha256"]
    assert result["provenance"] == "c2pa"
    dev = tmp_path / "keys" / "c2pa-dev"  # made at first start, beside the audit database
    assert (dev / "key.pem").stat().st_mode & 0o777 == 0o600 and (dev / "ca.pem").exists()


@pytest.mark.parametrize("image_format", ["JPEG", "WEBP"])
def test_jpeg_and_webp_are_marked_each_image_of_a_request(start, image_format) -> None:  # type: ignore[no-untyped-def]
    run, backend = start
    base = run()
    backend.image_format = image_format
    raw = sdk(base).images.with_raw_response.generate(prompt="two boats", n=2,
                                                        model="gpt-image-1")
    images = [base64.b64decode(d.b64_json or "") for d in raw.parse().data]
    t = trace(base, raw.headers["x-guard-trace-id"])
    for image, result in zip(images, t["results"], strict=True):
        assert image.startswith(MAGIC[image_format])
        active, store = manifest(image, MEDIA[image_format])
        assert failures(store) == {"signingCredential.untrusted"}
        assert assertion(active, GUARD_LABEL)["decision"] == "passed"
        assert [a["action"] for a in assertion(active, "c2pa.actions.v2")["actions"]] == [
            "c2pa.created"]
        assert result["delivered_sha256"] == sha(image)


def test_a_link_serves_the_marked_image(start) -> None:  # type: ignore[no-untyped-def]
    run, _ = start
    base = run()
    raw = sdk(base).images.with_raw_response.generate(prompt="a lighthouse", model="dall-e-3",
                                                        response_format="url")
    served = httpx.get(raw.parse().data[0].url or "", timeout=10).content
    active, _ = manifest(served)
    trace_id = raw.headers["x-guard-trace-id"]
    assert assertion(active, GUARD_LABEL)["trace_id"] == trace_id
    assert trace(base, trace_id)["results"][0]["delivered_sha256"] == sha(served)


def test_streamed_and_edited_images_are_marked(start) -> None:  # type: ignore[no-untyped-def]
    run, _ = start
    base = run()
    events = list(sdk(base).images.generate(prompt="a street at night", stream=True,
                                            model="gpt-image-1", partial_images=1))
    streamed = base64.b64decode(events[-1].b64_json)  # type: ignore[union-attr]
    active, _ = manifest(streamed)
    trace_id = events[-1].guard["trace_id"]  # type: ignore[union-attr]
    assert assertion(active, GUARD_LABEL)["trace_id"] == trace_id
    assert trace(base, trace_id)["results"][0]["delivered_sha256"] == sha(streamed)

    raw = sdk(base).images.with_raw_response.edit(image=("in.png", png("blue"), "image/png"),
                                                    prompt="add a hat", model="gpt-image-1")
    edited = base64.b64decode(raw.parse().data[0].b64_json or "")
    active, _ = manifest(edited)
    assert assertion(active, GUARD_LABEL)["trace_id"] == raw.headers["x-guard-trace-id"]


def test_the_backends_own_manifest_stays_as_the_parent(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, backend = start
    base = run()
    _, chain, key = dev_chain()  # the backend's own signer, not the guard's

    def backend_manifest(image: bytes) -> bytes:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key,
                                                           None))
        out = io.BytesIO()
        with c2pa.Builder({"claim_generator_info": [{"name": "a backend"}],
                           "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [
                               {"action": "c2pa.created",
                                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA}]}}]}) as b:
            b.sign(signer, "image/png", io.BytesIO(image), out)
        return out.getvalue()

    backend.finish = backend_manifest
    result = sdk(base).images.generate(prompt="a bowl of fruit", model="gpt-image-1")
    active, store = manifest(base64.b64decode(result.data[0].b64_json or ""))
    assert failures(store) == {"signingCredential.untrusted"}
    parent = next(i for i in active["ingredients"] if i["relationship"] == "parentOf")
    assert store["manifests"][parent["active_manifest"]]["claim_generator_info"][0]["name"] == (
        "a backend")
    actions = assertion(active, "c2pa.actions.v2")["actions"]
    assert actions[0]["action"] == "c2pa.opened" and len(store["manifests"]) == 2


@pytest.mark.parametrize("overrides", [{"guard": {"enabled": False}},
                                       {"provenance": {"enabled": False}}])
def test_passthrough_and_provenance_off_leave_images_as_generated(start, overrides) -> None:  # type: ignore[no-untyped-def]
    run, _ = start
    provenance = overrides.pop("provenance", None)
    base = run(provenance, **overrides)
    raw = sdk(base).images.with_raw_response.generate(prompt="a cat", model="gpt-image-1")
    delivered = base64.b64decode(raw.parse().data[0].b64_json or "")
    assert delivered == png("blue")
    assert c2pa.Reader.try_create("image/png", io.BytesIO(delivered)) is None
    result = trace(base, raw.headers["x-guard-trace-id"])["results"][0]
    assert (result["delivered_sha256"], result["provenance"]) == (None, None)


@pytest.fixture
def broken_cert(tmp_path: Path) -> dict[str, str]:
    """An operator's key beside a certificate file that is not one."""
    _, _, key = dev_chain()
    (tmp_path / "signer.key").write_bytes(key)
    (tmp_path / "chain.pem").write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
    return {"cert_file": str(tmp_path / "chain.pem"), "key_file": str(tmp_path / "signer.key")}


def test_a_signing_failure_refuses_by_default_and_is_traced(start, broken_cert) -> None:  # type: ignore[no-untyped-def]
    run, _ = start
    base = run({"c2pa": broken_cert})
    with pytest.raises(openai.InternalServerError) as info:
        sdk(base).images.generate(prompt="a cat", model="gpt-image-1")
    body = info.value.body
    assert info.value.status_code == 500 and body["code"] == "provenance_failed"  # type: ignore[index]
    assert "chain.pem" not in body["message"]  # type: ignore[index]  # the operator's, not the client's
    t = trace(base, body["trace_id"])  # type: ignore[index]
    assert t["status"] == 500 and t["error"]["code"] == "provenance_failed"
    assert t["results"][0]["provenance"].startswith("failed: ")
    assert "not a PEM chain" in t["error"]["detail"]
    assert t["results"][0]["delivered_sha256"] is None
    assert "PRIVATE KEY" not in json.dumps(t)


def test_on_error_unmarked_sends_the_image_and_says_so(start, broken_cert) -> None:  # type: ignore[no-untyped-def]
    run, _ = start
    base = run({"c2pa": broken_cert, "on_error": "unmarked"})
    raw = sdk(base).images.with_raw_response.generate(prompt="a cat", model="gpt-image-1")
    delivered = base64.b64decode(raw.parse().data[0].b64_json or "")
    assert delivered == png("blue")
    result = trace(base, raw.headers["x-guard-trace-id"])["results"][0]
    assert result["provenance"].startswith("unmarked: ") and "certificate" in result["provenance"]
    assert result["delivered_sha256"] == result["image_sha256"] == sha(delivered)


def test_verify_image_on_a_delivered_image(start, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run, _ = start
    ca, chain, key = dev_chain()  # the operator's own chain this time
    for name, pem in (("ca.pem", ca), ("chain.pem", chain), ("signer.key", key)):
        (tmp_path / name).write_bytes(pem)
    base = run({"c2pa": {"cert_file": str(tmp_path / "chain.pem"),
                         "key_file": str(tmp_path / "signer.key")}})
    raw = sdk(base).images.with_raw_response.generate(prompt="a cat", model="gpt-image-1")
    image = tmp_path / "delivered.png"
    image.write_bytes(base64.b64decode(raw.parse().data[0].b64_json or ""))
    trace_id = raw.headers["x-guard-trace-id"]
    capsys.readouterr()

    assert main(["verify-image", str(image)]) == 0
    out = capsys.readouterr().out
    assert "manifest holds" in out and "UNTRUSTED" in out and trace_id in out
    assert "policy e2e version 7" in out and "decision passed" in out

    assert main(["verify-image", str(image), "--trust", str(tmp_path / "ca.pem"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["intact"] and report["trusted"]
    assert report["guard"]["trace_id"] == trace_id and report["sha256"] == sha(image.read_bytes())

    other_ca, _, _ = dev_chain()
    (tmp_path / "other.pem").write_bytes(other_ca)
    assert main(["verify-image", str(image), "--trust", str(tmp_path / "other.pem")]) == 1
    assert "does not lead to" in capsys.readouterr().out

    data = bytearray(image.read_bytes())
    data[-40] ^= 1  # inside the image data, past the manifest
    image.write_bytes(bytes(data))
    assert main(["verify-image", str(image)]) == 1
    assert "FAILED: assertion.dataHash.mismatch" in capsys.readouterr().out
    assert main(["verify-image", str(tmp_path / "absent.png")]) == 2
    (tmp_path / "plain.png").write_bytes(png("blue"))
    assert main(["verify-image", str(tmp_path / "plain.png")]) == 1
    assert "FAILED: no C2PA manifest in the image" in capsys.readouterr().out


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ConfigError, match="certificate needs its key"):
        load_config(None, {"provenance": {"c2pa": {"cert_file": "chain.pem"}}})
    with pytest.raises(ConfigError, match="on_error"):
        load_config(None, {"provenance": {"on_error": "ignore"}})


def test_verify_image_checks_the_image_against_the_log(start, tmp_path: Path, capsys,
                                                       monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run, _ = start
    base = run()
    monkeypatch.setenv("SAFEEDIT_LOG_API_KEY", AUDITOR_KEY)
    raw = sdk(base).images.with_raw_response.generate(prompt="a cat", model="gpt-image-1")
    image = tmp_path / "delivered.png"
    image.write_bytes(base64.b64decode(raw.parse().data[0].b64_json or ""))
    capsys.readouterr()
    assert main(["verify-image", str(image), "--log", base]) == 0, capsys.readouterr().out
    assert "inclusion proof verifies" in capsys.readouterr().out

    # A copy re-marked by someone else for the same trace: its hash is not the one delivered.
    other = Marker(ProvenanceConfig(), keys_dir=tmp_path / "other-keys")
    facts = read_image(image.read_bytes()).facts or {}
    forged = tmp_path / "forged.png"
    forged.write_bytes(other.mark(png("red"), Facts(
        trace_id=facts["trace_id"], policy=facts["policy"], decision="passed", rounds=1)))
    assert main(["verify-image", str(forged), "--log", base, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["intact"] and not report["ok"]
    assert "did not deliver" in report["log"]["problems"][0]
