"""The reward from a scoring server (scripts/serve.py), as the in-process callable: reward_fn("http://host:8000")
returns remote_reward_fn's fn(images, prompts, metadata) -> (rewards, info), so a DDPO or flow_grpo loop uses a remote
reward by changing one string. It needs only torch, numpy, PIL and requests (no model code).

    fn = remote_reward_fn("http://10.0.0.5:8000")
    rewards, info = fn(images, prompts, metadata)     # images: B x 3 x H x W floats in [0, 1], uint8 B x H x W x 3, PIL

Images travel losslessly, so the server scores exactly what an in-process call would: a float batch as .npy float32
bytes (no rounding to 8 bits), a uint8 batch as .npy uint8, PIL images as PNG (a mode PNG cannot hold, CMYK say, is
converted to RGB first, as every scorer's preprocessing converts it). A 503 is retried after its Retry-After, a
refused or dropped connection with a growing back-off, up to `retries` times; any other refusal ends in one line
(InputError) carrying the server's message.
"""
import io
import math
import time

import numpy as np
import requests
import torch
from PIL import Image

from social_reward.errors import InputError, first_line

PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


def encode_images(images):
    """The multipart files of a batch: [("tensor", .npy)] for a tensor or array, [("images", PNG), ...] for PIL."""
    if isinstance(images, (list, tuple)) and all(isinstance(image, Image.Image) for image in images):
        files = []
        for i, image in enumerate(images):
            buffer = io.BytesIO()
            (image if image.mode in PNG_MODES else image.convert("RGB")).save(buffer, format="PNG", compress_level=1)
            files.append(("images", (f"{i}.png", buffer.getvalue(), "image/png")))
        return files
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = (images if images.dtype == torch.uint8 else images.float()).numpy()  # fp16/bf16: as the reward casts
    if not isinstance(images, np.ndarray):
        raise InputError(f"images: expected a float tensor B x 3 x H x W in [0, 1], a uint8 array B x H x W x 3 or a "
                         f"list of PIL images, got {type(images).__name__}")
    if images.dtype != np.uint8:
        images = images.astype(np.float32, copy=False)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(images), allow_pickle=False)
    return [("tensor", ("images.npy", buffer.getvalue(), "application/octet-stream"))]


def score_remote(url, images, prompts, session=None, retries=8, timeout=120.0, backoff=0.5):
    """The server's answer to one /score request, a dict: "scores", and "raw" ({spec: scores}) for a mix,
    "probabilities" with a calibration."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    files = [("prompts", (None, prompt.encode("utf-8"))) for prompt in prompts] + encode_images(images)
    session = session or requests.Session()
    wait = backoff
    for attempt in range(retries + 1):
        try:
            response = session.post(url.rstrip("/") + "/score", files=files, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as e:
            if attempt == retries:
                raise InputError(f"{url}: no answer after {retries + 1} tries ({type(e).__name__})") from None
            time.sleep(wait)
            wait = min(wait * 2, 30.0)
            continue
        if response.status_code == 200:
            return response.json()
        message = _message(response)
        if response.status_code == 503 and attempt < retries:
            time.sleep(retry_after(response, wait))
            wait = min(wait * 2, 30.0)  # a 503 without Retry-After (a proxy's) backs off as a lost connection does
            continue
        raise InputError(f"{url}: {response.status_code}: {message}")


def _message(response):
    try:
        return response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return first_line(response.text, 200) if response.text.strip() else response.reason


def retry_after(response, default):
    """The seconds a 503's Retry-After asks for, between 0 and 60; `default` when it has none, or none that is a
    number of seconds (an HTTP date, "-1", "nan")."""
    try:
        seconds = float(response.headers.get("Retry-After", default))
    except ValueError:
        return default
    return min(seconds, 60.0) if 0 <= seconds < math.inf else default


def remote_reward_fn(url, device="cpu", retries=8, timeout=120.0):
    """reward.reward_fn's callable for the reward a server at `url` serves: fn(images, prompts, metadata) ->
    (rewards float32 [B] on `device`, info), info {} for a plain spec, else {spec: its raw scores}, as in process.
    The rewards carry no gradient (DDPO and GRPO call without one); the server decides spec and normalisation.

        fn = remote_reward_fn("http://localhost:8000")
        rewards, info = fn(images, prompts, metadata)
    """
    if not url.startswith(("http://", "https://")):
        raise InputError(f"{url}: not an http:// or https:// address")
    session = requests.Session()

    def fn(images, prompts, metadata=None):
        answer = score_remote(url, images, prompts, session, retries, timeout)
        rewards = torch.tensor(answer["scores"], dtype=torch.float32, device=device)
        info = {name: torch.tensor(values, dtype=torch.float32, device=device)
                for name, values in answer.get("raw", {}).items()}
        return rewards, info

    fn.url = url
    return fn
