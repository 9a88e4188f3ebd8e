"""The frozen-trunk cache of train_pair_pos_neg.py --trunk_cache DIR: the frozen part of each tower runs once per
distinct image and prompt, its output is stored, and every epoch and later run reads it back and runs only the
trained blocks.

A tower splits where its first trained block starts: the trunk is the embeddings and the frozen blocks below it, the
head is the rest. A tower that trains nothing is all trunk (its final embedding is stored); a tower whose embeddings
train (mode "all", the image tower of mode "visual") is not cached.

An entry is one safetensors file, written under a temporary name and renamed, so it is whole or absent; its folder
is named by a hash of everything that changes the trunk's output (the frozen weights, the architecture, the split,
preprocessing and decoding, the storage dtype, the autocast precision) and its file by the image's identity (path,
size and modification time; or the bytes' hash for images stored in parquet or in the table) or the prompt's tokens.
"""
import hashlib
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from safetensors import safe_open
from safetensors.torch import load, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from social_reward.data.cells import image_file, location_order, parse_cell
from social_reward.data.images import draft_size, open_image
from social_reward.errors import InputError
from social_reward.scoring.encoding import ImageFiles
from social_reward.training.flags import TRUNK_CACHE_DTYPES

STORAGE_DTYPES = {name: getattr(torch, dtype) for name, dtype in TRUNK_CACHE_DTYPES.items()}


TOWERS = ("image", "text")


@dataclass(frozen=True)
class TowerSplit:
    """Where a training mode splits a tower: the trunk is its embeddings and first `frozen_blocks` blocks."""
    tower: str
    frozen_blocks: int
    depth: int
    trains: bool  # False: the whole tower is frozen, and the trunk is the tower (its final embedding is stored)

    def describe(self):
        if not self.trains:
            return f"{self.tower} tower: its final embedding (it trains nothing)"
        return f"{self.tower} tower: the tokens entering block {self.frozen_blocks} of {self.depth}"


def _tower_parts(clip, tower):
    """(embedding parameters, blocks, all parameters) of a tower, by name prefix."""
    if tower == "image":
        visual = clip.visual
        embeddings = [p for n, p in visual.named_parameters() if n.startswith(("conv1", "class_embedding",
                                                                               "positional_embedding", "ln_pre"))]
        return embeddings, visual.transformer.resblocks, list(visual.parameters())
    embeddings = [clip.token_embedding.weight, clip.positional_embedding]
    everything = embeddings + list(clip.transformer.parameters()) + list(clip.ln_final.parameters())
    if isinstance(clip.text_projection, nn.Parameter):
        everything.append(clip.text_projection)
    elif clip.text_projection is not None:
        everything += list(clip.text_projection.parameters())
    return embeddings, clip.transformer.resblocks, everything


def tower_splits(clip):
    """{tower: TowerSplit, or None where the tower's embeddings train}, read from requires_grad (after
    training_modes.trainable_parameters has applied the mode)."""
    splits = {}
    for tower in TOWERS:
        embeddings, blocks, everything = _tower_parts(clip, tower)
        if any(p.requires_grad for p in embeddings):
            splits[tower] = None
            continue
        trained = [i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters())]
        trains = any(p.requires_grad for p in everything)
        splits[tower] = TowerSplit(tower, trained[0] if trained else len(blocks), len(blocks), trains)
    return splits


def _run_blocks(transformer, x, start, stop, attn_mask=None):
    """Blocks start..stop-1 of an open_clip Transformer, on batch-first tokens, as Transformer.forward runs them."""
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for block in transformer.resblocks[start:stop]:
        x = block(x, attn_mask=attn_mask)
    return x if transformer.batch_first else x.transpose(0, 1)


def trunk(clip, split, inputs):
    """The trunk's output for preprocessed images or token ids: what the cache stores."""
    if split.tower == "image":
        if not split.trains:
            return clip.encode_image(inputs)
        return _run_blocks(clip.visual.transformer, clip.visual._embeds(inputs), 0, split.frozen_blocks)
    if not split.trains:
        return clip.encode_text(inputs)
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(inputs).to(cast_dtype) + clip.positional_embedding.to(cast_dtype)
    return _run_blocks(clip.transformer, x, 0, split.frozen_blocks, clip.attn_mask)


def head(clip, split, x, tokens=None):
    """The rest of the tower on the trunk's output `x` (text: with the prompts' token ids, which pooling needs):
    the tower's unnormalized embedding, as encode_image/encode_text compute it."""
    if not split.trains:
        return x
    if split.tower == "image":
        pooled, _ = clip.visual._pool(_run_blocks(clip.visual.transformer, x, split.frozen_blocks, None))
        return pooled @ clip.visual.proj if clip.visual.proj is not None else pooled
    x = clip.ln_final(_run_blocks(clip.transformer, x, split.frozen_blocks, None, clip.attn_mask))
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)
    return x @ clip.text_projection if clip.text_projection is not None else x


