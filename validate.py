"""Pairwise accuracy: how often the model scores the preferred image above the other one for the prompt.

    python validate.py validation_data.parquet --checkout_path clip_epoch_4_global_step_final.pth
"""
import argparse
import sys

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clip_model import (DEFAULT_MODEL, DEFAULT_PRETRAINED, InputError, add_model_flags, default_device,
                        default_num_workers, load_model, run_cli)
from data_set import drop_unreadable_pairs, load_pairs, open_image, resize_target


class ImageFiles(Dataset):
    def __init__(self, paths, preprocess, wheres=None):
        self.paths, self.preprocess, self.draft_size = paths, preprocess, resize_target(preprocess)
        self.wheres = wheres or [None] * len(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, idx):
        return open_image(self.paths[idx], self.preprocess, self.draft_size, self.wheres[idx])


@torch.no_grad()
def encode_images(model, preprocess, paths, device, batch_size=1024, num_workers=0, progress=True, wheres=None):
    """L2-normalised embeddings of the images at `paths`, in order, as a float32 tensor on the CPU.
    `wheres` names each image's place (e.g. its row) in the message of an unreadable one."""
    loader = DataLoader(ImageFiles(list(paths), preprocess, wheres), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    return torch.cat([model.encode_image(images.to(device), normalize=True).float().cpu()
                      for images in tqdm(loader, desc="images", disable=not progress)])


@torch.no_grad()
def encode_prompts(model, tokenizer, prompts, device, batch_size=1024):
    """L2-normalised embeddings of `prompts`, in order, as a float32 tensor on the CPU."""
    prompts = list(prompts)
    return torch.cat([model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device), normalize=True).float().cpu()
                      for i in range(0, len(prompts), batch_size)])


def pair_scores(model, preprocess, tokenizer, pairs, device, batch_size=1024, num_workers=0, progress=True):
    """Cosine similarity of each pair's prompt with its preferred and its other image: (pos_score, neg_score).

    Preference data repeats images and prompts across pairs, so each distinct one is encoded once.
    """
    paths = pd.concat([pairs["pos_path"], pairs["neg_path"]], keys=["pos_path", "neg_path"])
    first_seen = paths[~paths.duplicated()]  # each distinct image, with the column and row it first appears in
    images = pd.Index(first_seen.values)
    wheres = [f"row {row}, column {column!r}" for column, row in first_seen.index]
    prompts = pd.Index(pd.unique(pairs["prompt"]))
    # no encode call holds more images than the original's did (a batch of pairs' images): larger calls are slower
    # on a CPU, and the set of distinct images can be twice the number of pairs
    image_features = encode_images(model, preprocess, images, device, min(batch_size, len(pairs)), num_workers, progress,
                                   wheres)
    text_features = encode_prompts(model, tokenizer, prompts, device, batch_size)
    text = text_features[prompts.get_indexer(pairs["prompt"])]
    pos_score = (text * image_features[images.get_indexer(pairs["pos_path"])]).sum(1)
    neg_score = (text * image_features[images.get_indexer(pairs["neg_path"])]).sum(1)
    return pos_score, neg_score


def counted_correct(pos_score, neg_score):
    """Which pairs count as correct: cos(prompt, pos) >= cos(prompt, neg); a tie counts, as in the original."""
    return pos_score >= neg_score


def pair_accuracy(model, preprocess, tokenizer, pairs, device, batch_size=1024, num_workers=0, progress=True):
    """Fraction of pairs counted correct."""
    pos_score, neg_score = pair_scores(model, preprocess, tokenizer, pairs, device, batch_size, num_workers, progress)
    return counted_correct(pos_score, neg_score).float().mean().item()


def write_pair_scores(pairs, pos_score, neg_score, path):
    """Every pair with its pos_score, neg_score and whether it counted as correct, as csv or parquet by extension."""
    table = pairs.assign(pos_score=pos_score.numpy(), neg_score=neg_score.numpy(),
                         correct=counted_correct(pos_score, neg_score).numpy())
    table.to_parquet(path) if path.endswith(".parquet") else table.to_csv(path, index_label="row")


def validate_image_pair_classifier(parquet_file_or_pandas_dataframe, checkout_path=None, device=None, batch_size=1024,
                                   num_workers=None, model=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED,
                                   scores_out=None, skip_bad_images=False):
    """Pairwise accuracy of a (fine-tuned) CLIP on a pair table, as a fraction.

    scores_out:      also write every pair's scores there (.csv or .parquet).
    skip_bad_images: leave out the pairs whose images cannot be read (reported) instead of stopping.

    Example:
        accuracy = validate_image_pair_classifier("validation_data.parquet", checkout_path="classifier_checkpoint.pth")
        print(f"Accuracy: {accuracy * 100:.2f}%")
    """
    device = device or default_device()
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    if batch_size < 1 or num_workers < 0:
        raise InputError(f"--batch_size must be at least 1 and --num_workers at least 0 (got {batch_size}, {num_workers})")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device on this machine; use --device cpu")
    if scores_out is not None and not scores_out.endswith((".csv", ".parquet")):
        raise InputError(f"--scores_out {scores_out}: name a .csv or .parquet file")
    # the data is checked before the model loads: a typo costs seconds, not a ViT-L/14 load
    pairs = load_pairs(parquet_file_or_pandas_dataframe, check_files=not skip_bad_images)
    if skip_bad_images:
        pairs, skipped = drop_unreadable_pairs(pairs)
        if skipped:
            print(skipped, file=sys.stderr)
    clip, preprocess, tokenizer = load_model(model, pretrained, checkout_path, device)
    pos_score, neg_score = pair_scores(clip, preprocess, tokenizer, pairs, device, batch_size, num_workers)
    if scores_out is not None:
        write_pair_scores(pairs, pos_score, neg_score, scores_out)
    return counted_correct(pos_score, neg_score).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parquet_file", help="pairs: columns prompt, pos_path, neg_path")
    add_model_flags(parser, inference=True)
    parser.add_argument("--scores_out", default=None, help="write each pair's scores here (.csv or .parquet)")
    parser.add_argument("--skip_bad_images", action="store_true", help="skip pairs whose images cannot be read")
    args = parser.parse_args()
    accuracy = validate_image_pair_classifier(args.parquet_file, args.checkout_path, args.device, args.batch_size,
                                              args.num_workers, args.model, args.pretrained, args.scores_out,
                                              args.skip_bad_images)
    print(f"Accuracy: {accuracy * 100:.2f}%")


if __name__ == "__main__":
    run_cli(main)
