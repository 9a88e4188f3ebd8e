"""The FastAPI app: POST /score (admission, the body read and parsed within the limits, the images decoded, then
scored by the backend), GET /health (503 when the scoring thread is dead or stalled) and GET /metrics (Prometheus).
Its lifespan starts the backend and, at shutdown, scores what is queued.

    app = make_app(LocalBackend(ScoringCore(*load_reward("clip:final.pth"), "cpu"), max_batch_size=32))
    uvicorn.run(app, port=8000)
"""
import asyncio
import contextlib
import time

from social_reward.serving.admission import Admission
from social_reward.serving.body import content_kind, parse_in_thread, read_body
from social_reward.serving.decoding import PixelBudget, decode_in_thread, strict_decoding
from social_reward.serving.limits import Limits, Refusal

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images a batch, for the /metrics histogram


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps may live in one process: the tests')."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("reward_requests", "Requests answered, by HTTP status", ["status"], registry=registry)
        self.images = Counter("reward_images", "Images scored", registry=registry)
        self.rejections = Counter("reward_rejections", "Requests refused, by reason", ["reason"], registry=registry)
        self.batch_size = Histogram("reward_batch_size", "Images a scored batch", buckets=BATCH_BUCKETS,
                                    registry=registry)
        self.batch_seconds = Histogram("reward_batch_seconds", "Seconds scoring one batch", registry=registry)
        self.latency = Histogram("reward_request_seconds", "Seconds from admission to answer of a /score request",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.in_flight = Gauge("reward_in_flight", "Requests admitted and not yet answered", registry=registry)

    def on_batch(self, size, seconds=None):
        """A batch of `size` images scored in `seconds`; None: images scored in a batch made elsewhere (Ray's)."""
        if seconds is not None:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)
        self.images.inc(size)


REASONS = {503: "unavailable", 413: "too_large", 408: "timeout", 504: "timeout", 422: "non_finite", 500: "error"}


def make_app(backend, limits=None):
    """The FastAPI app: POST /score, GET /health, GET /metrics, scoring through `backend` (LocalBackend, or Ray's).
    Its lifespan starts the backend and, at shutdown (after uvicorn has finished the requests in flight), scores what
    is queued and stops it. /score's door (--max_queue) is Admission's middleware, in front of FastAPI's routing.
    /health answers 503 while the backend cannot score (a dead scoring thread, or one that has answered nothing for
    --request_timeout while requests wait), so that an orchestrator restarts the server.

        app = make_app(LocalBackend(ScoringCore(*load_reward("clip:final.pth"), "cpu"), max_batch_size=32))
        uvicorn.run(app, port=8000)
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.requests import ClientDisconnect

    limits = limits or Limits()
    metrics = Metrics()
    admission = Admission(limits, metrics, backend)
    budget = PixelBudget(limits.max_pixels_in_flight)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        with strict_decoding(limits.max_pixels):
            backend.start(metrics.on_batch)
            try:
                yield
            finally:
                admission.stopping = True
                await asyncio.to_thread(backend.stop)

    app = FastAPI(title="Social Reward scoring server", lifespan=lifespan)
    app.state.metrics, app.state.limits = metrics, limits
    app.add_middleware(admission.middleware)

    def refuse(e):
        metrics.rejections.labels(e.reason or REASONS.get(e.status, "bad_input")).inc()  # bad_input: 400, 415
        metrics.requests.labels(str(e.status)).inc()
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    async def until_disconnected(request):
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.post("/score")
    async def score(request: Request):
        started, pixels = time.monotonic(), 0
        try:
            kind = content_kind(request)
            body = await read_body(request, limits, started)
            prompts, images, tensor = await parse_in_thread(kind, request.headers, body, limits)
            del body
            images, prompts, pixels = await decode_in_thread(prompts, images, tensor, limits, budget)
            scoring = asyncio.ensure_future(backend.score(images, prompts))
            left = asyncio.ensure_future(until_disconnected(request))
            try:
                done, _ = await asyncio.wait({scoring, left}, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=max(limits.request_timeout - (time.monotonic() - started), 0))
            finally:
                for task in (scoring, left):
                    task.cancel()  # a job still queued leaves the queue: its slot is free
            if scoring not in done:
                if left in done:
                    raise ClientDisconnect()
                raise Refusal(504, f"not scored within --request_timeout {limits.request_timeout:g} s")
            answer = scoring.result()
        except Refusal as e:
            return refuse(e)
        except ClientDisconnect:
            metrics.rejections.labels("client_left").inc()
            return Response(status_code=499)  # nobody reads it
        finally:
            budget.give_back(pixels)
        metrics.latency.observe(time.monotonic() - started)
        metrics.requests.labels("200").inc()
        return JSONResponse(answer)

    @app.get("/health")
    async def health():
        fault = None if admission.stopping else backend.fault(limits.request_timeout)
        answer = {"status": "stopping" if admission.stopping else "failing" if fault else "ok", **backend.describe(),
                  "queue_depth": backend.waiting(), "in_flight": admission.admitted, "max_queue": limits.max_queue,
                  "pixels_in_flight": budget.held, "max_pixels_in_flight": budget.limit}
        return JSONResponse({**answer, "error": fault}, 503) if fault else answer

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
