"""API keys: looked up by their sha256, each with a role and a tenant.

With no keys configured the proxy is in open mode: it binds to loopback only (the CLI refuses
anything else), accepts any key, and treats the caller as a local admin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guard.core.config import KeyConfig, Role, hash_key
from guard.support.errors import AuthenticationError, PermissionDenied


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    role: Role
    tenant: str
    policy: str | None = None
    may_choose_policy: bool = False


OPEN_PRINCIPAL = Principal(key_id="local", role="admin", tenant="default", may_choose_policy=True)


class Authenticator:
    """The one place a caller becomes a Principal: API keys on every route, and the key id in a
    review-page session (looked up again on each request, so removing a key ends its sessions)."""

    def __init__(self, keys: Sequence[KeyConfig]) -> None:
        self._by_hash = {k.hash: k for k in keys}
        self._by_id = {k.id: k for k in keys}
        if len(self._by_id) != len(keys):
            # The config refuses this; a second key with the same id would inherit the first's
            # sessions and role.
            raise ValueError("duplicate key ids")
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
        return _principal(found)

    def authorize(self, authorization: str | None, *roles: Role) -> Principal:
        """Authenticate and check the role: 401 without a valid key, 403 with the wrong role."""
        principal = self.authenticate(authorization)
        require(principal, *roles)
        return principal

    def by_id(self, key_id: str) -> Principal | None:
        """The principal of a key id (a session's), None when that key no longer exists."""
        if self.open_mode:
            return OPEN_PRINCIPAL if key_id == OPEN_PRINCIPAL.key_id else None
        found = self._by_id.get(key_id)
        return _principal(found) if found is not None else None


def _principal(key: KeyConfig) -> Principal:
    return Principal(key.id, key.role, key.tenant, key.policy, key.may_choose_policy)


def require(principal: Principal, *roles: Role) -> None:
    if principal.role != "admin" and principal.role not in roles:
        raise PermissionDenied(
            f"This key's role ({principal.role}) may not use this endpoint; "
            f"it needs {' or '.join(roles)}.")


def tenant_scope(principal: Principal, asked: str | None) -> str | None:
    """The tenant a listing is limited to: an admin's choice (None: all tenants); for anyone
    else their own tenant, whatever they ask for."""
    return asked if principal.role == "admin" else principal.tenant


def may_see(principal: Principal, tenant: str | None) -> bool:
    """Whether a record of `tenant` is visible to `principal`."""
    return principal.role == "admin" or tenant == principal.tenant
