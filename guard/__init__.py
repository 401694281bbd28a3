"""SafeEdit Guard: guardrail middleware for image-generation APIs.

The public face for plugin authors (a backend, a judge, an audit or image store of their own):
the contracts and registries of `guard.plugins`, the values they take and return, the policy
they are given, and the errors they raise. Everything else is imported from its module.
"""

from guard.core.policy import Policy
from guard.core.types import (
    GeneratedImage,
    GenerationCall,
    JudgeInput,
    RoundRecord,
    Trace,
    Verdict,
)
from guard.plugins import (
    AuditStore,
    Backend,
    Covering,
    EditingBackend,
    Explanation,
    ImageStore,
    Judge,
    LabelStore,
    Preview,
    PreviewAction,
    PreviewHandler,
    PreviewingBackend,
    PurgeResult,
    Refiner,
    TracePage,
    TraceQuery,
    audit_stores,
    backends,
    build_backend,
    build_image_store,
    build_judge,
    build_store,
    image_stores,
    judges,
    profiles,
)
from guard.support.errors import (
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    ConfigError,
    GuardError,
    JudgeError,
    PolicyViolation,
    RequestError,
)
from guard.support.lifecycle import Startable
from guard.support.retry import Retrying, RetryPolicy

__all__ = [
    "AuditStore", "Backend", "BackendError", "BackendRateLimited", "BackendRejected",
    "BackendTimeout", "ConfigError", "Covering", "EditingBackend", "Explanation", "GeneratedImage",
    "GenerationCall", "GuardError", "ImageStore", "Judge", "JudgeError", "JudgeInput",
    "LabelStore", "Policy", "PolicyViolation", "Preview", "PreviewAction", "PreviewHandler",
    "PreviewingBackend", "PurgeResult", "Refiner", "RequestError",
    "RetryPolicy", "Retrying", "RoundRecord", "Startable", "Trace", "TracePage", "TraceQuery",
    "Verdict", "audit_stores", "backends", "build_backend", "build_image_store", "build_judge",
    "build_store", "image_stores", "judges", "profiles",
]
