"""Generate images for evaluation: N samples per prompt from a Stable Diffusion pipeline folder, with or without a
fine-tuning's LoRA, appended to a generations table that evaluate_generators.py reads.

    python generate.py --pretrained_model stable-diffusion-2-1-base/ --prompts prompts.txt --samples 4 \\
        --generator base --out generations/
    python generate.py --pretrained_model stable-diffusion-2-1-base/ --lora sd_lora/ --prompts prompts.txt \\
        --samples 4 --generator tuned --out generations/
    python evaluate_generators.py generations/generations.parquet --scorer ours=clip:clip_final.pth --out table/

Images go to OUT/GENERATOR/PPPPP_K.png (prompt P, sample K) and rows (generator, prompt, sample, image: the path
relative to OUT, as generations.read_generations reads it) to OUT/generations.parquet. For a given --seed, sample K of a prompt starts from the same noise for every generator (and
in finetune_generator.py's validation, sample 0), so generators are compared image for image.
"""
import argparse
import os

import pandas as pd
from tqdm import tqdm

from clip_model import InputError, check_free_space, default_device, inference_precision, run_cli, PRECISIONS
from generators import (check_pipeline_folder, check_size, default_size, generate_images, load_lora, load_pipeline,
                        read_prompts, to_pil)

TABLE = "generations.parquet"
COLUMNS = ("generator", "prompt", "sample", "image")


def existing_rows(out, generator, overwrite):
    """The table's rows already in `out` (without this generator's, with `overwrite`); a generator already there is
    refused, naming it."""
    path = os.path.join(out, TABLE)
    if not os.path.exists(path):
        return pd.DataFrame(columns=list(COLUMNS))
    try:
        rows = pd.read_parquet(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise InputError(f"{path}: not a generations table (no column {missing[0]!r}; it has {', '.join(rows.columns)})")
    if (rows.generator == generator).any():
        if not overwrite:
            raise InputError(f"{path}: already holds generator {generator!r} ({(rows.generator == generator).sum()} "
                             f"rows); give another --generator, or --overwrite to replace them")
        rows = rows[rows.generator != generator]
    return rows


def generate(pretrained_model, prompts, generator, out, samples=1, lora=None, resolution=512, sampling_steps=50,
             guidance_scale=7.5, seed=42, batch_size=8, device=None, precision="fp32", overwrite=False):
    """Write `samples` images of each prompt and append their rows to out/generations.parquet; returns the new rows.

    Example:
        generate("tiny-sd", "prompts.txt", "base", "generations", samples=2, resolution=32, sampling_steps=4)
    """
    if samples < 1 or batch_size < 1:
        raise InputError(f"--{'samples' if samples < 1 else 'batch_size'} must be at least 1 (got {min(samples, batch_size)})")
    if not generator or "/" in generator or generator.startswith("."):
        raise InputError(f"--generator {generator!r}: give a name (it names a folder in --out)")
    check_pipeline_folder(pretrained_model)
    prompt_list = read_prompts(prompts)
    os.makedirs(out, exist_ok=True)
    previous = existing_rows(out, generator, overwrite)
    device = device or default_device()
    pipeline = load_pipeline(pretrained_model, device)
    if lora:
        load_lora(pipeline, lora)
    size = check_size(pipeline, resolution) if resolution else default_size(pipeline)
    folder = os.path.join(out, generator)
    os.makedirs(folder, exist_ok=True)
    items = [(p, prompt, k) for p, prompt in enumerate(prompt_list) for k in range(samples)]
    rows = []
    for start in tqdm(range(0, len(items), batch_size), desc=generator):
        chunk = items[start:start + batch_size]
        with inference_precision(device, precision):
            images = generate_images(pipeline, [prompt for _, prompt, _ in chunk],
                                     [(seed, prompt, k) for _, prompt, k in chunk], size, sampling_steps,
                                     guidance_scale, batch_size)
        check_free_space(folder, images[0].numel() * len(chunk) * 2, "images")
        for (p, prompt, k), image in zip(chunk, to_pil(images)):
            name = os.path.join(generator, f"{p:05d}_{k}.png")  # relative to the table's folder: --out can move
            path = os.path.join(out, name)
            image.save(path + ".tmp.png")
            os.replace(path + ".tmp.png", path)
            rows.append({"generator": generator, "prompt": prompt, "sample": k, "image": name})
    new = pd.DataFrame(rows, columns=list(COLUMNS))
    table = pd.concat([previous, new], ignore_index=True) if len(previous) else new
    path = os.path.join(out, TABLE)
    table.to_parquet(path + ".tmp", index=False)
    os.replace(path + ".tmp", path)
    print(f"{len(new)} images of {generator} in {folder}; {path} has {len(table)} rows")
    return new


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model", required=True, help="a Stable Diffusion pipeline folder (save_pretrained)")
    parser.add_argument("--lora", default=None, help="LoRA weights: a finetune_generator.py save_folder or checkpoint")
    parser.add_argument("--prompts", required=True, nargs="+",
                        help="a text file (one a line), a json list, or a pair source (its prompts)")
    parser.add_argument("--samples", type=int, default=1, help="images per prompt")
    parser.add_argument("--generator", required=True, help="the name of these images in the table")
    parser.add_argument("--out", required=True, help="folder of the images and generations.parquet")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--sampling_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--overwrite", action="store_true", help="replace the rows of a --generator already in the table")
    args = parser.parse_args()
    generate(**vars(args))


if __name__ == "__main__":
    run_cli(main)
