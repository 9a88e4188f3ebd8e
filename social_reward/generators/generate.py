"""Generate images for evaluation: N samples per prompt from a pipeline folder of any supported family (SD 1.x/2.x,
SDXL, SD3/3.5, FLUX.1), with or without a fine-tuning's LoRA, appended to a generations table that
evaluate_generators.py reads.

    python scripts/generate.py --pretrained_model_name_or_path stable-diffusion-2-1-base/ --prompts prompts.txt --samples 4 \\
        --generator base --output_dir generations/
    python scripts/generate.py --pretrained_model_name_or_path stable-diffusion-2-1-base/ --lora sd_lora/ \\
        --prompts prompts.txt --samples 4 --generator tuned --output_dir generations/
    python scripts/evaluate_generators.py generations/generations.parquet --scorer ours=clip:clip_final.pth --out table/

Images go to OUT/GENERATOR/PPPPP_K.png (prompt line P, sample K) and rows (generator, prompt, sample, image: the
path relative to OUT, as generations.read_generations reads it; prompt_index: the prompt's line) to
OUT/generations.parquet. A prompt listed twice (HPS v2's lists repeat some) keeps its lines apart: its second line's
samples are numbered after its first's (N..2N-1), as read_generations numbers a repeated prompt of a folder. For a
given --seed, sample K of a prompt starts from the same noise for every generator (and in finetune_generator.py's
validation, sample 0), so generators are compared image for image. Rows are journaled in OUT/GENERATOR/rows.jsonl
as images are written: a killed run, started again with the same flags, goes on where it stopped.
"""
import json
import os

import pandas as pd
from tqdm import tqdm

from social_reward.data.prompts import read_prompts
from social_reward.devices import default_device, inference_precision
from social_reward.dist import check_one_process
from social_reward.errors import InputError
from social_reward.generators.families import check_pipeline_folder, check_size, default_size, load_pipeline
from social_reward.generators.lora import load_lora
from social_reward.generators.sampling import generate_images, to_pil
from social_reward.outputs import check_free_space

TABLE = "generations.parquet"


COLUMNS = ("generator", "prompt", "sample", "image", "prompt_index")


JOURNAL = "rows.jsonl"


ALIASES = {"pretrained_model": "pretrained_model_name_or_path", "out": "output_dir",
           "sampling_steps": "num_inference_steps"}  # today's names, kept working


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
    missing = [c for c in COLUMNS[:4] if c not in rows.columns]
    if missing:
        raise InputError(f"{path}: not a generations table (no column {missing[0]!r}; it has {', '.join(rows.columns)})")
    if (rows.generator == generator).any():
        if not overwrite:
            raise InputError(f"{path}: already holds generator {generator!r} ({(rows.generator == generator).sum()} "
                             f"rows); give another --generator, or --overwrite to replace them")
        rows = rows[rows.generator != generator]
    return rows


def journal(folder, settings, overwrite):
    """The rows already written by a killed run of this generator with the same settings (folder/rows.jsonl, its
    first line the settings); another run's journal is refused naming what differs, or cleared with `overwrite`."""
    path = os.path.join(folder, JOURNAL)
    if overwrite or not os.path.exists(path):
        with open(path, "w") as f:
            f.write(json.dumps(settings) + "\n")
        return {}
    with open(path) as f:
        lines = f.read().splitlines()
    saved = json.loads(lines[0]) if lines else {}
    for key, value in settings.items():
        if saved.get(key) != value:
            raise InputError(f"{path}: a run of generator {settings['generator']!r} with --{key} {saved.get(key)} was "
                             f"stopped here; resume it with the same flags, or --overwrite to start again")
    rows = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:  # the line a kill cut short
            continue
        if os.path.isfile(os.path.join(os.path.dirname(folder), row["image"])):
            rows[row["prompt_index"], row["sample"]] = row
    return rows


