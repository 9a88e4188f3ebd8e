"""What a score difference means: the probability that one image beats another, fitted per scorer on preference pairs.

A scorer's temperature t makes t * (s_a - s_b) the log-odds that image a beats image b for the same prompt, with s
the scorer's own score (score.py's: ours the cosine, PickScore logit_scale.exp() times it):

    P(a beats b) = sigmoid(t * (s_a - s_b))

t is fitted by maximum likelihood on (preferred, other) pairs, a tie counting one half for each side. A pair's
prompt decides its split (held_out: a hash of the prompt, so a prompt's pairs stay together): t is fitted on the
rest and the negative log-likelihood and the expected calibration error (ECE, 10 equal-count bins) are reported on
the held-out prompts. calibration.json holds {scorer name: {spec, weights, temperature, nll, ece, pairs, ...}}; a
file fitted for another scorer's spec or weights is refused by read_calibration.

    t = fit_temperature(pos_scores, neg_scores)
    entry = read_calibration("comparison/calibration.json", "clip:clip_final.pth")
    p = win_probability(scores, reference_score, entry["temperature"])
"""
import hashlib
import json
import os

import numpy as np

from social_reward.errors import InputError
from social_reward.models import DEFAULT_MODEL
from social_reward.scorers.registry import parse_spec
from social_reward.scoring.kept import setting_key
from social_reward.scoring.pictures import reliability_picture

BINS = 10


HELD_OUT = 0.2  # the share of prompts ECE is reported on


def _sigmoid(z):
    return 0.5 * (1 + np.tanh(0.5 * z))  # stable at both ends


def _softplus(z):
    return np.logaddexp(0, z)


def pair_nll(temperature, gaps, labels):
    """The mean negative log-likelihood of the pairs (gap s_pos - s_neg, label 1 for the preferred side, 0.5 a tie)
    under P(pos beats neg) = sigmoid(t * gap), in nats."""
    z = temperature * gaps
    return float(np.mean(labels * _softplus(-z) + (1 - labels) * _softplus(z)))


def _gradient(temperature, gaps, labels):
    return float(np.sum(gaps * (_sigmoid(temperature * gaps) - labels)))


def _check_pairs(gaps, labels, name):
    if len(gaps) < 2:
        raise InputError(f"{name}: {len(gaps)} pair{'s' * (len(gaps) != 1)} to calibrate on; a temperature needs at "
                         f"least 2 (and a few hundred to mean much)")
    if not np.all(np.isfinite(gaps)):
        raise InputError(f"{name}: a score is not finite (pair {int(np.flatnonzero(~np.isfinite(gaps))[0])})")
    if np.all(labels == 0.5):
        raise InputError(f"{name}: every one of the {len(gaps)} pairs is a tie: they say nothing about which "
                         f"image wins, so there is no temperature to fit")
    if np.all(gaps == 0):
        raise InputError(f"{name}: the scorer gives both images of every one of the {len(gaps)} pairs the same "
                         f"score: a score difference never occurs, so there is no temperature to fit")


def separation(gaps, labels):
    """+1 when the scorer orders every decided pair right and no tie has a score gap (the likelihood then grows
    without bound as t grows), -1 when it orders every one wrong (as t falls), else 0 (the maximum is finite)."""
    decided_against = np.sum(np.where(gaps > 0, gaps * (1 - labels), -gaps * labels))
    decided_for = np.sum(np.where(gaps > 0, gaps * labels, -gaps * (1 - labels)))
    return 1 if decided_against == 0 else -1 if decided_for == 0 else 0


def fit_temperature(pos_scores, neg_scores, labels=None, name="the pairs"):
    """The temperature t of P(pos beats neg) = sigmoid(t * (pos - neg)) that maximises the pairs' likelihood; labels
    (default all 1) are 1 where pos was preferred and 0.5 for a tie. A scorer right on every pair has no finite
    maximum (nor one wrong on every pair): then t is the Firth estimate (the likelihood times Jeffreys' prior), finite
    and of the same sign. A negative t means the scorer prefers the other image: kept, as it is.

    Example:
        t = fit_temperature([0.31, 0.28, 0.30], [0.27, 0.29, 0.25])
    """
    gaps = np.asarray(pos_scores, dtype=np.float64) - np.asarray(neg_scores, dtype=np.float64)
    labels = np.ones_like(gaps) if labels is None else np.asarray(labels, dtype=np.float64)
    _check_pairs(gaps, labels, name)
    scale = 1 / np.sqrt(np.mean(gaps ** 2))  # t's natural unit: one over the typical gap
    side = separation(gaps, labels)
    if side:
        return _firth_temperature(gaps, labels, side, scale)
    low, high = -scale, scale
    while _gradient(low, gaps, labels) > 0:  # the gradient grows with t (the likelihood is concave): bracket its zero
        low *= 2
    while _gradient(high, gaps, labels) < 0:
        high *= 2
    for _ in range(200):  # bisection to the last bit: robust where Newton's steps overshoot on near-separated pairs
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        low, high = (middle, high) if _gradient(middle, gaps, labels) < 0 else (low, middle)
    return 0.5 * (low + high)


