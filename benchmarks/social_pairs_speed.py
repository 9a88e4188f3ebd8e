"""social_pairs.py at a million posts: the whole command's time and peak RSS against pyarrow's time just to read the
two tables (the floor), a straightforward pandas version of the same rule, and Spark local mode; scaling in events.

    python benchmarks/social_pairs_speed.py                        # 1M posts; 5M, 10M, 20M events; into /tmp
    python benchmarks/social_pairs_speed.py --posts 100000 --events 1000000 2000000 --skip_spark

Writes benchmarks/results-social-pairs.json. The logs are written to --data (default /tmp), never into the repository.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_logs(folder, n_posts, n_events, seed=0):
    """Posts of 100,000 creators with a heavy tail of activity (a twentieth of them make half the posts), and events
    of three kinds over about five weeks."""
    rng = np.random.default_rng(seed)
    n_creators = max(1, n_posts // 10)
    creator = (rng.pareto(1.2, n_posts) * n_creators / 20).astype(np.int64) % n_creators
    start = np.datetime64("2026-01-01T00:00:00", "us")
    posted_at = start + (rng.uniform(0, 28 * 86400, n_posts) * 1e6).astype("timedelta64[us]")
    posts_file = os.path.join(folder, f"posts_{n_posts}.parquet")
    if not os.path.exists(posts_file):
        pq.write_table(pa.table({
            "post": np.arange(n_posts, dtype=np.int64), "image": [f"images/{i}.jpg" for i in range(n_posts)],
            "prompt": [f"prompt {i % 5000}" for i in range(n_posts)], "creator": creator,
            "posted_at": posted_at, "views": rng.poisson(50, n_posts)}), posts_file)
    events_file = os.path.join(folder, f"events_{n_posts}_{n_events}.parquet")
    if not os.path.exists(events_file):
        post = rng.zipf(1.3, n_events) % n_posts
        kind = pa.DictionaryArray.from_arrays(rng.choice(3, n_events, p=[0.3, 0.55, 0.15]).astype(np.int32),
                                              ["remix", "like", "save"])
        user = rng.integers(0, n_posts // 10 + 1, n_events)
        own = rng.random(n_events) < 0.02  # creators remixing their own posts
        user[own] = creator[post[own]]
        at = posted_at[post] + (rng.exponential(3 * 86400, n_events) * 1e6).astype("timedelta64[us]")
        pq.write_table(pa.table({"post": post, "user": user, "kind": kind, "at": at}), events_file,
                       row_group_size=1 << 20)
    return posts_file, events_file


def read_time(*files):
    start = time.perf_counter()
    for f in files:
        pq.read_table(f)
    return time.perf_counter() - start


def timed_command(args):
    """Wall seconds and peak RSS (MB) of a whole process, as /usr/bin/time reports them."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1]) / 1024
    return wall, rss


def pandas_rule(posts_file, events_file, out, window=pd.Timedelta("7D"), cap=16, seed=0):
    """The same rule written the straightforward way in pandas (creator_day strata, creator split left out)."""
    import hashlib
    posts = pd.read_parquet(posts_file)
    events = pd.read_parquet(events_file)
    e = events[events.kind == "remix"].merge(posts[["post", "creator", "posted_at"]], on="post")
    e = e[(e.user != e.creator) & (e["at"] >= e.posted_at) & (e["at"] < e.posted_at + window)]
    signal = e.drop_duplicates(["post", "user"]).groupby("post").size()
    posts["signal"] = signal.reindex(posts.post, fill_value=0).values
    posts["stratum"] = posts.creator.astype(str) + "/" + posts.posted_at.dt.date.astype(str)
    pos, neg = posts[posts.signal >= 1], posts[(posts.signal == 0) & (posts.views >= 0)]
    pairs = pos.merge(neg, on="stratum", suffixes=("_pos", "_neg"))
    pairs["hash"] = [hashlib.md5(f"{seed}/{p}/{n}".encode()).hexdigest()
                     for p, n in zip(pairs.post_pos, pairs.post_neg)]
    pairs = pairs.sort_values("hash").groupby("stratum").head(cap)
    pairs.rename(columns={"prompt_pos": "prompt", "image_pos": "pos_path", "image_neg": "neg_path"})[
        ["prompt", "pos_path", "neg_path", "post_pos", "post_neg", "stratum"]].to_parquet(out)
    return len(pairs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, nargs="+", default=[5_000_000, 10_000_000, 20_000_000])
    parser.add_argument("--data", default="/tmp/social_pairs_bench")
    parser.add_argument("--skip_spark", action="store_true")
    parser.add_argument("--skip_pandas", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results-social-pairs.json"))
    args = parser.parse_args()
    os.makedirs(args.data, exist_ok=True)
    rows = []
    for n_events in args.events:
        posts_file, events_file = write_logs(args.data, args.posts, n_events)
        out = os.path.join(args.data, "pairs")
        row = {"posts": args.posts, "events": n_events, "load": os.getloadavg(),
               "pyarrow_read_s": read_time(posts_file, events_file)}
        row["duckdb_s"], row["duckdb_peak_rss_mb"] = timed_command(
            ["social_pairs.py", posts_file, events_file, "--out", out, "--overwrite", "--memory_limit", "1GB"])
        row["duckdb_over_read"] = row["duckdb_s"] / row["pyarrow_read_s"]
        if n_events == max(args.events):
            if not args.skip_pandas:
                code = (f"import sys; sys.path.insert(0, 'benchmarks'); from social_pairs_speed import pandas_rule; "
                        f"pandas_rule({posts_file!r}, {events_file!r}, {os.path.join(args.data, 'pandas.parquet')!r})")
                row["pandas_s"], row["pandas_peak_rss_mb"] = timed_command(["-c", code])
                row["duckdb_speedup_over_pandas"] = row["pandas_s"] / row["duckdb_s"]
            if not args.skip_spark:
                row["spark_s"], row["spark_peak_rss_mb_driver_python"] = timed_command(
                    ["social_pairs.py", posts_file, events_file, "--out", out, "--overwrite", "--engine", "spark"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "command": "python " + " ".join(sys.argv), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
