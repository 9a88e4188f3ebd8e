"""Peak memory of scripts/evaluate_generators.py on a generations table holding image bytes, at 2,000 and 20,000
images: the table is read a row group's image column at a time (social_reward.data.generations._read_parquet names
each cell, social_reward.data.cells.ParquetCells reads it), so peak RSS must stay flat in the table's size, not grow
by its bytes.

    python benchmarks/bytes_table_memory.py                                   # 2K and 20K images (2 GB under /tmp)
    python benchmarks/bytes_table_memory.py --images 200 2000 --json /tmp/bytes-table.json      # a short check
    python benchmarks/bytes_table_memory.py --images 200 2000 --row_group_size 0  # pyarrow's default: one row group

Each row is a generation (generator a or b, the same prompts for both) whose image is a distinct JPEG of about 100 KB
(benchmarks/pickapic_memory.py's pool, each with a unique tail after its end marker, which decoders ignore), written
with `--row_group_size` rows per row group (100, as the `datasets` library writes image data; 0: pyarrow's and
pandas' default, the whole table up to 1Mi rows in one row group). The table is written under --tmp, never in the
repository. scripts/evaluate_generators.py runs as a user runs it (the tiny config from a random init saved once,
CPU, the CPU's default of no DataLoader workers, a fixed --batch_size) in a process of its own under /usr/bin/time
-v, which reports its peak RSS and wall time.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pickapic_memory.py beside this file (social_reward itself is pip-installed)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")

from pickapic_memory import jpeg_pool  # noqa: E402


def write_table(path, images, row_group_size, pool):
    """A generations table of `images` rows (generator, prompt, image bytes); returns the image bytes written. Row
    groups are written one at a time, so only one is held here, except with row_group_size 0 (one row group)."""
    def rows(start, stop):
        index = np.arange(start, stop)
        return pa.table({"generator": ["a" if i < images // 2 else "b" for i in index],
                         "prompt": [f"prompt number {i % (images // 2)}" for i in index],
                         "image": pa.array([pool[i % len(pool)] + int(i).to_bytes(8, "little") for i in index],
                                           pa.binary())})
    step = row_group_size or images
    written = 0
    with pq.ParquetWriter(path, rows(0, 1).schema) as writer:
        for start in range(0, images, step):
            table = rows(start, min(start + step, images))
            writer.write_table(table, row_group_size=len(table))
            written += sum(len(b) for b in table.column("image").to_pylist())
    return written


def timed(command):
    """`command` under /usr/bin/time -v: (its output, peak RSS in MB, wall seconds)."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(part) * 60 ** k for k, part in enumerate(reversed(wall.split(":"))))
    return result.stdout, peak_kb / 1024, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--row_group_size", type=int, default=100, help="rows per row group; 0: one row group")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the tables are written (not the repo)")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results-bytes-table-memory.json"))
    args = parser.parse_args()
    import torch
    from social_reward.models.clip import load_model
    results = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": ("python benchmarks/bytes_table_memory.py " + " ".join(sys.argv[1:])).strip(),
               "load_average_at_start": os.getloadavg(), "row_group_size": args.row_group_size,
               "batch_size": args.batch_size, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": {}}
    pool = jpeg_pool(64, np.random.default_rng(0))
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        torch.manual_seed(0)
        init = os.path.join(folder, "init.pth")
        torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), init)
        for images in args.images:
            table = os.path.join(folder, f"generations-{images}.parquet")
            image_bytes = write_table(table, images, args.row_group_size, pool)
            command = [sys.executable, "scripts/evaluate_generators.py", table, "--scorer",
                       f"ours=clip:{init},model={TINY_CLIP}", "--device", "cpu", "--batch_size", str(args.batch_size),
                       "--out", os.path.join(folder, f"out-{images}")]
            output, peak, seconds = timed(command)
            if "ours: scoring" not in output:
                raise SystemExit(f"scripts/evaluate_generators.py did not score {images} images:\n{output}")
            results["runs"][images] = {"image_mb": image_bytes / 2**20, "file_mb": os.path.getsize(table) / 2**20,
                                       "row_groups": pq.ParquetFile(table).num_row_groups, "peak_rss_mb": peak,
                                       "wall_s": seconds, "ms_per_image": 1000 * seconds / images}
            os.remove(table)
            print(images, results["runs"][images], flush=True)
    results["load_average_at_end"] = os.getloadavg()
    runs = results["runs"]
    print(f"\n{results['date']}, {results['machine']}, load average {results['load_average_at_start'][0]:.1f} at "
          f"start, {results['load_average_at_end'][0]:.1f} at end: {results['command']}\n"
          f"scripts/evaluate_generators.py on a table of image bytes ({args.row_group_size or 'all'} rows a row "
          f"group), tiny config, random init, CPU, --batch_size {args.batch_size}, under /usr/bin/time -v\n")
    print("| images | row groups | image MB | file MB | peak RSS (MB) | wall s | ms an image |\n"
          "|---|---|---|---|---|---|---|")
    for images, run in runs.items():
        print(f"| {images:,} | {run['row_groups']} | {run['image_mb']:.0f} | {run['file_mb']:.0f} | "
              f"{run['peak_rss_mb']:.0f} | {run['wall_s']:.1f} | {run['ms_per_image']:.1f} |")
    peaks, sizes = [run["peak_rss_mb"] for run in runs.values()], [run["file_mb"] for run in runs.values()]
    print(f"\nlargest minus smallest peak RSS: {max(peaks) - min(peaks):.0f} MB, for "
          f"{max(sizes) - min(sizes):.0f} MB more table")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
