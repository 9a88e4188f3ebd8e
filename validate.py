"""Pairwise accuracy: how often the model scores the preferred image above the other one for the prompt.

    python validate.py validation_data.parquet --checkout_path clip_epoch_4_global_step_final.pth
"""
import argparse
import sys

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clip_model import (DEFAULT_MODEL, DEFAULT_PRETRAINED, InputError, add_model_flags, default_device,
                        default_num_workers, inference_precision, run_cli)
from data_set import draft_size, drop_unreadable_pairs, open_image
from pair_sources import benchmark_metric, describe, location_order, read_source
from scorers import check_spec, clip_scorer, load_scorer


class ImageFiles(Dataset):
    def __init__(self, paths, preprocess, wheres=None, fast_decode=False):
        self.paths, self.preprocess, self.draft_size = paths, preprocess, draft_size(preprocess, fast_decode)
        self.wheres = wheres or [None] * len(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, idx):
        return open_image(self.paths[idx], self.preprocess, self.draft_size, self.wheres[idx])


@torch.no_grad()
def encode_images(model, preprocess, paths, device, batch_size=1024, num_workers=0, progress=True, wheres=None,
                  fast_decode=False):
    """L2-normalised embeddings of the images at `paths` (paths, bytes or parquet cells), in order, as a float32
    tensor on the CPU. `wheres` names each image's place (e.g. its row) in the message of an unreadable one."""
    loader = DataLoader(ImageFiles(list(paths), preprocess, wheres, fast_decode), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
    return torch.cat([model.encode_image(images.to(device), normalize=True).float().cpu()
                      for images in tqdm(loader, desc="images", disable=not progress)])


@torch.no_grad()
def encode_prompts(model, tokenizer, prompts, device, batch_size=1024):
    """L2-normalised embeddings of `prompts`, in order, as a float32 tensor on the CPU."""
    prompts = list(prompts)
    return torch.cat([model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device), normalize=True).float().cpu()
                      for i in range(0, len(prompts), batch_size)])


