"""Credentials beyond keys, where the services expect them: Microsoft Entra ID tokens for Azure
Content Safety (azure-identity), application default credentials and service accounts for
Cloud Vision (google-auth). Both libraries are optional (`pip install safeedit-guard[cloud]`);
AWS keeps boto3's own credential chain.

    judge: {kind: azure-content-safety, endpoint: ..., auth: entra}
        DefaultAzureCredential (environment, workload identity, managed identity, Azure CLI...),
        or the credential object given to the judge; the token is asked for
        `https://cognitiveservices.azure.com/.default` and sent as `Authorization: Bearer`.
    judge: {kind: google-safesearch, auth: adc}                       google.auth.default()
    judge: {kind: google-safesearch, auth: service_account, credentials_file: sa.json}
        scope `https://www.googleapis.com/auth/cloud-vision`; `quota_project` (null) is sent
        as `x-goog-user-project`.

A token is fetched in a worker thread (both libraries block), kept until five minutes before it
expires, and never written to a trace, a log line or an error: each token joins the judge's
secrets that every error's detail is redacted of.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from typing import Any

from guard.support.errors import ConfigError, JudgeError

AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"
VISION_SCOPE = "https://www.googleapis.com/auth/cloud-vision"
REFRESH_BEFORE_S = 300.0


class BearerToken:
    """A bearer token from a credential, fetched when there is none or it is about to expire."""

    def __init__(self, what: str, fetch: Callable[[], tuple[str, float | None]],
                 remember: Callable[[str], None]) -> None:
        self.what = what
        self._fetch = fetch          # blocking: (token, expires at as a Unix time or None)
        self._remember = remember    # a new token joins the judge's secrets
        self._token: str | None = None
        self._expires: float | None = None
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self._token is not None and (
            self._expires is None or self._expires - time.time() > REFRESH_BEFORE_S)

    async def headers(self) -> dict[str, str]:
        async with self._lock:
            if not self._fresh():
                try:
                    token, expires = await asyncio.to_thread(self._fetch)
                except Exception as exc:  # noqa: BLE001 - any credential failure is the judge's
                    raise JudgeError(f"{self.what} could not get a token "
                                     f"({type(exc).__name__})") from None
                self._remember(token)
                self._token, self._expires = token, expires
            assert self._token is not None
            return {"authorization": f"Bearer {self._token}"}


def azure_entra(kind: str, credential: Any | None, scope: str,
                remember: Callable[[str], None]) -> BearerToken:
    """Entra ID tokens from `credential` (an azure.core TokenCredential), by default
    azure.identity's DefaultAzureCredential."""
    if credential is None:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError as exc:
            raise ConfigError(f"judge ({kind}): auth: entra needs azure-identity "
                              "(pip install 'safeedit-guard[cloud]')") from exc
        credential = DefaultAzureCredential()

    def fetch() -> tuple[str, float | None]:
        access = credential.get_token(scope)
        return access.token, float(access.expires_on)

    return BearerToken(f"judge ({kind}) (Entra ID)", fetch, remember)


def google_credentials(kind: str, auth: str, credentials: Any | None,
                       credentials_file: str | None, quota_project: str | None,
                       remember: Callable[[str], None]) -> tuple[BearerToken, dict[str, str]]:
    """Google OAuth tokens from `credentials` (google.auth credentials), by default the
    application default credentials or the service account file; and the fixed headers."""
    try:
        import google.auth
        import google.auth.exceptions
        from google.auth.transport.requests import Request
    except ImportError as exc:
        raise ConfigError(f"judge ({kind}): auth: {auth} needs google-auth "
                          "(pip install 'safeedit-guard[cloud]')") from exc
    if credentials is None:
        if auth == "service_account":
            if not credentials_file:
                raise ConfigError(f"judge ({kind}): auth: service_account needs "
                                  "credentials_file")
            from google.oauth2 import service_account

            credentials = service_account.Credentials.from_service_account_file(
                credentials_file, scopes=[VISION_SCOPE])
        else:
            try:
                credentials, _ = google.auth.default(scopes=[VISION_SCOPE])
            except google.auth.exceptions.DefaultCredentialsError as exc:
                raise ConfigError(f"judge ({kind}): no application default credentials "
                                  f"({exc})") from None

    def fetch() -> tuple[str, float | None]:
        if not credentials.valid:
            credentials.refresh(Request())
        expiry = getattr(credentials, "expiry", None)  # a naive UTC datetime, or None
        expires = expiry.replace(tzinfo=datetime.UTC).timestamp() if expiry is not None \
            else None
        return str(credentials.token), expires

    fixed = {"x-goog-user-project": quota_project} if quota_project else {}
    return BearerToken(f"judge ({kind}) (Google credentials)", fetch, remember), fixed


__all__ = ["AZURE_SCOPE", "VISION_SCOPE", "BearerToken", "azure_entra", "google_credentials"]
