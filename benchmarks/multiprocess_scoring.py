"""Scoring throughput of validate.py with 1 and with 2 processes (torchrun, CPUs, 1 thread each), and whether the two
print and write the same: each process encodes half the distinct images and prompts
(social_reward.dist.across_processes).

    python benchmarks/multiprocess_scoring.py                      # about 4 minutes on an idle 2-CPU machine
    python benchmarks/multiprocess_scoring.py --pairs 256 --model ViT-B-32 --json results-multiprocess-cpu.json

The pairs are the demo's synthetic ones (PNG files, 2 distinct images per pair), the model a randomly initialised
open_clip --model saved once so that every process loads the same weights. Times are of the whole command (start-up,
model load, data reading, encoding), as a user sees them; "encode s" subtracts the same command on 2 pairs.
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
import pandas as pd
import torch

from social_reward.models.clip import load_model
from social_reward.synthetic.shapes import make_pairs  # demo.py's synthetic pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAUNCHERS = {1: [], 2: ["-m", "torch.distributed.run", "--nproc_per_node", "2"]}


def timed_validate(processes, pairs_file, init, model, scores_out):
    """validate.py on `processes` processes of one thread each: (seconds, stdout)."""
    command = [sys.executable, *LAUNCHERS[processes], "validate.py", pairs_file, "--model", model, "--pretrained",
               "none", "--checkout_path", init, "--device", "cpu", "--batch_size", "32", "--scores_out", scores_out]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - start, result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
               "load_average_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d"), "pairs": args.pairs,
               "model": args.model, "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        pairs = make_pairs(os.path.join(folder, "images"), args.pairs, seed=0)
        pairs.to_parquet(os.path.join(folder, "pairs.parquet"))
        pairs.iloc[:2].to_parquet(os.path.join(folder, "two.parquet"))
        torch.manual_seed(0)
        init = os.path.join(folder, "init.pth")
        torch.save(load_model(args.model, pretrained="none")[0].state_dict(), init)
        scores = {}
        for processes in (1, 2):
            start_s, _ = timed_validate(processes, os.path.join(folder, "two.parquet"), init, args.model,
                                        os.path.join(folder, "start.csv"))
            seconds, printed = timed_validate(processes, os.path.join(folder, "pairs.parquet"), init, args.model,
                                              os.path.join(folder, f"{processes}.csv"))
            scores[processes] = pd.read_csv(os.path.join(folder, f"{processes}.csv"))
            results["runs"][processes] = {"seconds": seconds, "start_up_seconds": start_s,
                                          "encode_seconds": seconds - start_s,
                                          "images_per_second": 2 * args.pairs / (seconds - start_s),
                                          "printed": printed.strip()}
            print(processes, results["runs"][processes], flush=True)
        one, two = scores[1], scores[2]
        results["max_abs_score_difference"] = float(max(np.abs(one.pos_score - two.pos_score).max(),
                                                         np.abs(one.neg_score - two.neg_score).max()))
        results["same_printed"] = results["runs"][1]["printed"] == results["runs"][2]["printed"]
    results["load_average_at_end"] = os.getloadavg()
    runs = results["runs"]
    print(f"\n{results['date']}, {results['machine']}, load average {results['load_average_at_start'][0]:.1f} at "
          f"start: validate.py, {args.pairs} pairs ({2 * args.pairs} images), {args.model} random init, CPU, "
          "1 thread per process")
    print(f"{'processes':>9} {'command s':>9} {'start-up s':>10} {'encode s':>8} {'images/s':>8}")
    for processes, run in runs.items():
        print(f"{processes:>9} {run['seconds']:9.1f} {run['start_up_seconds']:10.1f} {run['encode_seconds']:8.1f} "
              f"{run['images_per_second']:8.1f}")
    print(f"speed-up of 2 processes: {runs[1]['encode_seconds'] / runs[2]['encode_seconds']:.2f}x (encoding), "
          f"{runs[1]['seconds'] / runs[2]['seconds']:.2f}x (command); same printed lines: {results['same_printed']}; "
          f"largest score difference: {results['max_abs_score_difference']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
