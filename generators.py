"""Text-to-image generators for the scripts that fine-tune them and generate with them: a Stable Diffusion pipeline
from a local folder, LoRA on its UNet, the DDIM sampling loop both scripts run, the noise each sample starts from,
and a tiny pipeline made from configs for tests and the demo.

    pipeline = load_pipeline("stable-diffusion-2-1-base/", "cuda")        # a folder as save_pretrained writes it
    lora_params = add_lora(pipeline.unet, rank=4, lora_alpha=4)
    noise = start_noise(pipeline, [(42, "a red cube", 0)], 512, "cuda")   # sample 0 of the prompt at seed 42
    embeds = text_embeddings(pipeline, ["a red cube"], guidance_scale=7.5)
    latents = sample_latents(pipeline.unet, pipeline.scheduler, noise, embeds, 50, 7.5, grad_steps=1)  # DRaFT-1
    images = decode(pipeline.vae, latents)                                # B x 3 x H x W in [0, 1]
    images = generate_images(pipeline, ["a red cube"], [(42, "a red cube", 0)], 512, 50, 7.5)  # no gradient
    make_tiny_pipeline("tiny-sd/")                                        # random weights, for tests and the demo
"""
import glob
import hashlib
import json
import os

import pandas as pd
import torch

from clip_model import InputError, write_clip_tokenizer_files

# what a Stable Diffusion folder must hold (the diffusers layout save_pretrained writes): part -> (description,
# files of which one must be there)
PARTS = {
    "unet": ("the UNet", ("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "vae": ("the VAE", ("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "text_encoder": ("the text encoder", ("config.json",), ("model.safetensors", "pytorch_model.bin")),
    "tokenizer": ("the tokenizer", ("vocab.json", "merges.txt"), ()),
    "scheduler": ("the noise scheduler", ("scheduler_config.json",), ()),
}
# where diffusers' own LoRA training scripts put adapters: the UNet's attention projections
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def check_pipeline_folder(folder):
    """Raise InputError naming what a Stable Diffusion pipeline folder lacks (the folder, model_index.json, a part,
    a part's file); return the folder."""
    if not os.path.isdir(folder):
        raise InputError(f"--pretrained_model {folder}: no such folder (a Stable Diffusion pipeline folder, as "
                         f"save_pretrained writes it)")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise InputError(f"--pretrained_model {folder}: no model_index.json: not a diffusers pipeline folder")
    for part, (description, needed, weights) in PARTS.items():
        where = os.path.join(folder, part)
        if not os.path.isdir(where):
            raise InputError(f"--pretrained_model {folder}: the pipeline has no {part}/ ({description})")
        missing = [name for name in needed if not os.path.isfile(os.path.join(where, name))]
        if weights and not any(os.path.isfile(os.path.join(where, name)) for name in weights):
            missing.append(" or ".join(weights))
        if missing:
            raise InputError(f"--pretrained_model {folder}: {part}/ ({description}) has no {', '.join(missing)}")
    return folder


def load_pipeline(folder, device="cpu", dtype=torch.float32):
    """A StableDiffusionPipeline from a local folder (nothing downloaded), every weight frozen, sampling with DDIM
    (eta 0) from the folder's own noise schedule, in eval mode, no safety checker, no progress bars."""
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    check_pipeline_folder(folder)
    diffusers.utils.logging.disable_progress_bar()  # a bar per part of a local folder says nothing
    transformers.utils.logging.disable_progress_bar()
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                           feature_extractor=None, requires_safety_checker=False)
    except Exception as e:
        raise InputError(f"--pretrained_model {folder}: cannot load it as a Stable Diffusion pipeline "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    # DDIM on the folder's own betas: deterministic, and every step a differentiable function of the last
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    for model in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        model.requires_grad_(False).eval()
    # (from_pretrained's own dtype argument changed its name across diffusers versions)
    return pipeline.to(device) if dtype == torch.float32 else pipeline.to(device, dtype)


def add_lora(unet, rank=4, lora_alpha=None):
    """LoRA adapters on the UNet's attention projections, as diffusers' train_text_to_image_lora.py adds them (peft,
    Gaussian A, zero B: the pipeline's output is unchanged until a step); returns the trainable LoRA parameters."""
    from peft import LoraConfig
    if rank < 1:
        raise InputError(f"--rank must be at least 1 (got {rank})")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha,
                                init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state_dict(unet):
    """The UNet's LoRA tensors under the names diffusers' load_lora_weights reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def set_lora_state_dict(unet, folder):
    """Load LoRA tensors written by save_lora_weights (folder/pytorch_lora_weights.safetensors) into the UNet's adapter."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(folder)
    unet_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()
                                                  if k.startswith("unet.")})
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    if result.unexpected_keys:
        raise InputError(f"{folder}: LoRA weights for another UNet or rank ({result.unexpected_keys[0]}, ...)")


