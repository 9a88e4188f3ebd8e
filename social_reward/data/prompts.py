"""Text-to-image generators for the scripts that fine-tune them and generate with them: one table of the diffusers
families they take (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1), each family's text conditioning, denoiser call, sampler and
LoRA, one sampling loop with a pluggable step, the noise each sample starts from, and tiny pipelines of every family
made from configs for tests and the demo.

    pipeline = load_pipeline("stable-diffusion-xl-base-1.0/", "cuda")     # the family from model_index.json
    lora_params = add_lora(pipeline, rank=4, lora_alpha=4)                 # on the family's LoRA targets
    noise = start_noise(pipeline, [(42, "a red cube", 0)], (1024, 1024), "cuda")  # sample 0 of the prompt at seed 42
    cond = conditioning(pipeline, ["a red cube"], 7.5, (1024, 1024))       # embeddings, pooled, time ids, ...
    latents = sample_latents(pipeline, denoiser(pipeline), noise, cond, 50, 7.5, grad_steps=1)  # DRaFT-1
    images = decode(pipeline.vae, latents)                                 # B x 3 x H x W in [0, 1]
    images = generate_images(pipeline, ["a red cube"], [(42, "a red cube", 0)], (1024, 1024), 50, 7.5)  # no gradient
    save_lora(pipeline, "sd_lora/"); load_lora(load_pipeline("stable-diffusion-xl-base-1.0/"), "sd_lora/")
    make_tiny_pipeline("tiny-flux/", "flux")                               # random weights, for tests and the demo
"""
import glob
import json
import os

import pandas as pd

from social_reward.errors import InputError


def read_prompts(paths, flag="--prompts"):
    """The prompts of a text file (one a line; blank lines skipped), a json list of strings, or a pair source that
    pair_sources.read_source reads (a pair table, Pick-a-Pic shards, an HPD v2 or ImageReward json: its distinct
    prompts, in order). `paths`: a path or a list of them; `flag` names them in a message."""
    from social_reward.data.sources import read_source
    paths = [paths] if isinstance(paths, str) else list(paths)
    named = " ".join(paths)
    for path in paths:
        if not glob.glob(path):
            raise InputError(f"{flag} {path}: no such file")
    if len(paths) == 1 and os.path.isfile(paths[0]) and not paths[0].endswith(".parquet"):
        with open(paths[0], encoding="utf-8") as f:
            text = f.read()
        prompts = None
        if paths[0].endswith(".json"):
            try:
                data = json.loads(text)
            except ValueError as e:
                raise InputError(f"{flag} {paths[0]}: not valid json ({e})") from None
            if isinstance(data, list) and all(isinstance(p, str) for p in data):
                prompts = data
        else:
            prompts = text.splitlines()
        if prompts is not None:
            prompts = [p.strip() for p in prompts if p.strip()]
            if not prompts:
                raise InputError(f"{flag} {named}: no prompts in it (empty, or only blank lines)")
            return prompts
    prompts = list(pd.unique(read_source(paths if len(paths) > 1 else paths[0], check_files=False).pairs.prompt))
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise InputError(f"{flag} {named}: no prompts in it")
    return prompts
