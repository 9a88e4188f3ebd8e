"""What one /score request may ask, and how many may be in the server at once (Limits: the flags of the same names),
and the answer when a request asks too much or comes at the wrong time (Refusal: a status and one line naming the
fault). It imports nothing heavy: scripts/serve.py takes its flags' defaults from here before anything loads.

    limits = Limits(max_queue=8, max_images=64)
    raise Refusal(413, f"images: {n} in one request, more than --max_images {limits.max_images}")
"""
from dataclasses import dataclass


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
