"""scripts/social_pairs.py at a million posts: the whole command's time and peak RSS against pyarrow's time just to read
the two tables (the floor), a straightforward pandas version of the same rule (checked to write the same pairs), and
Spark local mode (checked too); scaling in events. Times are the least of --repeats runs, files in the page cache; peak
RSS is the whole process's, as /usr/bin/time -v reports it, with DuckDB's memory limit and threads as
scripts/social_pairs.py sets them from the machine. At the most events, issue 33's command (--pair_within group, every
candidate kept) on POSTS with request groups of --group_sizes posts (4: ~0.4M pairs; 20: ~3M), once each.

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


def with_groups(posts_file, size):
    """POSTS with a `group` column: each creator's posts in requests of `size` (its last request smaller), for
    --pair_within group."""
    out = posts_file.replace(".parquet", f"_groups{size}.parquet")
    if not os.path.exists(out):
        table = pq.read_table(posts_file)
        order = np.argsort(table["creator"].to_numpy(), kind="stable")
        _, starts, counts = np.unique(table["creator"].to_numpy()[order], return_index=True, return_counts=True)
        rank = np.arange(len(order)) - np.repeat(starts, counts)
        first_group = np.cumsum(np.r_[0, -(-counts // size)])[:-1]
        group = np.empty(len(order), np.int64)
        group[order] = np.repeat(first_group, counts) + rank // size
        pq.write_table(table.append_column("group", pa.array(group)), out)
    return out


# issue 33's command: request groups, every candidate kept, a creator split
GROUP_FLAGS = ["--window", "7d", "--min_positive", "1", "--max_negative", "0", "--min_views", "20", "--pair_within",
               "group", "--max_pairs_per_stratum", "1000000", "--split", "creator", "--test_fraction", "0.1",
               "--seed", "0"]


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


def pandas_rule(posts_file, events_file, out, window=pd.Timedelta("7D"), cap=16, seed=0, test_fraction=0.1):
    """The same rule with scripts/social_pairs.py's defaults (creator_day strata, --split creator, the stratum cap,
    images in one split) written the straightforward way in pandas: writes OUT/train.parquet and OUT/test.parquet,
    which must equal scripts/social_pairs.py's, and returns the report's counts."""
    import hashlib

    def md5(texts):
        return [hashlib.md5(t.encode()).hexdigest() for t in texts]

    posts = pd.read_parquet(posts_file)
    events = pd.read_parquet(events_file, columns=["post", "user", "kind", "at"])
    e = events[events.kind == "remix"].merge(posts[["post", "creator", "posted_at"]], on="post", how="left")
    fate = np.select([e.creator.isna(), e.user == e.creator, e["at"] < e.posted_at, e["at"] >= e.posted_at + window],
                     ["unknown_post", "self", "before_post", "late"], "counted")
    report = {"fates": pd.Series(fate).value_counts().to_dict()}
    counted = e[fate == "counted"].drop_duplicates(["post", "user"])
    report["repeats"] = report["fates"].get("counted", 0) - len(counted)
    posts["signal"] = counted.groupby("post").size().reindex(posts.post, fill_value=0).to_numpy()
    posts["side"] = np.select([posts.signal >= 1, (posts.signal <= 0) & (posts.views >= 0)], ["pos", "neg"], "other")
    posts["stratum"] = posts.creator.astype(str) + "/" + posts.posted_at.dt.strftime("%Y-%m-%d")
    columns = ["stratum", "post", "creator", "signal", "prompt", "image"]
    pairs = posts.loc[posts.side == "pos", columns].merge(posts.loc[posts.side == "neg", columns[:-2] + ["image"]],
                                                          on="stratum", suffixes=("_pos", "_neg"))
    report["candidates"] = len(pairs)
    pairs["hash"] = md5(f"{seed}/{p}/{n}" for p, n in zip(pairs.post_pos, pairs.post_neg))
    pairs = pairs.sort_values(["stratum", "hash", "post_pos", "post_neg"]).groupby("stratum").head(cap)
    creators = pd.unique(np.concatenate([pairs.creator_pos.to_numpy(), pairs.creator_neg.to_numpy()]))
    threshold = f"{min(int(test_fraction * 16 ** 8), 16 ** 8 - 1):08x}"
    side = pd.Series(np.where([h[:8] < threshold for h in md5(f"{seed}/{c}" for c in creators)], "test", "train"),
                     index=creators)
    pos_side, neg_side = side[pairs.creator_pos].to_numpy(), side[pairs.creator_neg].to_numpy()
    pairs["split"] = np.where(pos_side == neg_side, pos_side, "creator_conflict")
    train = pairs[pairs.split == "train"]
    train_images = set(train.image_pos) | set(train.image_neg)
    conflict = (pairs.split == "test") & (pairs.image_pos.isin(train_images) | pairs.image_neg.isin(train_images))
    pairs.loc[conflict, "split"] = "image_conflict"
    report["splits"] = pairs.split.value_counts().to_dict()
    pairs = pairs.rename(columns={"image_pos": "pos_path", "image_neg": "neg_path", "post_pos": "pos_post",
                                  "post_neg": "neg_post", "creator_pos": "pos_creator", "creator_neg": "neg_creator",
                                  "signal_pos": "pos_signal", "signal_neg": "neg_signal"})
    os.makedirs(out, exist_ok=True)
    for name in ("train", "test"):
        pairs[pairs.split == name].sort_values(["stratum", "pos_post", "neg_post"])[
            ["prompt", "pos_path", "neg_path", "pos_post", "neg_post", "stratum", "pos_creator", "neg_creator",
             "pos_signal", "neg_signal"]].to_parquet(os.path.join(out, f"{name}.parquet"), index=False)
    return report


def same_pairs(a, b):
    """Whether two --out folders hold the same train and test pairs (the columns of the original's layout and where
    each pair came from)."""
    for name in ("train", "test"):
        x, y = (pd.read_parquet(os.path.join(folder, f"{name}.parquet")) for folder in (a, b))
        columns = ["prompt", "pos_path", "neg_path", "pos_post", "neg_post", "stratum", "pos_signal", "neg_signal"]
        if len(x) != len(y) or not (x[columns].reset_index(drop=True).astype(str) ==
                                    y[columns].reset_index(drop=True).astype(str)).all().all():
            return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, nargs="+", default=[5_000_000, 10_000_000, 20_000_000])
    parser.add_argument("--data", default="/tmp/social_pairs_bench")
    parser.add_argument("--repeats", type=int, default=3, help="each time is the least of this many runs")
    parser.add_argument("--group_sizes", type=int, nargs="*", default=[4, 20],
                        help="at the most events: issue 33's command on POSTS with requests of these many posts")
    parser.add_argument("--duckdb_default_limit", action="store_true",
                        help="each group run again under DuckDB's own memory limit (80%% of RAM)")
    parser.add_argument("--skip_spark", action="store_true")
    parser.add_argument("--skip_pandas", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results-social-pairs.json"))
    args = parser.parse_args()
    os.makedirs(args.data, exist_ok=True)
    rows = []
    for n_events in args.events:
        posts_file, events_file = write_logs(args.data, args.posts, n_events)
        out = os.path.join(args.data, "pairs")
        # no --memory_limit: DuckDB's limit and threads as scripts/social_pairs.py sets them from the machine
        command = ["scripts/social_pairs.py", posts_file, events_file, "--out", out, "--overwrite"]
        row = {"posts": args.posts, "events": n_events, "load_at_start": os.getloadavg(),
               "pyarrow_read_s": min(read_time(posts_file, events_file) for _ in range(args.repeats))}
        runs = [timed_command(command) for _ in range(args.repeats)]
        row["duckdb_s"], row["duckdb_peak_rss_mb"] = min(r[0] for r in runs), max(r[1] for r in runs)
        row["duckdb_over_read"] = row["duckdb_s"] / row["pyarrow_read_s"]
        if n_events == max(args.events):
            for size in args.group_sizes:  # the whole process under issue 33's flags, requests of `size` posts
                group_command = ["scripts/social_pairs.py", with_groups(posts_file, size), events_file, "--out",
                                 os.path.join(args.data, "pairs_groups"), "--overwrite", *GROUP_FLAGS]
                row[f"groups{size}_s"], row[f"groups{size}_peak_rss_mb"] = timed_command(group_command)
                if args.duckdb_default_limit:  # DuckDB's own default, 80% of RAM, as social_pairs.py had it
                    limit = f"{int(0.8 * os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')) // 2 ** 20}MB"
                    row[f"groups{size}_duckdb_default_limit_s"], row[f"groups{size}_duckdb_default_limit_peak_rss_mb"] = \
                        timed_command(group_command + ["--memory_limit", limit])
                with open(os.path.join(args.data, "pairs_groups", "report.json")) as f:
                    row[f"groups{size}_candidates"] = json.load(f)["pairs"]["candidates"]
            if not args.skip_pandas:
                code = (f"import sys; sys.path.insert(0, 'benchmarks'); from social_pairs_speed import pandas_rule; "
                        f"pandas_rule({posts_file!r}, {events_file!r}, {os.path.join(args.data, 'pandas')!r})")
                runs = [timed_command(["-c", code]) for _ in range(args.repeats)]
                row["pandas_s"], row["pandas_peak_rss_mb"] = min(r[0] for r in runs), max(r[1] for r in runs)
                row["pandas_same_pairs"] = same_pairs(out, os.path.join(args.data, "pandas"))
                if not row["pandas_same_pairs"]:
                    raise SystemExit(f"pandas_rule wrote other pairs than scripts/social_pairs.py: {row}")
                row["duckdb_speedup_over_pandas"] = row["pandas_s"] / row["duckdb_s"]
            if not args.skip_spark:
                spark_out = os.path.join(args.data, "spark")
                row["spark_s"], row["spark_peak_rss_mb_driver_python"] = timed_command(
                    ["scripts/social_pairs.py", posts_file, events_file, "--out", spark_out, "--overwrite", "--engine",
                     "spark"])
                row["spark_same_pairs"] = same_pairs(out, spark_out)
                if not row["spark_same_pairs"]:
                    raise SystemExit(f"--engine spark wrote other pairs than DuckDB: {row}")
        row["load_at_end"] = os.getloadavg()
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "command": "python " + " ".join(sys.argv), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
