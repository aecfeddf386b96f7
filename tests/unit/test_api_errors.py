"""api.errors: whatever a route raises, the client gets JSON in the OpenAI error shape."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import BaseModel

from openrealtime.api.app import create_app
from openrealtime.api.errors import LimitedJSONRoute
from openrealtime.config import Settings


class _Body(BaseModel):
    value: object = None


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(Settings(api_keys=[], vad_enabled=False, stt_enabled=False, tts_enabled=False,
                              turn_detector_enabled=False, llm_model="smollm2-135m"))
    router = APIRouter(route_class=LimitedJSONRoute)

    @router.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    @router.get("/recurse")
    async def recurse() -> dict:
        raise RecursionError("maximum recursion depth exceeded")

    @router.post("/body")
    async def body(data: _Body) -> dict:
        return {"ok": True}

    app.include_router(router)
    # raise_server_exceptions: an exception escaping the app would fail the test here.
    with TestClient(app, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000)) as c:
        yield c


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"} and error["message"]
    return error


def test_unexpected_exception_is_a_json_500_and_logged(client: TestClient, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR, logger="openrealtime.api.errors"):
        response = client.get("/boom", headers={"Origin": "http://example.com"})
    error = _error(response, 500)
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "a bug" not in error["message"]  # internals stay in the log
    assert response.headers.get("access-control-allow-origin") == "*"  # a browser can read it
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "GET /boom" in logged[0].getMessage() and "a bug" in str(logged[0].exc_info[1])


def test_recursion_error_is_a_400(client: TestClient):
    error = _error(client.get("/recurse"), 400)
    assert error["code"] == "nesting_too_deep" and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("depth", [150, 5000, 100_000])
def test_pydantic_bodies_are_parsed_with_the_nesting_limit(client: TestClient, depth: int):
    body = '{"value": ' + "[" * depth + "]" * depth + "}"
    error = _error(client.post("/body", content=body, headers={"Content-Type": "application/json"}), 400)
    assert error["code"] == "nesting_too_deep" and error["param"] is None


def test_pydantic_bodies_still_parse(client: TestClient):
    body = '{"value": ' + "[" * 50 + "]" * 50 + "}"
    assert client.post("/body", content=body, headers={"Content-Type": "application/json"}).json() == {"ok": True}
    # FastAPI still decides what is JSON: a body without a JSON Content-Type is not parsed.
    assert _error(client.post("/body", content=body, headers={"Content-Type": "text/plain"}), 400)
    assert _error(client.post("/body", content=b"{", headers={"Content-Type": "application/json"}),
                  400)["code"] == "invalid_json"


def test_api_docs_are_off_by_default():
    assert Settings().api_docs is False
    app = create_app(Settings(api_keys=[], vad_enabled=False, stt_enabled=False, tts_enabled=False,
                              turn_detector_enabled=False, llm_model="smollm2-135m"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert _error(c.get(path), 404)["type"] == "not_found_error"
