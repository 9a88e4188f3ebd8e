"""Each benchmark's own metric, as its project computes it: the original's pairwise accuracy (a tie counts as
correct), Pick-a-Pic's tie-aware accuracy (PickScore's), HPD v2's ranking accuracy and ImageReward's accuracy (as HPS
v2 computes them).

    name, value = benchmark_metric(source, group_scores, logit_scale=100.0)   # None for a pair table
"""
from itertools import combinations

import numpy as np


def counted_correct(pos_score, neg_score):
    """Which pairs count as correct: cos(prompt, pos) >= cos(prompt, neg); a tie counts, as in the original."""
    return pos_score >= neg_score


def pickapic_accuracy(scores, labels, logit_scale, tie_threshold=0.0):
    """PickScore's accuracy (trainer/scripts/eval_preference_predictor.py): per row, p = softmax over the two images
    of logit_scale * score; a tie is predicted when |p1 - p0| <= tie_threshold; credit 1 when the prediction equals the
    label, 0.5 when either is a tie, else 0; the mean over rows. `scores`, `labels`: a (score_0, score_1) and a
    (label_0, label_1) per row."""
    scores = np.asarray(scores, dtype=np.float64) * logit_scale
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    label_0 = np.asarray(labels, dtype=np.float64)[:, 0]
    label = np.where(label_0 == 0.5, -1, np.where(label_0 == 1, 0, 1))  # -1: a tie
    pred = np.where(np.abs(probs[:, 1] - probs[:, 0]) <= tie_threshold, -1, np.where(probs[:, 0] > probs[:, 1], 0, 1))
    credit = np.where(label == pred, 1.0, np.where((label == -1) | (pred == -1), 0.5, 0.0))
    return credit.mean()


def hpd_ranking_accuracy(scores, ranks):
    """HPD v2's ranking accuracy (hpsv2 evaluation.evaluate_rank, inversion_score): per prompt, the images' positions
    by descending score (0 = best; equal scores in listed order) against the annotated ranks:
    1 - discordant pairs / (n(n-1)/2), a pair tied on either side not discordant; the mean over prompts."""
    accuracies = []
    for entry_scores, entry_ranks in zip(scores, ranks):
        order = np.argsort(-np.asarray(entry_scores, dtype=np.float64), kind="stable")
        position = np.empty(len(order))
        position[order] = np.arange(len(order))
        n = len(order)
        discordant = sum(1 for i, j in combinations(range(n), 2)
                         if (position[i] - position[j]) * (entry_ranks[i] - entry_ranks[j]) < 0)
        accuracies.append(1 - discordant / (n * (n - 1) / 2))
    return float(np.mean(accuracies))


def imagereward_accuracy(scores, ranks):
    """ImageReward's accuracy as HPS v2 computes it (calc_ImageReward): per prompt, over the image pairs whose
    annotated ranks differ, the fraction the scores order the same way (equal scores count as wrong); the mean over
    prompts (a prompt whose images all tie has no pair and is left out)."""
    accuracies = []
    for entry_scores, entry_ranks in zip(scores, ranks):
        right = total = 0
        for i, j in combinations(range(len(entry_ranks)), 2):
            if entry_ranks[i] != entry_ranks[j]:
                total += 1
                better, worse = (i, j) if entry_ranks[i] < entry_ranks[j] else (j, i)
                right += entry_scores[better] > entry_scores[worse]
        if total:
            accuracies.append(right / total)
    return float(np.mean(accuracies))


BENCHMARK_METRICS = {"pickapic": "Pick-a-Pic accuracy", "hpdv2_test": "HPD v2 ranking accuracy",
                     "imagereward": "ImageReward accuracy"}


def benchmark_metric(source, group_scores, logit_scale=100.0, tie_threshold=0.0):
    """(name, value) of the source's own benchmark metric from each group's image scores, or None for a pair table."""
    if source.groups is None or source.layout not in BENCHMARK_METRICS:
        return None
    labels = source.groups.labels.tolist()
    if source.layout == "pickapic":
        value = pickapic_accuracy(group_scores, labels, logit_scale, tie_threshold)
    elif source.layout == "hpdv2_test":
        value = hpd_ranking_accuracy(group_scores, labels)
    else:
        value = imagereward_accuracy(group_scores, labels)
    return BENCHMARK_METRICS[source.layout], value