def _firth_temperature(gaps, labels, side, scale):
    """Minimise nll - log(det information) / 2 over t of the separating sign, on a log grid then by golden section."""
    def penalised(t):
        p = _sigmoid(t * gaps)
        return len(gaps) * pair_nll(t, gaps, labels) - 0.5 * np.log(np.sum(gaps ** 2 * p * (1 - p)) + 1e-300)

    grid = side * scale * np.logspace(-3, 6, 200)
    values = [penalised(t) for t in grid]
    best = int(np.argmin(values))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(100):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if penalised(a) < penalised(b) else (a, high)
    return 0.5 * (low + high)


def reliability_bins(probabilities, labels, bins=BINS):
    """The calibration curve: both orientations of every pair (p with its label, 1 - p with 1 - label, since which
    image came first says nothing), sorted by probability into `bins` bins of equal count; per bin (mean predicted
    probability, observed frequency, count)."""
    p = np.concatenate([probabilities, 1 - np.asarray(probabilities)])
    y = np.concatenate([labels, 1 - np.asarray(labels)])
    order = np.argsort(p, kind="stable")
    return [(float(p[part].mean()), float(y[part].mean()), len(part))
            for part in np.array_split(order, bins) if len(part)]


def expected_calibration_error(probabilities, labels, bins=BINS):
    """ECE: the count-weighted mean over reliability_bins of |observed frequency - mean predicted probability|."""
    table = reliability_bins(probabilities, labels, bins)
    total = sum(count for _, _, count in table)
    return float(sum(count * abs(observed - predicted) for predicted, observed, count in table) / total)


def held_out(prompts, fraction=HELD_OUT):
    """Which pairs ECE is reported on: those whose prompt's SHA-256 falls in the first `fraction` of its range (the
    same prompts on every run and machine; a prompt's pairs all on one side)."""
    return np.array([int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") < fraction * 2 ** 64
                     for p in prompts], dtype=bool)


def calibrate(pos_scores, neg_scores, prompts, labels=None, name="the pairs"):
    """Fit on the pairs whose prompts are not held out, report on the held-out ones: {temperature, nll, ece, pairs,
    held_out_pairs, fit_nll, fit_ece, separated}; nll in nats per pair. Raises InputError when either split is empty.

    Example:
        entry = calibrate(pos, neg, prompts)    # entry["temperature"], entry["ece"]
    """
    gaps = np.asarray(pos_scores, dtype=np.float64) - np.asarray(neg_scores, dtype=np.float64)
    labels = np.ones_like(gaps) if labels is None else np.asarray(labels, dtype=np.float64)
    report = held_out(prompts)
    prompt_count = len(set(prompts))
    if report.all() or not report.any():
        raise InputError(f"{name}: all {prompt_count} prompts fall on one side of the fit / held-out split "
                         f"({HELD_OUT:.0%} of prompts, by hash, are held out): give more prompts")
    fit = ~report
    t = fit_temperature(gaps[fit], np.zeros(fit.sum()), labels[fit], f"{name} (the fitting split)")
    entry = {"temperature": t, "separated": bool(separation(gaps[fit], labels[fit]))}
    for prefix, part in (("", report), ("fit_", fit)):
        probabilities = _sigmoid(t * gaps[part])
        entry[prefix + "nll"] = pair_nll(t, gaps[part], labels[part])
        entry[prefix + "ece"] = expected_calibration_error(probabilities, labels[part])
    entry["pairs"], entry["held_out_pairs"] = int(fit.sum()), int(report.sum())
    entry["bins"] = reliability_bins(_sigmoid(t * gaps[report]), labels[report])
    return entry


