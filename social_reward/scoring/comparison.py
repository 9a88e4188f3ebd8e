"""Reward models compared on the same pairs, the work of scripts/compare.py: every source scored by every scorer
through the kept scores (one scorer's model in memory at a time, only what --out lacks scored), then the table of
accuracies with intervals, how often the scorers agree, what each picks, and optionally each one's calibration.

    table = compare(["val.parquet"], {"ours": "clip:final.pth", "hps": "hpsv2:HPS_v2.1_compressed.pt"}, out="cmp/")
    print(markdown_table(table))
"""
import os

import numpy as np
import pandas as pd

from social_reward.data.sources import read_source
from social_reward.devices import default_device, default_num_workers, inference_precision
from social_reward.dist import is_main_process, process_device
from social_reward.scorers.registry import parse_named_scorers
from social_reward.scoring.calibration import (
    calibrate,
    calibration_entries,
    calibration_note,
    source_pairs,
    write_calibration,
)
from social_reward.scoring.encoding import source_requests, split_source_scores
from social_reward.scoring.intervals import prompt_proportion_interval
from social_reward.scoring.kept import kept_prompt_image_scores
from social_reward.scoring.metrics import benchmark_metric, counted_correct
from social_reward.scoring.pictures import comparison_picture


def score_all(sources, scorers, out, device, batch_size, num_workers, fast_decode, precision="fp32"):
    """{scorer name: [per source {"pos", "neg", "groups", "softmax_scale"}]} (each the scorer's own score), scoring only what --out
    does not hold yet (scoring/kept.py: a folder of parquet parts per scorer setting, one part appended per flush)."""
    requests = [source_requests(source) for source in sources]
    prompts, images, wheres = ([item for request in requests for item in request[i]] for i in range(3))
    ends = np.cumsum([len(request[0]) for request in requests])
    results = {}
    for name, spec in scorers.items():
        scores, scales = kept_prompt_image_scores(os.path.join(out, "scores"), name, spec, prompts, images, wheres,
                                                  device, batch_size, num_workers, fast_decode, precision)
        results[name] = []
        for source, start, end in zip(sources, np.concatenate([[0], ends[:-1]]), ends):
            pos, neg, groups = split_source_scores(source, scores[start:end])
            results[name].append({"pos": pos.tolist(), "neg": neg.tolist(),
                                  "groups": groups and [list(map(float, g)) for g in groups], **scales})
    return results


def comparison_table(sources, results, tie_threshold=0.0):
    """A row per (scorer, source): pairs, prompts, accuracy and its 95% interval with the prompt as the unit
    (percent), and the benchmark's own metric."""
    rows = []
    for name, per_source in results.items():
        for source, scored in zip(sources, per_source):
            correct = counted_correct(np.array(scored["pos"]), np.array(scored["neg"])).astype(np.float64)
            accuracy, low, high = prompt_proportion_interval(correct, source.pairs.prompt.tolist())
            row = {"scorer": name, "source": source.name, "pairs": len(correct),
                   "prompts": source.pairs.prompt.nunique(), "accuracy": 100 * accuracy,
                   "ci_low": 100 * low, "ci_high": 100 * high}
            metric = benchmark_metric(source, scored["groups"], scored["softmax_scale"], tie_threshold)
            if metric:
                row[metric[0]] = 100 * metric[1]
            rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table):
    """Scorers as rows, sources as columns: accuracy [95% interval], and the benchmark's own metric beside it."""
    metrics = [c for c in table.columns
               if c not in ("scorer", "source", "pairs", "prompts", "accuracy", "ci_low", "ci_high")]
    sources = list(dict.fromkeys(table.source))
    counts = {s: table[table.source == s].iloc[0] for s in sources}
    lines = ["| scorer | " + " | ".join(f"{s} ({counts[s].pairs} pairs, {counts[s].prompts} prompts)" for s in sources)
             + " |",
             "|---" * (len(sources) + 1) + "|"]
    for scorer, rows in table.groupby("scorer", sort=False):
        cells = []
        for source in sources:
            row = rows[rows.source == source].iloc[0]
            cell = f"{row.accuracy:.2f} [{row.ci_low:.1f}, {row.ci_high:.1f}]"
            cell += "".join(f"; {m} {row[m]:.2f}" for m in metrics if pd.notna(row.get(m)))
            cells.append(cell)
        lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def agreement(results):
    """How often each two scorers pick the same image of a pair (over every pair of every source), as a matrix."""
    picks = {name: np.concatenate([counted_correct(np.array(s["pos"]), np.array(s["neg"])) for s in per_source])
             for name, per_source in results.items()}
    names = list(picks)
    return pd.DataFrame([[float((picks[a] == picks[b]).mean()) for b in names] for a in names], index=names,
                        columns=names)


