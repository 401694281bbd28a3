"""`kind: aws-rekognition`: Amazon Rekognition DetectModerationLabels as a judge (images only).

    judge:
      kind: aws-rekognition
      region: eu-west-1
      access_key_id_env: AWS_ACCESS_KEY_ID        # or neither: boto3's own credential chain
      secret_access_key_env: AWS_SECRET_ACCESS_KEY

Each image is one DetectModerationLabels call through boto3 (`Image.Bytes`, `MinConfidence`),
run in a worker thread, with boto3's own retries off so that guard.support.retry is the only policy
(throttling and 5xx are retried). The answer's `ModerationLabels` (`Name`, `ParentName`,
`Confidence` in percent, `TaxonomyLevel` 1-3) are mapped through the label taxonomy: a label
maps by its own name or, when that is not in the map, by its nearest ancestor's (`ParentName`),
so `categories:` may name labels at any level; its score is `Confidence / 100`. Rekognition
applies its whole taxonomy to every image, so a mapped label of the answer's taxonomy with no
label in the answer is assessed at 0.0, which means "below `min_confidence`": keep
`min_confidence` under the lowest threshold it should serve. Rekognition reads no text: a
prompt-only item is unassessed (adapters.moderation.base).

Taxonomy versions: the answer's `ModerationModelVersion` says which taxonomy it labels with
(`TAXONOMIES`: 6 for 6.x, 7 for 7.x; AWS moved every account to 7 in May-June 2024; a later
version is read as 7 and says so in `details.taxonomy`). A mapped label the answer's taxonomy
does not have (a version 6 name such as `Drugs` under model 7) assesses nothing: unless another
mapped label of that taxonomy covers its category, the category is unassessed, never 0.0. The
default map holds the names of both versions; for model 7 `illegal_activity` is
`Drugs & Tobacco` with its level 2 `Products` (level 3 `Pills`) and
`Drugs & Tobacco Paraphernalia & Use`. Version 7 files tobacco under the same node as drugs and
answers a label's ancestors with it (`Smoking` comes with its level 2 and level 1 labels): a
policy that lets tobacco pass maps `Drugs & Tobacco` and `Drugs & Tobacco Paraphernalia & Use`
to null and keeps `Products`.

Options (besides those of adapters.moderation.base): `region` (us-east-1), `endpoint` (null:
AWS's own), `access_key_id_env`, `secret_access_key_env`, `session_token_env` (null: boto3's
credential chain), `min_confidence` (10, percent).

Limits (the service's, checked before upload, adapters.moderation.base): PNG or JPEG (WebP is
re-encoded as JPEG), at most 5 MB of image bytes (botocore's model: `Image.Bytes` max 5242880),
80 to 10,000 px a side; `details.upload` says what was done to fit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import boto3
import orjson
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from pydantic import Field

from adapters.moderation.base import (
    CategoryMap,
    HostedJudge,
    HostedOptions,
    ImageLimits,
    Reading,
    Transient,
    parse_options,
    secret,
)
from guard.core.types import JudgeInput
from guard.support.errors import ConfigError, JudgeError
from guard.support.redact import identifier, redact_logs

DEFAULT_CATEGORIES: dict[str, tuple[str, ...]] = {
    # taxonomy version 7
    "Explicit": ("sexual",),
    "Violence": ("violence",),
    "Graphic Violence": ("violence", "shocking"),
    "Self-Harm": ("self_harm",),
    "Blood & Gore": ("violence", "shocking"),
    "Visually Disturbing": ("shocking",),
    "Hate Symbols": ("hate",),
    "Drugs & Tobacco": ("illegal_activity",),
    "Products": ("illegal_activity",),
    "Pills": ("illegal_activity",),
    "Drugs & Tobacco Paraphernalia & Use": ("illegal_activity",),
    # taxonomy version 6
    "Explicit Nudity": ("sexual",),
    "Graphic Violence Or Gore": ("violence", "shocking"),
    "Self Injury": ("self_harm",),
    "Drugs": ("illegal_activity",),
}
# Every label of each taxonomy version, levels 1-3 (AWS's "Label categories" tables).
TAXONOMIES: dict[int, frozenset[str]] = {
    7: frozenset({
        "Explicit", "Explicit Nudity", "Exposed Male Genitalia", "Exposed Female Genitalia",
        "Exposed Buttocks or Anus", "Exposed Female Nipple", "Explicit Sexual Activity",
        "Sex Toys", "Non-Explicit Nudity of Intimate parts and Kissing", "Non-Explicit Nudity",
        "Bare Back", "Exposed Male Nipple", "Partially Exposed Buttocks",
        "Partially Exposed Female Breast", "Implied Nudity", "Obstructed Intimate Parts",
        "Obstructed Female Nipple", "Obstructed Male Genitalia", "Kissing on the Lips",
        "Swimwear or Underwear", "Female Swimwear or Underwear", "Male Swimwear or Underwear",
        "Violence", "Weapons", "Graphic Violence", "Weapon Violence", "Physical Violence",
        "Self-Harm", "Blood & Gore", "Explosions and Blasts", "Visually Disturbing",
        "Death and Emaciation", "Emaciated Bodies", "Corpses", "Crashes", "Air Crash",
        "Drugs & Tobacco", "Products", "Pills", "Drugs & Tobacco Paraphernalia & Use",
        "Smoking", "Alcohol", "Alcohol Use", "Drinking", "Alcoholic Beverages",
        "Rude Gestures", "Middle Finger", "Gambling", "Hate Symbols", "Nazi Party",
        "White Supremacy", "Extremist"}),
    6: frozenset({
        "Explicit Nudity", "Nudity", "Graphic Male Nudity", "Graphic Female Nudity",
        "Sexual Activity", "Illustrated Explicit Nudity", "Adult Toys", "Suggestive",
        "Female Swimwear Or Underwear", "Male Swimwear Or Underwear", "Partial Nudity",
        "Barechested Male", "Revealing Clothes", "Sexual Situations", "Violence",
        "Graphic Violence Or Gore", "Physical Violence", "Weapon Violence", "Weapons",
        "Self Injury", "Visually Disturbing", "Emaciated Bodies", "Corpses", "Hanging",
        "Air Crash", "Explosions And Blasts", "Rude Gestures", "Middle Finger", "Drugs",
        "Drug Products", "Drug Use", "Pills", "Drug Paraphernalia", "Tobacco",
        "Tobacco Products", "Smoking", "Alcohol", "Drinking", "Alcoholic Beverages",
        "Gambling", "Hate Symbols", "Nazi Party", "White Supremacy", "Extremist"}),
}
LATEST_TAXONOMY = max(TAXONOMIES)
_THROTTLED = frozenset({"ThrottlingException", "ProvisionedThroughputExceededException",
                        "InternalServerError", "ServiceUnavailableException"})
_AUTH = frozenset({"AccessDeniedException", "UnrecognizedClientException",
                   "InvalidSignatureException", "ExpiredTokenException"})
# botocore's loggers that print requests (signed headers) or answers at DEBUG
_LOGGERS = ("botocore.endpoint", "botocore.auth", "botocore.parsers", "botocore.hooks",
            "botocore.httpsession", "botocore.credentials", "botocore.client",
            "botocore.retryhandler", "urllib3.connectionpool")


class AwsRekognitionOptions(HostedOptions):
    region: str = "us-east-1"
    endpoint: str | None = None
    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    session_token_env: str | None = None
    min_confidence: float = Field(10.0, ge=0, le=100)


def read_labels(data: Any, mapping: CategoryMap) -> dict[str, float]:
    """Scores keyed by the mapped taxonomy node each label resolves to (its own name when no
    node on its path is mapped). ValueError when malformed."""
    labels = data.get("ModerationLabels") if isinstance(data, Mapping) else None
    if not isinstance(labels, list):
        raise ValueError("no ModerationLabels list")
    parents = {label.get("Name"): label.get("ParentName") for label in labels
               if isinstance(label, Mapping)}
    scores: dict[str, float] = {}
    for label in labels:
        name = label.get("Name") if isinstance(label, Mapping) else None
        confidence = label.get("Confidence") if isinstance(label, Mapping) else None
        if not isinstance(name, str) or isinstance(confidence, bool) \
                or not isinstance(confidence, int | float):
            raise ValueError(f"unreadable label {label!r:.80}")
        node, seen = name, {name}
        while node not in mapping:
            parent = parents.get(node)
            if not parent or parent in seen:
                break
            seen.add(parent)
            node = parent
        key = node if mapping.get(node) else name
        scores[key] = max(scores.get(key, 0.0), min(1.0, max(0.0, confidence / 100.0)))
    return scores


def taxonomy_of(model_version: Any) -> tuple[int, str]:
    """The taxonomy an answer's `ModerationModelVersion` labels with, and how to name it in
    the trace ("7"; "7 (assumed for model 8.0)" for a version this module does not know)."""
    text = model_version if isinstance(model_version, str) else ""
    major = text.split(".", 1)[0]
    if major.isdigit() and int(major) in TAXONOMIES:
        return int(major), major
    return LATEST_TAXONOMY, f"{LATEST_TAXONOMY} (assumed for model {text or 'unnamed'})"


def assessed_labels(mapping: CategoryMap, taxonomy: int, answered: Mapping[str, float]
                    ) -> frozenset[str]:
    """The mapped labels an answer assessed: those of its taxonomy (applied to every image) and
    any it answered; a mapped label of another version assesses nothing."""
    labels = TAXONOMIES[taxonomy]
    return frozenset(name for name, targets in mapping.items()
                     if targets and (name in labels or name in answered))


class AwsRekognitionJudge(HostedJudge):
    kind = "aws-rekognition"
    defaults = DEFAULT_CATEGORIES
    reads = frozenset({"image"})
    image_limits = ImageLimits(max_bytes=5_242_880, min_side=80, max_side=10_000,
                               formats=frozenset({"image/png", "image/jpeg"}))

    def __init__(self, options: AwsRekognitionOptions) -> None:
        key_id = secret(self.kind, options.access_key_id_env)
        key = secret(self.kind, options.secret_access_key_env)
        token = secret(self.kind, options.session_token_env)
        if (key_id is None) != (key is None):
            raise ConfigError(f"judge ({self.kind}): give both access_key_id_env and "
                              "secret_access_key_env, or neither")
        super().__init__(options, default_id="aws-rekognition", secrets=(key_id, key, token))
        self.min_confidence = options.min_confidence
        redact_logs(_LOGGERS, self._secrets)
        timeout = options.timeout_s
        session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=key,
                                        aws_session_token=token, region_name=options.region)
        self._rekognition = session.client(
            "rekognition", endpoint_url=options.endpoint,
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                          connect_timeout=min(10.0, timeout), read_timeout=timeout,
                          max_pool_connections=options.max_concurrency))

    def applies_to(self, name: str) -> frozenset[str]:
        # Said without a call (coverage): every account answers with the latest model, so a
        # label only an older taxonomy has (`Drugs`) is applied to nothing
        return self.reads if name in TAXONOMIES[LATEST_TAXONOMY] else frozenset()

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> AwsRekognitionJudge:
        return cls(parse_options(AwsRekognitionOptions, cls.kind, options))

    async def read(self, item: JudgeInput) -> Reading:
        assert item.image is not None  # reads images only
        data, _, extra = await self.upload(item.image)

        async def attempt() -> dict[str, Any]:
            try:
                return await asyncio.to_thread(
                    self._rekognition.detect_moderation_labels, Image={"Bytes": data},
                    MinConfidence=self.min_confidence)
            except ClientError as exc:
                raise self._client_error(exc) from None
            except (ReadTimeoutError, ConnectTimeoutError) as exc:
                raise Transient(f"judge ({self.kind}) timed out after "
                                f"{self.options.timeout_s:g} s") from exc
            except EndpointConnectionError as exc:
                raise Transient(f"judge ({self.kind}) is unreachable") from exc
            except BotoCoreError as exc:  # no credentials, a broken connection, ...
                raise JudgeError(f"judge ({self.kind}) failed ({type(exc).__name__})",
                                 detail=str(exc), secrets=self._secrets) from None

        answer = await self.retrying(attempt)
        answer.pop("ResponseMetadata", None)
        text = orjson.dumps(answer).decode()
        try:
            scores = read_labels(answer, self.categories)
        except ValueError as exc:
            raise self.malformed(str(exc), text) from None
        version = answer.get("ModerationModelVersion")
        taxonomy, named = taxonomy_of(version)
        return Reading(scores, assessed_labels(self.categories, taxonomy, scores),
                       self.raw(text),
                       {**extra, "model_version": version, "taxonomy": named})

    def _client_error(self, exc: ClientError) -> JudgeError:
        error = exc.response.get("Error", {})
        code = identifier(error.get("Code"), self._secrets) or "error"
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = f"HTTP {status}: {code}: {error.get('Message', '')}"
        if code in _THROTTLED or status == 429 or status >= 500:
            return Transient(f"judge ({self.kind}) failed ({code}, HTTP {status})",
                             detail=detail, secrets=self._secrets)
        if code in _AUTH or status in (401, 403):
            what = "refused the guard's credentials"
        else:
            what = "rejected the request"
        return JudgeError(f"judge ({self.kind}) {what} ({code}, HTTP {status})",
                          detail=detail, secrets=self._secrets)

    async def aclose(self) -> None:
        await super().aclose()
        await asyncio.to_thread(self._rekognition.close)


__all__ = ["DEFAULT_CATEGORIES", "TAXONOMIES", "AwsRekognitionJudge", "AwsRekognitionOptions",
           "assessed_labels", "read_labels", "taxonomy_of"]
