"""The engines the scoring app runs on: uvicorn in this process (serve), or Ray Serve with an ingress and scoring
replicas on a cluster's GPUs (serve_ray). Both serve app.make_app; scripts/serve.py picks one.

    serve("clip:clip_final.pth", port=8000, device="cuda", precision="bf16", max_batch_size=64)
    handle = serve_ray("clip:clip_final.pth", replicas=4, device="cuda", blocking=False)
"""
import asyncio
import os
import threading

import torch

from social_reward.devices import default_device
from social_reward.errors import described
from social_reward.serving.app import make_app
from social_reward.serving.batching import LocalBackend
from social_reward.serving.core import ScoringCore, load_reward, reward_args
from social_reward.serving.limits import Limits, Refusal


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
    from social_reward.scorers.registry import check_spec
    reward_args(specs, reward_weights, reward_norm, calibration)  # a mistake in one line here, not in a replica's log
    for spec in [specs] if isinstance(specs, str) else specs:
        check_spec(spec)
    if not ray.is_initialized():
        # the replicas import this package: a local instance's workers inherit this process's environment (where it
        # is installed); a cluster's nodes get it shipped with the job (Ray's py_modules)
        cluster = os.environ.get("RAY_ADDRESS")
        import social_reward
        ray.init(address=cluster, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"py_modules": [social_reward]} if cluster else None)
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

    def fault(self, stalled_after):
        return None  # Ray Serve health-checks and restarts its replicas itself

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
                          {"Retry-After": "1"}, "no_replica") from None
        finally:
            self.pending -= 1
        self.on_batch(len(prompts))  # batched in the replica: Ray Serve's own metrics have its batch sizes
        if isinstance(answer, Refusal):
            raise answer
        return answer
