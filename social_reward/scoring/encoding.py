"""Images and prompts in, scores out: the one piece of code every script encodes with (validation, scoring, comparison,
generator evaluation, best-of-N, the trunk cache's fill). It works on what a Scorer (scorers/base.py) holds: a model with
`encode_image(images, normalize=True)` and `encode_text(tokens, normalize=True)`, its preprocess and tokenizer; or, for
a model whose text encoder attends to the image (ImageReward), `encode_image` and `pair_scores` (see attended_scores).

    features = encode_images(model, preprocess, ["a.png", "b.png"], "cpu")
    scores = prompt_image_scores(model, preprocess, tokenizer, ["a cat", "a dog"], ["a.png", "b.png"], "cpu")

Under `accelerate launch` or `torchrun` (several processes), each process encodes a contiguous share of the images and
prompts and every process gets the whole result, so a script scores as one process would, N times faster; it only
writes and prints where is_main_process(). prompt_image_scores gathers only scores: each process encodes its share of
the distinct images and the prompts of their requests, and the embeddings stay where they were made.

    device = process_device(args.device)          # under several GPU processes: this process's GPU
    scores = prompt_image_scores(...)             # the same tensor in every process
    if is_main_process():
        write(scores)
"""
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from social_reward.data.cells import location_order
from social_reward.data.images import draft_size, open_image
from social_reward.data.sources import PairSource
from social_reward.dist import across_processes, is_main_process
from social_reward.scoring.metrics import counted_correct


class ImageFiles(Dataset):
    """Preprocessed images from paths, bytes or parquet cells; `wheres[i]` names image i's place in an error."""

    def __init__(self, paths, preprocess, wheres=None, fast_decode=False):
        self.paths, self.preprocess, self.draft_size = paths, preprocess, draft_size(preprocess, fast_decode)
        self.wheres = wheres or [None] * len(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, idx):
        return open_image(self.paths[idx], self.preprocess, self.draft_size, self.wheres[idx])


def _encode_into(batches, encode):
    """encode(batch) for each batch, written into one float32 CPU tensor allocated at the first batch: a tensor kept
    per batch between the large transient ones fragments the heap, and memory would grow with the number of batches."""
    out, start = None, 0
    for batch in batches:
        features = encode(batch)
        if out is None:
            out = torch.empty((batches.total, *features.shape[1:]), dtype=torch.float32)
        out[start:start + len(features)] = features
        start += len(features)
    return out if out is not None else torch.empty(0)


class _Batches:
    """An iterable of batches that knows how many items it holds in all."""

    def __init__(self, iterable, total):
        self.iterable, self.total = iterable, total

    def __iter__(self):
        return iter(self.iterable)


def _image_features(model, preprocess, paths, wheres, device, batch_size, num_workers, progress, fast_decode):
    """The embeddings of `paths` in this process (no sharing out)."""
    loader = DataLoader(ImageFiles(paths, preprocess, wheres, fast_decode), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
    batches = _Batches(tqdm(loader, desc="images", disable=not (progress and is_main_process())), len(paths))
    return _encode_into(batches, lambda images: model.encode_image(images.to(device), normalize=True))


def _prompt_features(model, tokenizer, prompts, device, batch_size):
    """The embeddings of `prompts` in this process (no sharing out)."""
    batches = _Batches((prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)), len(prompts))
    return _encode_into(batches, lambda chunk: model.encode_text(tokenizer(chunk).to(device), normalize=True))


@torch.no_grad()
def encode_images(model, preprocess, paths, device, batch_size=1024, num_workers=0, progress=True, wheres=None,
                  fast_decode=False):
    """L2-normalised embeddings of the images at `paths` (paths, bytes or parquet cells), in order, as a float32
    tensor on the CPU. `wheres` names each image's place (e.g. its row) in the message of an unreadable one.
    Under several processes each encodes a share (across_processes) and every process gets them all."""
    paths = list(paths)
    wheres = wheres or [None] * len(paths)
    return across_processes(lambda share: _image_features(
        model, preprocess, [paths[i] for i in share], [wheres[i] for i in share], device, batch_size, num_workers,
        progress, fast_decode), range(len(paths)))


