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
import base64
import binascii
import json
import time

from social_reward.errors import first_line
from social_reward.serving.limits import Refusal


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
