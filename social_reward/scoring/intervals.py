"""Where pairs come from: the original pair table, and the public preference datasets as they are published.

    source = read_source("validation_data.parquet")                          # prompt, pos_path, neg_path
    source = read_source("pickapic_v2/data/test-*.parquet")                  # Pick-a-Pic shards, images inside
    source = read_source("HPD/test.json", image_root="HPD/test")             # HPD v2: ranked images per prompt
    source = read_source("ImageReward/data/test.json", image_root="ImageReward/data/test_images")
    source.pairs    # prompt, pos_path, neg_path: the pairs to train on and the original's accuracy (no ties)
    source.groups   # for a benchmark: every row's or entry's prompt, images and labels, for its own metric

An image is named in pos_path/neg_path by its file path, by the bytes themselves (a DataFrame with bytes columns),
or by a parquet cell `FILE#ROW/COLUMN`, read when an item loads: a few rows at a time, never a whole file.
"""
import math

import numpy as np
import pandas as pd


def wilson_interval(successes, n, z=1.96):
    """A proportion successes / n (successes may count halves) and its 95% Wilson score interval: (p, low, high)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, centre - half, centre + half


def _deviations(values, prompts):
    """(mean, the squared deviations summed per prompt first, the squared deviations, prompts)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    per_prompt = pd.Series(values - mean).groupby(pd.factorize(pd.Series(list(prompts)))[0]).sum().values
    return mean, float(np.sum(per_prompt ** 2)), float(np.sum((values - mean) ** 2)), len(per_prompt)


def prompt_mean_interval(values, prompts, z=1.96):
    """The mean of `values` and its 95% interval with the prompt as the unit (normal approximation; the mean itself
    for one prompt). prompts[i] is the prompt (or any group, e.g. (style, prompt)) of values[i]."""
    mean, clustered, _, k = _deviations(values, prompts)
    half = z * math.sqrt(k / (k - 1) * clustered) / len(values) if k > 1 else 0.0
    return mean, mean - half, mean + half


def prompt_proportion_interval(successes, prompts, z=1.96):
    """A proportion over items (each 1, 0, or 0.5 for a tie) and its 95% Wilson interval on the effective number of
    items: the items over the design effect, at most the items; the number of prompts where every item is the same
    (no spread to measure the effect from)."""
    rate, clustered, independent, k = _deviations(successes, prompts)
    n = len(successes)
    effective = k if independent == 0 else n if clustered == 0 else min(n, n * independent / clustered)
    return wilson_interval(rate * effective, effective, z)
