"""The one scoring thread: requests from many clients coalesce into a batch of up to max_batch_size images, waiting
at most max_wait_ms after the first came, on the model's device. It survives any error (the batch's requests get a
500 naming it in one line, later requests are scored) and says when it is dead or stalled, which /health reports.

    backend = LocalBackend(core, max_batch_size=32, max_wait_ms=10)
    backend.start(on_batch=metrics.on_batch); answer = await backend.score(images, prompts)
"""
import asyncio
import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass

from social_reward.errors import described
from social_reward.serving.limits import Refusal


@dataclass(eq=False)
class Job:
    images: object
    prompts: list
    future: concurrent.futures.Future
    enqueued: float

    def __len__(self):
        return len(self.prompts)


FAILING_BATCHES = 3  # batches in a row whose every request failed (500) before /health answers 503


class Batcher:
    """One scoring thread; requests coalesce into a batch of up to max_batch_size images, waiting at most max_wait_ms
    after the first request of the batch arrived (a request larger than max_batch_size is a batch of its own). The
    thread is the server's only one: an error in a batch (the scorer's, the metrics callback's) answers that batch's
    requests 500 and the thread goes on; `stalled_for` and `alive` tell /health when it has stopped answering."""

    def __init__(self, core, max_batch_size=32, max_wait_ms=10.0, on_batch=None):
        self.core, self.max_batch_size, self.max_wait = core, max_batch_size, max_wait_ms / 1000
        self.on_batch = on_batch or (lambda images, seconds: None)
        self.jobs, self.condition, self.stopping = collections.deque(), threading.Condition(), False
        self.seconds_per_image = 0.0  # measured, for Retry-After
        # when the thread last ended a batch, and when it took the batch it is scoring (None: none): /health's
        self.progress, self.scoring_since = time.monotonic(), None
        self.failing = (0, None)  # the batches in a row whose every request failed (500), and the last one's line
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

    def alive(self):
        return self.thread.is_alive()

    def stalled_for(self):
        """Seconds the thread has had requests to answer and ended no batch: 0 while it has none, or while its
        oldest queued request waits its max_wait_ms for the batch to fill."""
        with self.condition:
            since = self.scoring_since if self.scoring_since is not None else \
                self.jobs[0].enqueued + self.max_wait if self.jobs else None
        return 0.0 if since is None else max(0.0, time.monotonic() - max(since, self.progress))

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
                    self.scoring_since = time.monotonic()
                    # False for a job whose client has just left; once running, a job's future cannot be cancelled
                    return [job for job in batch if job.future.set_running_or_notify_cancel()]
                self.condition.wait(left)

    def _run(self):
        while (batch := self._next_batch()) is not None:
            try:
                answers = self._score(batch)
            except BaseException as e:  # the server's only scoring thread: it answers the batch and goes on
                answers = [Refusal(500, f"scoring failed ({described(e)})")] * len(batch)
                for job, answer in zip(batch, answers):
                    if not job.future.done():
                        job.future.set_result(answer)
            finally:
                self.progress, self.scoring_since = time.monotonic(), None
            failed = [a for a in answers if isinstance(a, Refusal) and a.status == 500]
            if answers:  # a batch of requests whose clients all left says nothing
                self.failing = (self.failing[0] + 1, failed[-1].message) if len(failed) == len(answers) else (0, None)

    def _score(self, batch):
        if not batch:
            return []
        started = time.monotonic()
        answers = self.core.score_batch([(job.images, job.prompts) for job in batch])
        seconds, size = time.monotonic() - started, sum(len(job) for job in batch)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / size if self.seconds_per_image \
            else seconds / size
        self.on_batch(size, seconds)
        for job, answer in zip(batch, answers):
            job.future.set_result(answer)
        return answers


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

    def fault(self, stalled_after):
        """Why the backend cannot answer, in one line (/health's 503), or None: its scoring thread is dead, or has
        had requests for `stalled_after` seconds and answered none, or its last FAILING_BATCHES batches failed every
        request (500: the server's fault, a device error say, not the requests')."""
        if not self.batcher.alive():
            return "the scoring thread has died; restart the server"
        stalled = self.batcher.stalled_for()
        if stalled > stalled_after:
            return f"the scoring thread has answered no request for {stalled:.0f} s while requests wait"
        batches, message = self.batcher.failing
        if batches >= FAILING_BATCHES:
            return f"the last {batches} batches failed every request ({message})"
        return None

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