def generate(pretrained_model_name_or_path=None, prompts=None, generator=None, output_dir=None, samples=1, lora=None,
             resolution=None, height=None, width=None, num_inference_steps=50, guidance_scale=None, seed=42,
             batch_size=8, device=None, precision="fp32", overwrite=False, **aliases):
    """Write `samples` images of each prompt and append their rows to output_dir/generations.parquet; returns the new
    rows. Today's names (pretrained_model, out, sampling_steps) are accepted for diffusers' ones; resolution and
    guidance_scale default to the pipeline's own.

    Example:
        generate("tiny-sd", "prompts.txt", "base", "generations", samples=2, resolution=32, num_inference_steps=4)
    """
    check_one_process("scripts/generate.py")
    pretrained_model_name_or_path, output_dir, num_inference_steps = take_aliases("generate", aliases, ALIASES, dict(
        pretrained_model_name_or_path=pretrained_model_name_or_path, output_dir=output_dir,
        num_inference_steps=num_inference_steps))
    if samples < 1 or batch_size < 1:
        raise InputError(f"--{'samples' if samples < 1 else 'batch_size'} must be at least 1 (got {min(samples, batch_size)})")
    if not generator or "/" in generator or generator.startswith("."):
        raise InputError(f"--generator {generator!r}: give a name (it names a folder in --output_dir)")
    family = check_pipeline_folder(pretrained_model_name_or_path)
    guidance_scale = family.default_guidance if guidance_scale is None else guidance_scale
    prompt_list = read_prompts(prompts)
    os.makedirs(output_dir, exist_ok=True)
    previous = existing_rows(output_dir, generator, overwrite)
    device = device or default_device()
    pipeline = load_pipeline(pretrained_model_name_or_path, device)
    if lora:
        load_lora(pipeline, lora)
    if resolution is not None and (height or width):
        raise InputError("--resolution with --height/--width: give one or the other")
    size = check_size(pipeline, resolution) if resolution is not None else check_size(
        pipeline, (height or default_size(pipeline)[0], width or default_size(pipeline)[1]))
    folder = os.path.join(output_dir, generator)
    os.makedirs(folder, exist_ok=True)
    settings = {"generator": generator, "pretrained_model_name_or_path": os.path.abspath(pretrained_model_name_or_path),
                "lora": lora and os.path.abspath(lora), "prompts": prompt_list, "samples": samples,
                "size": list(size), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                "seed": seed, "precision": precision}
    done = journal(folder, settings, overwrite)
    # line p's samples: a prompt's j-th line takes samples j*N .. j*N+N-1, so no two lines share (prompt, sample)
    occurrence = pd.Series(prompt_list).groupby(prompt_list).cumcount().tolist()
    items = [(p, prompt, occurrence[p] * samples + k) for p, prompt in enumerate(prompt_list) for k in range(samples)]
    todo = [item for item in items if (item[0], item[2]) not in done]
    if len(todo) < len(items):
        print(f"resuming {generator}: {len(items) - len(todo)} of {len(items)} images already written")
    with open(os.path.join(folder, JOURNAL), "a") as log:
        for start in tqdm(range(0, len(todo), batch_size), desc=generator):
            chunk = todo[start:start + batch_size]
            with inference_precision(device, precision):
                images = generate_images(pipeline, [prompt for _, prompt, _ in chunk],
                                         [(seed, prompt, k) for _, prompt, k in chunk], size, num_inference_steps,
                                         guidance_scale, batch_size)
            check_free_space(folder, images[0].numel() * len(chunk) * 2, "images")
            for (p, prompt, k), image in zip(chunk, to_pil(images)):
                # relative to the table's folder: --output_dir can move
                name = os.path.join(generator, f"{p:05d}_{k}.png")
                path = os.path.join(output_dir, name)
                image.save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
                done[p, k] = {"generator": generator, "prompt": prompt, "sample": k, "image": name, "prompt_index": p}
                log.write(json.dumps(done[p, k]) + "\n")
            log.flush()
    new = pd.DataFrame([done[p, k] for p, _, k in items], columns=list(COLUMNS))
    table = pd.concat([previous, new], ignore_index=True) if len(previous) else new
    path = os.path.join(output_dir, TABLE)
    table.to_parquet(path + ".tmp", index=False)
    os.replace(path + ".tmp", path)
    os.remove(os.path.join(folder, JOURNAL))
    print(f"{len(new)} images of {generator} in {folder}; {path} has {len(table)} rows")
    return new


def take_aliases(function, aliases, table, values):
    """`values` (diffusers-named arguments, in order) with those a caller gave under today's names (`aliases`,
    renamed by `table`, old -> new); an unknown keyword raises TypeError as Python would."""
    unknown = [name for name in aliases if name not in table]
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    return list({**values, **{table[old]: value for old, value in aliases.items()}}.values())