def prompt_image_scores(model, preprocess, tokenizer, prompts, images, device, batch_size=1024, num_workers=0,
                        progress=True, wheres=None, fast_decode=False):
    """cos(prompts[k], images[k]) for each k. Preference data repeats images and prompts, so each distinct one is
    encoded once; images stored in parquet are read file by file, row by row. `wheres[k]` names images[k]'s place."""
    requests = pd.DataFrame({"prompt": list(prompts), "image": list(images),
                             "where": wheres if wheres is not None else [None] * len(images)})
    first_seen = requests[~requests.image.duplicated()]  # each distinct image, with the place it first appears in
    order = location_order(first_seen.image.tolist())
    distinct = pd.Index(first_seen.image.values[order])
    distinct_prompts = pd.Index(pd.unique(requests.prompt))
    # no encode call holds more images than the original's did (a batch of pairs' images): larger calls are slower
    # on a CPU, and the set of distinct images can be twice the number of pairs
    image_features = encode_images(model, preprocess, distinct, device, min(batch_size, max(len(requests) // 2, 1)),
                                   num_workers, progress, first_seen["where"].values[order].tolist(), fast_decode)
    text_features = encode_prompts(model, tokenizer, distinct_prompts, device, batch_size)
    return (text_features[distinct_prompts.get_indexer(requests.prompt)]
            * image_features[distinct.get_indexer(requests.image)]).sum(1)


def pair_scores(model, preprocess, tokenizer, pairs, device, batch_size=1024, num_workers=0, progress=True,
                fast_decode=False):
    """Cosine similarity of each pair's prompt with its preferred and its other image: (pos_score, neg_score)."""
    wheres = [f"row {row}, column {column!r}" for column in ("pos_path", "neg_path") for row in pairs.index]
    scores = prompt_image_scores(model, preprocess, tokenizer, pd.concat([pairs.prompt, pairs.prompt]),
                                 pd.concat([pairs.pos_path, pairs.neg_path]), device, batch_size, num_workers,
                                 progress, wheres, fast_decode)
    return scores[:len(pairs)], scores[len(pairs):]


def counted_correct(pos_score, neg_score):
    """Which pairs count as correct: cos(prompt, pos) >= cos(prompt, neg); a tie counts, as in the original."""
    return pos_score >= neg_score


def pair_accuracy(model, preprocess, tokenizer, pairs, device, batch_size=1024, num_workers=0, progress=True,
                  fast_decode=False):
    """Fraction of pairs counted correct."""
    pos_score, neg_score = pair_scores(model, preprocess, tokenizer, pairs, device, batch_size, num_workers, progress,
                                       fast_decode)
    return counted_correct(pos_score, neg_score).float().mean().item()


def source_scores(model, preprocess, tokenizer, source, device, batch_size=1024, num_workers=0, progress=True,
                  fast_decode=False):
    """(pos_score, neg_score, group_scores) of a PairSource: each pair's two cosines, and for a benchmark layout
    each row's or entry's list of image scores (None for a pair table). Each distinct image is encoded once."""
    pairs, groups = source.pairs, source.groups
    if groups is None:
        return (*pair_scores(model, preprocess, tokenizer, pairs, device, batch_size, num_workers, progress,
                             fast_decode), None)
    every = groups.explode("images")
    prompts = pd.concat([pairs.prompt, pairs.prompt, every.prompt])
    images = pd.concat([pairs.pos_path, pairs.neg_path, every.images])
    wheres = ([f"row {row}" for row in pairs.entry] * 2 + [f"entry {entry}" for entry in every.entry])
    scores = prompt_image_scores(model, preprocess, tokenizer, prompts, images, device, batch_size, num_workers,
                                 progress, wheres, fast_decode)
    n = len(pairs)
    per_group = np.split(scores[2 * n:].numpy(), np.cumsum(groups.images.map(len))[:-1])
    return scores[:n], scores[n:2 * n], [list(g) for g in per_group]


def write_pair_scores(pairs, pos_score, neg_score, path):
    """Every pair with its pos_score, neg_score and whether it counted as correct, as csv or parquet by extension."""
    table = pairs.assign(pos_score=pos_score.numpy(), neg_score=neg_score.numpy(),
                         correct=counted_correct(pos_score, neg_score).numpy())
    write_table(table, path, "row")


def write_group_scores(source, group_scores, path):
    """A benchmark source's every image with its score: a row per (entry, image) with its label (Pick-a-Pic) or rank."""
    annotation = "label" if source.layout == "pickapic" else "rank"
    table = source.groups.assign(score=group_scores).rename(columns={"images": "image", "labels": annotation})
    table = table.explode(["image", annotation, "score"], ignore_index=True)
    table["image"] = table.image.map(describe)
    write_table(table.astype({"score": "float64"}), path, None)


def write_table(table, path, index_label):
    table.to_parquet(path) if path.endswith(".parquet") else table.to_csv(path, index=index_label is not None,
                                                                           index_label=index_label)


def evaluate_source(source, checkout_path=None, device=None, batch_size=1024, num_workers=None, model=DEFAULT_MODEL,
                    pretrained=DEFAULT_PRETRAINED, scores_out=None, skip_bad_images=False, image_root=None,
                    tie_threshold=0.0, fast_decode=False, scorer=None, precision="fp32"):
    """Read a source, score it, and return {"accuracy", "pairs", "metric": (name, value) or None}: the original's
    pairwise accuracy (ties left out) and, for a benchmark layout, that benchmark's own metric.

    scorer:    a scorers.py spec (e.g. "hpsv2:HPS_v2.1_compressed.pt") instead of model/pretrained/checkout_path.
    precision: "fp32" (the original's), or "bf16"/"fp16" (autocast)."""
    device = device or default_device()
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    if batch_size < 1 or num_workers < 0:
        raise InputError(f"--batch_size must be at least 1 and --num_workers at least 0 (got {batch_size}, {num_workers})")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device on this machine; use --device cpu")
    if scores_out is not None and not scores_out.endswith((".csv", ".parquet")):
        raise InputError(f"--scores_out {scores_out}: name a .csv or .parquet file")
    if not 0 <= tie_threshold <= 1:
        raise InputError(f"--tie_threshold must be between 0 and 1 (got {tie_threshold})")
    if scorer is not None:
        check_spec(scorer)
    precision_context = inference_precision(device, precision)
    # the data is checked before the model loads: a typo costs seconds, not a ViT-L/14 load
    source = read_source(source, image_root, check_files=not skip_bad_images)
    if source.left_out:
        print(source.left_out, file=sys.stderr)
    if skip_bad_images:
        source, skipped = drop_unreadable_pairs(source)
        if skipped:
            print(skipped, file=sys.stderr)
    scorer = load_scorer(scorer, device) if scorer else clip_scorer(model, pretrained, checkout_path, device)
    with precision_context:
        pos_score, neg_score, group_scores = source_scores(scorer.model, scorer.preprocess, scorer.tokenizer, source,
                                                           device, batch_size, num_workers, fast_decode=fast_decode)
    if scores_out is not None:
        if group_scores is None:
            write_pair_scores(source.pairs, pos_score, neg_score, scores_out)
        else:
            write_group_scores(source, group_scores, scores_out)
    metric = benchmark_metric(source, group_scores, scorer.softmax_scale, tie_threshold)
    return {"accuracy": counted_correct(pos_score, neg_score).float().mean().item(), "pairs": len(source.pairs),
            "metric": metric}


def validate_image_pair_classifier(parquet_file_or_pandas_dataframe, checkout_path=None, device=None, batch_size=1024,
                                   num_workers=None, model=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED,
                                   scores_out=None, skip_bad_images=False, image_root=None, fast_decode=False):
    """Pairwise accuracy of a (fine-tuned) CLIP on a pair table (or any source read_source reads), as a fraction.

    scores_out:      also write every pair's scores there (.csv or .parquet); for a benchmark, every image's.
    skip_bad_images: leave out the pairs whose images cannot be read (reported) instead of stopping.

    Example:
        accuracy = validate_image_pair_classifier("validation_data.parquet", checkout_path="classifier_checkpoint.pth")
        print(f"Accuracy: {accuracy * 100:.2f}%")
    """
    return evaluate_source(parquet_file_or_pandas_dataframe, checkout_path, device, batch_size, num_workers, model,
                           pretrained, scores_out, skip_bad_images, image_root, fast_decode=fast_decode)["accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parquet_file", nargs="+", help="pairs: a table with columns prompt, pos_path, neg_path; "
                        "Pick-a-Pic parquet shards (files, a glob or a folder); an HPD v2 or ImageReward json")
    add_model_flags(parser, inference=True)
    parser.add_argument("--scores_out", default=None, help="write each pair's scores here (.csv or .parquet)")
    parser.add_argument("--skip_bad_images", action="store_true", help="skip pairs whose images cannot be read")
    parser.add_argument("--image_root", default=None,
                        help="the image folder of an HPD v2 or ImageReward json (default: beside the json)")
    parser.add_argument("--scorer", default=None, help="another reward model, KIND:PATH[,key=value]: clip:, hpsv2:, "
                        "pickscore:, aesthetic: (see scorers.py); default: --model, --pretrained, --checkout_path")
    parser.add_argument("--tie_threshold", type=float, default=0.0,
                        help="Pick-a-Pic: predict a tie when the two images' probabilities differ by at most this")
    args = parser.parse_args()
    result = evaluate_source(args.parquet_file, args.checkout_path, args.device, args.batch_size, args.num_workers,
                             args.model, args.pretrained, args.scores_out, args.skip_bad_images, args.image_root,
                             args.tie_threshold, args.fast_decode, args.scorer, args.precision)
    print(f"Accuracy: {result['accuracy'] * 100:.2f}%")
    if result["metric"]:
        name, value = result["metric"]
        threshold = f" (tie threshold {args.tie_threshold:g})" if name.startswith("Pick-a-Pic") else ""
        print(f"{name}: {value * 100:.2f}%{threshold}")


if __name__ == "__main__":
    run_cli(main)
