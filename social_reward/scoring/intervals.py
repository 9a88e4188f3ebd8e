"""95% intervals that treat the prompt as the unit: several samples (or pairs) of one prompt are not independent
evidence, so they count as one prompt, not as many.

The variance of a mean over items grouped by prompt is the cluster-robust one (the items' deviations summed per
prompt, then squared): with one item a prompt it is the usual s^2 / n, and k identical samples a prompt give the
same interval as one. A proportion (an accuracy, a win rate) gets a Wilson interval on its effective count, the items
divided by the design effect (the squared deviations summed per prompt first over summed per item: 1 for one item a
prompt, k for k identical items a prompt).

    mean, low, high = prompt_mean_interval(scores, prompts)
    rate, low, high = prompt_proportion_interval(wins, prompts)     # wins: 1, 0.5 (a tie) or 0 per item

The Wilson interval itself (wilson_interval) lives here too: what each proportion's interval is made of.
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
