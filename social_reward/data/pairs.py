"""(prompt, preferred image, other image) triplets for training and validation: a source's pairs checked, the pairs
with unreadable images dropped (--skip_bad_images), and the original's Dataset, PromptImagePair (root data_set.py
hands it on under the original's import path).

    dataset = PromptImagePair(pd.read_parquet("data.parquet"), preprocess)
    text, pos_image, neg_image = dataset[0]
"""
from dataclasses import replace

import pandas as pd
from torch.utils.data import Dataset

from social_reward.data.cells import describe, location_order
from social_reward.data.images import draft_size, open_image, readable
from social_reward.data.sources import TABLE as COLUMNS
from social_reward.data.sources import read_source
from social_reward.errors import InputError
from social_reward.models import DEFAULT_MODEL


def load_pairs(parquet_file_or_pandas_dataframe, check_files=True, image_root=None):
    """The pairs of a source (a pair table, Pick-a-Pic shards, an HPD v2 or ImageReward json), checked: columns,
    string prompts, image files that exist and are not empty; see sources.read_source.

    Raises InputError naming the file, the column or the row. Rows are named by the frame's index where it is a
    unique integer index (a parquet file's 0..n-1, or the rows a filtered frame kept), else by position.
    check_files=False leaves missing and empty image files to drop_unreadable_pairs (--skip_bad_images).
    """
    return read_source(parquet_file_or_pandas_dataframe, image_root, check_files).pairs


def drop_unreadable_pairs(source):
    """The source (a PairSource) without the pairs, and benchmark rows or entries, that have an image that does not
    read, and a line saying what was skipped (None if nothing was)."""
    pairs = source.pairs
    images = pd.unique(pd.concat([pairs["pos_path"], pairs["neg_path"]] +
                                 ([source.groups.images.explode()] if source.groups is not None else []),
                                 ignore_index=True))
    bad = {images[i] for i in location_order(images) if not readable(images[i])}
    if not bad:
        return source, None
    keep = ~(pairs["pos_path"].isin(bad) | pairs["neg_path"].isin(bad))
    if not keep.any():
        raise InputError(f"no pair left: every pair has an unreadable image (first: {', '.join(sorted(map(describe, bad))[:3])})")
    groups = source.groups
    if groups is not None:
        groups = groups[[not bad.intersection(group) for group in groups.images]]
    named = sorted(map(describe, bad))
    skipped = (f"skipping pairs with unreadable images: {len(bad)} images, first: {', '.join(named[:5])}; "
               f"{keep.sum()} pairs left" + (f", {len(groups)} of {len(source.groups)} benchmark rows"
                                              if groups is not None else ""))
    return replace(source, pairs=pairs[keep], groups=groups), skipped


class PromptImagePair(Dataset):
    """Items are (text_tokens, pos_image, neg_image): the prompt's 77 CLIP token ids and both preprocessed images.

    Example:
        df = pd.read_parquet('data.parquet')
        preprocess_fn = torchvision.transforms.Compose([torchvision.transforms.Resize(224), torchvision.transforms.ToTensor()])
        dataset = PromptImagePair(df, preprocess_fn)
        text, pos_img, neg_img = dataset[0]

    The pairs may come from any source sources.read_source reads: a pair table (image paths or bytes),
    Pick-a-Pic parquet shards (images decoded from the shards' bytes as items load), HPD v2 or ImageReward json
    (with `image_root`). `tokenizer` defaults to the tokenizer of the default model (OpenAI's CLIP BPE, truncated to
    77 tokens). `with_row=True` puts the row number first in each item, so a training loop can name a batch's rows.
    `fast_decode=True` decodes JPEGs at reduced scale (faster; scores move slightly).
    """

    def __init__(self, parquet_file_or_pandas_dataframe, preprocess, tokenizer=None, with_row=False, fast_decode=False,
                 image_root=None):
        self.df = load_pairs(parquet_file_or_pandas_dataframe, image_root=image_root)
        self.preprocess = preprocess
        self.with_row = with_row
        self.draft_size = draft_size(preprocess, fast_decode)
        if tokenizer is None:
            import open_clip
            tokenizer = open_clip.get_tokenizer(DEFAULT_MODEL)
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.df)

    def __getitem__(self, idx):
        prompt, pos_path, neg_path = (self.df[column].iat[idx] for column in COLUMNS)
        row = self.df.index[idx]
        item = (self.tokenizer(prompt)[0],
                open_image(pos_path, self.preprocess, self.draft_size, f"row {row}, column 'pos_path'"),
                open_image(neg_path, self.preprocess, self.draft_size, f"row {row}, column 'neg_path'"))
        return (row, *item) if self.with_row else item
