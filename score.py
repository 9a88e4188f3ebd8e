"""Score and rank images for a prompt: the cosine similarity validate.py compares, best first.

    python score.py --prompt "a cat astronaut, digital art" a.png b.png c.png --checkout_path clip_final.pth \\
        --output scores.csv --grid ranking.png
    python score.py --prompt "a cat astronaut" a.png b.png c.png --checkout_path clip_final.pth \
        --calibration comparison/calibration.json

--calibration FILE (compare.py --calibrate or validate.py --calibrate writes one, for this very scorer) prints beside
each score the probability that the image beats the prompt's median image (the median score), or --reference IMAGE.
"""
import argparse
import math
import os

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from calibration import flags_spec, read_calibration, win_probability
from clip_model import (DEFAULT_MODEL, DEFAULT_PRETRAINED, InputError, add_model_flags, default_device,
                        default_num_workers, inference_precision, run_cli)
from encoding import is_main_process, process_device, prompt_image_scores
from scorers import check_spec, clip_scorer, load_scorer


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
    logit_scale.exp() times it); `scorer` is a scorers.py spec, by default our CLIP from model/pretrained/checkout_path;
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
    ranking = pd.DataFrame({"path": list(image_paths), "score": scores.numpy() * scorer.score_scale})
    if temperature is not None:
        versus = ranking.score[ranking.path.map(same)].iloc[0] if reference else np.median(ranking.score)
        ranking["p_win"] = win_probability(ranking.score, versus, temperature)
    return ranking.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def contact_sheet(ranking, path, thumb=224, columns=5):
    """Draw the ranked images in a grid, each with its rank and score underneath, and save it to `path`."""
    columns = min(columns, len(ranking))
    rows, label = math.ceil(len(ranking) / columns), 28
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=15)
    for i, (image_path, score) in enumerate(zip(ranking.path, ranking.score)):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + label)
        with Image.open(image_path) as image:
            sheet.paste(ImageOps.pad(image.convert("RGB"), (thumb, thumb), color="white"), (x, y))
        draw.text((x + 6, y + thumb + 6), f"#{i + 1}  {score:.4f}  {os.path.basename(image_path)[:24]}", fill="black", font=font)
    sheet.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files to rank")
    parser.add_argument("--prompt", required=True)
    add_model_flags(parser, inference=True)
    parser.add_argument("--scorer", default=None, help="another reward model, KIND:PATH[,key=value] (see scorers.py)")
    parser.add_argument("--output", default=None, help="write path,score rows to this .csv")
    parser.add_argument("--grid", default=None, help="draw the ranking into this image file (.png)")
    parser.add_argument("--calibration", default=None, help="a calibration.json of this scorer: print the probability "
                        "that each image beats the median one (or --reference)")
    parser.add_argument("--reference", default=None, help="with --calibration: the image (one of those given) the "
                        "probabilities are against")
    args = parser.parse_args()
    ranking = rank_images(args.prompt, args.images, args.checkout_path, args.device, args.batch_size,
                          args.num_workers, args.model, args.pretrained, args.fast_decode, args.scorer, args.precision,
                          args.calibration, args.reference)
    if not is_main_process():
        return
    against = f"beats {args.reference}" if args.reference else "beats the median"
    for rank, row in enumerate(ranking.itertuples(), start=1):
        beside = f"  P({against}) {row.p_win:.3f}" if args.calibration else ""
        print(f"{rank:>4}  {row.score:.4f}{beside}  {row.path}")
    if args.output:
        ranking.to_csv(args.output, index=False)
    if args.grid:
        contact_sheet(ranking, args.grid)


if __name__ == "__main__":
    run_cli(main)
