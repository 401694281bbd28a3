"""Credentials beyond keys (adapters/moderation/auth.py), through the real libraries' objects
against a local server that speaks the services' APIs: an azure.core TokenCredential giving
azure.core AccessTokens for Azure Content Safety, and google-auth's OAuth2 Credentials, refreshed
by google-auth itself against a local token endpoint, for Cloud Vision."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from google.oauth2.credentials import Credentials
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.moderation.auth import AZURE_SCOPE
from adapters.moderation.azure_content_safety import (
    AzureContentSafetyJudge,
    AzureContentSafetyOptions,
)
from adapters.moderation.google_safesearch import GoogleSafeSearchJudge, GoogleSafeSearchOptions
from guard.core.policy import Policy
from guard.core.types import GeneratedImage, JudgeInput
from guard.plugins import build_judge
from guard.support.errors import ConfigError, JudgeError
from tests.servers import serve

POLICY = Policy.model_validate({"id": "t", "version": 1, "categories": {
    "sexual": {"threshold": 0.5, "action": "refuse"},
    "violence": {"threshold": 0.5, "action": "edit"}}})


def image_item() -> JudgeInput:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), "red").save(buf, "PNG")
    return JudgeInput(prompt="a lighthouse", original_prompt="a lighthouse",
                      image=GeneratedImage(data=buf.getvalue()))


class Cloud:
    """Azure's image:analyze, Vision's images:annotate and an OAuth token endpoint: each
    answers only a request with the bearer token the token endpoint (or the test) issued."""

    def __init__(self) -> None:
        self.valid: set[str] = {"entra-token-1", "entra-token-2", "ya29.static"}
        self.auth: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.token_requests: list[dict[str, str]] = []

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/contentsafety/image:analyze", self.azure, methods=["POST"]),
            Route("/v1/images:annotate", self.google, methods=["POST"]),
            Route("/token", self.token, methods=["POST"])])

    def _authorized(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        self.auth.append(auth)
        self.headers.append(dict(request.headers))
        return auth.removeprefix("Bearer ") in self.valid

    async def azure(self, request: Request) -> Response:
        await request.json()
        if not self._authorized(request) or "ocp-apim-subscription-key" in request.headers:
            return JSONResponse({"error": {"code": "PermissionDenied",
                                           "message": "Principal does not have access"}}, 401)
        return JSONResponse({"categoriesAnalysis": [{"category": "Violence", "severity": 4},
                                                    {"category": "Sexual", "severity": 0}]})

    async def google(self, request: Request) -> Response:
        await request.json()
        if not self._authorized(request) or "x-goog-api-key" in request.headers:
            return JSONResponse({"error": {"code": 401, "status": "UNAUTHENTICATED",
                                           "message": "Request had invalid credentials."}}, 401)
        return JSONResponse({"responses": [{"safeSearchAnnotation": {
            "adult": "VERY_UNLIKELY", "violence": "LIKELY"}}]})

    async def token(self, request: Request) -> Response:
        form = dict(await request.form())
        self.token_requests.append({k: str(v) for k, v in form.items()})
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != "1//r":
            return JSONResponse({"error": "invalid_grant"}, 400)
        fresh = f"ya29.fresh-{len(self.token_requests)}"
        self.valid.add(fresh)
        return JSONResponse({"access_token": fresh, "expires_in": 3600, "token_type": "Bearer"})


@pytest.fixture(scope="module")
def cloud_url() -> Iterator[tuple[Cloud, str]]:
    cloud = Cloud()
    with serve(cloud.app()) as url:
        yield cloud, url


@pytest.fixture
def cloud(cloud_url: tuple[Cloud, str]) -> tuple[Cloud, str]:
    state, url = cloud_url
    state.auth.clear()
    state.headers.clear()
    state.token_requests.clear()
    return state, url


class StaticEntra:
    """azure.core's TokenCredential protocol: `get_token(*scopes)` -> AccessToken."""

    def __init__(self, tokens: list[str], lifetime_s: int = 3600) -> None:
        self.tokens = tokens
        self.lifetime_s = lifetime_s
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        if not self.tokens:
            raise ClientAuthenticationError("AADSTS7000215: Invalid client secret provided.")
        return AccessToken(self.tokens.pop(0), int(time.time()) + self.lifetime_s)