class TowerHeads(nn.Module):
    """CLIP's forward from cached trunk outputs: (image_features, text_features, logit_scale) as CLIP returns them.

    `images` is the image trunk's output (or preprocessed images where that tower is not cached); `text` is the token
    ids, or [trunk output, token ids] where the text tower is split, or the final embedding where it is all trunk.
    Its state_dict is the CLIP's own, so checkpoints are the same files with or without the cache.
    """

    def __init__(self, clip, splits):
        super().__init__()
        self.clip, self.splits = clip, splits

    def state_dict(self, *args, **kwargs):
        return self.clip.state_dict(*args, **kwargs)

    def forward(self, images, text):
        clip, image_split, text_split = self.clip, self.splits["image"], self.splits["text"]
        image_features = clip.encode_image(images) if image_split is None else head(clip, image_split, images)
        if text_split is None:
            text_features = clip.encode_text(text)
        elif text_split.trains:
            text_features = head(clip, text_split, *text)
        else:
            text_features = text
        return F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), clip.logit_scale.exp()


def image_identity(ref):
    """What names an image for the cache: a file by its real path, size and modification time; bytes (in a table
    or a parquet cell) by their hash."""
    if isinstance(ref, str) and not parse_cell(ref):
        stat = os.stat(ref)
        return f"file {os.path.realpath(ref)} {stat.st_size} {stat.st_mtime_ns}"
    return "bytes " + hashlib.sha256(image_file(ref).getbuffer()).hexdigest()


def _hash_tensors(digest, tensors):
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).reshape(-1).numpy().data if tensor.numel() else b"")


def tower_key(clip, split, preprocess, draft, storage_dtype, autocast_dtype):
    """A hash of everything that changes what the trunk of `split` outputs and how it is stored."""
    digest = hashlib.sha256(f"{split} {storage_dtype} autocast {autocast_dtype}".encode())
    embeddings, blocks, everything = _tower_parts(clip, split.tower)
    if split.trains:
        frozen = embeddings + [p for block in blocks[:split.frozen_blocks] for p in block.parameters()]
        digest.update(repr([embeddings[0].shape] + list(blocks[:split.frozen_blocks])).encode())
    else:
        frozen = everything
    digest.update(repr(clip.visual if split.tower == "image" else [clip.transformer, clip.attn_mask.shape]).encode())
    if split.tower == "image":
        digest.update(f"{preprocess} draft {draft}".encode())
    _hash_tensors(digest, frozen)
    return digest.hexdigest()[:24]


def entry_shape(clip, split):
    if split.tower == "image":
        if not split.trains:
            return (clip.visual.output_dim,)
        return tuple(clip.visual.positional_embedding.shape)
    if not split.trains:
        return (clip.text_projection.shape[-1] if clip.text_projection is not None else clip.transformer.width,)
    return tuple(clip.positional_embedding.shape)


def read_entry(path):
    """An entry's tensor, read whole into memory of its own (no mapping of a file that another run may replace)."""
    with open(path, "rb") as f:
        return load(f.read())["x"]


def entry_is_whole(path, shape, dtype):
    """Whether an entry holds a tensor of the right shape and dtype (a half-written or foreign file does not)."""
    try:
        with safe_open(path, framework="pt") as f:
            x = f.get_slice("x")
            return tuple(x.get_shape()) == shape and x.get_dtype() == {torch.float32: "F32", torch.float16: "F16",
                                                                       torch.bfloat16: "BF16"}[dtype]
    except Exception:
        return False


def write_entry(path, tensor):
    tmp = f"{path}.{os.getpid()}.tmp"  # each process its own: several processes may write the same entry
    save_file({"x": tensor.contiguous()}, tmp)
    os.replace(tmp, path)


def size_text(n_bytes):
    return next(f"{n_bytes / unit:.{digits}f} {name}" for unit, name, digits in
                ((1e9, "GB", 2), (1e6, "MB", 1), (1e3, "kB", 1), (1, "bytes", 0)) if n_bytes >= unit or unit == 1)