def source_pairs(source, pos_scores, neg_scores, group_scores):
    """A PairSource's pairs for calibration, as (pos, neg, prompts, labels) arrays in the scorer's own score:
    every pair (label 1), and Pick-a-Pic's ties (label 0.5: a row whose labels are equal)."""
    pos, neg = np.asarray(pos_scores, dtype=np.float64), np.asarray(neg_scores, dtype=np.float64)
    prompts, labels = source.pairs.prompt.to_numpy(dtype=object), np.ones(len(pos))
    if source.layout == "pickapic":
        tie = np.array([row[0] == row[1] for row in source.groups.labels], dtype=bool)
        if tie.any():
            tied = np.array([scores for scores, t in zip(group_scores, tie) if t], dtype=np.float64)
            pos, neg = np.concatenate([pos, tied[:, 0]]), np.concatenate([neg, tied[:, 1]])
            prompts = np.concatenate([prompts, source.groups.prompt.to_numpy(dtype=object)[tie]])
            labels = np.concatenate([labels, np.full(tie.sum(), 0.5)])
    return pos, neg, prompts, labels


def calibration_note(name, entry):
    """One line about a fit, saying so when the temperature is negative or the pairs are separated."""
    line = (f"{name}: temperature {entry['temperature']:.4g} from {entry['pairs']} pairs; held out "
            f"{entry['held_out_pairs']}: nll {entry['nll']:.4f}, ECE {entry['ece']:.4f}")
    if entry["temperature"] < 0:
        line += " (negative: this scorer prefers the other image; kept as fitted)"
    if entry["separated"]:
        line += (" (the scorer orders every fitting pair the same way: no finite maximum-likelihood temperature; "
                 "this is the Firth estimate)")
    return line


def weights_key(spec):
    """The spec with its files' real paths, and a key of the files' modification times (kept.setting_key): what
    names the scorer and the weights a calibration was fitted for."""
    kind, path, options = parse_spec(spec)
    real = lambda p: os.path.realpath(p) if os.path.exists(p) else p
    if kind == "clip" and options.get("model") == DEFAULT_MODEL:
        del options["model"]
    canonical = f"{kind}:{real(path)}" + "".join(f",{k}={real(v)}" for k, v in sorted(options.items()))
    return canonical, setting_key(canonical)


def flags_spec(model=DEFAULT_MODEL, pretrained="openai", checkout_path=None):
    """The clip: spec the scripts' --model, --pretrained, --checkout_path name (the weights loaded last)."""
    return f"clip:{checkout_path or pretrained}" + (f",model={model}" if model != DEFAULT_MODEL else "")


def calibration_entries(fits, specs):
    """{name: fit} and {name: spec} -> calibration.json's {name: {spec, weights, temperature, ...}}."""
    entries = {}
    for name, fit in fits.items():
        canonical, key = weights_key(specs[name])
        entries[name] = {"spec": canonical, "weights": key, "score": "the scorer's own score (score.py's)", **fit}
    return entries


def write_calibration(entries, path):
    """calibration.json (whole: a temporary name, then renamed) and its reliability diagram beside it (.png)."""
    with open(path + ".tmp", "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(path + ".tmp", path)
    picture = os.path.splitext(path)[0] + ".png"
    reliability_picture(entries, picture + ".tmp")
    os.replace(picture + ".tmp", picture)


def read_calibration(path, spec):
    """The entry of calibration file `path` fitted for scorer `spec` (a dict with at least "temperature"). Raises
    InputError when the file cannot be read, or holds no entry for that spec, or one for other weights (the weights
    file changed since): the message names what the file holds.

    Example:
        t = read_calibration("comparison/calibration.json", "clip:clip_final.pth")["temperature"]
    """
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"--calibration {path}: not a readable calibration file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]})") from None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and {"spec", "weights", "temperature"} <= set(e)
                                                for e in entries.values()):
        raise InputError(f"--calibration {path}: not a calibration file (scripts/compare.py --calibrate or validate.py "
                         f"--calibrate writes one: {{scorer: {{spec, weights, temperature, ...}}}})")
    canonical, key = weights_key(spec)
    same_spec = [e for e in entries.values() if e["spec"] == canonical]
    for entry in same_spec:
        if entry["weights"] == key:
            return entry
    held = "; ".join(f"{name}={e['spec']} (weights {e['weights']})" for name, e in entries.items()) or "nothing"
    if same_spec:
        raise InputError(f"--calibration {path}: fitted for {canonical} with other weights (weights "
                         f"{same_spec[0]['weights']}, now {key}: a file it names changed since); fit it again")
    raise InputError(f"--calibration {path}: fitted for another scorer: it holds {held}, not {canonical} "
                     f"(weights {key})")


def win_probability(scores, reference, temperature):
    """P(an image of score s beats one of score `reference`) = sigmoid(t * (s - reference)), for each score."""
    return _sigmoid(temperature * (np.asarray(scores, dtype=np.float64) - reference))
