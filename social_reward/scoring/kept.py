"""Scores kept on disk as they are made, so a rerun (or a run over more data) scores only what is missing: what
compare.py and evaluate_generators.py keep in their --out folder.

A folder of parquet parts per scorer setting (the spec, the weights file's modification time, decoding and
precision), a row per (prompt, image) with the scorer's own score; an image is named by its identity
(a file by its real path, size and modification time; image bytes by their hash; a parquet cell by its file's identity
and place). Each batch of new scores is one more part (a temporary name, then renamed), so what is written grows with
the new scores alone, never rewritten; the parts are read as one table (with the single file an older version kept, if
any). Under several processes every process scores its share and holds the whole table, and the main process alone
writes the parts.

    scores, scales = kept_prompt_image_scores("out/scores", "ours", "clip:final.pth", prompts, images, wheres, "cpu")
"""
import glob
import hashlib
import json
import os
import uuid

import numpy as np
import pandas as pd
import torch

from social_reward.data.cells import image_file, parse_cell
from social_reward.devices import inference_precision
from social_reward.dist import is_main_process, wait_for_everyone
from social_reward.scorers.registry import load_scorer
from social_reward.scoring.encoding import prompt_image_scores


def image_identity(ref):
    """What names an image across runs: a file by its real path, size and modification time; a parquet cell by its
    file's and its place; bytes by their hash."""
    cell = parse_cell(ref) if isinstance(ref, str) else None
    if cell:
        stat = os.stat(cell[0])
        return f"cell {os.path.realpath(cell[0])} {stat.st_size} {stat.st_mtime_ns} {cell[1]} {cell[2]}"
    if isinstance(ref, str):
        stat = os.stat(ref)
        return f"file {os.path.realpath(ref)} {stat.st_size} {stat.st_mtime_ns}"
    return "bytes " + hashlib.sha256(image_file(ref).getbuffer()).hexdigest()


def setting_key(spec, fast_decode=False, precision="fp32"):
    """A name for everything that changes a scorer's scores: its spec, the modification times of every file it names
    (the weights; a folder's files; model=, tokenizer=, med_config= files), the decoding and the precision."""
    path, *options = spec.split(":", 1)[1].split(",")
    named = [path] + [option.partition("=")[2] for option in options]
    changed = [max([os.path.getmtime(os.path.join(p, f)) for f in os.listdir(p)] or [0]) if os.path.isdir(p)
               else os.path.getmtime(p) if os.path.exists(p) else None for p in named]
    settings = [spec, changed, fast_decode] + ([precision] if precision != "fp32" else [])
    if spec.startswith("pickscore:"):  # since 2026-12 its crop is CLIPImageProcessor's, and its kept score is its own
        settings += ["crop=floor", "score=logit_scale*cos"]  # (logit_scale.exp() times the cosine): not an older one's
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]


class KeptScores:
    """One scorer's kept scores in `folder` (see the module's docstring)."""

    def __init__(self, folder, name, spec, fast_decode=False, precision="fp32", chunk=4096):
        self.chunk = chunk
        self.path = os.path.join(folder, f"{name}-{setting_key(spec, fast_decode, precision)}")
        parts = sorted(glob.glob(os.path.join(self.path, "part-*.parquet")))
        old = [self.path + ".parquet"] if os.path.isfile(self.path + ".parquet") else []  # one file, as kept before
        tables = [pd.read_parquet(path) for path in old + parts]
        self.parts = len(parts)
        # two runs sharing a folder (compare.py and evaluate_generators.py on one --out) may both have kept a score
        self.table = pd.concat(tables, ignore_index=True).drop_duplicates(["prompt", "image"], keep="last") \
            if tables else pd.DataFrame({"prompt": pd.Series(dtype=str), "image": pd.Series(dtype=str),
                                         "score": pd.Series(dtype="float32")})
        scales = [t.attrs["scales"] for t in tables if "scales" in t.attrs]
        self.scales = json.loads(scales[-1]) if scales else None

    def scores(self, prompts, images, score_missing):
        """The score of each (prompts[k], images[k]) as a float32 tensor. score_missing(indices, total) -> (scores,
        scales) is called with the indices of the distinct requests not kept yet, `chunk` at a time, and each chunk
        kept as one more part; `scales` are the scorer's {"softmax_scale"}, kept with the scores."""
        keys = pd.MultiIndex.from_arrays([list(prompts), [image_identity(ref) for ref in images]])
        kept = pd.MultiIndex.from_frame(self.table[["prompt", "image"]])
        missing = ~keys.isin(kept)
        first = np.flatnonzero(missing & ~keys.duplicated())
        # the levels' values made once: get_level_values builds a whole level, so once a chunk was O(n^2 / chunk)
        prompt_values, image_values = keys.get_level_values(0), keys.get_level_values(1)
        new_tables = []
        for start in range(0, len(first), self.chunk):  # kept after each chunk: an interrupted run loses one at most
            chunk = first[start:start + self.chunk]
            new_scores, self.scales = score_missing(chunk, len(first))
            new = pd.DataFrame({"prompt": prompt_values[chunk], "image": image_values[chunk],
                                "score": np.asarray(new_scores, dtype=np.float32)})
            new_tables.append(new)
            if is_main_process():  # every process holds the same table; one writes it
                self._write_part(new)
            self.parts += 1
            wait_for_everyone()
        if new_tables:  # joined once, at the end: a concat per chunk would copy the table each time
            self.table = pd.concat([self.table, *new_tables], ignore_index=True)
            kept = pd.MultiIndex.from_frame(self.table[["prompt", "image"]])
        return torch.from_numpy(self.table.score.values[kept.get_indexer(keys)].astype(np.float32))

    def _write_part(self, new):
        os.makedirs(self.path, exist_ok=True)
        new.attrs["scales"] = json.dumps(self.scales)
        # numbered in order, and unique: another run writing this folder at the same time never overwrites a part
        path = os.path.join(self.path, f"part-{self.parts:06d}-{uuid.uuid4().hex[:8]}.parquet")
        new.to_parquet(path + ".tmp")
        os.replace(path + ".tmp", path)


def kept_prompt_image_scores(folder, name, spec, prompts, images, wheres, device, batch_size=1024, num_workers=0,
                             fast_decode=False, precision="fp32"):
    """encoding.prompt_image_scores under the scorer `spec`, through the scores kept in `folder`: the scorer loads and
    encodes only when some request is not kept yet. Returns (scores, {"softmax_scale"})."""
    kept = KeptScores(folder, name, spec, fast_decode, precision)
    scorer = None

    def score_missing(indices, total):
        nonlocal scorer
        if scorer is None:  # loaded only when something is missing, and once
            if is_main_process():
                print(f"{name}: scoring {total} (prompt, image) pairs not kept in {folder} yet")
            scorer = load_scorer(spec, device)
        with inference_precision(device, precision):
            scores = prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer,
                                         [prompts[i] for i in indices], [images[i] for i in indices], device,
                                         batch_size, num_workers, wheres=[wheres[i] for i in indices],
                                         fast_decode=fast_decode)
        return scores.numpy(), {"softmax_scale": scorer.softmax_scale}

    scores = kept.scores(prompts, images, score_missing)
    return scores, kept.scales
