"""Where each attempt goes: the endpoints of one event loop, their health, and the wait before
a retry.

An endpoint that fails ``endpoint_fail_threshold`` times in a row (transport faults only) is
skipped for ``endpoint_cooldown_s``; attempts go to the endpoint with the fewest requests in
flight (or round robin), avoiding the one that just failed when there is a choice.
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from annotators.caption.backends.openai_api.settings import ClientSettings
from annotators.caption.backends.openai_api.transports import connect


def backoff_delay(retry: int, base_s: float, max_s: float, retry_after_s: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (1-based): exponential, capped, jittered.

    Half the capped exponential delay is fixed and half random ("equal jitter"); a server's
    Retry-After is honoured up to ``max_s``.
    """
    delay = min(max_s, base_s * (2 ** (retry - 1)))
    delay = delay / 2 + (rng or random).uniform(0, delay / 2)
    if retry_after_s:
        delay = min(max_s, max(delay, retry_after_s))
    return delay


class Endpoint:
    """One server: its SDK client, requests in flight, and health."""

    __slots__ = ("url", "client", "in_flight", "failures", "down_until")

    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self.client = client
        self.in_flight = 0
        self.failures = 0
        self.down_until = 0.0


class Pool:
    """Connection state bound to one event loop: endpoints and the in-flight semaphore."""

    def __init__(self, settings: ClientSettings, api_key: str) -> None:
        import httpx2

        self.settings = settings
        self.endpoints = [Endpoint(url, connect(settings, url, api_key))
                          for url in settings.endpoints]
        self.semaphore = asyncio.Semaphore(settings.max_in_flight)
        self.turn = 0
        self.raw_response = httpx2.Response

    def pick(self, avoid: Endpoint | None) -> Endpoint:
        """The endpoint for the next attempt: a healthy one, not ``avoid`` if there is a choice."""
        endpoints = self.endpoints
        if len(endpoints) == 1:
            return endpoints[0]
        now = time.monotonic()
        up = [e for e in endpoints if e.down_until <= now]
        if not up:
            return min(endpoints, key=lambda e: e.down_until)
        if avoid is not None and len(up) > 1:
            up = [e for e in up if e is not avoid]
        self.turn += 1
        start = self.turn % len(up)
        if self.settings.balance == "round_robin":
            return up[start]
        return min(up[start:] + up[:start], key=lambda e: e.in_flight)

    def failed(self, endpoint: Endpoint) -> bool:
        """Record a transport failure; True when this starts a cooldown."""
        endpoint.failures += 1
        if endpoint.failures < self.settings.endpoint_fail_threshold:
            return False
        now = time.monotonic()
        starts = endpoint.down_until <= now
        endpoint.down_until = now + self.settings.endpoint_cooldown_s
        return starts and len(self.endpoints) > 1

    async def close(self) -> None:
        """Close every SDK client (and its HTTP connections)."""
        for endpoint in self.endpoints:
            await endpoint.client.close()
