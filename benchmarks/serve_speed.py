"""Throughput and latency of serve.py on loopback against in-process scoring of the same images in the same run, and
its behaviour under overload (docs/serving.md).

    python benchmarks/serve_speed.py --models tiny --threads 1        # 1/8/32 clients, 20 s each, and overload
    python benchmarks/serve_speed.py --models vit-l-14 --threads 1 --pool 8 --max_batch_size 8 \
        --images_per_request 1 --overload_models vit-l-14 --overload_clients 16 --overload_queue 4 --append
    (docs/serving.md's numbers: the same with --seconds 5; ViT-L/14 on a CPU takes seconds an image, hence its
    smaller pool, batches and requests)
    pip install litserve==0.2.19     # not in requirements.txt: for this comparison only
    python benchmarks/serve_speed.py --models tiny --threads 1 --body json --overload_models --append
    python benchmarks/serve_speed.py --models tiny --threads 1 --engine litserve --overload_models --append
    (the same model, images and JSON bodies behind LitServe's batching: benchmarks/litserve_server.py)
    python benchmarks/serve_speed.py --models tiny --threads 1 --clients 32 --seconds 10 --overload_clients 0 \
        --impatient_clients 128 --append      # goodput under overload by clients that ignore Retry-After

For each model (random weights saved once, so that server and in-process load the same file): the server starts as a
process of its own (--max_batch_size, --max_wait_ms); 1, 8 and 32 client threads each send requests of
--images_per_request PNGs (--image_size px noise) for --seconds; images/s is answered images over the time, set against
reward_fn in this process decoding and scoring the same PNGs in batches of --max_batch_size. Reported: p50/p99
latency, the batch-size histogram (the server's /metrics), the server's peak RSS; every answered score is checked
against the in-process score of its image and prompt. Overload: --overload_clients clients against a server holding
--overload_queue requests, without retries: the share answered 503 and how fast, and no request lost (every request
answered 200 or 503) or answered wrongly. Impatient overload: --impatient_clients connections (asyncio, raw HTTP/1.1
keep-alive, so that the load costs the benchmark little CPU) that send their next request as soon as any answer comes,
a 503 included (Retry-After ignored), for --seconds or --impatient_requests requests, against --overload_queue: the
images/s answered then, set against the images/s the server delivers to 32 well-behaved clients in the same run.
"""
import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from social_reward.models.clip import load_model  # noqa: E402
from social_reward.reward.mix import reward_fn  # noqa: E402

MODELS = {"tiny": os.path.join(ROOT, "assets", "tiny-clip.json"), "vit-l-14": "ViT-L-14-quickgelu"}
TOLERANCE = 1e-5  # fp32 scores of one image in batches of other sizes agree to about 1e-7


def save_random_init(model, path):
    """A random init (seed 0) in fp16 (half the file; both sides load the same rounded weights, as fp32)."""
    torch.manual_seed(0)
    torch.save({k: v.half() for k, v in load_model(model, pretrained="none")[0].state_dict().items()}, path)
    return path


def make_pool(n, size, seed=0):
    """n noise PNGs of size x size and a prompt for each."""
    generator = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG",
                                                                                          compress_level=1)
        images.append(buffer.getvalue())
    return images, [f"a photograph, number {i}" for i in range(n)]


def decode(pngs):
    images = [Image.open(io.BytesIO(data)) for data in pngs]
    [image.load() for image in images]
    return images


