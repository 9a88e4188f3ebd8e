"""Who gets into the scoring server: up to --max_queue /score requests at once. A request beyond is refused as soon
as uvicorn has parsed its head, before FastAPI routes it, and its connection is closed so that its body is never read
(on a kept-alive connection the server would have to read it all to find the next request).

Refusing is cheap but not free, and the HTTP side shares the process and the GIL with the scoring thread: clients
that retry at once, ignoring Retry-After, would keep the event loop busy refusing and starve the requests admitted. So
refusals past REFUSALS_PER_SECOND (in bursts of REFUSAL_BURST) wait their turn before they are answered: a waiting
refusal costs nothing, and the clients that ignore Retry-After are slowed to that rate; within it (clients that keep
to Retry-After), a refusal is answered at once.

    app.add_middleware(Admission(limits, metrics, backend).middleware)
"""
import asyncio
import json
import math
import time

from social_reward.serving.limits import Refusal

REFUSALS_PER_SECOND, REFUSAL_BURST = 200, 50
# the longest a refusal waits: past it (a flood of connections) it waits that long and takes no turn, so that waiting
# refusals do not hold connections without end (uvicorn's own --limit-concurrency counts them, /health included)
MAX_REFUSAL_WAIT = 1.0


class Admission:
    """The /score door: counts the requests admitted (until the app has answered them), refuses 503 with
    Retry-After beyond --max_queue or while the server stops, and paces the refusals."""

    def __init__(self, limits, metrics, backend):
        self.limits, self.metrics, self.backend = limits, metrics, backend
        self.admitted, self.stopping = 0, False
        self.pacer = Pacer(REFUSALS_PER_SECOND, REFUSAL_BURST, MAX_REFUSAL_WAIT)

    def refusal(self):
        """The Refusal a /score request arriving now gets, or None: it is admitted."""
        if self.stopping:
            return Refusal(503, "the server is stopping; retry on another", {"Retry-After": "1"}, "stopping")
        if self.admitted >= self.limits.max_queue:
            seconds = self.backend.retry_after(self.backend.waiting())
            return Refusal(503, f"queue full ({self.limits.max_queue} requests, --max_queue); retry later",
                           {"Retry-After": str(max(1, math.ceil(seconds)))}, "queue_full")
        return None

    def middleware(self, app):
        """The ASGI middleware guarding POST /score in front of `app` (FastAPI's add_middleware calls it)."""
        async def door(scope, receive, send):
            if scope["type"] != "http" or scope["path"] != "/score":
                return await app(scope, receive, send)
            refusal = self.refusal()
            if refusal is not None:
                wait = self.pacer.turn()
                if wait:
                    await asyncio.sleep(wait)
                return await self.refuse(refusal, send)
            self.admitted += 1
            self.metrics.in_flight.inc()
            try:
                await app(scope, receive, send)
            finally:
                self.admitted -= 1
                self.metrics.in_flight.dec()
        return door

    async def refuse(self, refusal, send):
        self.metrics.rejections.labels(refusal.reason).inc()
        self.metrics.requests.labels("503").inc()
        body = json.dumps({"error": refusal.message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Pacer:
    """A token bucket: `rate` turns a second, `burst` at once; a turn taken past them waits until its token comes, up
    to `max_wait` seconds: a turn that would wait longer waits `max_wait` and takes no token (a connection is held
    at most that long, and a flood past the bucket is still slowed)."""

    def __init__(self, rate, burst, max_wait=float("inf"), clock=time.monotonic):
        self.rate, self.burst, self.max_wait, self.clock = rate, burst, max_wait, clock
        self.tokens, self.refilled = float(burst), clock()

    def turn(self):
        """Seconds until the turn taken now: 0 while tokens are left, at most max_wait."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if (1 - self.tokens) / self.rate > self.max_wait:
            return self.max_wait
        self.tokens -= 1
        return max(0.0, -self.tokens / self.rate)
