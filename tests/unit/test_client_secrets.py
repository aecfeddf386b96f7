"""Ephemeral client secrets and the playground's key route, in process (no models are loaded).

The store is checked with a fake clock; the routes through Starlette's TestClient with the speech
stages off, so nothing here needs a model or a network.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.realtime import ClientSecretCreateResponse
from pydantic import TypeAdapter

from openrealtime.api.app import create_app
from openrealtime.api.client_secrets import (
    ClientSecret,
    ClientSecrets,
    MemoryClientSecretStore,
    StoreFull,
    secret_digest,
    starting_session,
)
from openrealtime.api.errors import APIError
from openrealtime.config import Settings

KEY = "sk-unit-real"
LOCAL = ("127.0.0.1", 50000)
_RESPONSE = TypeAdapter(ClientSecretCreateResponse)


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = dict(api_keys=[KEY], vad_enabled=False, stt_enabled=False, tts_enabled=False,
                                llm_model="smollm2-135m")
    return Settings(**{**base, **kw})


@pytest.fixture
def app():
    return create_app(settings())


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app, base_url="http://127.0.0.1:8000", client=LOCAL) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def mint(client: TestClient, body: dict[str, Any] | None = None) -> dict[str, Any]:
    r = client.post("/v1/realtime/client_secrets", json=body or {}, headers=bearer(KEY))
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r, status: int, code: str | None = None, param: str | None = "any") -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param != "any":
        assert error["param"] == param, error
    return error


# ----------------------------------------------------------------------------- the store


async def test_store_keeps_expired_secrets_for_a_grace_period_then_purges():
    clock = Clock()
    store = MemoryClientSecretStore(grace_s=100, purge_every_s=10, clock=clock)
    secret = ClientSecret(secret_digest("ek_a"), int(clock.t), int(clock.t) + 60)
    await store.add(secret)
    assert await store.get(secret.digest) == secret
    assert await store.get(secret_digest("ek_b")) is None
    clock.t += 61  # expired, but still known (so users hear "expired", not "unknown")
    assert await store.get(secret.digest) == secret and secret.expired(clock.t)
    clock.t += 100  # past the grace period: purged on the next periodic purge
    assert await store.get(secret.digest) is None
    assert len(store) == 0


async def test_store_is_bounded_and_makes_room_from_expired_secrets():
    clock = Clock()
    store = MemoryClientSecretStore(max_entries=2, grace_s=3600, clock=clock)
    await store.add(ClientSecret("a", 0, int(clock.t) + 10))
    await store.add(ClientSecret("b", 0, int(clock.t) + 1000))
    with pytest.raises(StoreFull):
        await store.add(ClientSecret("c", 0, int(clock.t) + 1000))
    clock.t += 11  # "a" expired: a full store drops expired secrets even within the grace period
    await store.add(ClientSecret("c", 0, int(clock.t) + 1000))
    assert await store.get("a") is None and await store.get("c") is not None


async def test_service_mints_hashed_values_and_resolves_them():
    clock = Clock()
    store = MemoryClientSecretStore(clock=clock)
    service = ClientSecrets(store, ttl_s=600, clock=clock)
    value, secret = await service.mint({"instructions": "x", "id": "sess_ignored", "expires_at": 1})
    assert value.startswith("ek_") and len(value) > 40
    assert secret.digest == secret_digest(value) and value not in secret.to_json()  # only the hash is kept
    assert secret.expires_at == int(clock.t) + 600
    assert secret.session == {"instructions": "x"}  # read-only fields are not carried
    assert ClientSecret.from_json(secret.to_json()) == secret
    assert await service.resolve(value) == secret
    _, short = await service.mint(None, seconds=10, account="key:abc")
    assert short.expires_at == int(clock.t) + 10 and short.session is None
    assert short.account == "key:abc" and ClientSecret.from_json(short.to_json()) == short

    with pytest.raises(APIError) as unknown:
        await service.resolve("ek_" + "0" * 48)
    assert unknown.value.status == 401 and unknown.value.code == "invalid_api_key"
    clock.t += 600
    with pytest.raises(APIError) as expired:
        await service.resolve(value)
    assert expired.value.status == 401 and expired.value.code == "expired_api_key"
    assert "expired" in expired.value.message


async def test_service_refuses_when_the_store_is_full():
    service = ClientSecrets(MemoryClientSecretStore(max_entries=1), ttl_s=600)
    await service.mint()
    with pytest.raises(APIError) as full:
        await service.mint()
    assert full.value.status == 429


def test_starting_session_layers_the_secret_under_the_request():
    secret = ClientSecret("d", 0, 10, {"instructions": "from ek", "model": "m-ek",
                                       "audio": {"output": {"voice": "joe"}, "input": {"turn_detection": None}}})
    session, model = starting_session(secret, {"audio": {"output": {"speed": 1.2}}}, None)
    assert session == {"instructions": "from ek", "model": "m-ek",
                       "audio": {"output": {"voice": "joe", "speed": 1.2}, "input": {"turn_detection": None}}}
    assert model == "m-ek"
    _, model = starting_session(secret, None, "m-query")  # ?model= beats the ek's model
    assert model == "m-query"
    _, model = starting_session(secret, {"model": "m-body"}, "m-query")
    assert model == "m-body"
    assert starting_session(None, {"a": 1}, "m") == ({"a": 1}, "m")


# ----------------------------------------------------------------------------- the endpoint


def test_response_has_the_hosted_api_shape(client: TestClient):
    before = int(time.time())
    body = mint(client, {"expires_after": {"anchor": "created_at", "seconds": 120},
                         "session": {"type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"]}})
    parsed = _RESPONSE.validate_python(body, strict=True)
    assert parsed.value.startswith("ek_")
    assert before + 120 <= parsed.expires_at <= int(time.time()) + 120
    assert body["session"]["type"] == "realtime" and body["session"]["instructions"] == "Be brief."
    default = mint(client)
    _RESPONSE.validate_python(default, strict=True)
    assert default["expires_at"] - int(time.time()) in range(595, 601)  # client_secret_ttl_s


def test_a_transcription_session_secret(client: TestClient):
    body = mint(client, {"session": {
        "type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}})
    parsed = _RESPONSE.validate_python(body, strict=True)
    assert parsed.session.type == "transcription"
    assert body["session"]["object"] == "realtime.transcription_session"
    assert "instructions" not in body["session"]


@pytest.mark.parametrize(("body", "param"), [
    ({"expires_after": {"seconds": 5}}, "expires_after.seconds"),
    ({"expires_after": {"seconds": 7201}}, "expires_after.seconds"),
    ({"expires_after": {"anchor": "now", "seconds": 60}}, "expires_after.anchor"),
    ({"expire_after": {}}, "expire_after"),
    ({"session": {"type": "translation"}}, "session.type"),
    ({"session": {"type": "transcription", "instructions": "x"}}, "session.instructions"),
    ({"session": {"audio": {"output": {"speed": 9}}}}, "session.audio.output.speed"),
    ({"session": {"instructionz": "x"}}, "session.instructionz"),
    ({"session": "text"}, "session"),
])
def test_bad_requests_are_400_with_param(client: TestClient, body: dict[str, Any], param: str):
    r = client.post("/v1/realtime/client_secrets", json=body, headers=bearer(KEY))
    assert_error(r, 400, param=param)


def test_minting_needs_a_real_key(client: TestClient):
    assert_error(client.post("/v1/realtime/client_secrets"), 401, "missing_api_key")
    assert_error(client.post("/v1/realtime/client_secrets", headers=bearer("sk-wrong")), 401, "invalid_api_key")
    ek = mint(client)["value"]
    # An ephemeral key cannot mint another one, nor use the rest of the API.
    assert_error(client.post("/v1/realtime/client_secrets", headers=bearer(ek)), 403, "ephemeral_key_not_allowed")
    for path in ("/v1/models", "/v1/voices"):
        assert_error(client.get(path, headers=bearer(ek)), 403, "ephemeral_key_not_allowed")


def test_ephemeral_key_scope(client: TestClient):
    ek = mint(client)["value"]
    # Accepted where a session is created: the bad offer is judged, so auth passed.
    r = client.post("/v1/realtime/calls", content="v=0\r\n", headers={**bearer(ek), "Content-Type": "application/sdp"})
    assert_error(r, 400, "invalid_offer")
    assert client.get("/v1/realtime/ice-servers", headers=bearer(ek)).status_code == 200
    # Hangup only for its own calls; others look absent.
    assert_error(client.post("/v1/realtime/calls/rtc_someone_else/hangup", headers=bearer(ek)), 404, "call_not_found")
    # Basic auth and the WebSocket subprotocol carry it too.
    r = client.post("/v1/realtime/calls", content="v=0\r\n",
                    headers={"Authorization": f"Basic {ek}", "Content-Type": "application/sdp"})
    assert_error(r, 400, "invalid_offer")
    r = client.post("/v1/realtime/calls", content="v=0\r\n",
                    headers={**bearer("ek_unknown"), "Content-Type": "application/sdp"})
    assert_error(r, 401, "invalid_api_key")


def test_expired_key_is_rejected_with_a_clear_message(app, client: TestClient):
    clock = Clock(time.time())
    app.state.client_secrets = ClientSecrets(MemoryClientSecretStore(clock=clock), ttl_s=600, clock=clock)
    ek = mint(client, {"expires_after": {"anchor": "created_at", "seconds": 10}})["value"]
    clock.t += 11
    error = assert_error(client.post("/v1/realtime/calls", content="v=0\r\n",
                                     headers={**bearer(ek), "Content-Type": "application/sdp"}), 401, "expired_api_key")
    assert "expired" in error["message"]
    from starlette.websockets import WebSocketDisconnect
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/v1/realtime", subprotocols=["realtime", f"openai-insecure-api-key.{ek}"]):
            pass


def test_websocket_session_starts_from_the_ek_session(client: TestClient):
    ek = mint(client, {"session": {"type": "realtime", "instructions": "From the ek.", "temperature": 0.5}})["value"]
    with client.websocket_connect("/v1/realtime", subprotocols=["realtime", f"openai-insecure-api-key.{ek}"]) as ws:
        created = ws.receive_json()
    assert created["type"] == "session.created"
    assert created["session"]["instructions"] == "From the ek." and created["session"]["temperature"] == 0.5


def test_transcription_ek_and_intent_open_transcription_sessions(client: TestClient):
    ek = mint(client, {"session": {"type": "transcription", "include": ["item.input_audio_transcription.logprobs"]}})
    # ?model= does not leak into a transcription session (it has no model).
    with client.websocket_connect("/v1/realtime?model=gpt-realtime",
                                  subprotocols=["realtime", f"openai-insecure-api-key.{ek['value']}"]) as ws:
        created = ws.receive_json()
    assert created["session"]["type"] == "transcription"
    assert created["session"]["include"] == ["item.input_audio_transcription.logprobs"]
    with client.websocket_connect("/v1/realtime?intent=transcription", headers=bearer(KEY)) as ws:
        created = ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"type": "realtime", "instructions": "x"}})
        error = ws.receive_json()
    assert created["session"]["object"] == "realtime.transcription_session"
    assert error["type"] == "error" and error["error"]["param"] == "session.type"
    from starlette.websockets import WebSocketDisconnect
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/v1/realtime?intent=translation", headers=bearer(KEY)):
            pass


def test_open_server_still_scopes_ephemeral_keys():
    app = create_app(settings(api_keys=[]))
    with TestClient(app, base_url="http://127.0.0.1:8000", client=LOCAL) as c:
        assert c.get("/v1/models").status_code == 200
        ek = mint(c)["value"]
        assert_error(c.get("/v1/models", headers=bearer(ek)), 403, "ephemeral_key_not_allowed")


# ----------------------------------------------------------------------------- the playground


def test_page_is_static_and_locked_down(client: TestClient):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert KEY not in r.text and "ek_" not in r.text.replace("ek_…", "")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/playground/static/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and KEY not in r.text
        assert r.headers["content-security-policy"] == csp
    assert client.get("/playground/static/nope.js").status_code == 404


def test_loopback_mode_mints_for_local_same_origin_requests(client: TestClient):
    config = client.get("/playground/config").json()
    assert config["mode"] == "loopback" and config["can_mint"] is True and "models" in config
    r = client.post("/playground/session", json={}, headers={"Origin": "http://127.0.0.1:8000",
                                                             "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200, r.text
    _RESPONSE.validate_python(r.json(), strict=True)
    ek = r.json()["value"]
    assert_error(client.get("/v1/models", headers=bearer(ek)), 403)
    # The page's keys share one rate-limit account; keys minted through the API count against the key.
    store = client.app.state.client_secrets.store  # type: ignore[attr-defined]
    assert store._by_digest[secret_digest(ek)].account == "playground"
    r = client.post("/v1/realtime/client_secrets", json={}, headers=bearer(KEY))
    account = store._by_digest[secret_digest(r.json()["value"])].account
    assert account and account.startswith("key:") and KEY not in account


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},  # another site, through the visitor's browser
    {"Sec-Fetch-Site": "cross-site"},
    {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"},  # DNS rebinding
    {"X-Forwarded-For": "203.0.113.9"},  # a reverse proxy on this machine
    {"Forwarded": "for=203.0.113.9"},
])
def test_loopback_mode_refuses_foreign_requests(client: TestClient, headers: dict[str, str]):
    assert_error(client.post("/playground/session", json={}, headers=headers), 403)


def test_loopback_mode_refuses_remote_clients(app):
    with TestClient(app, base_url="http://127.0.0.1:8000", client=("203.0.113.9", 40000)) as c:
        config = c.get("/playground/config").json()
        assert config["can_mint"] is False and "models" not in config and config["reason"]
        assert_error(c.post("/playground/session", json={}), 403, "playground_key_refused")


def test_token_mode():
    app = create_app(settings(playground_mode="token", playground_token="let-me-in"))
    with TestClient(app, base_url="http://demo.example", client=("203.0.113.9", 40000)) as c:
        assert c.get("/playground/config").json()["token_required"] is True
        assert_error(c.post("/playground/session", json={}), 403, "playground_key_refused")
        error = assert_error(c.post("/playground/session", json={}, headers={"X-Playground-Token": "nope"}), 403)
        assert "wrong" in error["message"]
        r = c.post("/playground/session", json={}, headers={"X-Playground-Token": "let-me-in"})
        assert r.status_code == 200, r.text
        assert c.get("/playground/config", headers={"X-Playground-Token": "let-me-in"}).json()["can_mint"] is True
        # Still same-origin only.
        assert_error(c.post("/playground/session", json={}, headers={"X-Playground-Token": "let-me-in",
                                                                      "Origin": "http://evil.example"}), 403)
    with pytest.raises(ValueError, match="playground_token"):
        create_app(settings(playground_mode="token"))


def test_open_and_off_modes():
    with TestClient(create_app(settings(playground_mode="open")), base_url="http://demo.example",
                    client=("203.0.113.9", 40000)) as c:
        r = c.post("/playground/session", json={"session": {"instructions": "Demo."}},
                   headers={"Origin": "http://demo.example"})
        assert r.status_code == 200 and r.json()["session"]["instructions"] == "Demo."
        assert_error(c.post("/playground/session", json={"sesion": {}}), 400, "unknown_parameter")
    with TestClient(create_app(settings(playground_mode="off")), base_url="http://127.0.0.1:8000", client=LOCAL) as c:
        assert c.get("/").status_code == 200  # the page still works with a pasted key
        assert c.get("/playground/config").json()["can_mint"] is False
        assert_error(c.post("/playground/session", json={}), 403, "playground_key_refused")
    with TestClient(create_app(settings(playground_enabled=False)), base_url="http://127.0.0.1:8000",
                    client=LOCAL) as c:
        assert c.get("/").status_code == 404
        assert c.post("/playground/session", json={}).status_code in (404, 405)
