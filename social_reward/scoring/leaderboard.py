"""Text-to-image models side by side under any rewards: a leaderboard of mean scores and the win rate of each model
over each other on the prompts both have (the paper's table of a fine-tuned Stable Diffusion against its base).

    python scripts/evaluate_generators.py generations.parquet --scorer ours=clip:clip_final.pth \\
        --scorer hps=hpsv2:HPS_v2.1_compressed.pt --scorer pickscore=pickscore:PickScore_v1 --out generators/
    python scripts/evaluate_generators.py hps_images/ --prompts HPSv2/benchmark/ --scorer ours=clip:clip_final.pth

Generations come as a table (generator, prompt, image[, sample, style]; generate.py writes one) or in HPS v2's
benchmark layout (ROOT/<generator>/<style>/<index:05d>.jpg with --prompts holding <style>.json). An item is a
(style, prompt, sample); win rates count only the items both generators have, and beside each generator's mean over
its own images the leaderboard holds its mean over the items every generator has (shared_items says how many).
Intervals treat the prompt as the unit (intervals.py): 4 samples of a prompt are not 4 independent prompts.
Writes into --out: leaderboard.csv,
leaderboard.md, winrates.csv, scores.parquet and generators.png; scores are kept in --out/scores as they are made, so
a rerun (or a run with one more generator) scores only what is missing.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from social_reward.data.cells import describe, location_order
from social_reward.data.generations import read_generations, shared_items
from social_reward.data.images import readable
from social_reward.devices import default_device, default_num_workers, inference_precision
from social_reward.dist import is_main_process, process_device
from social_reward.errors import InputError
from social_reward.scorers.registry import parse_named_scorers
from social_reward.scoring.intervals import prompt_mean_interval, prompt_proportion_interval
from social_reward.scoring.kept import kept_prompt_image_scores
from social_reward.scoring.pictures import comparison_picture

OUTPUTS = ("leaderboard.csv", "leaderboard.md", "winrates.csv", "scores.parquet", "generators.png", "scores")


def check_out_folder(out, overwrite):
    """--out may be new, or hold what this script writes (a rerun reads its kept scores); anything else is refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: a file, not a folder")
    others = sorted(set(os.listdir(out)) - set(OUTPUTS)) if os.path.isdir(out) else []
    if others and not overwrite:
        raise InputError(f"--out {out}: holds other files ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}"
                         f"); choose another folder or pass --overwrite")


def score_generations(generations, scorers, out, device, batch_size=1024, num_workers=0, fast_decode=False,
                      precision="fp32"):
    """Every generation with its score under each scorer (the scorer's own score), through the scores kept in
    out/scores: scores.parquet's table, with the images as given."""
    wheres = [f"{g}/{s}, sample {k} of {p!r}" for g, s, p, k in
              zip(generations.generator, generations["style"], generations.prompt, generations["sample"])]
    order = location_order(generations.image.tolist())  # images stored in parquet are read row group by row group
    prompts, images = generations.prompt.values[order].tolist(), generations.image.values[order].tolist()
    frames = []
    for name, spec in scorers.items():
        scores, _ = kept_prompt_image_scores(os.path.join(out, "scores"), name, spec, prompts, images,
                                                  [wheres[i] for i in order], device, batch_size, num_workers,
                                                  fast_decode, precision)
        in_order = np.empty(len(order), dtype=np.float64)
        in_order[order] = scores.numpy().astype(np.float64)
        frames.append(generations.assign(scorer=name, score=in_order))
    return pd.concat(frames, ignore_index=True)[["scorer", "generator", "style", "prompt", "sample", "image", "score"]]


def prompt_keys(part):
    """The prompt of each row as intervals.py groups them: a prompt of one style (styles may share a prompt)."""
    return (part["style"].astype(str) + "\n" + part.prompt.astype(str)).tolist()


