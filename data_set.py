"""(prompt, preferred image, other image) triplets from a pair table, a DataFrame, or a public preference dataset."""
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFile
from torchvision.transforms import Resize
from torch.utils.data import Dataset, Sampler

from clip_model import DEFAULT_MODEL, InputError
from pair_sources import TABLE as COLUMNS, describe, image_file, keep_row_groups, location_order, read_source, row_groups

# as the original: a truncated JPEG loads (the missing part grey) instead of stopping a long run
ImageFile.LOAD_TRUNCATED_IMAGES = True


def load_pairs(parquet_file_or_pandas_dataframe, check_files=True, image_root=None):
    """The pairs of a source (a pair table, Pick-a-Pic shards, an HPD v2 or ImageReward json), checked: columns,
    string prompts, image files that exist and are not empty; see pair_sources.read_source.

    Raises InputError naming the file, the column or the row. Rows are named by the frame's index where it is a
    unique integer index (a parquet file's 0..n-1, or the rows a filtered frame kept), else by position.
    check_files=False leaves missing and empty image files to drop_unreadable_pairs (--skip_bad_images).
    """
    return read_source(parquet_file_or_pandas_dataframe, image_root, check_files).pairs


def readable(ref):
    """Whether PIL can identify and verify the image (a path, bytes or a parquet cell) as an image (no full decode)."""
    try:
        with Image.open(image_file(ref)) as image:
            image.verify()
        return True
    except Exception:
        return False


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


# With --fast_decode, JPEGs are decoded at a reduced scale (PIL's draft: DCT scaling by 1/2, 1/4, 1/8) that keeps at
# least this many times the resize target on the shortest side; the exact antialiased resize then runs on far fewer
# pixels. The scores then differ slightly from the original's full-scale decoding, so it is not the default.
DRAFT_MARGIN = 2


def resize_target(preprocess):
    """The shortest-side size the first Resize of a torchvision Compose makes, or None."""
    for transform in getattr(preprocess, "transforms", ()):
        if isinstance(transform, Resize):
            return transform.size if isinstance(transform.size, int) else min(transform.size)
    return None


def draft_size(preprocess, fast_decode):
    """The reduced-scale decoding target for open_image: None (full decoding, the original's) unless fast_decode."""
    return resize_target(preprocess) if fast_decode else None


def open_image(path, preprocess, draft_size=None, where=None):
    """Decode one image (a path, bytes, or a parquet cell; with draft_size, a JPEG at reduced scale, at least
    draft_size * DRAFT_MARGIN on its shortest side) and preprocess it; an unreadable one raises InputError naming it,
    after `where` (its row and column)."""
    try:
        with Image.open(image_file(path)) as image:
            if draft_size and image.format == "JPEG":
                image.draft(image.mode if image.mode in ("RGB", "L") else None, (draft_size * DRAFT_MARGIN,) * 2)
            return preprocess(image)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        raise InputError(f"{where + ': ' if where else ''}{describe(path)}: cannot read image ({reason})") from None