def load_lora(pipeline, folder):
    """pipeline.load_lora_weights(folder), with a mistake in one line naming the folder."""
    if not os.path.isfile(os.path.join(folder, LORA_WEIGHTS)):
        raise InputError(f"--lora {folder}: no {LORA_WEIGHTS} (a fine-tuning's save_folder or checkpoint-STEP folder)")
    try:
        pipeline.load_lora_weights(folder)
    except Exception as e:
        raise InputError(f"--lora {folder}: does not fit this pipeline ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    return pipeline


# ---- prompts -----------------------------------------------------------------------------------------------------

def read_prompts(paths, flag="--prompts"):
    """The prompts of a text file (one a line; blank lines skipped), a json list of strings, or a pair source that
    pair_sources.read_source reads (a pair table, Pick-a-Pic shards, an HPD v2 or ImageReward json: its distinct
    prompts, in order). `paths`: a path or a list of them; `flag` names them in a message."""
    from pair_sources import read_source
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


# ---- sampling ----------------------------------------------------------------------------------------------------

def noise_seed(*key):
    """A 63-bit seed from a key (e.g. the run's seed, a prompt, a sample number): the same on every machine and process."""
    return int.from_bytes(hashlib.sha256(json.dumps(key).encode()).digest()[:8], "little") >> 1


def latent_shape(pipeline, resolution):
    return (pipeline.unet.config.in_channels, resolution // pipeline.vae_scale_factor,
            resolution // pipeline.vae_scale_factor)


def start_noise(pipeline, keys, resolution, device="cpu"):
    """The initial latents, one per key, each drawn from its own generator seeded by the key (on the CPU, so the same
    on any device and in any batch): sample k of a prompt starts from the same noise whoever generates it."""
    shape = latent_shape(pipeline, resolution)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(*key))) for key in keys]
    return torch.stack(noise).to(device) * pipeline.scheduler.init_noise_sigma


def text_embeddings(pipeline, prompts, guidance_scale):
    """The text encoder's embeddings of the prompts; with classifier-free guidance (guidance_scale > 1) the empty
    prompt's before them, as the pipeline batches the two."""
    with torch.no_grad():
        cond, uncond = pipeline.encode_prompt(list(prompts), pipeline.text_encoder.device, 1, guidance_scale > 1)
    return torch.cat([uncond, cond]) if guidance_scale > 1 else cond


def sample_latents(unet, scheduler, latents, embeddings, sampling_steps, guidance_scale, grad_steps=0, stop_at=None):
    """DDIM (eta 0) from `latents` in `sampling_steps` steps; the final latents.

    grad_steps: the last K steps run with gradient (DRaFT-K), the others without, so the gradient reaches the UNet
    through those K calls only. stop_at: stop at that step index, run it with gradient and return its one-step
    prediction of the clean latents (ReFL). Call it under torch.no_grad() to sample without any gradient.
    """
    scheduler.set_timesteps(sampling_steps, device=latents.device)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps[:None if stop_at is None else stop_at + 1]):
        with torch.set_grad_enabled(torch.is_grad_enabled() and (i >= sampling_steps - grad_steps or i == stop_at)):
            model_input = torch.cat([latents] * 2) if guidance_scale > 1 else latents
            noise_pred = unet(scheduler.scale_model_input(model_input, t), t, encoder_hidden_states=embeddings).sample
            if guidance_scale > 1:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            step = scheduler.step(noise_pred, t, latents, eta=0.0)
            if i == stop_at:
                return step.pred_original_sample
            latents = step.prev_sample
    return latents


def decode(vae, latents):
    """Latents to images B x 3 x H x W in [0, 1], as the pipeline decodes them (and as rewards take them)."""
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def generate_images(pipeline, prompts, keys, resolution, sampling_steps, guidance_scale, batch_size=8):
    """Images (B x 3 x H x W in [0, 1], on the CPU) of prompts[i] from the noise of keys[i], without gradient."""
    images = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            noise = start_noise(pipeline, keys[start:start + batch_size], resolution, pipeline.unet.device)
            embeds = text_embeddings(pipeline, chunk, guidance_scale)
            latents = sample_latents(pipeline.unet, pipeline.scheduler, noise.to(embeds.dtype), embeds,
                                     sampling_steps, guidance_scale)
            images.append(decode(pipeline.vae, latents).cpu())
    return torch.cat(images)


def to_pil(images):
    """Tensors B x 3 x H x W in [0, 1] -> PIL images (rounded as the pipeline's numpy_to_pil does)."""
    from PIL import Image
    array = (images.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


# ---- a tiny pipeline from configs --------------------------------------------------------------------------------

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=32)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407, projection_dim=32)


def make_tiny_pipeline(folder, seed=0):
    """A Stable Diffusion pipeline with SD's parts and layout but tiny sizes and random weights (a UNet of two levels,
    a VAE that halves the resolution, a 2-layer CLIP text encoder with CLIP's real tokenizer, SD's DDIM schedule),
    saved with save_pretrained into `folder`: load it by path as a real one. Returns the folder.

        make_tiny_pipeline("tiny-sd"); pipeline = load_pipeline("tiny-sd")
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    token_files = write_clip_tokenizer_files(os.path.join(folder, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(token_files, model_max_length=77)
    # Stable Diffusion's own schedule (scaled linear betas, 1000 training steps)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder
