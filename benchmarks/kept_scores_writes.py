"""Kept scores' write cost at 10K, 100K and 1M scores: bytes written, time and peak RSS of one run that keeps N new
scores, 4,096 a flush (kept_scores.KeptScores; the scorer replaced by reading the score off the prompt, so only the
keeping is measured). Each N runs in its own process, so its peak RSS is its own.

    python benchmarks/kept_scores_writes.py            # prints a markdown table
"""
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(n, folder):
    sys.path.insert(0, ROOT)
    import numpy as np
    from kept_scores import KeptScores
    image = os.path.join(folder, "image.png")
    open(image, "wb").close()
    prompts = [f"p{i}" for i in range(n)]
    start = time.perf_counter()
    kept = KeptScores(os.path.join(folder, "scores"), "bench", f"clip:{image}")
    kept.scores(prompts, [image] * n, lambda indices, total: (np.asarray(indices, dtype=np.float32), {}))
    seconds = time.perf_counter() - start
    written = sum(os.path.getsize(os.path.join(kept.path, f)) for f in os.listdir(kept.path))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {n:,} | {len(os.listdir(kept.path))} | {written / 1e6:.2f} | {seconds:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        one(int(sys.argv[1]), sys.argv[2])
    else:
        print("| scores | parts | MB written | seconds | peak RSS (MB) |\n|---|---|---|---|---|")
        for n in (10_000, 100_000, 1_000_000):
            with tempfile.TemporaryDirectory() as folder:
                subprocess.run([sys.executable, __file__, str(n), folder], check=True)
