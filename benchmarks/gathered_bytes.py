"""What crosses between the processes when validate.py scores under 2 processes (torchrun, gloo, CPUs): each process
scores its share of the distinct images and gathers only scores (social_reward.scoring.encoding.prompt_image_scores,
social_reward.dist.across_processes), so each receives a float per request, where gathering the embeddings would be a
row per distinct image and prompt.

    python benchmarks/gathered_bytes.py                        # 256 and 2,048 pairs: a few minutes on 2 idle CPUs
    python benchmarks/gathered_bytes.py --pairs 64 128 --json /tmp/gathered.json     # a short check

The pairs are the demo's synthetic ones (social_reward.synthetic.shapes.make_pairs: PNGs, 2 distinct images a pair,
53-54 distinct prompts), the model the tiny open_clip config (assets/tiny-clip.json) from a random init saved once,
scored as validate.py scores (social_reward.scoring.encoding.pair_scores, --batch_size 64, 1 thread a process) once on 1
process and once under torchrun on 2. torch.distributed.all_gather_object is wrapped in each process: every part it
gathers is counted in elements and in pickled bytes (len(pickle.dumps(part)); all_gather_object pickles each part the
same way, then pads every part to the largest). "embeddings" is what gathering every distinct image's and prompt's
embedding would be, in float32: items x dim x 4 bytes, at the tiny model's dim and at ViT-L/14's (768). The 2-process
scores must equal the 1-process ones.
"""
import argparse
import glob
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = os.path.join(ROOT, "assets", "tiny-clip.json")
VIT_L_14_DIM = 768
LAUNCHERS = {1: [], 2: ["-m", "torch.distributed.run", "--nproc_per_node", "2"]}


def score_and_count(pairs_file, init, out_folder, batch_size):
    """One process of a run: pair_scores on the pairs, counting what all_gather_object gathers; writes
    process-<index>.json (the counts) and, from every process, scores-<index>.npy (pos then neg)."""
    import torch
    import torch.distributed

    from social_reward.dist import distributed
    from social_reward.scoring.encoding import pair_scores
    from social_reward.scorers.registry import load_scorer

    gathered = {"calls": 0, "elements": 0, "bytes": 0, "bytes_from_others": 0, "elements_from_others": 0}
    all_gather_object = torch.distributed.all_gather_object

    def counted(parts, mine):
        all_gather_object(parts, mine)
        gathered["calls"] += 1
        for index, part in enumerate(parts):
            size, elements = len(pickle.dumps(part)), part.numel()
            gathered["bytes"] += size
            gathered["elements"] += elements
            if index != torch.distributed.get_rank():
                gathered["bytes_from_others"] += size
                gathered["elements_from_others"] += elements
    torch.distributed.all_gather_object = counted

    scorer = load_scorer(f"clip:{init},model={TINY_CLIP}", "cpu")
    pairs = pd.read_parquet(pairs_file)
    start = time.perf_counter()
    pos_score, neg_score = pair_scores(scorer.model, scorer.preprocess, scorer.tokenizer, pairs, "cpu", batch_size,
                                       progress=False)
    seconds = time.perf_counter() - start
    state = distributed()
    index = state.process_index if state else 0
    np.save(os.path.join(out_folder, f"scores-{index}.npy"), torch.cat([pos_score, neg_score]).numpy())
    with open(os.path.join(out_folder, f"process-{index}.json"), "w") as f:
        json.dump({"process": index, "scores": len(pos_score) + len(neg_score), "score_seconds": seconds,
                   "gathered": gathered}, f)


def run(processes, pairs_file, init, out_folder, batch_size):
    """This script's score_and_count on `processes` processes (1 thread each): each process's counts, in order."""
    os.makedirs(out_folder)
    command = [sys.executable, *LAUNCHERS[processes], os.path.abspath(__file__), "--one", pairs_file, init, out_folder,
               "--batch_size", str(batch_size)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    counts = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(out_folder, "process-*.json")))]
    scores = [np.load(path) for path in sorted(glob.glob(os.path.join(out_folder, "scores-*.npy")))]
    return counts, scores, time.perf_counter() - start


