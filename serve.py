"""The reward as a service: a scoring server that RL loops on other GPUs and machines call (docs/serving.md).

    python serve.py clip:clip_epoch_4_global_step_final.pth --port 8000
    python serve.py pickscore:PickScore_v1 aesthetic:sac.pth,clip=ViT-L-14.pt --reward_weights 1 0.5 \\
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
import argparse
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import io
import json
import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from clip_model import InputError, PRECISIONS, default_device, inference_precision, run_cli
from errors import described, first_line
from reward import REWARD_NORMS, as_image_tensor, check_reward_norm, reward_fn

ROOT = os.path.dirname(os.path.abspath(__file__))
ENGINES = ("uvicorn", "ray")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images a batch, for the /metrics histogram


@dataclass
class Limits:
    """What one request may ask, and how many may be in the server at once (the flags of the same names)."""
    max_queue: int = 64  # requests admitted at once (uploading, decoding, waiting or being scored); more: 503
    max_images: int = 256  # images in one request (413)
    max_request_bytes: int = 64 * 2**20  # body bytes of one request (413)
    max_pixels: int = 4096 * 4096  # decoded pixels of one image, PIL's decompression-bomb limit (413)
    request_timeout: float = 60.0  # seconds from admission to the answer (408 while uploading, 504 after)
    # decoded pixels of one request's images, counted on their headers before any is decoded (413), and of all the
    # requests decoded and not yet answered (503 beyond): a small PNG of a blank 4096 x 4096 image decodes to 48 MB
    max_request_pixels: int = 64 * 2**20
    max_pixels_in_flight: int = 256 * 2**20


class Refusal(Exception):
    """A request the server answers with `status` and a one-line message naming the fault."""

    def __init__(self, status, message, headers=None, reason=None):
        super().__init__(message)
        self.status, self.message, self.headers, self.reason = status, message, headers, reason  # reason: /metrics'

    def __reduce__(self):  # a scoring replica's refusal crosses to Ray's ingress pickled
        return Refusal, (self.status, self.message, self.headers, self.reason)


# ---- one request's images, decoded and checked before it joins a batch ---------------------------------------------

@contextlib.contextmanager
def strict_decoding(max_pixels):
    """PIL as a server wants it while the app runs: a truncated upload is an error (data_set.py lets the training
    loader fill it grey, which would score a broken image as if whole), and the decompression-bomb check at
    `max_pixels`. Both are PIL's process-wide settings: restored when the app stops."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, max_pixels
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = before


class PixelBudget:
    """Decoded pixels held by the requests in the server (--max_pixels_in_flight): a request takes its share before
    its images are decoded and gives it back once answered; one that does not fit is answered 503 at once."""

    def __init__(self, limit):
        self.limit, self.held, self.lock = limit, 0, threading.Lock()

    def take(self, pixels):
        with self.lock:
            if self.held + pixels > self.limit:
                raise Refusal(503, f"{self.held} decoded pixels in the server, {pixels} more would pass "
                                   f"--max_pixels_in_flight {self.limit}; retry later", {"Retry-After": "1"},
                              "pixels_in_flight")
            self.held += pixels

    def give_back(self, pixels):
        with self.lock:
            self.held -= pixels