def leaderboard(scores):
    """A row per (scorer, generator, style): images, prompts, the mean and its 95% interval (the prompt as the unit);
    with several generators also the mean over the items every generator has (shared_items of them). Style "all" is
    over every image."""
    rows = []
    styles = [s for s in pd.unique(scores["style"]) if s != "all"]
    items = scores.set_index(["style", "prompt", "sample"]).index
    per_generator = [set(items[(scores.generator == g).values]) for g in pd.unique(scores.generator)]
    shared = (pd.Series(items.isin(list(set.intersection(*per_generator))), index=scores.index)
              if len(per_generator) > 1 else None)
    for (scorer, generator), group in scores.groupby(["scorer", "generator"], sort=False):
        for style, part in [("all", group)] + [(s, group[group["style"] == s]) for s in styles]:
            if not len(part):
                continue
            mean, low, high = prompt_mean_interval(part.score.values, prompt_keys(part))
            row = {"scorer": scorer, "generator": generator, "style": style, "images": len(part),
                   "prompts": len(set(prompt_keys(part))), "mean": mean, "ci_low": low, "ci_high": high}
            if shared is not None:
                common = part[shared[part.index].values]
                row["shared_items"] = len(common)
                if len(common):
                    row["shared_mean"], row["shared_ci_low"], row["shared_ci_high"] = prompt_mean_interval(
                        common.score.values, prompt_keys(common))
            rows.append(row)
    return pd.DataFrame(rows)


def win_rates(scores):
    """A row per (scorer, generator, other, style): over the items both have, the share where generator's image
    scores above other's (a tie counts one half), with its 95% Wilson interval on the prompts' effective count
    (intervals.py); style "all" is over every item."""
    rows = []
    for scorer, group in scores.groupby("scorer", sort=False):
        by_item = group.pivot_table(index=["style", "prompt", "sample"], columns="generator", values="score",
                                    aggfunc="first")
        generators = list(pd.unique(group.generator))
        styles = [s for s in pd.unique(group["style"]) if s != "all"]
        for generator in generators:
            for other in generators:
                if other == generator:
                    continue
                both = by_item[[generator, other]].dropna().reset_index()
                for style, part in [("all", both)] + [(s, both[both["style"] == s]) for s in styles]:
                    if part.empty:
                        continue
                    wins = (part[generator] > part[other]) + 0.5 * (part[generator] == part[other])
                    rate, low, high = prompt_proportion_interval(wins.values.astype(np.float64), prompt_keys(part))
                    rows.append({"scorer": scorer, "generator": generator, "other": other, "style": style,
                                 "items": len(part), "prompts": len(set(prompt_keys(part))), "win_rate": rate,
                                 "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["scorer", "generator", "other", "style", "items", "prompts", "win_rate",
                                       "ci_low", "ci_high"])


def leaderboard_markdown(board):
    """Generators as rows, scorers as columns: the mean [95% interval] over the items every generator has (over each
    one's images when there is one generator, or none shared), the best of each in bold, and how many items."""
    overall = board[board["style"] == "all"]
    shared = "shared_items" in overall and (overall.shared_items > 0).all()
    mean, low, high = ("shared_mean", "shared_ci_low", "shared_ci_high") if shared else ("mean", "ci_low", "ci_high")
    scorers = list(pd.unique(overall.scorer))
    lines = ["| generator | " + " | ".join(scorers) + " |", "|---" * (len(scorers) + 1) + "|"]
    best = overall.loc[overall.groupby("scorer", sort=False)[mean].idxmax()].set_index("scorer").generator
    for generator in pd.unique(overall.generator):
        cells = []
        for scorer in scorers:
            row = overall[(overall.scorer == scorer) & (overall.generator == generator)]
            if row.empty:
                cells.append("")
                continue
            row = row.iloc[0]
            cell = f"{row[mean]:.4f} [{row[low]:.4f}, {row[high]:.4f}]"
            cells.append(f"**{cell}**" if best[scorer] == generator else cell)
        lines.append(f"| {generator} | " + " | ".join(cells) + " |")
    first = overall.iloc[0]
    own = ", ".join(f"{g}: {n}" for g, n in zip(overall.generator, overall.images))
    count = f"the {first.shared_items} items every generator has" if shared else f"each generator's own images ({own})"
    lines.append(f"\nMeans over {count}; 95% intervals with the prompt as the unit.")
    return "\n".join(lines) + "\n"


