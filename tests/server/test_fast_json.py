"""Bodies parse as json.loads parses them, through msgspec or, where it refuses, through json.loads."""
from __future__ import annotations

import asyncio
import json
import math

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from rlserve.server.fast_json import FastJSONRequest, FastJSONRoute

BODIES = [b'{"prompt": [1, 2, 3], "max_tokens": 4}', b'{"a": 123456789012345678901234567890}', b'{"a": 1e400}',
          b'{"a": NaN}', b'{"a": 1, "a": 2}', b'{"a": "\\ud800"}', b'{"a": "caf\\u00e9 \xe2\x82\xac"}', b'[]']


def _parse(body: bytes):
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    req = FastJSONRequest({"type": "http", "method": "POST", "headers": [], "path": "/"}, receive)
    return asyncio.run(req.json())


@pytest.mark.parametrize("body", BODIES)
def test_parses_like_json_loads(body):
    got, want = _parse(body), json.loads(body)
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    if isinstance(want, dict) and isinstance(want.get("a"), float) and math.isnan(want["a"]):
        assert math.isnan(got["a"])


def test_bad_json_is_the_usual_validation_error():
    app = FastAPI()
    app.router.route_class = FastJSONRoute

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return body

    client = TestClient(app)
    assert client.post("/echo", content=b'{"x": [1, 2]}', headers={"content-type": "application/json"}).json() \
        == {"x": [1, 2]}
    bad = client.post("/echo", content=b'{"x": [1, 2', headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["type"] == "json_invalid"