def best_images(sources, results, prompts=4):
    """For the first `prompts` prompts with at least two images: each scorer's best image and its own score."""
    picked = []
    for i, source in enumerate(sources):
        pairs = source.pairs
        for prompt in pd.unique(pairs.prompt):
            rows = np.flatnonzero((pairs.prompt == prompt).values)
            images = pd.unique(pd.concat([pairs.pos_path.iloc[rows], pairs.neg_path.iloc[rows]]))
            if len(images) < 2:
                continue
            choice = {}
            for name, per_source in results.items():
                scored = per_source[i]
                score = {**{pairs.neg_path.iloc[r]: scored["neg"][r] for r in rows},
                         **{pairs.pos_path.iloc[r]: scored["pos"][r] for r in rows}}
                best = max(score, key=score.get)
                choice[name] = (best, score[best])
            picked.append((prompt, choice))
            if len(picked) == prompts:
                return picked
    return picked


def calibrate_scorers(sources, results, scorers):
    """calibration.json's entries: each scorer's temperature and its held-out nll and ECE (calibration.calibrate)."""
    fits = {}
    for name, per_source in results.items():
        parts = [source_pairs(source, s["pos"], s["neg"], s["groups"])
                 for source, s in zip(sources, per_source)]
        pos, neg, prompts, labels = (np.concatenate([part[i] for part in parts]) for i in range(4))
        fits[name] = calibrate(pos, neg, prompts.tolist(), labels, name=f"--calibrate, scorer {name}")
    return calibration_entries(fits, scorers)


def compare(sources, scorers, out="comparison", prompts=4, image_root=None, device=None, batch_size=1024,
            num_workers=None, tie_threshold=0.0, fast_decode=False, precision="fp32", calibrate=False):
    """Score every source with every scorer ({name: spec}); write the table, agreement and picture into `out` (the
    main process of several; every process returns the table).

    Example:
        table = compare(["val.parquet"], {"before": "clip:init.pth", "after": "clip:final.pth"}, out="cmp")

    calibrate: also fit each scorer's temperature and write calibration.json and calibration.png (calibration.py).
    """
    device = process_device(device or default_device())
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    inference_precision(device, precision)  # an unknown precision ends here, before any model loads
    scorers = parse_named_scorers(scorers)
    sources = [read_source(s, image_root) for s in sources]
    for source in sources:
        if source.left_out and is_main_process():
            print(f"{source.name}: {source.left_out}")
    results = score_all(sources, scorers, out, device, batch_size, num_workers, fast_decode, precision)
    table = comparison_table(sources, results, tie_threshold)
    entries = calibrate_scorers(sources, results, scorers) if calibrate else None  # a bad fit ends before any write
    if not is_main_process():
        return table
    if entries:
        write_calibration(entries, os.path.join(out, "calibration.json"))
        for name, entry in entries.items():
            print(calibration_note(name, entry))
    table.to_csv(os.path.join(out, "table.csv"), index=False)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown_table(table))
    agreement(results).to_csv(os.path.join(out, "agreement.csv"))
    picked = best_images(sources, results, prompts)
    if picked:
        comparison_picture(picked, os.path.join(out, "comparison.png"))
    return table