def measure(pairs_count, folder, init, batch_size, dim):
    """Both runs on `pairs_count` pairs: a row per process of the 2-process run, and the largest score difference."""
    from social_reward.synthetic.shapes import make_pairs
    pairs = make_pairs(os.path.join(folder, f"images-{pairs_count}"), pairs_count, seed=0)
    pairs_file = os.path.join(folder, f"pairs-{pairs_count}.parquet")
    pairs.to_parquet(pairs_file)
    one, one_scores, one_seconds = run(1, pairs_file, init, os.path.join(folder, f"one-{pairs_count}"), batch_size)
    two, two_scores, two_seconds = run(2, pairs_file, init, os.path.join(folder, f"two-{pairs_count}"), batch_size)
    difference = max(float(np.abs(scores - one_scores[0]).max()) for scores in two_scores)
    assert one[0]["gathered"]["calls"] == 0, "one process gathered something"
    assert difference <= 1e-6, f"{pairs_count} pairs: 2-process scores differ from 1-process ones by {difference}"
    items = pd.concat([pairs.pos_path, pairs.neg_path]).nunique() + pairs.prompt.nunique()
    rows = [{"pairs": pairs_count, "process": count["process"], "scores": count["scores"], **count["gathered"],
             "embedding_items": int(items), "embedding_bytes_tiny": int(items) * dim * 4,
             "embedding_bytes_vit_l_14": int(items) * VIT_L_14_DIM * 4} for count in two]
    return {"rows": rows, "max_abs_score_difference": difference, "one_process_seconds": one_seconds,
            "two_process_seconds": two_seconds}


def markdown(results):
    lines = ["| pairs | process | scores | gathered elements | gathered bytes (pickled) | from the other process | "
             "embeddings: items | embeddings, tiny (64) | embeddings, ViT-L/14 (768) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in results["sizes"].values():
        for row in size["rows"]:
            lines.append(f"| {row['pairs']:,} | {row['process']} | {row['scores']:,} | {row['elements']:,} | "
                         f"{row['bytes']:,} | {row['bytes_from_others']:,} B, {row['elements_from_others']:,} "
                         f"elements | {row['embedding_items']:,} | {row['embedding_bytes_tiny']:,} | "
                         f"{row['embedding_bytes_vit_l_14']:,} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results-gathered-bytes.json"))
    parser.add_argument("--one", nargs=3, metavar=("PAIRS", "INIT", "OUT"), help=argparse.SUPPRESS)  # a process's run
    args = parser.parse_args()
    if args.one:
        return score_and_count(*args.one, args.batch_size)
    import torch
    from social_reward.models.clip import load_model
    command = "python benchmarks/gathered_bytes.py " + " ".join(sys.argv[1:])
    results = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command.strip(),
               "load_average_at_start": os.getloadavg(), "batch_size": args.batch_size, "sizes": {}}
    dim = json.load(open(TINY_CLIP))["embed_dim"]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        init = os.path.join(folder, "init.pth")
        torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), init)
        for pairs_count in args.pairs:
            results["sizes"][pairs_count] = measure(pairs_count, folder, init, args.batch_size, dim)
            print(f"{pairs_count} pairs: done", flush=True)
    results["load_average_at_end"] = os.getloadavg()
    print(f"\n{results['date']}, {results['machine']}, load average {results['load_average_at_start'][0]:.1f} at "
          f"start, {results['load_average_at_end'][0]:.1f} at end: {results['command']}\n"
          f"social_reward.scoring.encoding.pair_scores (validate.py's scoring) under torchrun on 2 gloo processes, "
          f"tiny config, random init, batch {args.batch_size}, 1 thread a process; bytes are each part's pickled size "
          f"(own part included)\n")
    print(markdown(results))
    for pairs_count, size in results["sizes"].items():
        print(f"{pairs_count} pairs: 2-process scores equal the 1-process ones (largest difference "
              f"{size['max_abs_score_difference']:.1e}); {size['one_process_seconds']:.1f} s on 1 process, "
              f"{size['two_process_seconds']:.1f} s on 2 (whole commands)")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
