"""A synthetic creative community whose hidden quality is known: the logs social_pairs.py mines, for the demo, the
tests and the benchmark.

    posts, events = make_community("community/", n_creators=200, seed=0)    # PNGs under community/images
    posts, events = make_community(None, n_creators=50_000, seed=0)         # no images: the logs alone, fast
    pairs = popularity_pairs(posts, events, seed=0)                          # the naive baseline

Creators' audiences span three orders of magnitude (5 to 5,000 followers), and popular creators post more. Each
request makes a group of 2-4 images of the shapes world (shapes.py) that draw their prompt with probability 1/2: the
hidden quality, `follows` in POSTS. A post's views come from its creator's audience; each view turns into a remix
with a probability that depends on the quality (3% for an image that draws its prompt, 0.6% for one that does not),
so a popular creator's weak image gathers more remixes than an unknown creator's good one. On top: creators remixing
their own posts, remixes long after the window (old posts keep gathering them), repeated remixes by one user, likes
and saves.
"""
import os
import random

import numpy as np
import pandas as pd

from social_reward.synthetic.shapes import SCENES, draw, prompt_for

START = pd.Timestamp("2026-01-01")


REMIX_RATE = {True: 0.03, False: 0.006}  # per view, for an image that draws its prompt and one that does not


def make_community(folder, n_creators=200, seed=0, days=30, follow_rate=0.5, n_users=None, image_size=64):
    """(posts, events) DataFrames; with `folder`, each post's image is written there as a PNG (else `image` is a
    path that does not exist). POSTS has the hidden quality as `follows`; social_pairs.py never reads it."""
    rng = np.random.default_rng(seed)
    n_users = n_users or max(1000, 20 * n_creators)
    audience = np.round(10 ** rng.uniform(0.7, 3.7, n_creators)).astype(int)
    requests_per_creator = 1 + rng.poisson(np.log10(audience))  # popular creators post more
    creator = np.repeat(np.arange(n_creators), requests_per_creator)
    n_requests = len(creator)
    group_size = rng.integers(2, 5, n_requests)
    request_time = START + pd.to_timedelta(rng.uniform(0, days * 86400, n_requests).astype("int64"), unit="s")
    scene = rng.integers(0, len(SCENES), n_requests)

    group = np.repeat(np.arange(n_requests), group_size)
    n_posts = len(group)
    follows = rng.random(n_posts) < follow_rate
    drawn = np.where(follows, scene[group], (scene[group] + rng.integers(1, len(SCENES), n_posts)) % len(SCENES))
    posted_at = request_time[group] + pd.to_timedelta(np.arange(n_posts) % 4, unit="s")
    views = rng.poisson(audience[creator[group]] * rng.uniform(0.5, 1.5, n_posts))
    posts = pd.DataFrame({
        "post": np.arange(n_posts, dtype="int64"),
        "image": [os.path.join(folder or "images", f"{p}.png") for p in range(n_posts)],
        "prompt": [prompt_for(*SCENES[s]) for s in scene[group]],
        "creator": [f"c{c}" for c in creator[group]], "posted_at": posted_at.astype("datetime64[us]"),
        "group": group.astype("int64"), "views": views.astype("int64"), "follows": follows})
    if folder:
        os.makedirs(folder, exist_ok=True)
        draw_rng = random.Random(seed)
        for path, s in zip(posts.image, drawn):
            draw(*SCENES[s], draw_rng, size=image_size).save(path)

    remixes = rng.binomial(views, np.where(follows, REMIX_RATE[True], REMIX_RATE[False]))
    late = rng.binomial(views, 0.004)  # remixes after the 7-day window, whatever the quality: old posts gather them
    likes, saves = rng.binomial(views, 0.05), rng.binomial(views, 0.01)
    parts = []
    for kind, counts, delay in (("remix", remixes, rng.exponential(1.5 * 86400, remixes.sum())),
                                ("remix", late, rng.uniform(8 * 86400, 60 * 86400, late.sum())),
                                ("like", likes, rng.exponential(86400, likes.sum())),
                                ("save", saves, rng.exponential(86400, saves.sum()))):
        post = np.repeat(np.arange(n_posts), counts)
        parts.append(pd.DataFrame({"post": post, "user": rng.integers(0, n_users, len(post)), "kind": kind,
                                   "delay": delay}))
    events = pd.concat(parts, ignore_index=True)
    events["user"] = "u" + events.user.astype(str)
    # creators remix their own posts (a third of the posts, whatever their quality), and some remixers come back
    own = np.flatnonzero(rng.random(n_posts) < 1 / 3)
    selves = pd.DataFrame({"post": own, "user": posts.creator.values[own], "kind": "remix",
                           "delay": rng.exponential(86400, len(own))})
    repeats = events[events.kind == "remix"].sample(frac=0.2, random_state=seed)
    repeats = repeats.assign(delay=repeats.delay + rng.uniform(0, 86400, len(repeats)))
    events = pd.concat([events, selves, repeats], ignore_index=True)
    events["at"] = (posts.posted_at.values[events.post] + pd.to_timedelta(events.delay, unit="s")).astype("datetime64[us]")
    events = events.drop(columns="delay").sample(frac=1.0, random_state=seed + 1, ignore_index=True)
    return posts, events[["post", "user", "kind", "at"]]


def popularity_pairs(posts, events, n_pairs=None, seed=0):
    """The naive baseline: two posts of one prompt, the one with more remix events (any, at any time, by anyone)
    preferred, whoever made them and whenever. The layout of social_pairs.py's pairs, up to `n_pairs` of them."""
    raw = events[events.kind == "remix"].groupby("post").size().reindex(posts.post, fill_value=0).to_numpy()
    frame = posts.assign(raw=raw)
    rng = np.random.default_rng(seed)
    rows = []
    for prompt, same in frame.groupby("prompt", sort=True):
        if len(same) < 2:
            continue
        order = rng.permutation(len(same))
        first, second = same.iloc[order[: len(same) // 2]], same.iloc[order[len(same) // 2: 2 * (len(same) // 2)]]
        for a, b in zip(first.itertuples(), second.itertuples()):
            if a.raw == b.raw:
                continue
            pos, neg = (a, b) if a.raw > b.raw else (b, a)
            rows.append({"prompt": prompt, "pos_path": pos.image, "neg_path": neg.image, "pos_post": pos.post,
                         "neg_post": neg.post, "pos_signal": pos.raw, "neg_signal": neg.raw})
    pairs = pd.DataFrame(rows)
    return pairs.sample(n=min(n_pairs, len(pairs)), random_state=seed, ignore_index=True) if n_pairs else pairs


def agreement(pairs, posts):
    """Among pairs whose two images differ in hidden quality, the share where the preferred one draws its prompt."""
    follows = posts.set_index("post").follows
    pos, neg = follows[pairs.pos_post].to_numpy(), follows[pairs.neg_post].to_numpy()
    decided = pos != neg
    return float(pos[decided].mean()), int(decided.sum())