def shown_items(scores, prompts_shown):
    """For the first `prompts_shown` prompts every generator has: each generator's image of that item and its score
    under the first scorer, as pictures.comparison_picture draws them."""
    first = scores[scores.scorer == scores.scorer.iloc[0]]
    by_item = first.groupby(["style", "prompt", "sample"], sort=False)
    generators = list(pd.unique(first.generator))
    picked = []
    for (_, prompt, _), group in by_item:
        if len(picked) == prompts_shown:
            break
        if set(group.generator) == set(generators) and prompt not in [p for p, _ in picked]:
            picked.append((prompt, dict(zip(group.generator, zip(group.image, group.score)))))
    return picked


def evaluate_generators(generations, scorers, out="generators", prompts=None, prompts_shown=4, device=None,
                        batch_size=1024, num_workers=None, fast_decode=False, precision="fp32", skip_bad_images=False,
                        overwrite=False):
    """Score every generation under every scorer ({name: spec} or NAME=SPEC strings) and write the leaderboard, the
    win rates, every score and generators.png into `out`. Returns (leaderboard, win_rates) DataFrames. Under several
    processes (accelerate launch, torchrun) each encodes a share; the main one writes and prints.

    Example:
        board, rates = evaluate_generators(["base.parquet", "lora.parquet"], {"ours": "clip:clip_final.pth"})
    """
    device = process_device(device or default_device())
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    inference_precision(device, precision)  # an unknown precision ends here, before any model loads
    scorers = parse_named_scorers(scorers)
    check_out_folder(out, overwrite)
    generations = read_generations(generations, prompts)
    say = print if is_main_process() else lambda *args, **kwargs: None  # several processes: the main one speaks
    for note in generations.attrs.get("notes", []):
        say(note)
    if skip_bad_images:
        bad = {image for image in pd.unique(generations.image) if not readable(image)}
        if bad:
            say(f"skipping {len(bad)} unreadable images (first: {', '.join(sorted(map(describe, bad))[:3])})",
                file=sys.stderr)
            generations = generations[~generations.image.isin(bad)].reset_index(drop=True)
    if generations.generator.nunique() > 1:
        shared, lacking = shared_items(generations)
        for generator, count in lacking.items():
            if count:
                say(f"{generator}: lacks {count} items the other generators have; win rates count shared items only")
    os.makedirs(out, exist_ok=True)
    scores = score_generations(generations, scorers, out, device, batch_size, num_workers, fast_decode, precision)
    board, rates = leaderboard(scores), win_rates(scores)
    if not is_main_process():
        return board, rates
    written = {"leaderboard.csv": lambda path: board.to_csv(path, index=False),
               "leaderboard.md": lambda path: Path(path).write_text(leaderboard_markdown(board)),
               "winrates.csv": lambda path: rates.to_csv(path, index=False),
               "scores.parquet": lambda path: scores.assign(image=scores.image.map(describe)).to_parquet(path)}
    picked = shown_items(scores, prompts_shown)
    if picked:
        written["generators.png"] = lambda path: comparison_picture(picked, path, image_format="png")
    elif os.path.exists(os.path.join(out, "generators.png")):
        os.remove(os.path.join(out, "generators.png"))  # an earlier run's picture would show other generations
    for name, write in written.items():  # each file whole: a temporary name, then renamed
        write(os.path.join(out, name + ".tmp"))
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    return board, rates