async def test_azure_with_an_entra_id_token(cloud: tuple[Cloud, str]) -> None:
    state, url = cloud
    credential = StaticEntra(["entra-token-1"])
    judge = AzureContentSafetyJudge(AzureContentSafetyOptions(endpoint=url, auth="entra"),
                                    credential=credential)
    try:
        first, second = await judge.judge([image_item(), image_item()], POLICY)
    finally:
        await judge.aclose()
    assert state.auth == ["Bearer entra-token-1"] * 2  # one token, kept while it is fresh
    assert credential.scopes == [(AZURE_SCOPE,)]
    assert first.scores["violence"] == pytest.approx(4 / 6) == second.scores["violence"]


async def test_an_entra_token_about_to_expire_is_fetched_again(cloud: tuple[Cloud, str]
                                                               ) -> None:
    state, url = cloud
    credential = StaticEntra(["entra-token-1", "entra-token-2"], lifetime_s=120)
    judge = AzureContentSafetyJudge(AzureContentSafetyOptions(endpoint=url, auth="entra"),
                                    credential=credential)
    try:
        await judge.judge([image_item()], POLICY)
        await judge.judge([image_item()], POLICY)
        with pytest.raises(JudgeError, match="could not get a token") as err:
            await judge.judge([image_item()], POLICY)  # the credential has none left
    finally:
        await judge.aclose()
    assert state.auth == ["Bearer entra-token-1", "Bearer entra-token-2"]
    assert "AADSTS" not in str(err.value) and "entra-token" not in str(err.value.detail)


def test_entra_and_a_key_are_not_both_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CS_KEY", "k")
    with pytest.raises(ConfigError, match="drop api_key_env"):
        build_judge({"kind": "azure-content-safety", "endpoint": "http://x", "auth": "entra",
                     "api_key_env": "CS_KEY"})


async def test_google_with_oauth_credentials(cloud: tuple[Cloud, str]) -> None:
    state, url = cloud
    judge = GoogleSafeSearchJudge(
        GoogleSafeSearchOptions(api_base=url + "/v1", auth="adc", quota_project="my-project"),
        credentials=Credentials(token="ya29.static"))
    try:
        [verdict] = await judge.judge([image_item()], POLICY)
    finally:
        await judge.aclose()
    assert state.auth == ["Bearer ya29.static"] and verdict.scores["violence"] == 0.75
    assert state.headers[0]["x-goog-user-project"] == "my-project"


async def test_google_credentials_are_refreshed_by_google_auth(cloud: tuple[Cloud, str]
                                                                ) -> None:
    state, url = cloud
    # no token yet: google-auth refreshes it at the token endpoint, as for a user's ADC
    credentials = Credentials(token=None, refresh_token="1//r", token_uri=url + "/token",
                              client_id="client.apps.googleusercontent.com",
                              client_secret="client-secret")
    judge = GoogleSafeSearchJudge(GoogleSafeSearchOptions(api_base=url + "/v1", auth="adc"),
                                  credentials=credentials)
    try:
        await judge.judge([image_item(), image_item()], POLICY)
    finally:
        await judge.aclose()
    assert len(state.token_requests) == 1
    assert state.token_requests[0]["client_secret"] == "client-secret"
    assert state.auth == ["Bearer ya29.fresh-1"] * 2


def test_a_service_account_needs_its_file() -> None:
    with pytest.raises(ConfigError, match="credentials_file"):
        build_judge({"kind": "google-safesearch", "auth": "service_account"})
