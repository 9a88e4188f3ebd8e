"""Best of N: for each prompt keep the K candidates the reward scores highest, as a fine-tuning set in the layout the
diffusers training scripts read (a Hugging Face image folder).

    python scripts/best_of_n.py candidates.parquet --scorer clip:clip_final.pth --top_k 1 --out best/
    # then: datasets.load_dataset("imagefolder", data_dir="best/"), or diffusers' train_text_to_image.py --train_data_dir best/

Candidates are a table (prompt, image[, generator, sample]; generate.py writes one). --out gets the kept images
(hard-linked where possible, else copied; image bytes written as files) and metadata.jsonl, a line per image with its
file_name, text (the prompt) and score; the folder appears whole when it is done.
"""
import json
import os
import shutil

import numpy as np
import pandas as pd
from PIL import Image

from social_reward.data.cells import describe, image_file, location_order
from social_reward.data.generations import read_generations
from social_reward.devices import default_device, default_num_workers, inference_precision
from social_reward.dist import is_main_process, process_device
from social_reward.errors import InputError
from social_reward.outputs import check_new_folder, folder_written_whole
from social_reward.scorers.registry import check_spec, load_scorer
from social_reward.scoring.encoding import prompt_image_scores


def score_candidates(candidates, spec, device, batch_size=1024, num_workers=0, fast_decode=False, precision="fp32"):
    """Each candidate's score under the scorer `spec` (its own score), in the candidates' order."""
    scorer = load_scorer(spec, device)
    order = location_order(candidates.image.tolist())
    wheres = [f"candidate {i} ({p!r})" for i, p in zip(candidates.index, candidates.prompt)]
    with inference_precision(device, precision):
        scores = prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer,
                                     candidates.prompt.values[order].tolist(), candidates.image.values[order].tolist(),
                                     device, batch_size, num_workers, wheres=[wheres[i] for i in order],
                                     fast_decode=fast_decode)
    in_order = np.empty(len(order))
    in_order[order] = scores.double().numpy()
    return in_order


def keep_best(candidates, top_k):
    """The top_k highest-scoring candidates of each prompt (ties in the order given), best first; and the prompts with
    fewer than top_k candidates, which keep them all."""
    ranked = candidates.sort_values("score", ascending=False, kind="stable")
    kept = ranked.groupby("prompt", sort=False).head(top_k)
    counts = candidates.groupby("prompt", sort=False).size()
    return kept.reset_index(drop=True), counts[counts < top_k]


def file_name_for(i, image):
    """The kept image's name in the folder: its rank, with its file's extension (image bytes: PIL's format)."""
    if isinstance(image, str) and os.path.isfile(image):
        return f"{i:06d}{os.path.splitext(image)[1].lower()}"
    with Image.open(image_file(image)) as opened:
        return f"{i:06d}.{(opened.format or 'png').lower().replace('jpeg', 'jpg')}"


def place_image(image, path):
    """Hard-link an image file into the folder (copy it across file systems); write image bytes as a file."""
    if isinstance(image, str) and os.path.isfile(image):
        try:
            os.link(image, path)
        except OSError:
            shutil.copyfile(image, path)
    else:
        with open(path, "wb") as f:
            f.write(image_file(image).getvalue())


def best_of_n(candidates, scorer, top_k=1, out="best_of_n", device=None, batch_size=1024, num_workers=None,
              fast_decode=False, precision="fp32", overwrite=False):
    """Score the candidates (tables or DataFrames: prompt, image[, generator, sample]) under `scorer` (a scorer
    spec), keep each prompt's top_k and write them into `out` as an image folder. Returns a dict with the mean score of
    all candidates and of the kept ones, and the kept rows. Under several processes each encodes a share; the main one
    writes.

    Example:
        result = best_of_n("candidates.parquet", "clip:clip_final.pth", top_k=1, out="best")
    """
    if top_k < 1:
        raise InputError(f"--top_k must be at least 1 (got {top_k})")
    device = process_device(device or default_device())
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    inference_precision(device, precision)
    check_spec(scorer)
    tables = [candidates] if isinstance(candidates, (str, pd.DataFrame)) else list(candidates)
    candidates = read_generations(tables, need_generator=False).reset_index(drop=True)
    # --overwrite must never replace the folder the candidates are read from
    inputs = {t for t in tables if isinstance(t, str)} | {os.path.dirname(i) for i in candidates.image if isinstance(i, str)}
    check_new_folder(out, overwrite, keep=sorted(inputs))
    repeated = candidates.duplicated(["prompt", "image"])
    if repeated.any():  # the same image twice for a prompt would be kept twice
        print(f"{repeated.sum()} candidates repeat an image already given for their prompt: each is scored and kept once")
        candidates = candidates[~repeated].reset_index(drop=True)
    candidates["score"] = score_candidates(candidates, scorer, device, batch_size, num_workers, fast_decode,
                                           precision)
    kept, short = keep_best(candidates, top_k)
    result = {"candidates": len(candidates), "mean_all": float(candidates.score.mean()), "kept": len(kept),
              "mean_kept": float(kept.score.mean()), "rows": kept.assign(image=kept.image.map(describe))}
    if not is_main_process():  # several processes: each scored a share; the main one writes
        return result
    if len(short):
        print(f"{len(short)} prompts have fewer than {top_k} candidates and keep them all: "
              + ", ".join(repr(p) for p in short.index[:5]) + (", ..." if len(short) > 5 else ""))
    with folder_written_whole(out) as tmp:
        lines = []
        for i, row in enumerate(kept.itertuples()):
            name = file_name_for(i, row.image)
            place_image(row.image, os.path.join(tmp, name))
            lines.append(json.dumps({"file_name": name, "text": row.prompt, "score": float(row.score)}))
        with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return result
