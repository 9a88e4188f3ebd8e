"""Peak memory of validate.py on Pick-a-Pic shards of 200 and 2,000 rows: image bytes are read a row group at a time,
so the larger shard must not cost more than the smaller by the bytes it adds.

    python benchmarks/pickapic_memory.py                     # about 3 minutes here
    python benchmarks/pickapic_memory.py --rows 200,2000 --row_group_size 100 --batch_size 8,100 --json memory.json

Each row holds two distinct JPEGs of about 100 KB (so 2,000 rows hold about 400 MB of image bytes), written with
pyarrow's defaults and `--row_group_size` rows per row group (the `datasets` library writes image data in row groups
of 100). validate.py runs as a user runs it (the tiny config, random weights, CPU) in a process of its own, and the
peak resident memory of that process is reported. The batch size is the same for every shard: validate.py's default
(1024, capped at the number of pairs) would otherwise give the larger shard larger encode calls, whose activations,
not the data, would make the difference. A small batch (8) makes many batches: memory that grows per batch shows there.
"""
import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")


def jpeg_pool(count, rng):
    """`count` different 480x480 JPEGs of about 100 KB each: smooth colour fields with noise."""
    pool = []
    for _ in range(count):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(base).resize((480, 480), Image.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.normal(0, 24, image.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=85)
        pool.append(buffer.getvalue())
    return pool


def write_shard(path, rows, row_group_size, pool):
    """A Pick-a-Pic-layout shard; every image has its own uid and its own bytes (a JPEG from the pool with a unique
    tail after its end marker, which decoders ignore), so each is stored, decoded and encoded."""
    labels = np.arange(rows) % 2
    image = lambda i: pool[i % len(pool)] + i.to_bytes(8, "little")  # noqa: E731
    table = pa.table({
        "caption": [f"prompt number {i}" for i in range(rows)], "has_label": [True] * rows,
        "image_0_uid": [f"{i}_0" for i in range(rows)], "image_1_uid": [f"{i}_1" for i in range(rows)],
        "jpg_0": pa.array([image(2 * i) for i in range(rows)], pa.binary()),
        "jpg_1": pa.array([image(2 * i + 1) for i in range(rows)], pa.binary()),
        "label_0": labels.astype(float), "label_1": 1.0 - labels})
    pq.write_table(table, path, row_group_size=row_group_size)
    return sum(len(b) for b in table.column("jpg_0").to_pylist() + table.column("jpg_1").to_pylist())


def peak_rss_of(command):
    """Run `command` in a child process; its output and peak RSS (MB), measured by a wrapper of its own."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(r.stdout + r.stderr[-2000:]); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    return "\n".join(lines[:-1]), int(lines[-1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="200,2000")
    parser.add_argument("--row_group_size", type=int, default=100)
    parser.add_argument("--batch_size", default="8,100", help="validate.py --batch_size values, each run on every shard")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pool = jpeg_pool(64, rng)
    results = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
               "date": time.strftime("%Y-%m-%d"), "row_group_size": args.row_group_size,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        shards = {}
        for rows in map(int, args.rows.split(",")):
            shards[rows] = os.path.join(folder, f"test-{rows}.parquet")
            image_bytes = write_shard(shards[rows], rows, args.row_group_size, pool)
            results["runs"][rows] = {"image_mb": image_bytes / 2**20, "file_mb": os.path.getsize(shards[rows]) / 2**20}
        for batch_size in args.batch_size.split(","):
            for rows, shard in shards.items():
                start = time.perf_counter()
                output, peak = peak_rss_of([sys.executable, "validate.py", shard, "--model", TINY_CLIP, "--pretrained",
                                            "none", "--device", "cpu", "--batch_size", batch_size])
                if "Accuracy:" not in output:
                    raise SystemExit(f"validate.py failed on {rows} rows:\n{output}")
                results["runs"][rows][f"batch_{batch_size}"] = {"peak_rss_mb": peak,
                                                                "run_s": time.perf_counter() - start}
    print(f"{results['date']}, {results['machine']}, validate.py on Pick-a-Pic-layout shards, "
          f"{args.row_group_size} rows per row group, tiny config, CPU")
    print(f"{'batch':>6} {'rows':>6} {'image MB':>9} {'file MB':>8} {'peak RSS MB':>12} {'run s':>6}")
    for batch_size in args.batch_size.split(","):
        peaks = []
        for rows, run in results["runs"].items():
            measured = run[f"batch_{batch_size}"]
            peaks.append(measured["peak_rss_mb"])
            print(f"{batch_size:>6} {rows:>6} {run['image_mb']:9.0f} {run['file_mb']:8.0f} "
                  f"{measured['peak_rss_mb']:12.0f} {measured['run_s']:6.1f}")
        print(f"batch {batch_size}: largest minus smallest peak RSS: {max(peaks) - min(peaks):.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
