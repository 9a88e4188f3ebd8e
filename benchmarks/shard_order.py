"""An epoch over Pick-a-Pic-layout shards in the uniform order and in the block order: bytes read from the parquet
files, wall time and peak memory of the data loading alone (decoding and preprocessing every pair's two images, as a
training epoch does; no model runs).

    python benchmarks/shard_order.py                         # about 5 minutes here
    python benchmarks/shard_order.py --rows 2000,4000 --row_group_sizes 100,1000 --windows 1,4,8,16 --json order.json

The shards are made at run time in a temporary folder (each row two distinct JPEGs of about 100 KB, the Pick-a-Pic
layout, benchmarks/pickapic_memory.py's writer). Bytes read are counted where the reader reads
(social_reward.data.cells.ParquetCells.bytes_read: the compressed size of each row-group column chunk it reads). The
uniform order reads a row group's column for nearly every image, so it is run on the epoch's first --uniform_pairs pairs
and its bytes and time are scaled to the epoch (marked "scaled"). Each run is a process of its own (its peak RSS is its
own).

The window's cost and worth at Pick-a-Pic v2's size (959,040 pairs in row groups of 100) are computed from the order
alone: the distinct row groups a batch of 128 draws from, and the image bytes a process holds (2 W row-group columns).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")
PICKAPIC_V2_PAIRS = 959_040


def one_epoch(shard, order, window, pairs_limit, batch_size=32):
    """Load the pairs of `shard` in `order` (all of them, or the first pairs_limit): bytes read, seconds, pairs."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from social_reward.data.cells import cells
    from social_reward.data.order import pair_order
    from social_reward.data.pairs import PromptImagePair
    from social_reward.data.sources import read_source
    from social_reward.models.clip import load_model

    torch.set_num_threads(1)
    source = read_source(shard)
    preprocess, tokenizer = load_model(TINY_CLIP, pretrained="none")[1:]
    sampler = (RandomSampler(source.pairs, generator=torch.Generator().manual_seed(0)) if order == "uniform" else
               pair_order(source.pairs, "block", window, 0, batch_size, 1))
    loader = DataLoader(PromptImagePair(source, preprocess, tokenizer), batch_size=batch_size, sampler=sampler)
    start_rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
    start, loaded = time.perf_counter(), 0
    for _, pos, _ in loader:
        loaded += len(pos)
        if pairs_limit and loaded >= pairs_limit:
            break
    return {"start_rss_mb": start_rss, "bytes_read": cells().bytes_read, "seconds": time.perf_counter() - start, "pairs": loaded,
            "epoch_pairs": len(source.pairs)}


def run_child(shard, order, window, pairs_limit):
    """one_epoch in a process of its own; its result and its peak RSS (MB)."""
    # VmHWM, not ru_maxrss: after exec, ru_maxrss starts from the parent's peak (here the shards it wrote)
    code = (f"import json, sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); "
            f"from shard_order import one_epoch; r = one_epoch({shard!r}, {order!r}, {window}, {pairs_limit}); "
            "r['peak_rss_mb'] = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
            " / 1024; print(json.dumps(r))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def window_table(windows, row_group_size=100, batch_size=128, image_kb=170):
    """Per window: distinct row groups per batch of `batch_size` in an epoch of Pick-a-Pic v2's pair count, and the
    image bytes a process holds (2 W row-group columns of `image_kb` images; Pick-a-Pic v2: ~322 GB / ~1M rows)."""
    from social_reward.data.order import BlockOrder
    blocks = np.arange(PICKAPIC_V2_PAIRS) // row_group_size
    rows = []
    for window in windows:
        order = np.array(list(BlockOrder(blocks, window, seed=0)))
        batches = blocks[order][:len(order) // batch_size * batch_size].reshape(-1, batch_size)
        distinct = np.mean([len(np.unique(b)) for b in batches])
        rows.append({"window": window, "distinct_row_groups_per_batch": float(distinct),
                     "held_mb": 2 * window * row_group_size * image_kb / 1024})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="2000,4000", help="rows of each shard (one per row-group size): enough "
                        "row groups that the uniform order's reads miss the reader's cache as on a full dataset")
    parser.add_argument("--row_group_sizes", default="100,1000")
    parser.add_argument("--windows", default="1,4,8,16", help="block windows to run (row groups)")
    parser.add_argument("--uniform_pairs", type=int, default=64,
                        help="pairs the uniform order loads (then scaled); 0: leave the uniform order out")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # pickapic_memory.py beside this file
    from pickapic_memory import jpeg_pool, write_shard

    results = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
               "date": time.strftime("%Y-%m-%d"), "runs": [],
               "windows_at_pickapic_v2": window_table([1, 2, 4, 8, 16, 32, 64])}
    pool = jpeg_pool(64, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as folder:
        for rows, row_group_size in zip(map(int, args.rows.split(",")), map(int, args.row_group_sizes.split(","))):
            shard = os.path.join(folder, f"train-{row_group_size}.parquet")
            write_shard(shard, rows, row_group_size, pool)
            runs = ([("uniform", 0, args.uniform_pairs)] if args.uniform_pairs else []) + \
                [("block", int(w), 0) for w in args.windows.split(",")]
            for order, window, limit in runs:
                run = run_child(shard, order, window, limit)
                scale = run["epoch_pairs"] / run["pairs"]
                results["runs"].append({"rows": rows, "row_group_size": row_group_size, "order": order, "window": window or None,
                                        "file_mb": os.path.getsize(shard) / 2**20, "scaled": scale > 1,
                                        "mb_read": run["bytes_read"] * scale / 2**20, "seconds": run["seconds"] * scale,
                                        "start_rss_mb": run["start_rss_mb"], "peak_rss_mb": run["peak_rss_mb"]})
                print(results["runs"][-1], flush=True)
    print(f"\n{results['date']}, {results['machine']}: an epoch over Pick-a-Pic-layout rows (2 JPEGs of ~100 KB "
          f"each), data loading only, 1 thread")
    print(f"{'rows':>5} {'rows/group':>10} {'order':>8} {'W':>3} {'file MB':>8} {'MB read':>9} {'read/file':>9} {'epoch s':>8} "
          f"{'RSS MB at start':>15} {'peak':>5}")
    for r in results["runs"]:
        print(f"{r['rows']:>5} {r['row_group_size']:>10} {r['order']:>8} {r['window'] or '':>3} {r['file_mb']:8.0f} "
              f"{r['mb_read']:9.0f} {r['mb_read'] / r['file_mb']:8.1f}x {r['seconds']:8.1f} {r['start_rss_mb']:15.0f} {r['peak_rss_mb']:5.0f}"
              + ("  (scaled)" if r["scaled"] else ""))
    print(f"\nwindow W at Pick-a-Pic v2 ({PICKAPIC_V2_PAIRS} pairs, row groups of 100, batch 128):")
    for r in results["windows_at_pickapic_v2"]:
        print(f"  W={r['window']:>3}: {r['distinct_row_groups_per_batch']:5.1f} row groups per batch, "
              f"~{r['held_mb']:.0f} MB of images held per process")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