class PromptImagePair(Dataset):
    """Items are (text_tokens, pos_image, neg_image): the prompt's 77 CLIP token ids and both preprocessed images.

    Example:
        df = pd.read_parquet('data.parquet')
        preprocess_fn = torchvision.transforms.Compose([torchvision.transforms.Resize(224), torchvision.transforms.ToTensor()])
        dataset = PromptImagePair(df, preprocess_fn)
        text, pos_img, neg_img = dataset[0]

    The pairs may come from any source pair_sources.read_source reads: a pair table (image paths or bytes),
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



# ---- the order of an epoch's pairs ------------------------------------------------------------------------------

SHUFFLES = ("block", "uniform")
# row groups: a batch of 128 then draws from about 9 of Pick-a-Pic's row groups of 100, and a loading process holds
# about 270 MB of its images (benchmarks/shard_order.py, docs/data.md)
DEFAULT_SHUFFLE_WINDOW = 8


class BlockOrder(Sampler):
    """A shard-aware shuffle of pairs whose images live in parquet: each epoch shuffles the order of the row groups,
    deals them to the processes (each to the one with the fewest pairs so far), and each process shuffles the pairs
    within each window of `window` of its row groups. So each row group is read once per epoch, a process's memory
    holds a window's row groups, and the processes read disjoint row groups.

    `blocks[i]` is pair i's row group (pair_sources.row_groups). Seeded by seed + epoch like accelerate's seedable
    sampler, so a resumed run (set_epoch, then accelerate's skip_first_batches) continues at the exact pair. With
    `num_processes` N > 1 the indices are laid out for accelerate's batch sharding (batch k goes to process k mod N):
    batch j * N + r holds process r's j-th batch, and each process's pairs are padded to the same number of full
    batches with its own first pairs (as accelerate pads a uniform order with the epoch's first pairs).

        order = BlockOrder(row_groups(pairs.pos_path), window=16, seed=42)
        loader = DataLoader(dataset, batch_size=128, sampler=order)   # loader.set_epoch / order.set_epoch(epoch)
    """

    def __init__(self, blocks, window, seed, batch_size=1, num_processes=1):
        self.window, self.seed, self.batch_size, self.num_processes = window, seed, batch_size, num_processes
        blocks = np.asarray(blocks)
        order = np.argsort(blocks, kind="stable")
        self.members = np.split(order, np.flatnonzero(np.diff(blocks[order])) + 1)  # pair positions per row group
        self.epoch, self._cached = 0, (None, None)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def process_orders(self):
        """This epoch's pair positions for each process, in the order that process reads them."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        dealt, counts = [[] for _ in range(self.num_processes)], np.zeros(self.num_processes, dtype=np.int64)
        for block in torch.randperm(len(self.members), generator=generator).tolist():
            process = int(counts.argmin())
            dealt[process].append(block)
            counts[process] += len(self.members[block])
        orders = []
        for blocks in dealt:
            windows = [np.concatenate([self.members[b] for b in blocks[i:i + self.window]])
                       for i in range(0, len(blocks), self.window)]
            orders.append(np.concatenate([w[torch.randperm(len(w), generator=generator).numpy()] for w in windows])
                          if windows else np.empty(0, dtype=np.int64))
        return orders

    def _indices(self):
        if self._cached[0] != self.epoch:
            orders = self.process_orders()
            if self.num_processes > 1:
                batches = -(-max(map(len, orders)) // self.batch_size)
                padded = [np.resize(order, batches * self.batch_size) for order in orders]
                # batch j * N + r is process r's j-th batch
                orders = [np.stack([p.reshape(batches, self.batch_size) for p in padded], 1).reshape(-1)]
            self._cached = (self.epoch, orders[0])
        return self._cached[1]

    def __len__(self):
        return len(self._indices())

    def __iter__(self):
        return iter(self._indices().tolist())


def pair_order(pairs, shuffle, window, seed, batch_size, num_processes):
    """The sampler of a training loader: None (a uniform shuffle, accelerate's seedable sampler: the original's order)
    or a BlockOrder of the pairs' row groups. `shuffle` None picks block for pairs whose images live in parquet
    cells (Pick-a-Pic shards, a pair table with image bytes) and uniform for image files (the original's tables).
    Sets this process's row-group cache (and its DataLoader workers') to hold a window."""
    if shuffle not in (None, *SHUFFLES):
        raise InputError(f"--shuffle {shuffle}: unknown; choose from {', '.join(SHUFFLES)}")
    if window < 1:
        raise InputError(f"--shuffle_window must be at least 1 (got {window})")
    if shuffle == "uniform":
        return None
    blocks = row_groups(pairs.pos_path)
    if blocks is None:
        if shuffle == "block":
            raise InputError("--shuffle block: the pairs' images are files, not parquet cells; a block order is for "
                             "pairs whose images live in parquet (use --shuffle uniform)")
        return None
    if len(np.unique(blocks)) < num_processes:
        raise InputError(f"--shuffle block: {len(np.unique(blocks))} row groups for {num_processes} processes; each "
                         f"process reads row groups of its own (use --shuffle uniform)")
    keep_row_groups(2 * window)  # two image columns per row group
    return BlockOrder(blocks, window, seed, batch_size, num_processes)
