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
import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass

from social_reward.serving.limits import Refusal


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
