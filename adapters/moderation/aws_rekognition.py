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
applies its whole taxonomy to every image, so a mapped category with no label in the answer is
assessed at 0.0, which means "below `min_confidence`": keep `min_confidence` under the lowest
threshold it should serve. The default map holds the level 1 and 2 names of taxonomy versions 6
and 7. Rekognition reads no text: a prompt-only item is unassessed (adapters.moderation.base).

Options (besides those of adapters.moderation.base): `region` (us-east-1), `endpoint` (null:
AWS's own), `access_key_id_env`, `secret_access_key_env`, `session_token_env` (null: boto3's
credential chain), `min_confidence` (10, percent). Images other than PNG and JPEG are
re-encoded as JPEG (Rekognition takes no WebP).
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
    # taxonomy version 6
    "Explicit Nudity": ("sexual",),
    "Graphic Violence Or Gore": ("violence", "shocking"),
    "Self Injury": ("self_harm",),
    "Drugs": ("illegal_activity",),
}
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


class AwsRekognitionJudge(HostedJudge):
    kind = "aws-rekognition"
    defaults = DEFAULT_CATEGORIES
    reads = frozenset({"image"})
    accepted_images = frozenset({"image/png", "image/jpeg"})

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
        assessed = frozenset(name for name, targets in self.categories.items() if targets)
        return Reading(scores, assessed, self.raw(text),
                       {**extra, "model_version": answer.get("ModerationModelVersion")})

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


__all__ = ["DEFAULT_CATEGORIES", "AwsRekognitionJudge", "AwsRekognitionOptions", "read_labels"]