class TrunkCache:
    """The entries of one run's towers in `folder`: where each image's and prompt's entry is, filling the missing
    ones, and what the training items are made of."""

    def __init__(self, folder, clip, splits, preprocess, tokenizer, images, prompts, fast_decode=False,
                 storage_dtype="fp16", autocast_dtype=None):
        self.folder, self.clip, self.splits, self.dtype = folder, clip, splits, STORAGE_DTYPES[storage_dtype]
        self.preprocess, self.fast_decode, self.draft = preprocess, fast_decode, draft_size(preprocess, fast_decode)
        self.tokens = dict(zip(prompts, tokenizer(list(prompts)))) if len(prompts) else {}
        self.entries = {}  # tower: {image ref or prompt: entry path}
        for tower, split in splits.items():
            if split is None:
                continue
            key = tower_key(clip, split, preprocess, self.draft, self.dtype, autocast_dtype)
            tower_folder = os.path.join(folder, f"{tower}-{key}")
            if tower == "image":
                names = {ref: image_identity(ref) for ref in images}
            else:
                names = {p: "tokens " + hashlib.sha256(t.numpy().tobytes()).hexdigest() for p, t in self.tokens.items()}
            self.entries[tower] = {item: os.path.join(tower_folder, hashlib.sha256(name.encode()).hexdigest()[:32]
                                                      + ".safetensors") for item, name in names.items()}

    def missing(self, tower):
        shape = entry_shape(self.clip, self.splits[tower])
        return [item for item, path in self.entries[tower].items() if not entry_is_whole(path, shape, self.dtype)]

    def entry_bytes(self, tower):
        shape = entry_shape(self.clip, self.splits[tower])
        return torch.Size(shape).numel() * self.dtype.itemsize + 128

    def plan(self):
        """One line: what is cached per tower, how much to compute, the estimated size on disk. Raises InputError
        where the disk lacks room for the entries to write."""
        parts, to_write = [], 0
        for tower, split in self.splits.items():
            if split is None:
                parts.append(f"{tower} tower: trains whole, not cached")
                continue
            missing, total = len(self.missing(tower)), len(self.entries[tower])
            to_write += missing * self.entry_bytes(tower)
            shape = "x".join(map(str, entry_shape(self.clip, split)))
            parts.append(f"{split.describe()} ({shape}), {total} {'images' if tower == 'image' else 'prompts'}, "
                         f"{missing} to compute")
        size = sum(len(e) * self.entry_bytes(t) for t, e in self.entries.items())
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise InputError(f"--trunk_cache {self.folder}: cannot be a folder here ({e.strerror})") from None
        free = shutil.disk_usage(self.folder).free
        if to_write > free:
            raise InputError(f"--trunk_cache {self.folder}: needs {size_text(to_write)} more for its entries, "
                             f"{size_text(free)} free on that disk")
        dtype = {v: k for k, v in STORAGE_DTYPES.items()}[self.dtype]
        return (f"trunk cache {self.folder} ({dtype}): " + "; ".join(parts) +
                f"; about {size_text(size)} on disk" if self.entries else
                f"trunk cache {self.folder}: nothing cached: " + "; ".join(parts))

    @torch.no_grad()
    def fill(self, accelerator, batch_size, num_workers=0):
        """Compute and write the missing entries, each process a share of them; every process returns when all are
        written. The trunk runs as training runs it (frozen blocks in eval mode, under accelerate's autocast)."""
        for tower in self.entries:
            missing = self.missing(tower)
            accelerator.wait_for_everyone()  # every process has listed the same missing entries before any is written
            for attempt in range(2):  # the second: entries another process left unwritten (it died)
                mine = missing[accelerator.process_index::accelerator.num_processes] if attempt == 0 else missing
                self._compute(tower, mine, accelerator, batch_size, num_workers)
                accelerator.wait_for_everyone()
                missing = self.missing(tower)
                if not missing:
                    break

    def _compute(self, tower, items, accelerator, batch_size, num_workers):
        if not items:
            return
        os.makedirs(os.path.dirname(self.entries[tower][items[0]]), exist_ok=True)
        split = self.splits[tower]
        if tower == "image":
            items = [items[i] for i in location_order(items)]
            batches = DataLoader(ImageFiles(items, self.preprocess, fast_decode=self.fast_decode),
                                 batch_size=batch_size, num_workers=num_workers)
        else:
            batches = (torch.stack([self.tokens[p] for p in items[i:i + batch_size]])
                       for i in range(0, len(items), batch_size))
        done = 0
        bar = tqdm(total=len(items), desc=f"trunk cache, {tower}s", disable=not accelerator.is_local_main_process)
        for inputs in batches:
            with accelerator.autocast():
                outputs = trunk(self.clip, split, inputs.to(accelerator.device)).to("cpu", self.dtype)
            for item, output in zip(items[done:done + len(outputs)], outputs):
                write_entry(self.entries[tower][item], output)
            done += len(outputs)
            bar.update(len(outputs))
        bar.close()

    def inputs(self, tower, item):
        """A training item's input to TowerHeads for one tower: the entry (fp32), or what the tower takes whole."""
        if tower == "image":
            if self.splits["image"] is None:
                return open_image(item, self.preprocess, self.draft)
            return read_entry(self.entries["image"][item]).float()
        split = self.splits["text"]
        if split is None:
            return self.tokens[item]
        entry = read_entry(self.entries["text"][item]).float()
        return [entry, self.tokens[item]] if split.trains else entry


class CachedTriplets(Dataset):
    """Items (row, text, pos, neg) of a pair table, as TowerHeads takes them, read from the cache: no image decoded."""

    def __init__(self, pairs, cache):
        self.pairs, self.cache = pairs, cache

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, idx):
        prompt, pos, neg = (self.pairs[column].iat[idx] for column in ("prompt", "pos_path", "neg_path"))
        return (self.pairs.index[idx], self.cache.inputs("text", prompt), self.cache.inputs("image", pos),
                self.cache.inputs("image", neg))
