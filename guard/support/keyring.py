"""Named secret keys from the environment: `kid:secret,kid:secret` (the first signs, every one
verifies, so a key can be rotated without breaking what the old one signed) or one secret alone.

Shared by the audit log's checkpoint keys (`checkpoint_keys_env` / `checkpoint_key_env`) and the
image links' keys (`link_keys_env` / `link_key_env`). An error never echoes a value: it may hold
a secret.
"""

from __future__ import annotations

import os
import re

from guard.support.errors import ConfigError

KID = re.compile(r"[A-Za-z0-9._-]{1,32}")


def keyring_from_env(section: str, *, keys_env: str | None, key_env: str | None,
                     keys_option: str, key_option: str) -> dict[str, bytes] | None:
    """The keys the variable `keys_env` (`kid:secret,...`) holds, or the one key of `key_env` under
    the kid "" (the caller derives its kid); None when neither option is given.
    A named but unset variable is a ConfigError: signing would silently stop otherwise."""
    if keys_env and key_env:
        raise ConfigError(f"{section}: give {keys_option} or {key_option}, not both")
    env_name = keys_env or key_env
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"{section}: {keys_option if keys_env else key_option} names "
                          f"{env_name}, which is not set")
    if key_env:
        return {"": value.encode()}
    keys: dict[str, bytes] = {}
    for entry in value.split(","):
        kid, sep, secret = entry.strip().partition(":")
        if not sep or not secret:
            raise ConfigError(f"{section}: {env_name} must hold kid:secret pairs separated by "
                              "commas")
        if kid in keys:
            raise ConfigError(f"{section}: {env_name} names key id {kid!r} twice")
        if not KID.fullmatch(kid):
            raise ConfigError(f"{section}: key id {kid!r} in {env_name} is not 1-32 of "
                              "[A-Za-z0-9._-]")
        keys[kid] = secret.encode()
    return keys
