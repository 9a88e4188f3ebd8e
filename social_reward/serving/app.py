"""The reward as a service: a scoring server that RL loops on other GPUs and machines call (docs/serving.md).

    python serve.py clip:clip_epoch_4_global_step_final.pth --port 8000
    python serve.py pickscore:PickScore_v1 aesthetic:sac.pth,clip=ViT-L-14.pt --reward_weights 1 0.5 \
        --reward_norm group --device cuda --precision bf16
    python serve.py clip:final.pth --engine ray --replicas 4        # one replica a GPU, on a Ray cluster

    curl -F prompts="a red fox" -F images=@fox.png -F prompts="a cat" -F images=@cat.png localhost:8000/score
    fn = reward.reward_fn("http://localhost:8000")      # the in-process callable's twin: fn(images, prompts, metadata)

POST /score takes prompts and images (PNG/JPEG bytes, or one .npy array of a float or uint8 batch) as multipart or
base64 JSON and answers {"scores": [...]} (with "raw" per scorer for a mix, "probabilities" with a calibration);
GET /health says what is served and how full the queue is; GET /metrics is Prometheus text. Requests from many
clients coalesce into batches of up to --max_batch_size images or --max_wait_ms in one scoring thread on the model's
device: the scores are reward.reward_fn's of the same images. Each request's images are decoded and checked before it
joins a batch, so a bad upload fails its own request (4xx, one line naming the fault) and no other.
"""
import asyncio
import contextlib
import math
import time

from social_reward.serving.body import parse_request, read_body
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


REASONS = {503: "queue_full", 413: "too_large", 408: "timeout", 504: "timeout", 422: "non_finite", 500: "error"}


def make_app(backend, limits=None):
    """The FastAPI app: POST /score, GET /health, GET /metrics, scoring through `backend` (LocalBackend, or Ray's).
    Its lifespan starts the backend and, at shutdown (after uvicorn has finished the requests in flight), scores what
    is queued and stops it.

        app = make_app(LocalBackend(ScoringCore(*load_reward("clip:final.pth"), "cpu"), max_batch_size=32))
        uvicorn.run(app, port=8000)
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.requests import ClientDisconnect

    limits = limits or Limits()
    metrics = Metrics()
    state = {"admitted": 0, "stopping": False}
    budget = PixelBudget(limits.max_pixels_in_flight)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        with strict_decoding(limits.max_pixels):
            backend.start(metrics.on_batch)
            try:
                yield
            finally:
                state["stopping"] = True
                await asyncio.to_thread(backend.stop)

    app = FastAPI(title="Social Reward scoring server", lifespan=lifespan)
    app.state.metrics, app.state.limits = metrics, limits

    def refuse(e):
        metrics.rejections.labels(e.reason or REASONS.get(e.status, "bad_input")).inc()  # bad_input: 400, 415
        metrics.requests.labels(str(e.status)).inc()
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    async def until_disconnected(request):
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.post("/score")
    async def score(request: Request):
        if state["stopping"]:
            return refuse(Refusal(503, "the server is stopping; retry on another", {"Retry-After": "1"}))
        if state["admitted"] >= limits.max_queue:
            seconds = backend.retry_after(backend.waiting())
            return refuse(Refusal(503, f"queue full ({limits.max_queue} requests, --max_queue); retry later",
                                  {"Retry-After": str(max(1, math.ceil(seconds)))}))
        state["admitted"] += 1
        metrics.in_flight.inc()
        started, pixels = time.monotonic(), 0
        try:
            body = await read_body(request, limits, started)
            prompts, images, tensor = await parse_request(request, body, limits)
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
            state["admitted"] -= 1
            metrics.in_flight.dec()
        metrics.latency.observe(time.monotonic() - started)
        metrics.requests.labels("200").inc()
        return JSONResponse(answer)

    @app.get("/health")
    async def health():
        return {"status": "stopping" if state["stopping"] else "ok", **backend.describe(),
                "queue_depth": backend.waiting(), "in_flight": state["admitted"], "max_queue": limits.max_queue,
                "pixels_in_flight": budget.held, "max_pixels_in_flight": budget.limit}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
