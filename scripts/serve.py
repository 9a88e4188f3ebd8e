"""The reward as a service: a scoring server that RL loops on other GPUs and machines call (docs/serving.md).

    python scripts/serve.py clip:clip_epoch_4_global_step_final.pth --port 8000
    python scripts/serve.py pickscore:PickScore_v1 aesthetic:sac.pth,clip=ViT-L-14.pt --reward_weights 1 0.5 \\
        --reward_norm group --device cuda --precision bf16
    python scripts/serve.py clip:final.pth --engine ray --replicas 4        # one replica a GPU, on a Ray cluster

    curl -F prompts="a red fox" -F images=@fox.png -F prompts="a cat" -F images=@cat.png localhost:8000/score
    fn = reward_fn("http://localhost:8000")      # social_reward.reward.mix: the in-process callable's twin

POST /score takes prompts and images (PNG/JPEG bytes, or one .npy array of a float or uint8 batch) as multipart or
base64 JSON and answers {"scores": [...]} (with "raw" per scorer for a mix, "probabilities" with a calibration);
GET /health says what is served and how full the queue is; GET /metrics is Prometheus text. Requests from many
clients coalesce into batches of up to --max_batch_size images or --max_wait_ms in one scoring thread on the model's
device: the scores are reward_fn's of the same images. Each request's images are decoded and checked before it
joins a batch, so a bad upload fails its own request (4xx, one line naming the fault) and no other. The work is
social_reward.serving (engines.serve, engines.serve_ray).
"""
import argparse

from social_reward.cli import run_cli
from social_reward.devices import PRECISIONS
from social_reward.errors import InputError
from social_reward.reward.normalization import REWARD_NORMS
from social_reward.serving.limits import Limits

ENGINES = ("uvicorn", "ray")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="a scorer spec (KIND:PATH[,key=value]); several "
                        "make a mix (--reward_weights, --reward_norm)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="fp32 (the original's), or autocast to bf16/fp16, as scripts/score.py")
    parser.add_argument("--reward_weights", type=float, nargs="+", default=None, help="one per SPEC (default 1 each)")
    parser.add_argument("--reward_norm", default=None, choices=REWARD_NORMS,
                        help="each scorer's normalisation within a request before the weights (docs/reward.md); "
                        "prompt is not served: its running statistics would make a score depend on earlier requests")
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
    from social_reward.serving.engines import serve, serve_ray

    if args.engine == "ray":
        serve_ray(args.specs, args.replicas, num_cpus=args.num_cpus, **common)
    else:
        serve(args.specs, log_level=args.log_level, **common)


if __name__ == "__main__":
    run_cli(main)
