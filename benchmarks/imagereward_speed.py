"""Images per second of the ImageReward scorer against the CLIP ViT-L/14 one: both at full size with random weights (the
arithmetic, and so the time, is that of the real weights), the same PNGs, one prompt each, scored through
social_reward.scoring.encoding.prompt_image_scores as validate.py, scripts/score.py and scripts/compare.py score them
(decoding and preprocessing included).

    python benchmarks/imagereward_speed.py --images 32 --repeats 2 --out benchmarks/results-imagereward-cpu.json

ImageReward encodes an image with a ViT-L/16 (197 tokens at 224 px; CLIP's ViT-L/14 has 257) and then runs BLIP's
BERT over the prompt, cross-attending to the image's tokens, once per (prompt, image) pair.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch
from PIL import Image

from social_reward.cli import keep_freed_memory
from social_reward.scorers.clip import clip_scorer
from social_reward.scorers.imagereward import (ImageReward, ImageRewardTokenizer, image_preprocess, text_config,
                                               vit_config)
from social_reward.scoring.encoding import prompt_image_scores

WORDS = ["a", "an", "the", "of", "in", "on", "with", "cat", "dog", "astronaut", "red", "blue", "green", "painting",
         "photo", "castle", "forest", "city", "night", "snow", "portrait", "digital", "art", "detailed", "sunset"]


def make_inputs(folder, n, size=512):
    """n noise PNGs of size x size (Pick-a-Pic's generations are 512 to 768 px) and n prompts of 12 words."""
    images, prompts = [], []
    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        Image.merge("RGB", [Image.effect_noise((size, size), 20 + 5 * c + i) for c in range(3)]).save(
            os.path.join(folder, f"{i}.png"))
        images.append(os.path.join(folder, f"{i}.png"))
        prompts.append(" ".join(WORDS[j] for j in torch.randint(len(WORDS), (12,), generator=generator).tolist()))
    return images, prompts


def imagereward_random(folder):
    """A full-size ImageReward (ViT-L/16, BERT-base with cross-attention, its MLP) with random weights, its
    preprocessing and a BERT tokenizer over WORDS (any vocabulary pads to the same 35 tokens)."""
    from transformers import BertTokenizer
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(os.path.join(folder, "vocab.txt")).save_pretrained(os.path.join(folder, "bert"))
    tokenizer = ImageRewardTokenizer(os.path.join(folder, "bert"))
    model = ImageReward(vit_config(), text_config(None, 1024), tokenizer.pad_token_id).eval()
    return model, image_preprocess(224), tokenizer


def timed(function, seconds):
    """`function`, adding the seconds each call takes to seconds[function.__name__]."""
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[function.__name__] = seconds.get(function.__name__, 0.0) + time.perf_counter() - start
    return run


def images_per_second(model, preprocess, tokenizer, prompts, images, repeats, batch_size):
    """The best of `repeats` timed runs (after one warm-up on a few images), in images per second, and the share of
    that run's time each of the model's encoding methods took (the rest: decoding, preprocessing, tokenizing)."""
    prompt_image_scores(model, preprocess, tokenizer, prompts[:2], images[:2], "cpu", batch_size, progress=False)
    best, shares, seconds = float("inf"), {}, {}
    for name in ("encode_image", "encode_text", "pair_scores"):
        if hasattr(model, name):
            setattr(model, name, timed(getattr(model, name), seconds))
    for _ in range(repeats):
        seconds.clear()
        start = time.perf_counter()
        prompt_image_scores(model, preprocess, tokenizer, prompts, images, "cpu", batch_size, progress=False)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, shares = elapsed, {name: round(s / elapsed, 3) for name, s in seconds.items()}
    return len(images) / best, shares


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=1024, help="the scripts' --batch_size")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                          f"torch {torch.__version__}, {torch.get_num_threads()} threads",
               "command": "python " + " ".join(sys.argv), "images": args.images, "image_px": 512}
    with tempfile.TemporaryDirectory() as folder:
        images, prompts = make_inputs(folder, args.images)
        model, preprocess, tokenizer = imagereward_random(folder)
        results["imagereward_images_per_s"], results["imagereward_time_shares"] = images_per_second(
            model, preprocess, tokenizer, prompts, images, args.repeats, args.batch_size)
        del model
        scorer = clip_scorer(pretrained="none")
        results["clip_vit_l14_images_per_s"], results["clip_vit_l14_time_shares"] = images_per_second(
            scorer.model, scorer.preprocess, scorer.tokenizer, prompts, images, args.repeats, args.batch_size)
    results["imagereward_vs_clip"] = results["imagereward_images_per_s"] / results["clip_vit_l14_images_per_s"]
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
