"""Every contract a plugin implements, and every registry it registers in.

    Backend / EditingBackend   makes (and edits) images           registry `backends`
    PreviewingBackend          shows previews while it generates   (a Backend capability)
    Judge, Refiner             scores items; explains and refines  registry `judges`
    Covering                   says what a judge assesses, unasked (a Judge capability)
    judge profiles             prompt layout + parser per model    registry `profiles`
    AuditStore                 keeps every request's trace         registry `audit_stores`
    LabelStore                 keeps auditors' labels of traces    (an AuditStore capability)
    DashboardStore             counts a window for the dashboard   (an AuditStore capability)
    ImageStore                 bytes by sha256 with an expiry      registry `image_stores`
    UrlFetcher                 fetches a client's image URL safely registry `url_fetchers`

A registry maps a kind (the `kind:` of a config section) to a factory. The built-ins register
from one list (`BUILTINS`) through the same loader a third party uses, as "module:attribute"
strings resolved on first use, so that importing the guard imports neither torch nor litellm nor
any vendor SDK until a config asks for it. A third party registers in code
(`judges.register("mine", factory)`) or under the entry-point group of the registry
(`safeedit.backends`, `safeedit.judges`, `safeedit.judge_profiles`, `safeedit.audit_stores`,
`safeedit.image_stores`).

Capabilities beyond these contracts are declared beside their implementations and checked with
isinstance: `guard.audit.ChainedStore`, `guard.audit.ImageKeepingStore`.

Previews (`PreviewingBackend`): a backend that can show partial images while it generates
(OpenAI's streamed `partial_images`, a diffusion pipeline's intermediate steps) implements
`generate_previewed(call, on_preview)`. It calls `on_preview(Preview(index, step, image))` with
each preview as it comes and goes on generating; the engine judges the preview (verdict only)
and answers "continue" or "stop". On "stop" the backend ends that image's generation at once
(closes its stream, interrupts its pipeline) and returns None in its place. The engine
(guard.pipeline.previews) cancels the whole call itself once every image of it is stopped, and
never returns a preview unjudged: the one that stopped an image stands in for it, with the
verdict that stopped it (explained by the judge where a refined prompt is still wanted).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from guard.core.hashchain import VerifyReport
from guard.core.labels import Label, LabelPage, QueuePage, QueueQuery
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, GenerationCall, JudgeInput, Trace, Verdict
from guard.support.errors import ConfigError
from guard.support.registry import Registry

# --- backends -----------------------------------------------------------------------------------


@runtime_checkable
class Backend(Protocol):
    """Whatever makes the images. A backend's factory takes its name (its identity in routes,
    traces and metrics) and its options: `(name, options) -> Backend`."""

    name: str

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        """Make `call.n` images from `call.prompt`. Raise guard.errors.BackendError subclasses."""
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class EditingBackend(Backend, Protocol):
    """A backend that also edits images (/v1/images/edits, the policy's `refine_mode: edit`)."""

    async def edit(self, call: GenerationCall, images: list[bytes],
                   mask: bytes | None) -> list[GeneratedImage]:
        """Make `call.n` images from `images` (PNG/JPEG/WebP bytes) as `call.prompt` asks.
        `mask`: transparent where the image may change, as in OpenAI's API."""
        ...


@dataclass(frozen=True, slots=True)
class Preview:
    """A partial image of a generation still running."""

    index: int  # which image of the call, 0 .. n-1
    step: int  # the backend's own count: OpenAI's partial_image_index, a diffusion step
    image: GeneratedImage


PreviewAction = Literal["continue", "stop"]
PreviewHandler = Callable[[Preview], Awaitable[PreviewAction]]


@runtime_checkable
class PreviewingBackend(Backend, Protocol):
    """A backend that shows previews while it generates, so that an unsafe generation is
    stopped early (issue 18)."""

    def shows_previews(self, call: GenerationCall) -> bool:
        """Whether `generate_previewed` would show any previews for this call (its options
        ask for them); when false the engine calls `generate`."""
        ...

    async def generate_previewed(self, call: GenerationCall, on_preview: PreviewHandler
                                 ) -> list[GeneratedImage | None]:
        """As `generate`, calling `on_preview` with each preview as it comes (the calls may
        overlap: the generation need not wait for a verdict). An image whose handler answered
        "stop" is ended at once and is None in the result. Returns after every handler call it
        made has returned. A preview the backend cannot read is skipped; a stream it cannot
        finish falls back to the final image made without previews."""
        ...


# --- judges -------------------------------------------------------------------------------------


@runtime_checkable
class Judge(Protocol):
    """Looks at a prompt (and an image) and scores it per policy category. Factory:
    `(options) -> Judge`."""

    id: str

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        """One verdict per item, in order. Batch where the judge can; raise JudgeError on failure.

        `policy` carries the categories and thresholds, so a verdict-first judge knows whether an
        item crosses a threshold and only then spends time on reasoning and a refined prompt.
        """
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Covering(Protocol):
    """A judge that says without a call what it assesses (optional beside `Judge`)."""

    def coverage(self, policy: Policy) -> Mapping[str, set[str]]:
        """Per policy category, the inputs ("text": the prompt, "image") it assesses it on; a
        category it never assesses is absent."""
        ...


def coverage_of(judge: Judge, policy: Policy) -> dict[str, set[str]]:
    """What `judge` assesses per policy category: its `coverage` (Covering), or for a judge that
    does not say, every category on both inputs, as its verdicts are read (Verdict.coverage)."""
    if isinstance(judge, Covering):
        declared = judge.coverage(policy)
        return {c: set(declared.get(c, ())) for c in policy.categories}
    return {c: {"text", "image"} for c in policy.categories}


@dataclass(frozen=True, slots=True)
class Explanation:
    thought: str = ""
    refined_prompt: str | None = None


@runtime_checkable
class Refiner(Protocol):
    """Writes the thought and refined prompt for items other judges scored (the builtin judge is
    one; an ensemble asks its refiner)."""

    async def refine(self, items: Sequence[JudgeInput], policy: Policy,
                     scores: Sequence[Mapping[str, float]]) -> list[Explanation]:
        """For items already scored (`scores[i]` for `items[i]`), a thought and a refined prompt
        where `policy.wants_explanation(scores[i])`, an empty Explanation elsewhere."""
        ...


# --- audit stores -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceQuery:
    since: float | None = None
    until: float | None = None
    decision: str | None = None
    category: str | None = None
    tenant: str | None = None
    key_id: str | None = None
    policy_id: str | None = None
    policy_version: int | None = None
    model: str | None = None
    endpoint: str | None = None  # "/v1/images/generations" or "/v1/images/edits"
    q: str | None = None  # words of the request's prompt (guard.audit.search)
    limit: int = 50
    cursor: str | None = None  # opaque; from the previous page's next_cursor


@dataclass(frozen=True, slots=True)
class TracePage:
    items: list[dict[str, Any]]
    next_cursor: str | None


@runtime_checkable
class AuditStore(Protocol):
    """Where every request's trace is kept. Factory: `(options, images=ImageStore) -> AuditStore`
    (`images` only when the app shares an image store)."""

    async def write(self, trace: Trace) -> Trace:
        """Seal the trace into the chain (prev_hash, hash) and store it durably."""
        ...

    async def get(self, trace_id: str) -> Trace | None: ...

    async def query(self, q: TraceQuery) -> TracePage: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class LabelStore(Protocol):
    """An audit store that keeps auditors' labels of its traces (guard.core.labels) in a chain of
    their own, and the review queue (a capability, checked with isinstance)."""

    async def add_label(self, label: Label) -> Label:
        """Append the label to the label chain, after checking that its item was judged in
        the trace (a RequestError naming `slot` or `round` if not; NotFound without the
        trace); its tenant is the trace's. Returns the sealed label."""
        ...

    async def labels(self, *, trace_id: str | None = None, tenant: str | None = None,
                     verdict: str | None = None, category: str | None = None,
                     since: float | None = None, until: float | None = None,
                     latest_only: bool = True, limit: int = 50,
                     cursor: str | None = None) -> LabelPage:
        """Labels, newest first; with `latest_only`, only each item's latest label."""
        ...

    async def review_queue(self, q: QueueQuery) -> QueuePage: ...

    async def verify_labels(self) -> VerifyReport: ...


@dataclass(frozen=True, slots=True)
class WindowFigures:
    """The dashboard's counts of a window (guard.review.dashboard), as a DashboardStore makes
    them. Of each trace: its decision, its rounds that made images (`Trace.round_count`), its
    policy, its duration; of each round record, the judge's time where it judged images and the
    backend's where the call made images (not a call that failed without any); of each judged
    item, one flag per flagged category with the item's action. The latency percentiles of a
    long window may come from an even sample of its traces (the SQL stores: at most 10,000)."""

    over_time: Mapping[tuple[int, str], int]  # (bucket start, decision) -> requests
    rounds: Mapping[int, int]  # rounds that made images -> requests
    flags: Mapping[tuple[str, str], int]  # (category, action) -> flags
    policies: Mapping[tuple[str | None, int | None, str], int]  # (id, version, decision) -> n
    # "request", "judge", "backend" -> percentile -> ms, by nearest rank (none: no values)
    latency_ms: Mapping[str, Mapping[int, float]]


@runtime_checkable
class DashboardStore(Protocol):
    """An audit store that counts a window's figures itself, in its database, so that the
    dashboard's cost does not grow with the window (a capability, checked with isinstance;
    without it the dashboard reads a bounded number of traces and counts them)."""

    async def figures(self, q: TraceQuery, bucket_s: int,
                      percentiles: Sequence[int]) -> WindowFigures:
        """The counts of the traces `q` filters (not its limit or cursor), requests counted
        per `bucket_s` seconds from the epoch (bucket start = created_at rounded down)."""
        ...


# --- image stores -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurgeResult:
    removed: int
    freed_bytes: int
    kept: int


@runtime_checkable
class ImageStore(Protocol):
    """Image bytes by sha256, each copy with an expiry (links and retained images). Factory:
    `(options) -> ImageStore`."""

    async def put(self, data: bytes, media_type: str, ttl_s: float | None) -> str:
        """Store `data` under its sha256 (the returned id). Storing it again restarts its age
        and keeps the later of the two expiries; `ttl_s` None = until purged by age."""
        ...

    async def get(self, image_id: str, now: float | None = None) -> tuple[str, bytes] | None:
        """(media type, bytes); None when unknown, purged or expired (or not an id at all)."""
        ...

    async def has(self, image_id: str, now: float | None = None) -> bool: ...

    async def purge(self, before: float, *, stored_before: float | None = None,
                    dry_run: bool = False) -> PurgeResult:
        """Delete copies that expire before `before`, and those last stored before
        `stored_before` when given."""
        ...

    async def shared_secret(self) -> bytes:
        """A random key kept in the store, the same for every process that uses it."""
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


# --- image URLs a client names -----------------------------------------------------------------


@runtime_checkable
class UrlFetcher(Protocol):
    """Fetches an image a client names by URL (a moderation's `image_url`), as carefully as a
    backend's image links are fetched. Factory: `(options) -> UrlFetcher`."""

    async def fetch_image(self, url: str, param: str) -> GeneratedImage:
        """The checked image; a RequestError naming `param` when the URL may not or cannot be
        used (a host not allowed, a non-public address, not an image, too large)."""
        ...

    async def aclose(self) -> None: ...


# --- the registries and the built-ins -----------------------------------------------------------

backends: Registry[Backend] = Registry("backend", "safeedit.backends")
judges: Registry[Judge] = Registry("judge", "safeedit.judges")
profiles: Registry[Any] = Registry("judge profile", "safeedit.judge_profiles")
audit_stores: Registry[AuditStore] = Registry("audit store", "safeedit.audit_stores")
image_stores: Registry[ImageStore] = Registry("image store", "safeedit.image_stores")
url_fetchers: Registry[UrlFetcher] = Registry("image URL fetcher", "safeedit.url_fetchers")

BUILTINS: dict[Registry[Any], dict[str, str]] = {
    backends: {
        "demo": "adapters.demo:DemoBackend.from_config",
        "openai-compatible": "adapters.openai_compat:OpenAICompatBackend.from_config",
        "litellm": "adapters.litellm_backend:LiteLLMBackend.from_config",
        "diffusers": "adapters.diffusers_backend:DiffusersBackend.from_config",
    },
    judges: {
        "builtin": "guard.judges.builtin:BuiltinJudge.from_config",
        "vlm": "guard.judges.vlm:VLMJudge.from_config",
        "remote": "guard.judges.remote:RemoteJudge.from_config",
        "ensemble": "guard.judges.composite:EnsembleJudge.from_config",
        "cascade": "guard.judges.composite:CascadeJudge.from_config",
        "openai-moderation":
            "adapters.moderation.openai_moderation:OpenAIModerationJudge.from_config",
        "azure-content-safety":
            "adapters.moderation.azure_content_safety:AzureContentSafetyJudge.from_config",
        "google-safesearch":
            "adapters.moderation.google_safesearch:GoogleSafeSearchJudge.from_config",
        "aws-rekognition": "adapters.moderation.aws_rekognition:AwsRekognitionJudge.from_config",
    },
    profiles: {
        "safeeditor": "guard.judges.profiles.safeeditor:SafeEditorProfile",
        "ipr": "guard.judges.profiles.ipr:IPRProfile",
        "llavaguard": "guard.judges.profiles.llavaguard:LlavaGuardProfile",
        "shieldgemma2": "guard.judges.profiles.shieldgemma2:ShieldGemma2Profile",
    },
    audit_stores: {
        "sqlite": "guard.audit.sqlite:SQLiteStore.from_config",
        "postgres": "guard.audit.postgres:PostgresStore.from_config",
    },
    image_stores: {
        "local": "guard.imagestore.local:LocalImageStore.from_config",
        "postgres": "guard.imagestore.postgres:PostgresImageStore.from_config",
        "s3": "adapters.imagestore_s3:S3ImageStore.from_config",
    },
    url_fetchers: {"safe": "adapters.input_urls:InputImageFetcher.from_config"},
}
for _registry, _kinds in BUILTINS.items():
    for _kind, _target in _kinds.items():
        _registry.register(_kind, _target)


def build_backend(name: str, options: Mapping[str, Any]) -> Backend:
    """The backend a `backends:` entry describes: `{kind: ..., **kind-specific options}`."""
    opts = dict(options)
    return backends.create(opts.pop("kind"), name, opts)


def build_judge(options: Mapping[str, Any]) -> Judge:
    """The judge a config section describes: `{kind: ..., **kind-specific options}`."""
    opts = dict(options)
    return judges.create(opts.pop("kind", "builtin"), opts)


def build_store(options: Mapping[str, Any], images: ImageStore | None = None) -> AuditStore:
    """The audit store `options` name. `images`, the app's shared image store, goes to the store's
    `from_config(options, images=...)` when given (where it keeps retained images)."""
    opts = dict(options)
    kind = opts.pop("kind", "sqlite")
    return (audit_stores.create(kind, opts) if images is None
            else audit_stores.create(kind, opts, images=images))


LINK_OPTIONS = ("link_ttl_s", "link_key_env", "link_keys_env")


def resolve_image_store(section: Mapping[str, Any] | None,
                    audit: Mapping[str, Any]) -> dict[str, Any]:
    """The `image_store:` section, its kind filled in from `audit:` when it names none."""
    options = dict(section or {})
    images_dir = audit.get("images_dir")
    if "kind" in options:
        if images_dir is not None:
            raise ConfigError("image_store names a kind and audit names an images_dir: both say "
                              "where images go; keep one")
        return options
    if audit.get("kind") == "postgres" and images_dir is None:
        follow = {name: audit[name] for name in ("dsn", "dsn_env", "schema") if name in audit}
        return {"kind": "postgres", **follow, **options}
    if images_dir is None:
        images_dir = (Path(audit.get("path", "var/audit.db")).parent / "images"
                      if audit.get("kind", "sqlite") == "sqlite" else Path("var/images"))
    return {"kind": "local", "path": str(images_dir), **options}


def build_image_store(options: Mapping[str, Any]) -> ImageStore:
    """The store a resolved section names (its link options are guard.pipeline.links' to read)."""
    opts = {name: value for name, value in options.items() if name not in LINK_OPTIONS}
    return image_stores.create(opts.pop("kind", "local"), opts)


def build_url_fetcher(options: Mapping[str, Any]) -> UrlFetcher:
    """The fetcher for image URLs a client sends (`moderations.image_urls`)."""
    opts = dict(options)
    return url_fetchers.create(opts.pop("kind", "safe"), opts)
