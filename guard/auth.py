"""API keys: looked up by their sha256, each with a role and a tenant.

With no keys configured the proxy is in open mode: it binds to loopback only (the CLI refuses
anything else), accepts any key, and treats the caller as a local admin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guard.config import KeyConfig, Role, hash_key
from guard.errors import AuthenticationError, PermissionDenied


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    role: Role
    tenant: str
    policy: str | None = None
    may_choose_policy: bool = False


OPEN_PRINCIPAL = Principal(key_id="local", role="admin", tenant="default", may_choose_policy=True)


class Authenticator:
    def __init__(self, keys: Sequence[KeyConfig]) -> None:
        self._by_hash = {k.hash: k for k in keys}
        self.open_mode = not keys

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open_mode:
            return OPEN_PRINCIPAL
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        found = self._by_hash.get(hash_key(key.strip()))
        if found is None:
            # Never echo the key, not even a prefix.
            raise AuthenticationError("Incorrect API key provided.")
        return Principal(found.id, found.role, found.tenant, found.policy,
                         found.may_choose_policy)


def require(principal: Principal, *roles: Role) -> None:
    if principal.role != "admin" and principal.role not in roles:
        raise PermissionDenied(
            f"This key's role ({principal.role}) may not use this endpoint; "
            f"it needs {' or '.join(roles)}.")
