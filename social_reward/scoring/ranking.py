"""Images ranked for a prompt, best first, by any scorer's own score (ours: the cosine similarity validate.py
compares), with a calibration's probability of beating the median image: the work of scripts/score.py.

    ranking = rank_images("a red fox in the snow", ["a.png", "b.png"], checkout_path="clip_final.pth")
"""
import os

import numpy as np
import pandas as pd

from social_reward.devices import default_device, default_num_workers, inference_precision
from social_reward.dist import process_device
from social_reward.errors import InputError
from social_reward.models import DEFAULT_MODEL, DEFAULT_PRETRAINED
from social_reward.scorers.clip import clip_scorer
from social_reward.scorers.registry import check_spec, load_scorer
from social_reward.scoring.calibration import flags_spec, read_calibration, win_probability
from social_reward.scoring.encoding import prompt_image_scores


def score_images(prompt, image_paths, model, preprocess, tokenizer, device="cpu", batch_size=1024, num_workers=0,
                 fast_decode=False):
    """The model's score of `prompt` with each image (ours: the cosine similarity), in the order given (a float
    tensor); each distinct image encoded once."""
    return prompt_image_scores(model, preprocess, tokenizer, [prompt] * len(image_paths), list(image_paths), device,
                               batch_size, num_workers, fast_decode=fast_decode)


def rank_images(prompt, image_paths, checkout_path=None, device=None, batch_size=1024, num_workers=None,
                model=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED, fast_decode=False, scorer=None, precision="fp32",
                calibration=None, reference=None):
    """A DataFrame of path, score, best first. The score is the scorer's own (ours: the cosine similarity; PickScore:
    logit_scale.exp() times it); `scorer` is a scorer spec, by default our CLIP from model/pretrained/checkout_path;
    `precision` "fp32" (the original's) or "bf16"/"fp16" (autocast). Under several processes each encodes a share of
    the images and every one returns the whole ranking.

    calibration: a calibration.json fitted for this scorer: adds p_win, the probability that each image beats the
                 median image (the median score), or the image `reference` (one of image_paths).

    Example:
        ranking = rank_images("a red fox in the snow", ["a.png", "b.png"], checkout_path="clip_final.pth")
    """
    missing = [p for p in image_paths if not os.path.isfile(p)]
    if missing:
        raise InputError(f"{missing[0]}: no such image file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if scorer is not None:
        check_spec(scorer)
    if reference is not None and calibration is None:
        raise InputError(f"--reference {reference}: give --calibration too (a probability needs a temperature)")
    same = lambda path: os.path.realpath(path) == os.path.realpath(reference)
    if reference is not None and not any(map(same, image_paths)):
        raise InputError(f"--reference {reference}: not among the images scored; name one of them")
    temperature = (read_calibration(calibration, scorer or flags_spec(model, pretrained, checkout_path))["temperature"]
                   if calibration else None)
    device = process_device(device or default_device())
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    precision_context = inference_precision(device, precision)
    scorer = load_scorer(scorer, device) if scorer else clip_scorer(model, pretrained, checkout_path, device)
    with precision_context:
        scores = score_images(prompt, image_paths, scorer.model, scorer.preprocess, scorer.tokenizer, device,
                              batch_size, num_workers, fast_decode)
    ranking = pd.DataFrame({"path": list(image_paths), "score": scores.numpy()})
    if temperature is not None:
        versus = ranking.score[ranking.path.map(same)].iloc[0] if reference else np.median(ranking.score)
        ranking["p_win"] = win_probability(ranking.score, versus, temperature)
    return ranking.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
