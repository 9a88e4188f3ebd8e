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
