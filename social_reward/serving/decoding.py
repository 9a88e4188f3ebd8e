"""A request's images decoded and checked before it joins a batch, so that a bad upload fails its own request (4xx,
one line) and no other: PNG/JPEG bytes read as far as their headers, their decoded pixels counted and taken from the
server's pixel budget before any is decoded, or one .npy batch checked on its header before it is allocated. PIL is
strict while the app runs (a truncated upload is an error).

    images, prompts, pixels = await decode_in_thread(prompts, images, None, limits, budget)
"""
import asyncio
import contextlib
import io
import math
import threading

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from social_reward.errors import InputError, first_line
from social_reward.reward.differentiable import as_image_tensor
from social_reward.serving.limits import Refusal


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
