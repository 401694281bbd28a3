"""Reading an image's manifest back, as its recipient does (`safeedit verify-image`).

What each result proves:
    intact     the active manifest's signature verifies over its claim, and the claim's hash of
               the image's bytes (`c2pa.hash.data`) matches: no byte outside the manifest changed
               since it was signed, and the manifest is the one the signer made
    trusted    the signing certificate's chain leads to a trust anchor given (`--trust PEM`);
               without one, nothing says who the signer is: a development chain, or anyone's
    facts      the guard's assertion (trace id, policy, decision...), worth what the signer is
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import c2pa

from guard.provenance.marker import GUARD_LABEL, media_type_of

UNTRUSTED = "signingCredential.untrusted"


@dataclass(frozen=True, slots=True)
class Reading:
    sha256: str  # of the file as read
    media_type: str | None
    manifest: bool = False  # a C2PA manifest was found
    intact: bool = False  # signature and hash binding hold
    trusted: bool = False  # and the signer chains to a given trust anchor
    problems: list[str] = field(default_factory=list)  # "code: explanation" of each failure

    @property
    def ok(self) -> bool:
        """Nothing failed: intact, and trusted when trust anchors were given."""
        return self.manifest and not self.problems
    signer: dict[str, Any] = field(default_factory=dict)  # the manifest's signature_info
    facts: dict[str, Any] | None = None  # the guard's assertion
    actions: list[dict[str, Any]] = field(default_factory=list)
    parent: bool = False  # the manifest keeps an earlier manifest as its parent ingredient

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "media_type": self.media_type, "manifest": self.manifest,
                "intact": self.intact, "trusted": self.trusted, "problems": self.problems,
                "signer": self.signer, "guard": self.facts,
                "actions": [a.get("action") for a in self.actions], "parent": self.parent}


def read_image(data: bytes, trust_pem: str | None = None) -> Reading:
    """Verify `data`'s C2PA manifest; with `trust_pem` (PEM certificates), its signer's chain
    must lead to one of them."""
    sha256 = hashlib.sha256(data).hexdigest()
    media_type = media_type_of(data)
    if media_type is None:
        return Reading(sha256, None, problems=["not a PNG, JPEG or WebP image"])
    settings: dict[str, Any] = {"verify": {"verify_trust": trust_pem is not None}}
    if trust_pem is not None:
        settings["trust"] = {"trust_anchors": trust_pem}
    context = c2pa.Context.from_dict(settings)
    try:
        reader = c2pa.Reader.try_create(media_type, io.BytesIO(data), context=context)
        if reader is None:
            return Reading(sha256, media_type, problems=["no C2PA manifest in the image"])
        with reader:
            store = json.loads(reader.json())
    except c2pa.C2paError as exc:
        return Reading(sha256, media_type, problems=[f"the manifest cannot be read: {exc}"])
    finally:
        context.close()
    active = store.get("manifests", {}).get(store.get("active_manifest"), {})
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    failures = [f for f in results.get("failure", []) if f.get("code") != UNTRUSTED]
    broken = [f"{f.get('code')}: {f.get('explanation')}" for f in failures]
    passed = {s.get("code") for s in results.get("success", [])}
    if not failures and "claimSignature.validated" not in passed:
        broken.append("the claim's signature was not validated")
    if not failures and not passed & {"assertion.dataHash.match", "assertion.bmffHash.match",
                                      "assertion.boxesHash.match"}:
        broken.append("no hash binding of the image's bytes was validated")
    trusted = not broken and trust_pem is not None and store.get("validation_state") == "Trusted"
    untrusted = ([f"{UNTRUSTED}: the signer's certificate does not chain to the trusted "
                  "certificate(s)"] if trust_pem is not None and not broken and not trusted
                 else [])
    assertions = {a.get("label"): a.get("data") for a in active.get("assertions", [])}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {})
    return Reading(
        sha256, media_type, manifest=True, intact=not broken, trusted=trusted,
        problems=broken + untrusted, signer=active.get("signature_info") or {},
        facts=assertions.get(GUARD_LABEL), actions=list(actions.get("actions", [])),
        parent=any(i.get("relationship") == "parentOf" for i in active.get("ingredients", [])))
