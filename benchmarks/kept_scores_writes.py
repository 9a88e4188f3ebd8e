"""Kept scores' write cost at 10K, 100K and 1M scores: bytes written, time and peak RSS of one run that keeps N new
scores, 4,096 a flush (social_reward.scoring.kept.KeptScores; the scorer replaced by reading the score off the prompt,
so only the keeping is measured). Each N runs in its own process, so its peak RSS is its own; "µs a score" is the run's
seconds over N (flat when the keeping is linear).

    python benchmarks/kept_scores_writes.py                          # 10K, 100K, 1M: prints a markdown table
    python benchmarks/kept_scores_writes.py --scores 10000 100000    # a shorter check
"""
import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def one(n, folder):
    import numpy as np
    from social_reward.scoring.kept import KeptScores
    image = os.path.join(folder, "image.png")
    open(image, "wb").close()
    prompts = [f"p{i}" for i in range(n)]
    start = time.perf_counter()
    kept = KeptScores(os.path.join(folder, "scores"), "bench", f"clip:{image}")
    kept.scores(prompts, [image] * n, lambda indices, total: (np.asarray(indices, dtype=np.float32), {}))
    seconds = time.perf_counter() - start
    written = sum(os.path.getsize(os.path.join(kept.path, f)) for f in os.listdir(kept.path))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {n:,} | {len(os.listdir(kept.path))} | {written / 1e6:.2f} | {seconds:.1f} | {seconds / n * 1e6:.1f} | "
          f"{peak:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--one", nargs=2, metavar=("N", "FOLDER"), help=argparse.SUPPRESS)  # a child process's run
    args = parser.parse_args()
    if args.one:
        return one(int(args.one[0]), args.one[1])
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}: python benchmarks/kept_scores_writes.py "
          f"--scores {' '.join(map(str, args.scores))}\n")
    print("| scores | parts | MB written | seconds | µs a score | peak RSS (MB) |\n|---|---|---|---|---|---|",
          flush=True)
    for n in args.scores:
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run([sys.executable, __file__, "--one", str(n), folder], check=True)


if __name__ == "__main__":
    main()