def image_errors(where, data, max_pixels):
    """A context mapping PIL's errors on an upload to the Refusal naming it."""
    @contextlib.contextmanager
    def mapped():
        try:
            yield
        except Image.DecompressionBombError:
            raise Refusal(413, f"{where}: more pixels than --max_pixels {max_pixels}") from None
        except UnidentifiedImageError:
            raise Refusal(400, f"{where}: not an image ({len(data)} bytes PIL cannot identify)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise Refusal(400, f"{where}: cannot decode the image ({first_line(e)})") from None
    return mapped()


def open_image(data, where, max_pixels):
    """An uploaded image's bytes -> a PIL image read as far as its header (nothing decoded yet); Refusal 400 (not an
    image) or 413 (more pixels than `max_pixels`)."""
    with image_errors(where, data, max_pixels):
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:  # PIL only warns between its limit and twice that
            raise Refusal(413, f"{where}: {image.width} x {image.height} pixels, more than --max_pixels {max_pixels}")
        return image


def tensor_size(data, limits):
    """An uploaded .npy batch's (images, decoded pixels: images x height x width), from its header, checked (dtype,
    shape, the size of the data after it) before anything is allocated; Refusal 400 or 413."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f".npy format version {version[0]}.{version[1]}; np.save writes 1.0")
        shape, _, dtype = read_header[version](stream)
    except (ValueError, OSError, EOFError, SyntaxError, MemoryError, RecursionError) as e:  # literal_eval's too
        raise Refusal(400, f"tensor: not a .npy array ({first_line(e)})") from None
    if dtype not in (np.uint8, np.float16, np.float32) or len(shape) != 4:
        raise Refusal(400, f"tensor: expected float32 B x 3 x H x W or uint8 B x H x W x 3, got {dtype} of "
                           f"shape {shape}")
    if shape[0] > limits.max_images:
        raise Refusal(413, f"tensor: {shape[0]} images in one request, more than --max_images {limits.max_images}")
    height, width = shape[1:3] if dtype == np.uint8 else shape[2:]
    if height * width > limits.max_pixels:
        raise Refusal(413, f"tensor: {width} x {height} pixels an image, more than --max_pixels {limits.max_pixels}")
    if math.prod(shape) * dtype.itemsize != len(data) - stream.tell():
        raise Refusal(400, f"tensor: its header says {dtype} of shape {shape}, {len(data) - stream.tell()} bytes "
                           f"follow it")
    return shape[0], shape[0] * height * width


def decode_tensor(data):
    """An uploaded .npy batch (float B x 3 x H x W in [0, 1], or uint8 B x H x W x 3; its header checked by
    tensor_size) -> the float tensor reward.as_image_tensor makes of it, which is what an in-process call scores."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise Refusal(400, f"tensor: not a .npy array ({first_line(e)})") from None
    try:
        return as_image_tensor(torch.from_numpy(array.copy()))
    except InputError as e:
        raise Refusal(400, f"tensor: {e}") from None


async def read_body(request, limits, started):
    """The request's body, refused (413) past --max_request_bytes, by its Content-Length at once or while it comes in
    (chunked), and (408) when it has not all come by the request's deadline."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_request_bytes:
        raise Refusal(413, f"body: {length} bytes, more than --max_request_bytes {limits.max_request_bytes}")

    async def receive():
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_request_bytes:
                raise Refusal(413, f"body: more than --max_request_bytes {limits.max_request_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)
    try:
        return await asyncio.wait_for(receive(), max(limits.request_timeout - (time.monotonic() - started), 0.001))
    except asyncio.TimeoutError:
        raise Refusal(408, f"body: not received within --request_timeout {limits.request_timeout:g} s") from None


async def parse_request(request, body, limits):
    """(prompts, [encoded images] or None, .npy bytes or None) from a multipart or JSON body; Refusal 4xx naming
    the field at fault."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body
            yield b""
        try:
            form = await MultiPartParser(request.headers, stream(), max_files=limits.max_images + 1,
                                         max_fields=limits.max_images + 1, max_part_size=limits.max_request_bytes
                                         ).parse()
        except MultiPartException as e:
            raise Refusal(413 if "many" in str(e) else 400, f"body: bad multipart ({e})") from None
        prompts, images, tensor = [], [], None
        for key, value in form.multi_items():
            if key not in ("prompts", "images", "tensor"):
                raise Refusal(400, f"{key}: unknown field; send prompts, and images or tensor")
            is_file = not isinstance(value, str)
            if key == "prompts":
                prompts.append(value if not is_file else (await value.read()).decode("utf-8", "replace"))
            elif not is_file:
                raise Refusal(400, f"{key}: a text field; send it as a file part (with a filename)")
            elif key == "tensor":
                tensor = await value.read()
            else:
                images.append(await value.read())
        return prompts, images or None, tensor
    if kind == "application/json":
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise Refusal(400, f"body: not JSON ({first_line(e)})") from None
        if not isinstance(payload, dict):
            raise Refusal(400, f"body: a JSON {type(payload).__name__}; send an object with prompts and images")
        unknown = set(payload) - {"prompts", "images", "tensor"}
        if unknown:
            raise Refusal(400, f"{sorted(unknown)[0]}: unknown field; send prompts, and images or tensor")
        prompts = payload.get("prompts", [])
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise Refusal(400, "prompts: must be a list of strings")
        images, tensor = payload.get("images"), payload.get("tensor")
        if images is not None and (not isinstance(images, list) or not all(isinstance(i, str) for i in images)):
            raise Refusal(400, "images: must be a list of base64 strings (PNG or JPEG bytes)")
        if tensor is not None and not isinstance(tensor, str):
            raise Refusal(400, "tensor: must be a base64 string (.npy bytes)")
        if images is not None and len(images) > limits.max_images:
            raise Refusal(413, f"images: {len(images)} in one request, more than --max_images {limits.max_images}")
        try:
            images = None if images is None else [base64.b64decode(i, validate=True) for i in images]
            tensor = None if tensor is None else base64.b64decode(tensor, validate=True)
        except binascii.Error as e:
            raise Refusal(400, f"{'tensor' if tensor is not None else 'images'}: not base64 ({e})") from None
        return prompts, images, tensor
    raise Refusal(415, f"content-type {kind or 'none'}: send multipart/form-data or application/json")


def decode_request(prompts, images, tensor, limits, budget=None):
    """Check a parsed request and decode its images: (PIL images or a float tensor, prompts, the pixels taken from
    `budget`, a PixelBudget, which the caller gives back once the request is answered), or Refusal 4xx or 503. The
    pixels are counted on the images' headers, and taken, before any image is decoded."""
    if images is not None and tensor is not None:
        raise Refusal(400, "images and tensor: send one of them")
    if images is None and tensor is None:
        raise Refusal(400, f"empty request: no images ({len(prompts)} prompts); send images or tensor, one prompt an "
                           f"image")
    if images is not None and len(images) > limits.max_images:
        raise Refusal(413, f"images: {len(images)} in one request, more than --max_images {limits.max_images}")
    if tensor is not None:
        (count, pixels), field = tensor_size(tensor, limits), "tensor"
    else:
        opened = [open_image(data, f"images[{i}]", limits.max_pixels) for i, data in enumerate(images)]
        count, pixels, field = len(opened), sum(image.width * image.height for image in opened), "images"
    if count == 0:
        raise Refusal(400, "empty request: no images; send images or tensor, one prompt an image")
    if len(prompts) != count:
        raise Refusal(400, f"prompts: {len(prompts)} for {count} images; give one prompt per image")
    limit = min(limits.max_request_pixels, budget.limit if budget is not None else math.inf)
    if pixels > limit:
        flag = "--max_request_pixels" if limit == limits.max_request_pixels else "--max_pixels_in_flight"
        raise Refusal(413, f"{field}: {pixels} pixels decoded in one request, more than {flag} {limit}")
    if budget is not None:
        budget.take(pixels)
    try:
        decoded = decode_tensor(tensor) if tensor is not None else []
        for i, (image, data) in enumerate(zip(opened, images) if tensor is None else ()):
            with image_errors(f"images[{i}]", data, limits.max_pixels):
                image.load()
            decoded.append(image)
    except BaseException:
        if budget is not None:
            budget.give_back(pixels)
        raise
    return decoded, prompts, (pixels if budget is not None else 0)


async def decode_in_thread(prompts, images, tensor, limits, budget):
    """decode_request in a thread. A request cancelled meanwhile (its client gone, Ray's ingress, a shutdown) leaves
    the thread running: the pixels it takes from `budget` are given back when it ends."""
    decoding = asyncio.get_running_loop().run_in_executor(None, decode_request, prompts, images, tensor, limits,
                                                          budget)
    try:
        return await asyncio.shield(decoding)
    except asyncio.CancelledError:
        decoding.add_done_callback(lambda done: done.cancelled() or done.exception() is not None or
                                   budget.give_back(done.result()[2]))
        raise


# ---- scoring: batches of requests, each answered as reward_fn answers it -------------------------------------------

def reward_args(specs, reward_weights=None, reward_norm=None, calibration=None):
    """(reward_fn's spec, reward_norm, whether it is plain) from the server's flags, checked in one line each before
    any model loads: a single spec without normalisation is plain (its scores, info {}), anything else reward_fn's
    mix of {spec: weight}."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if reward_weights is not None and len(reward_weights) != len(specs):
        raise InputError(f"--reward_weights: {len(reward_weights)} weights for {len(specs)} specs")
    reward_norm = check_reward_norm(reward_norm or ("none" if calibration is None else "calibrated"))
    twice = [spec for spec in specs if specs.count(spec) > 1]
    if twice:
        raise InputError(f"{twice[0]}: given twice; give each spec once (--reward_weights weighs them)")
    plain = len(specs) == 1 and reward_weights is None and reward_norm == "none"
    return (specs[0] if plain else dict(zip(specs, reward_weights or [1.0] * len(specs)))), reward_norm, plain


def load_reward(specs, device="cpu", reward_weights=None, reward_norm=None, calibration=None):
    """(reward_fn's callable, whether it is plain) for the server's flags (reward_args). The server scores with what
    reward_fn builds."""
    spec, reward_norm, plain = reward_args(specs, reward_weights, reward_norm, calibration)
    return reward_fn(spec, device, reward_norm=reward_norm, calibration=calibration), plain


class ScoringCore:
    """Scores a batch of requests [(images, prompts)] in one forward pass a kind of input (PIL images together, float
    tensors by size), then answers each request as reward_fn would have answered it alone: its own normalisation
    (a "group" is the request's images, never another client's) and its own non-finite check."""

    def __init__(self, fn, plain, device, precision="fp32"):
        self.mix, self.plain, self.device, self.precision = fn.mix, plain, device, precision
        inference_precision(device, precision)  # an unknown precision is refused here, at start-up

    def describe(self):
        return {"spec": list(self.mix.names), "model": {name: type(r.model).__name__ for name, r in
                zip(self.mix.names, self.mix.rewards)}, "device": str(self.device), "precision": self.precision,
                "reward_norm": self.mix.reward_norm}

    def _raw(self, requests):
        """{name: scores [total images]} of the requests' images, in order."""
        groups = collections.defaultdict(list)  # requests whose images stack into one call
        for i, (images, _) in enumerate(requests):
            groups["pil" if isinstance(images, list) else tuple(images.shape[1:])].append(i)
        raw = [None] * len(requests)
        with torch.inference_mode(), inference_precision(self.device, self.precision):
            for members in groups.values():
                prompts = [p for i in members for p in requests[i][1]]
                images = [requests[i][0] for i in members]
                # tensors go to the model's device first: their preprocessing then runs there, batched, as it does
                # in a trainer whose VAE decoded them on its GPU
                images = sum(images, []) if isinstance(images[0], list) else torch.cat(images).to(self.device)
                scores = self.mix.scores(images, prompts, check_finite=False)
                start = 0
                for i in members:
                    n = len(requests[i][1])
                    raw[i] = {name: values[start:start + n].cpu() for name, values in scores.items()}
                    start += n
        return raw

    def answer(self, raw, prompts):
        """One request's answer from its raw scores, as reward_fn's callable computes it."""
        message = self.mix.nonfinite_message(raw, prompts)
        if message:
            raise Refusal(422, message)
        if self.plain:
            scores, info = raw[self.mix.names[0]], {}
        else:
            try:
                scores, info = self.mix.combine(self.mix.normalize(raw, prompts)), raw
            except InputError as e:
                raise Refusal(400, str(e)) from None
        answer = {"scores": scores.tolist()}
        if info:
            answer["raw"] = {name: values.tolist() for name, values in info.items()}
        temperatures = {n: r.temperature for n, r in zip(self.mix.names, self.mix.rewards) if r.temperature}
        if temperatures:  # score.py's: the probability that each image beats the request's median image
            from calibration import win_probability
            answer["probabilities"] = {n: win_probability(raw[n].numpy(), float(np.median(raw[n].numpy())), t
                                                          ).tolist() for n, t in temperatures.items()}
        return answer

    def score_batch(self, requests):
        """[answer dict or Refusal] for the requests [(images, prompts)], in order. A batch that fails as a whole (an
        error, or out of memory) is scored request by request, so that only the request at fault fails."""
        try:
            raws = self._raw(requests)
        except Exception as e:
            if len(requests) > 1:
                return [answer for request in requests for answer in self.score_batch([request])]
            return [refusal(e)]
        answers = []
        for (_, prompts), raw in zip(requests, raws):
            try:
                answers.append(self.answer(raw, prompts))
            except Exception as e:
                answers.append(refusal(e))
        return answers


def refusal(error):
    """The Refusal an error in scoring one request answers: 4xx for the request's fault, else 500."""
    if isinstance(error, Refusal):
        return error
    if isinstance(error, InputError) and not device_error(error.__context__):
        return Refusal(400, str(error).strip().splitlines()[-1])
    if isinstance(error, InputError):  # the device failed, not the request
        error = error.__context__
    return Refusal(500, f"scoring failed ({described(error)})")


def device_error(error):
    """Whether an error is the accelerator's (a CUDA error): the server's fault, never the request's."""
    return isinstance(error, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(error)


@dataclass(eq=False)
class Job:
    images: object
    prompts: list
    future: concurrent.futures.Future
    enqueued: float

    def __len__(self):
        return len(self.prompts)


class Batcher:
    """One scoring thread; requests coalesce into a batch of up to max_batch_size images, waiting at most max_wait_ms
    after the first request of the batch arrived (a request larger than max_batch_size is a batch of its own)."""

    def __init__(self, core, max_batch_size=32, max_wait_ms=10.0, on_batch=None):
        self.core, self.max_batch_size, self.max_wait = core, max_batch_size, max_wait_ms / 1000
        self.on_batch = on_batch or (lambda images, seconds: None)
        self.jobs, self.condition, self.stopping = collections.deque(), threading.Condition(), False
        self.seconds_per_image = 0.0  # measured, for Retry-After
        self.thread = threading.Thread(target=self._run, name="scoring", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, images, prompts):
        job = Job(images, prompts, concurrent.futures.Future(), time.monotonic())
        with self.condition:
            self.jobs.append(job)
            self.condition.notify()
        return job

    def cancel(self, job):
        """Take a job out of the queue (its client left or timed out); False when it is already being scored."""
        with self.condition:
            try:
                self.jobs.remove(job)
                return True
            except ValueError:
                return False

    def waiting_images(self):
        with self.condition:
            return sum(len(job) for job in self.jobs)

    def stop(self):
        """Score what is queued, then end the thread."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join()

    def _next_batch(self):
        """The next batch, taken from the queue only when it is full or its first request has waited max_wait_ms:
        until then its requests stay queued (a client that leaves takes its own out)."""
        with self.condition:
            while True:
                while not self.jobs and not self.stopping:
                    self.condition.wait()
                if not self.jobs:
                    return None
                size, count = 0, 0
                for job in self.jobs:
                    if count and size + len(job) > self.max_batch_size:
                        break
                    size, count = size + len(job), count + 1
                left = self.jobs[0].enqueued + self.max_wait - time.monotonic()
                if size >= self.max_batch_size or count < len(self.jobs) or left <= 0 or self.stopping:
                    batch = [self.jobs.popleft() for _ in range(count)]
                    # False for a job whose client has just left; once running, a job's future cannot be cancelled
                    return [job for job in batch if job.future.set_running_or_notify_cancel()]
                self.condition.wait(left)

    def _run(self):
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            started = time.monotonic()
            answers = self.core.score_batch([(job.images, job.prompts) for job in batch])
            seconds, size = time.monotonic() - started, sum(len(job) for job in batch)
            self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / size if self.seconds_per_image \
                else seconds / size
            self.on_batch(size, seconds)
            for job, answer in zip(batch, answers):
                job.future.set_result(answer)


class LocalBackend:
    """make_app's scoring backend in this process: a Batcher on the model's device."""

    def __init__(self, core, max_batch_size=32, max_wait_ms=10.0):
        self.core, self.batcher = core, None
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms

    def start(self, on_batch):
        self.batcher = Batcher(self.core, self.max_batch_size, self.max_wait_ms, on_batch).start()

    def stop(self):
        self.batcher.stop()

    def describe(self):
        return {**self.core.describe(), "engine": "uvicorn", "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_ms}

    def waiting(self):
        return self.batcher.waiting_images()

    def retry_after(self, queued_images):
        return self.batcher.seconds_per_image * queued_images

    async def score(self, images, prompts):
        """The request's answer (a dict, or Refusal raised); a cancelled wait takes the job out of the queue."""
        job = self.batcher.submit(images, prompts)
        try:
            answer = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise
        if isinstance(answer, Refusal):
            raise answer
        return answer


# ---- the HTTP app --------------------------------------------------------------------------------------------------

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


# ---- the engines ---------------------------------------------------------------------------------------------------

def serve(specs, host="127.0.0.1", port=8000, device=None, precision="fp32", reward_weights=None, reward_norm=None,
          calibration=None, max_batch_size=32, max_wait_ms=10.0, limits=None, log_level="info"):
    """Load the reward and serve it with uvicorn until SIGTERM or SIGINT, which finish the requests in flight and
    refuse new ones (uvicorn stops listening and closes idle connections), then score what is queued.

        serve("clip:clip_final.pth", port=8000, device="cuda", precision="bf16", max_batch_size=64)
    """
    import uvicorn
    device = device or default_device()
    core = ScoringCore(*load_reward(specs, device, reward_weights, reward_norm, calibration), device, precision)
    limits = limits or Limits()
    app = make_app(LocalBackend(core, max_batch_size, max_wait_ms), limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=limits.request_timeout,
                # uvicorn's own limit (a bare 503 past it) far above ours, which answers 503 with Retry-After
                limit_concurrency=max(1024, 4 * limits.max_queue), timeout_keep_alive=30)


def serve_ray(specs, replicas=2, host="127.0.0.1", port=8000, device=None, precision="fp32", reward_weights=None,
              reward_norm=None, calibration=None, max_batch_size=32, max_wait_ms=10.0, limits=None,
              num_cpus=None, blocking=True):
    """The same app behind Ray Serve: one ingress replica (decoding, limits; make_app) and `replicas` scoring
    replicas (a GPU each when device is cuda), each batching with @serve.batch: there --max_batch_size counts
    requests, Ray's unit. Connects to the cluster at RAY_ADDRESS, else starts a local Ray instance (num_cpus).
    Returns the Ray Serve handle when not blocking; blocking, it serves until SIGTERM/SIGINT, then shuts Serve down."""
    import ray
    from ray import serve as ray_serve
    device, limits = device or default_device(), limits or Limits()
    if reward_norm == "prompt" and replicas > 1:
        raise InputError("--reward_norm prompt with --replicas > 1: each replica would keep its own prompt buffers; "
                         "serve one replica, or normalise in the trainer")
    from scorers import check_spec
    reward_args(specs, reward_weights, reward_norm, calibration)  # a mistake in one line here, not in a replica's log
    for spec in [specs] if isinstance(specs, str) else specs:
        check_spec(spec)
    if not ray.is_initialized():
        # the replicas import this repo's modules: on a cluster they need it on their path (this checkout's path on
        # each node); a local instance's workers inherit this process's environment, where a runtime_env would
        # keep them from reusing the workers Ray starts in advance
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        cluster = os.environ.get("RAY_ADDRESS")
        if not cluster:
            os.environ["PYTHONPATH"] = path
        ray.init(address=cluster, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": path}} if cluster else None)
    per_replica = {"num_gpus": 1} if torch.device(device).type == "cuda" else {"num_cpus": 1}
    # a stopping replica drains its requests in flight (up to the request timeout), checking every 0.1 s
    draining = dict(graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=limits.request_timeout)

    @ray_serve.deployment(num_replicas=replicas, ray_actor_options=per_replica, max_ongoing_requests=4 * max_batch_size,
                          **draining)
    class RewardReplica:
        def __init__(self):
            self.core = ScoringCore(*load_reward(specs, device, reward_weights, reward_norm, calibration), device,
                                    precision)

        def describe(self):
            return self.core.describe()

        @ray_serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000)
        async def score(self, images, prompts):
            return await asyncio.to_thread(self.core.score_batch, list(zip(images, prompts)))

    @ray_serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=limits.max_queue * 2 + 16,
                          **draining)
    @ray_serve.ingress()
    class RewardIngress:
        async def __init__(self, replica):
            self.backend = RayBackend(replica, await replica.describe.remote(), replicas, max_batch_size, max_wait_ms)

        def __serve_build_asgi_app__(self):
            return make_app(self.backend, limits)

    stop = threading.Event()
    if blocking:  # Python's handlers over Ray's (which abort): a signal during start-up stops once Serve is up
        import signal
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    ray_serve.start(http_options={"host": host, "port": port})
    handle = ray_serve.run(RewardIngress.bind(RewardReplica.bind()), name="reward", route_prefix="/")
    if not blocking:
        return handle
    print(f"serving {specs} on http://{host}:{port} with Ray Serve, {replicas} replicas", flush=True)
    stop.wait()
    ray_serve.shutdown()  # Ray Serve drains each replica's requests in flight before it stops it
    ray.shutdown()


class RayBackend:
    """make_app's scoring backend under Ray Serve: each request a call to a scoring replica (batched there)."""

    def __init__(self, replica, info, replicas, max_batch_size, max_wait_ms):
        self.replica, self.info, self.replicas, self.pending = replica, info, replicas, 0
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms

    def start(self, on_batch):
        self.on_batch = on_batch

    def stop(self):
        pass

    def describe(self):
        return {**self.info, "engine": "ray", "replicas": self.replicas,
                "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait_ms}

    def waiting(self):
        return self.pending

    def retry_after(self, queued_images):
        return 1.0

    async def score(self, images, prompts):
        self.pending += 1
        response = self.replica.score.remote(images, prompts)
        try:
            answer = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as e:  # a replica answers every request's fault as a Refusal: this is Ray's (a dead replica)
            raise Refusal(503, f"no scoring replica answered ({described(e)}); retry later",
                          {"Retry-After": "1"}) from None
        finally:
            self.pending -= 1
        self.on_batch(len(prompts))  # batched in the replica: Ray Serve's own metrics have its batch sizes
        if isinstance(answer, Refusal):
            raise answer
        return answer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="a scorers.py spec (KIND:PATH[,key=value]); several "
                        "make a mix (--reward_weights, --reward_norm)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="fp32 (the original's), or autocast to bf16/fp16, as score.py")
    parser.add_argument("--reward_weights", type=float, nargs="+", default=None, help="one per SPEC (default 1 each)")
    parser.add_argument("--reward_norm", default=None, choices=REWARD_NORMS,
                        help="each scorer's normalisation within a request before the weights (reward.py)")
    parser.add_argument("--calibration", default=None, help="a calibration.json: scores in log-odds units, and each "
                        "image's probability of beating the request's median image")
    parser.add_argument("--max_batch_size", type=int, default=32, help="images a batch (requests under --engine ray)")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="how long a batch waits to fill")
    defaults = Limits()
    parser.add_argument("--max_queue", type=int, default=defaults.max_queue,
                        help="requests in the server at once; one more is answered 503 with Retry-After")
    parser.add_argument("--max_images", type=int, default=defaults.max_images, help="images a request (413)")
    parser.add_argument("--max_request_bytes", type=int, default=defaults.max_request_bytes, help="bytes a request")
    parser.add_argument("--max_pixels", type=int, default=defaults.max_pixels,
                        help="decoded pixels an image: PIL's decompression-bomb limit (413)")
    parser.add_argument("--max_request_pixels", type=int, default=defaults.max_request_pixels,
                        help="decoded pixels of a request's images, counted on their headers (413)")
    parser.add_argument("--max_pixels_in_flight", type=int, default=defaults.max_pixels_in_flight,
                        help="decoded pixels of all the requests not yet answered; beyond, 503 with Retry-After")
    parser.add_argument("--request_timeout", type=float, default=defaults.request_timeout,
                        help="seconds from admission to answer (408 uploading, 504 scoring)")
    parser.add_argument("--engine", default="uvicorn", choices=ENGINES)
    parser.add_argument("--replicas", type=int, default=1, help="scoring replicas under --engine ray")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    parser.add_argument("--log_level", default="info", help="uvicorn's (warning: no line a request)")
    args = parser.parse_args()
    for flag in ("max_batch_size", "max_queue", "max_images", "max_request_bytes", "max_pixels", "max_request_pixels",
                 "max_pixels_in_flight", "replicas"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.max_request_pixels > args.max_pixels_in_flight:
        raise InputError(f"--max_request_pixels {args.max_request_pixels}: more than --max_pixels_in_flight "
                         f"{args.max_pixels_in_flight}, so such a request could never be scored")
    limits = Limits(**{field: getattr(args, field) for field in Limits.__dataclass_fields__})
    common = dict(host=args.host, port=args.port, device=args.device, precision=args.precision,
                  reward_weights=args.reward_weights, reward_norm=args.reward_norm, calibration=args.calibration,
                  max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, limits=limits)
    if args.engine == "ray":
        serve_ray(args.specs, args.replicas, num_cpus=args.num_cpus, **common)
    else:
        serve(args.specs, log_level=args.log_level, **common)


if __name__ == "__main__":
    run_cli(main)