@torch.no_grad()
def encode_prompts(model, tokenizer, prompts, device, batch_size=1024):
    """The model's text embeddings of `prompts` (`encode_text(tokens, normalize=True)`: L2-normalised; PickScore's
    scaled by its logit_scale, so that a dot product is its score), in order, as a float32 tensor on the CPU (under
    several processes each encodes a share)."""
    return across_processes(lambda share: _prompt_features(model, tokenizer, share, device, batch_size), list(prompts))


def prompt_image_scores(model, preprocess, tokenizer, prompts, images, device, batch_size=1024, num_workers=0,
                        progress=True, wheres=None, fast_decode=False):
    """cos(prompts[k], images[k]) for each k. Preference data repeats images and prompts, so each distinct one is
    encoded once; images stored in parquet are read file by file, row by row. `wheres[k]` names images[k]'s place."""
    requests = pd.DataFrame({"prompt": list(prompts), "image": list(images),
                             "where": wheres if wheres is not None else [None] * len(images)})
    first_seen = requests[~requests.image.duplicated()]  # each distinct image, with the place it first appears in
    order = location_order(first_seen.image.tolist())
    distinct = pd.Index(first_seen.image.values[order])
    # no encode call holds more images than the original's did (a batch of pairs' images): larger calls are slower
    # on a CPU, and the set of distinct images can be twice the number of pairs
    image_batch = min(batch_size, max(len(requests) // 2, 1))
    if hasattr(model, "pair_scores"):
        return attended_scores(model, preprocess, tokenizer, requests, distinct, device, image_batch, num_workers,
                               progress, first_seen["where"].values[order].tolist(), fast_decode)
    wheres = first_seen["where"].values[order].tolist()
    image_of = distinct.get_indexer(requests.image)
    by_image = np.argsort(image_of, kind="stable")  # the requests in the order their images are encoded
    starts = np.searchsorted(image_of[by_image], np.arange(len(distinct) + 1))  # image i's: starts[i]:starts[i + 1]

    @torch.no_grad()
    def score_share(share):
        """The scores of the requests on the distinct images `share` (a range), in by_image's order: its images and
        their requests' prompts are encoded here, and only the scores leave the process."""
        rows = by_image[starts[share.start]:starts[share.stop]]
        image_features = _image_features(model, preprocess, list(distinct[share.start:share.stop]),
                                         wheres[share.start:share.stop], device, image_batch, num_workers, progress,
                                         fast_decode)
        prompts = pd.Index(pd.unique(requests.prompt.values[rows]))
        text_features = _prompt_features(model, tokenizer, list(prompts), device, batch_size)
        if not len(rows):
            return torch.empty(0)
        return (text_features[prompts.get_indexer(requests.prompt.values[rows])]
                * image_features[image_of[rows] - share.start]).sum(1)

    scores = torch.empty(len(requests))
    scores[torch.from_numpy(by_image)] = across_processes(score_share, range(len(distinct)))  # several: a share each
    return scores


@torch.no_grad()
def attended_scores(model, preprocess, tokenizer, requests, distinct, device, batch_size, num_workers=0, progress=True,
                    wheres=None, fast_decode=False):
    """prompt_image_scores for a model whose text encoder attends to the image (ImageReward: `encode_image` gives the
    image's tokens, `pair_scores(image_features, tokens)` a score per row). Each distinct image is encoded once, and
    the requests on a batch of images are scored, batch_size rows at a time, while that batch's tokens are held: one
    image's tokens are 197 x 1024 floats at ViT-L/16, so every image's at once would not fit for a large source.
    `requests`: a DataFrame with a prompt and an image column; `distinct`: a pd.Index of its images, in encoding order."""
    image_of = distinct.get_indexer(requests.image)
    by_image = np.argsort(image_of, kind="stable")  # the requests in the order their images are encoded
    starts = np.searchsorted(image_of[by_image], np.arange(len(distinct) + 1))  # image i's: starts[i]:starts[i + 1]
    prompts, wheres = requests.prompt.values, wheres or [None] * len(distinct)

    def score_share(share):
        """The scores of the requests on the distinct images `share` (a range), in by_image's order."""
        scores = torch.empty(starts[share.stop] - starts[share.start])
        loader = DataLoader(ImageFiles(list(distinct[share.start:share.stop]), preprocess,
                                       wheres[share.start:share.stop], fast_decode), batch_size=batch_size,
                            num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
        first = share.start
        for images in tqdm(loader, desc="images", disable=not (progress and is_main_process())):
            image_features = model.encode_image(images.to(device), normalize=True)
            for i in range(starts[first], starts[first + len(images)], batch_size):
                chunk = by_image[i:min(i + batch_size, starts[first + len(images)])]
                tokens = tokenizer(prompts[chunk].tolist()).to(device)
                scores[i - starts[share.start]:i - starts[share.start] + len(chunk)] = model.pair_scores(
                    image_features[image_of[chunk] - first], tokens).float().cpu()
            first += len(images)
        return scores

    scores = torch.empty(len(requests))
    scores[torch.from_numpy(by_image)] = across_processes(score_share, range(len(distinct)))  # several: a share each
    return scores


def pair_scores(model, preprocess, tokenizer, pairs, device, batch_size=1024, num_workers=0, progress=True,
                fast_decode=False):
    """Cosine similarity of each pair's prompt with its preferred and its other image: (pos_score, neg_score)."""
    source = PairSource("pairs", "table", pairs)
    return source_scores(model, preprocess, tokenizer, source, device, batch_size, num_workers, progress,
                         fast_decode)[:2]


def pair_accuracy(model, preprocess, tokenizer, pairs, device, batch_size=1024, num_workers=0, progress=True,
                  fast_decode=False):
    """Fraction of pairs counted correct."""
    pos_score, neg_score = pair_scores(model, preprocess, tokenizer, pairs, device, batch_size, num_workers, progress,
                                       fast_decode)
    return counted_correct(pos_score, neg_score).float().mean().item()


def source_requests(source):
    """The (prompts, images, wheres) whose scores make a PairSource's: each pair's preferred and other image, then, for
    a benchmark layout, every image of each row or entry. source_scores splits the scores back (split_source_scores)."""
    pairs, groups = source.pairs, source.groups
    if groups is None:
        wheres = [f"row {row}, column {column!r}" for column in ("pos_path", "neg_path") for row in pairs.index]
        return (pd.concat([pairs.prompt, pairs.prompt]).tolist(), pd.concat([pairs.pos_path, pairs.neg_path]).tolist(),
                wheres)
    every = groups.explode("images")
    prompts = pd.concat([pairs.prompt, pairs.prompt, every.prompt]).tolist()
    images = pd.concat([pairs.pos_path, pairs.neg_path, every.images]).tolist()
    wheres = [f"row {row}" for row in pairs.entry] * 2 + [f"entry {entry}" for entry in every.entry]
    return prompts, images, wheres


def split_source_scores(source, scores):
    """source_requests' scores as (pos_score, neg_score, group_scores): group_scores is None for a pair table, else
    each row's or entry's list of image scores."""
    n = len(source.pairs)
    if source.groups is None:
        return scores[:n], scores[n:2 * n], None
    per_group = np.split(scores[2 * n:].numpy(), np.cumsum(source.groups.images.map(len))[:-1])
    return scores[:n], scores[n:2 * n], [list(g) for g in per_group]


def source_scores(model, preprocess, tokenizer, source, device, batch_size=1024, num_workers=0, progress=True,
                  fast_decode=False):
    """(pos_score, neg_score, group_scores) of a PairSource: each pair's two cosines, and for a benchmark layout
    each row's or entry's list of image scores (None for a pair table). Each distinct image is encoded once."""
    prompts, images, wheres = source_requests(source)
    scores = prompt_image_scores(model, preprocess, tokenizer, prompts, images, device, batch_size, num_workers,
                                 progress, wheres, fast_decode)
    return split_source_scores(source, scores)
