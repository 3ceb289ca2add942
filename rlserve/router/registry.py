"""The router's worker registry over HTTP: GET /workers lists them ({"workers": [{"id", "url",
"is_healthy", ...}]}), POST /workers {"url"} queues an addition (answered 202; the router then checks
/health and reads /server_info and /model_info before routing to it), DELETE /workers/{id} queues a
removal. Used by the router launcher (supervision) and by the router client (weight updates)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

CALL_TIMEOUT_S = 10.0
REGISTER_TIMEOUT_S = 120.0


class WorkerRegistry:
    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def workers(self) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/workers", headers=self.headers, timeout=CALL_TIMEOUT_S)
        r.raise_for_status()
        return list(r.json().get("workers", []))

    def urls(self) -> list[str]:
        return [w["url"] for w in self.workers()]

    def healthy_urls(self) -> list[str]:
        return [w["url"] for w in self.workers() if w.get("is_healthy")]

    def add(self, url: str) -> None:
        r = httpx.post(self.url + "/workers", json={"url": url}, headers=self.headers, timeout=CALL_TIMEOUT_S)
        if r.status_code >= 400:
            raise RuntimeError(f"the router refused worker {url}: {r.status_code} {r.text}")

    def remove(self, url: str) -> bool:
        """Take `url` out of the router (its prefix tree goes with it); False if it was not registered."""
        found = [w["id"] for w in self.workers() if w["url"] == url]
        for wid in found:
            r = httpx.delete(f"{self.url}/workers/{wid}", headers=self.headers, timeout=CALL_TIMEOUT_S)
            if r.status_code >= 400 and r.status_code != 404:
                raise RuntimeError(f"the router did not remove worker {url}: {r.status_code} {r.text}")
        return bool(found)

    def wait_healthy(self, urls: Sequence[str], timeout: float = REGISTER_TIMEOUT_S,
                     check: Callable[[], None] | None = None) -> None:
        """Until every URL in `urls` is registered and healthy; `check()` may raise to give up early."""
        deadline = time.monotonic() + timeout
        while True:
            missing = set(urls) - set(self.healthy_urls())
            if not missing:
                return
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not take {sorted(missing)} within {timeout:.0f} s")
            time.sleep(0.1)

    def wait_removed(self, url: str, timeout: float = CALL_TIMEOUT_S) -> None:
        """Removal is queued by the router: until it no longer lists `url`."""
        deadline = time.monotonic() + timeout
        while url in self.urls():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router still lists {url} after {timeout:.0f} s")
            time.sleep(0.05)