def in_process(fn, pngs, prompts, batch_size, seconds):
    """(images/s decoding and scoring the pool in batches, the score of each pool image)."""
    expected = torch.cat([fn(decode(pngs[i:i + batch_size]), prompts[i:i + batch_size])[0]
                          for i in range(0, len(pngs), batch_size)])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        i = (done // batch_size * batch_size) % len(pngs)
        fn(decode(pngs[i:i + batch_size]), prompts[i:i + batch_size])
        done += len(pngs[i:i + batch_size])
    return done / (time.perf_counter() - start), expected.tolist()


def start_server(spec, port, flags, threads=None, engine="serve"):
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = ([os.path.join(ROOT, "scripts/serve.py"), spec, "--device", "cpu", "--log_level", "warning"]
               if engine == "serve" else [os.path.join(ROOT, "benchmarks", "litserve_server.py"), spec])
    process = subprocess.Popen([sys.executable, *command, "--port", str(port), *flags], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # LitServe's workers: a process group to stop together
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise SystemExit(process.stderr.read()[-3000:])
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start in 10 minutes")
        time.sleep(0.2)


def group_memory_mb(pgid, file, field):
    """The sum of `field` (kB) in /proc/PID/`file` over the processes in process group `pgid` (serve.py is one
    process; LitServe several)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
            with open(f"/proc/{pid}/{file}") as f:
                total += int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))
        except (OSError, AttributeError):
            continue
    return total / 1024


def stop_server(process):
    """Stop the server's process group: its peak RSS (each process's peak, summed: pages a forked process shares
    with its parent count in both) and its PSS at the end (shared pages split between the processes sharing them)."""
    peak = group_memory_mb(process.pid, "status", "VmHWM"), group_memory_mb(process.pid, "smaps_rollup", "Pss")
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(120)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # what is left of the group
        except ProcessLookupError:
            pass
    return peak


def batch_histogram(url):
    """{upper bound: batches with at most that many images} (cumulative, as Prometheus keeps it); {} for a server
    without serve.py's /metrics (LitServe)."""
    response = requests.get(url + "/metrics", timeout=10)
    text = response.text if response.status_code == 200 else ""
    return {bound: float(count) for bound, count in re.findall(r'reward_batch_size_bucket\{le="([^"]+)"\} (\S+)', text)}


def batches_by_size(before, after):
    """{"lo-hi" images: batches} scored between two cumulative histograms, empty ranges left out."""
    counts, below, low = {}, 0.0, 1
    for bound in after:
        total = after[bound] - before.get(bound, 0.0)
        if total > below:
            high = bound.replace(".0", "")
            counts[f"{low}-{high}" if str(low) != high else high] = int(total - below)
        below, low = total, (int(float(bound)) + 1 if bound != "+Inf" else None)
    return counts


def run_clients(url, bodies, clients, seconds, expected, images_per_request):
    """clients threads posting prepared bodies for `seconds`: every answer's status, latency and correctness. A
    client answered 503 waits its Retry-After, as reward_client does."""
    records, stop = [], time.monotonic() + seconds
    lock = threading.Lock()

    def client(k):
        session, n = requests.Session(), k
        while time.monotonic() < stop:
            first, (body, content_type) = n % len(bodies), bodies[n % len(bodies)]
            n += clients
            started = time.perf_counter()
            try:
                response = session.post(url + "/score", data=body, headers={"Content-Type": content_type},
                                        timeout=3600)
                status = response.status_code
                scores = response.json()["scores"] if status == 200 else None
            except (requests.RequestException, ValueError) as e:
                status, scores = type(e).__name__, None
            latency = time.perf_counter() - started
            wrong = None
            if status == 200:
                want = [expected[(first * images_per_request + j) % len(expected)] for j in range(images_per_request)]
                wrong = len(scores) != len(want) or max(abs(a - b) for a, b in zip(scores, want)) > TOLERANCE
            with lock:
                records.append((status, latency, wrong))
            if status == 503:
                time.sleep(min(float(response.headers.get("Retry-After", 1)), max(stop - time.monotonic(), 0)))
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    return records, time.perf_counter() - start


def impatient_clients(url, bodies, clients, seconds, max_requests, expected, images_per_request):
    """`clients` keep-alive connections, each sending its next request as soon as an answer comes, 503 or not (no
    Retry-After, no back-off), until `seconds` pass or `max_requests` are sent: every answer's status, latency and
    correctness, as run_clients records them. Raw HTTP/1.1 over asyncio streams: a request costs the benchmark a
    few tens of microseconds, so the server, not the load, is what is measured."""
    host, port = url.split("//")[1].split(":")
    raw = [(f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body, content_type in bodies]
    records, sent = [], [0]

    async def answer(reader):
        status = int((await reader.readline()).split()[1])
        length, close = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            length = int(value) if name.lower() == "content-length" else length
            close = close or (name.lower() == "connection" and "close" in value.lower())
        return status, await reader.readexactly(length), close

    async def client(k, stop):
        n, connection = k, None
        while time.monotonic() < stop and sent[0] < max_requests:
            sent[0] += 1
            first = n % len(raw)
            n += clients
            started = time.perf_counter()
            try:
                connection = connection or await asyncio.open_connection(host, int(port))
                connection[1].write(raw[first])
                await connection[1].drain()
                status, payload, close = await asyncio.wait_for(answer(connection[0]), 60 + seconds)
                if close:
                    connection[1].close()
                    connection = None
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as e:
                status, payload = type(e).__name__, None
                if connection:
                    connection[1].close()
                connection = None
            latency, wrong = time.perf_counter() - started, None
            if status == 200:
                scores = json.loads(payload)["scores"]
                want = [expected[(first * images_per_request + j) % len(expected)] for j in range(images_per_request)]
                wrong = len(scores) != len(want) or max(abs(a - b) for a, b in zip(scores, want)) > TOLERANCE
            records.append((status, latency, wrong))
        if connection:
            connection[1].close()

    async def run():
        stop = time.monotonic() + seconds
        await asyncio.gather(*(client(k, stop) for k in range(clients)))
    start = time.perf_counter()
    asyncio.run(run())
    return records, time.perf_counter() - start


def prepared_bodies(pngs, prompts, images_per_request, body="multipart"):
    """Multipart or base64 JSON bodies of consecutive pool images, made once (the clients then spend no time
    encoding)."""
    bodies = []
    for first in range(0, len(pngs), images_per_request):
        idx = [(first + j) % len(pngs) for j in range(images_per_request)]
        if body == "json":
            bodies.append((json.dumps({"prompts": [prompts[i] for i in idx], "images": [
                base64.b64encode(pngs[i]).decode() for i in idx]}).encode(), "application/json"))
            continue
        request = requests.Request("POST", "http://x/score", files=[("prompts", (None, prompts[i])) for i in idx] +
                                   [("images", (f"{i}.png", pngs[i], "image/png")) for i in idx]).prepare()
        bodies.append((request.body, request.headers["Content-Type"]))
    return bodies


def summary(records, elapsed, images_per_request):
    latencies = np.array([latency for status, latency, _ in records if status == 200])
    answered = sum(status == 200 for status, _, _ in records)
    return {"requests": len(records), "answered": answered,
            "images_per_second": answered * images_per_request / elapsed,
            "p50_latency_s": float(np.percentile(latencies, 50)) if len(latencies) else None,
            "p99_latency_s": float(np.percentile(latencies, 99)) if len(latencies) else None,
            "wrong": sum(bool(w) for _, _, w in records),
            "other_answers": sorted({str(s) for s, _, _ in records if s not in (200, 503)})}


def bench_model(name, folder, args, port):
    spec = f"clip:{save_random_init(MODELS[name], os.path.join(folder, name + '.pth'))},model={MODELS[name]}"
    pngs, prompts = make_pool(args.pool, args.image_size)
    fn = reward_fn(spec)
    local_rate, expected = in_process(fn, pngs, prompts, args.max_batch_size, args.seconds)
    print(f"{name}: in process {local_rate:.1f} images/s (batches of {args.max_batch_size})", flush=True)
    bodies = prepared_bodies(pngs, prompts, args.images_per_request, args.body)
    if args.engine == "litserve":  # LitServe batches requests, not images: the same images a batch
        batching = ["--max_batch_size", str(max(1, args.max_batch_size // args.images_per_request)),
                    "--max_wait_ms", str(args.max_wait_ms)]
    else:
        batching = ["--max_batch_size", str(args.max_batch_size), "--max_wait_ms", str(args.max_wait_ms),
                    "--request_timeout", "3600"]  # a benchmark's slow answer is measured, not refused
    process, url = start_server(spec, port, batching + (["--max_queue", "1024"] if args.engine == "serve" else []),
                                args.threads, args.engine)
    result = {"spec_model": MODELS[name], "engine": args.engine, "body": args.body,
              "in_process_images_per_second": local_rate, "clients": {}}
    try:
        for clients in args.clients:
            before = batch_histogram(url)
            records, elapsed = run_clients(url, bodies, clients, args.seconds, expected, args.images_per_request)
            after = batch_histogram(url)
            one = summary(records, elapsed, args.images_per_request)
            one["vs_in_process"] = one["images_per_second"] / local_rate
            one["batches_by_size"] = batches_by_size(before, after)
            result["clients"][str(clients)] = one
            print(f"{name}: {clients:>3} clients {one['images_per_second']:.1f} images/s "
                  f"({one['vs_in_process']:.2f}x in process), p50 {one['p50_latency_s']:.3f} s, "
                  f"p99 {one['p99_latency_s']:.3f} s, wrong {one['wrong']}", flush=True)
    finally:
        result["server_peak_rss_mb"], result["server_pss_mb_at_end"] = stop_server(process)
    if name in args.overload_models and args.overload_clients:
        process, url = start_server(spec, port, batching + ["--max_queue", str(args.overload_queue)], args.threads)
        try:
            records, elapsed = run_clients(url, bodies, args.overload_clients, args.seconds, expected,
                                           args.images_per_request)
        finally:
            stop_server(process)
        refused = [latency for status, latency, _ in records if status == 503]
        over = summary(records, elapsed, args.images_per_request)
        over.update({"clients": args.overload_clients, "max_queue": args.overload_queue,
                     "share_503": len(refused) / max(len(records), 1),
                     "p50_503_latency_s": float(np.percentile(refused, 50)) if refused else None,
                     "p99_503_latency_s": float(np.percentile(refused, 99)) if refused else None,
                     "lost": len(over["other_answers"])})
        result["overload"] = over
        print(f"{name}: overload {args.overload_clients} clients, queue {args.overload_queue}: "
              f"{over['share_503']:.0%} answered 503 (p99 {over['p99_503_latency_s'] or 0:.4f} s), "
              f"wrong {over['wrong']}, other answers {over['other_answers']}", flush=True)
    if name in args.overload_models and args.impatient_clients:
        process, url = start_server(spec, port, batching + ["--max_queue", str(args.overload_queue)], args.threads)
        try:
            records, elapsed = impatient_clients(url, bodies, args.impatient_clients, args.seconds,
                                                 args.impatient_requests, expected, args.images_per_request)
        finally:
            stop_server(process)
        storm = summary(records, elapsed, args.images_per_request)
        storm.update({"clients": args.impatient_clients, "max_queue": args.overload_queue,
                      "answered_503": sum(status == 503 for status, _, _ in records), "seconds": elapsed})
        polite = result["clients"].get("32", {}).get("images_per_second")
        storm["vs_32_clients"] = storm["images_per_second"] / polite if polite else None
        result["impatient_overload"] = storm
        print(f"{name}: {args.impatient_clients} impatient clients, queue {args.overload_queue}: "
              f"{storm['images_per_second']:.1f} images/s ({storm['answered']} answered 200, "
              f"{storm['answered_503']} 503 in {elapsed:.1f} s; {storm['vs_32_clients'] or 0:.2f}x 32 clients), "
              f"wrong {storm['wrong']}, other answers {storm['other_answers']}", flush=True)
    os.remove(spec.split(":", 1)[1].split(",")[0])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=20.0, help="each setting's time")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--images_per_request", type=int, default=4)
    parser.add_argument("--pool", type=int, default=64, help="distinct images")
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--max_wait_ms", type=float, default=10.0)
    parser.add_argument("--overload_models", nargs="*", default=["tiny"])
    parser.add_argument("--overload_clients", type=int, default=64, help="clients that wait Retry-After (0: none)")
    parser.add_argument("--overload_queue", type=int, default=8)
    parser.add_argument("--impatient_clients", type=int, default=128, help="connections that retry at once on 503 "
                        "(0: none); against --overload_queue, for --seconds")
    parser.add_argument("--impatient_requests", type=int, default=200_000, help="at most this many requests in all")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, in process and in the server "
                        "(default torch's; 1 on a machine others load: idle threads spin)")
    parser.add_argument("--engine", default="serve", choices=["serve", "litserve"],
                        help="serve.py, or the same model behind LitServe (benchmarks/litserve_server.py; JSON bodies)")
    parser.add_argument("--body", default=None, choices=["multipart", "json"],
                        help="the requests' encoding (default multipart; JSON for LitServe)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results-serve.json"))
    parser.add_argument("--append", action="store_true", help="add this run to the --json file's runs")
    args = parser.parse_args()
    args.body = args.body or ("json" if args.engine == "litserve" else "multipart")
    if args.engine == "litserve" and (args.body != "json" or args.overload_models):
        parser.error("--engine litserve: JSON bodies, and no overload run (LitServe has no bounded queue): "
                     "--body json --overload_models")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python benchmarks/serve_speed.py", *sys.argv[1:]]),
               "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
               "load_average_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "port")}, "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            results["models"][name] = bench_model(name, folder, args, args.port)
    results["load_average_at_end"] = os.getloadavg()
    runs = []
    if args.append and os.path.isfile(args.json):
        with open(args.json) as f:
            runs = json.load(f)["runs"]
    with open(args.json, "w") as f:
        json.dump({"runs": runs + [results]}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
