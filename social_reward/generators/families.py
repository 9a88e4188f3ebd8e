"""The diffusers families the generator scripts take (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1), as one table every
function reads: what a pipeline folder must hold, its denoiser, sampler, guidance, LoRA targets, default size and
guidance. Loading a folder (nothing downloaded) and checking a size.

    family = check_pipeline_folder("stable-diffusion-xl-base-1.0/")     # the family from model_index.json
    pipeline = load_pipeline("stable-diffusion-xl-base-1.0/", "cuda")    # frozen, eval mode, DDIM or flow sampler
"""
import glob
import json
import os
from types import SimpleNamespace

import torch

from social_reward.errors import InputError

# the attention (and, for FLUX, feed-forward) projections diffusers' own LoRA scripts adapt by default:
# train_text_to_image_lora(_sdxl).py, train_dreambooth_lora_sd3.py, train_dreambooth_lora_flux.py
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


MMDIT_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                 "attn.to_out.0", "attn.to_q", "attn.to_v")


FLUX_TARGETS = MMDIT_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


MODEL = ("config.json",), ("*.safetensors", "*.bin")


TOKENIZER = ("tokenizer.json", "vocab.json", "spiece.model"), ()   # a fast tokenizer alone, or the slow one's files


PART_FILES = {"unet": MODEL, "transformer": MODEL, "vae": MODEL, "text_encoder": MODEL, "text_encoder_2": MODEL,
              "text_encoder_3": MODEL, "tokenizer": TOKENIZER, "tokenizer_2": TOKENIZER, "tokenizer_3": TOKENIZER,
              "scheduler": (("scheduler_config.json",), ())}


# one row per family, read by every function below: model_index.json's _class_name -> what the family is
# (default_guidance: the pipeline's own guidance_scale default)
FAMILIES = {
    "StableDiffusionPipeline": SimpleNamespace(
        name="sd", denoiser="unet", sampler="ddim", guidance="cfg", default_guidance=7.5, lora_targets=UNET_TARGETS,
        parts=("unet", "vae", "text_encoder", "tokenizer", "scheduler"), optional=()),
    "StableDiffusionXLPipeline": SimpleNamespace(
        name="sdxl", denoiser="unet", sampler="ddim", guidance="cfg", default_guidance=5.0, lora_targets=UNET_TARGETS,
        parts=("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"), optional=()),
    "StableDiffusion3Pipeline": SimpleNamespace(
        name="sd3", denoiser="transformer", sampler="flow", guidance="cfg", default_guidance=7.0,
        lora_targets=MMDIT_TARGETS,
        parts=("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
        optional=("text_encoder_3", "tokenizer_3")),   # T5: SD3 runs without it, as the pipeline allows
    "FluxPipeline": SimpleNamespace(
        name="flux", denoiser="transformer", sampler="flow", guidance="embedded", default_guidance=3.5,
        lora_targets=FLUX_TARGETS,
        parts=("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
        optional=()),
}


FAMILY_NAMES = {family.name: cls for cls, family in FAMILIES.items()}


def folder_family(folder, flag="--pretrained_model"):
    """The family row of a pipeline folder, from model_index.json's _class_name; another class is refused in one
    line listing the supported ones."""
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {folder}: no such folder (a diffusers pipeline folder, as save_pretrained writes it)")
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise InputError(f"{flag} {folder}: no model_index.json: not a diffusers pipeline folder")
    try:
        with open(index) as f:
            cls = json.load(f).get("_class_name")
    except ValueError as e:
        raise InputError(f"{flag} {folder}: model_index.json is not valid json ({e})") from None
    if cls not in FAMILIES:
        raise InputError(f"{flag} {folder}: a {cls} pipeline is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[cls]


def check_pipeline_folder(folder, flag="--pretrained_model"):
    """Raise InputError naming what a pipeline folder of a supported family lacks (the folder, model_index.json, a
    part, a part's file); return the family row."""
    family = folder_family(folder, flag)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    present = [p for p in family.optional if (index.get(p) or [None])[0] is not None]
    for part in family.parts + tuple(present):
        where = os.path.join(folder, part)
        if not os.path.isdir(where):
            raise InputError(f"{flag} {folder}: the {family.name} pipeline has no {part}/")
        any_of, weights = PART_FILES[part]
        if not any(os.path.isfile(os.path.join(where, name)) for name in any_of):
            raise InputError(f"{flag} {folder}: {part}/ has no {' or '.join(any_of)}")
        if weights and not any(glob.glob(os.path.join(where, pattern)) for pattern in weights):
            raise InputError(f"{flag} {folder}: {part}/ has no weights ({' or '.join(weights)})")
    return family


def family_of(pipeline):
    return FAMILIES[type(pipeline).__name__]


def denoiser(pipeline):
    """The pipeline's UNet or transformer: what LoRA adapts and each sampling step calls."""
    return getattr(pipeline, family_of(pipeline).denoiser)


def load_pipeline(folder, device="cpu", dtype=torch.float32):
    """The family's pipeline from a local folder (nothing downloaded), every weight frozen, in eval mode, no safety
    checker, no progress bars; UNet families sample with DDIM (eta 0) on the folder's own noise schedule, flow
    families with the folder's flow-matching schedule."""
    import diffusers
    import transformers
    from diffusers import DDIMScheduler
    family = check_pipeline_folder(folder)
    diffusers.utils.logging.disable_progress_bar()  # a bar per part of a local folder says nothing
    transformers.utils.logging.disable_progress_bar()
    cls = FAMILY_NAMES[family.name]
    extra = {} if family.name != "sd" else dict(safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    extra.update({part: None for part in family.optional if (index.get(part) or [None])[0] is None})  # SD3 sans T5
    try:
        pipeline = getattr(diffusers, cls).from_pretrained(folder, local_files_only=True, **extra)
    except Exception as e:
        raise InputError(f"--pretrained_model {folder}: cannot load it as a {cls} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if family.sampler == "ddim":
        # DDIM on the folder's own betas: deterministic, and every step a differentiable function of the last
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    for name in (family.denoiser, "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipeline, name, None) is not None:
            getattr(pipeline, name).requires_grad_(False).eval()
    # (from_pretrained's own dtype argument changed its name across diffusers versions)
    return pipeline.to(device) if dtype == torch.float32 else pipeline.to(device, dtype)


def latent_factor(pipeline):
    """Pixels per latent position: the VAE's factor, times the transformer's patch (SD3) or FLUX's 2x2 packing."""
    family = family_of(pipeline)
    if family.name == "flux":
        return pipeline.vae_scale_factor * 2
    return pipeline.vae_scale_factor * (pipeline.transformer.config.patch_size if family.name == "sd3" else 1)


def default_size(pipeline):
    """(height, width) the pipeline generates by default (SD 2.1's 768, SDXL's and FLUX's 1024, ...)."""
    side = getattr(pipeline, "default_sample_size", None) or denoiser(pipeline).config.sample_size
    return side * pipeline.vae_scale_factor, side * pipeline.vae_scale_factor


def check_size(pipeline, size, flag="--resolution"):
    """(height, width) from an int or a pair, refused in one line unless a multiple of the family's latent factor."""
    height, width = (size, size) if isinstance(size, int) else size
    factor = latent_factor(pipeline)
    for name, value in (("height", height), ("width", width)):
        if value < factor or value % factor:
            raise InputError(f"{flag if isinstance(size, int) else '--' + name} {value}: must be a multiple of "
                             f"{factor} for this {family_of(pipeline).name} pipeline")
    return height, width
