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
import hashlib
import json
import os
from types import SimpleNamespace

import pandas as pd
import torch

from clip_model import InputError, write_clip_tokenizer_files

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
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


def take_aliases(function, aliases, table, values):
    """`values` (diffusers-named arguments, in order) with those a caller gave under today's names (`aliases`,
    renamed by `table`, old -> new); an unknown keyword raises TypeError as Python would."""
    unknown = [name for name in aliases if name not in table]
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    return list({**values, **{table[old]: value for old, value in aliases.items()}}.values())


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


# ---- LoRA --------------------------------------------------------------------------------------------------------

def add_lora(pipeline, rank=4, lora_alpha=None):
    """LoRA adapters on the denoiser's layers that diffusers' own LoRA script for the family adapts (peft, Gaussian A,
    zero B: the pipeline's output is unchanged until a step); returns the trainable LoRA parameters."""
    from peft import LoraConfig
    if rank < 1:
        raise InputError(f"--rank must be at least 1 (got {rank})")
    model = denoiser(pipeline)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha,
                                 init_lora_weights="gaussian", target_modules=list(family_of(pipeline).lora_targets)))
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(pipeline, folder, model=None):
    """folder/pytorch_lora_weights.safetensors through the family's save_lora_weights, with the adapter's LoraConfig
    (alpha included) in the file's lora_adapter_metadata as diffusers' own scripts write it, so load_lora_weights
    rebuilds the adapter at its own scale. `model`: the denoiser holding the adapter (default the pipeline's)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    family, model = family_of(pipeline), model if model is not None else denoiser(pipeline)
    state = get_peft_model_state_dict(model)
    if family.denoiser == "unet":  # the UNet scripts convert to diffusers' names, the transformer scripts do not
        state = convert_state_dict_to_diffusers(state)
    type(pipeline).save_lora_weights(folder, safe_serialization=True, **{
        f"{family.denoiser}_lora_layers": state,
        f"{family.denoiser}_lora_adapter_metadata": model.peft_config["default"].to_dict()})
    return os.path.join(folder, LORA_WEIGHTS)


def lora_tensors(pipeline, folder, flag="--lora"):
    """The LoRA file's tensors for the denoiser, under peft's names; a file of another family (prefix, module or
    shape that the denoiser lacks) is refused naming the first key that does not fit."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file
    path = os.path.join(folder, LORA_WEIGHTS)
    if not os.path.isfile(path):
        raise InputError(f"{flag} {folder}: no {LORA_WEIGHTS} (a fine-tuning's output_dir or checkpoint-STEP folder)")
    family, model = family_of(pipeline), denoiser(pipeline)
    state = load_file(path)
    prefix = family.denoiser + "."
    if not state or any(not k.startswith(prefix) for k in state):
        other = next((k for k in state if not k.startswith(prefix)), "no tensors")
        raise InputError(f"{flag} {folder}: not a LoRA of this {family.name} pipeline's {family.denoiser} ({other})")
    state = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items()})
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        name, _, end = key.rpartition(".lora_")
        module = modules.get(name) or modules.get(name + ".base_layer")
        base = getattr(module, "base_layer", module)
        ok = isinstance(base, torch.nn.Linear) and (tensor.shape[1] == base.in_features if end.startswith("A")
                                                   else tensor.shape[0] == base.out_features)
        if not ok:
            raise InputError(f"{flag} {folder}: a LoRA of another model than this {family.name} pipeline "
                             f"({prefix}{key} {tuple(tensor.shape)} fits no layer of its {family.denoiser})")
    return state


def set_lora_state_dict(pipeline, folder, model=None):
    """Load a saved LoRA's tensors into the adapter add_lora made (resuming a run)."""
    from peft.utils import set_peft_model_state_dict
    model = model if model is not None else denoiser(pipeline)
    result = set_peft_model_state_dict(model, lora_tensors(pipeline, folder, "--resume_from_checkpoint"),
                                       adapter_name="default")
    if result.unexpected_keys:
        raise InputError(f"{folder}: LoRA weights for another model or rank ({result.unexpected_keys[0]}, ...)")


def load_lora(pipeline, folder):
    """pipeline.load_lora_weights(folder) (alpha from the file's metadata), a LoRA of another family or a mistake
    refused in one line naming the folder."""
    lora_tensors(pipeline, folder)
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


def latent_shape(pipeline, size):
    """C x h x w of one sample's latents (FLUX's unpacked: the 2x2 packing happens inside the denoiser call)."""
    height, width = (size, size) if isinstance(size, int) else size
    channels = denoiser(pipeline).config.in_channels // (4 if family_of(pipeline).name == "flux" else 1)
    return channels, height // pipeline.vae_scale_factor, width // pipeline.vae_scale_factor


def start_noise(pipeline, keys, size, device="cpu"):
    """The initial latents, one per key, each drawn from its own generator seeded by the key (on the CPU, so the same
    on any device and in any batch): sample k of a prompt starts from the same noise whoever generates it."""
    shape = latent_shape(pipeline, size)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(*key))) for key in keys]
    return torch.stack(noise).to(device) * getattr(pipeline.scheduler, "init_noise_sigma", 1.0)  # flow: 1


def conditioning(pipeline, prompts, guidance_scale, size=None):
    """What the denoiser takes besides the latents and the timestep, for a batch of prompts: the text embeddings
    (with classifier-free guidance, guidance_scale > 1, the empty prompt's before them, as the pipelines batch the
    two), and the family's extras: SDXL's pooled embeddings and time ids, SD3's pooled projections, FLUX's pooled
    projections, text ids and guidance value. `size`: (height, width) of the images (SDXL's time ids)."""
    family, cfg = family_of(pipeline), guidance_scale > 1 and family_of(pipeline).guidance == "cfg"
    prompts, device = list(prompts), pipeline._execution_device
    pair = (lambda cond, uncond: torch.cat([uncond, cond]) if cfg else cond)
    with torch.no_grad():
        if family.name == "sd":
            cond, uncond = pipeline.encode_prompt(prompts, device, 1, cfg)
            return {"encoder_hidden_states": pair(cond, uncond)}
        if family.name == "sdxl":
            cond, uncond, pooled, uncond_pooled = pipeline.encode_prompt(prompts, device=device,
                                                                          do_classifier_free_guidance=cfg)
            height, width = size
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=cond.dtype)
            return {"encoder_hidden_states": pair(cond, uncond), "added_cond_kwargs": {
                "text_embeds": pair(pooled, uncond_pooled), "time_ids": time_ids.repeat(len(cond) * (1 + cfg), 1)}}
        if family.name == "sd3":
            cond, uncond, pooled, uncond_pooled = pipeline.encode_prompt(prompts, prompts, prompts, device=device,
                                                                          do_classifier_free_guidance=cfg)
            return {"encoder_hidden_states": pair(cond, uncond), "pooled_projections": pair(pooled, uncond_pooled)}
        cond, pooled, text_ids = pipeline.encode_prompt(prompts, prompts, device=device)
        extra = {"guidance": torch.full((len(cond),), float(guidance_scale), device=device)} if (
            pipeline.transformer.config.guidance_embeds) else {}
        return {"encoder_hidden_states": cond, "pooled_projections": pooled, "txt_ids": text_ids, **extra}


def pack(latents):
    """FLUX's 2x2 packing: B x C x h x w -> B x (h/2 * w/2) x 4C."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(packed, h, w):
    b, _, c4 = packed.shape
    return packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def denoise(pipeline, model, latents, t, cond, guidance_scale):
    """One call of the denoiser on B latents at timestep t, classifier-free guidance applied: the noise prediction
    (UNet families) or the flow velocity (SD3, FLUX), shaped as the latents."""
    family = family_of(pipeline)
    cfg = guidance_scale > 1 and family.guidance == "cfg"
    x = torch.cat([latents] * 2) if cfg else latents
    x = x.to(cond["encoder_hidden_states"].dtype)
    if family.name in ("sd", "sdxl"):
        out = model(pipeline.scheduler.scale_model_input(x, t), t, **cond).sample
    elif family.name == "sd3":
        out = model(hidden_states=x, timestep=t.expand(len(x)), return_dict=False, **cond)[0]
    else:
        h, w = x.shape[-2:]
        img_ids = pipeline._prepare_latent_image_ids(len(x), h // 2, w // 2, x.device, x.dtype)
        out = unpack(model(hidden_states=pack(x), timestep=t.expand(len(x)) / 1000, img_ids=img_ids,
                           return_dict=False, **cond)[0], h, w)
    if cfg:
        uncond, cond_out = out.chunk(2)
        out = uncond + guidance_scale * (cond_out - uncond)
    return out


def schedule(pipeline, sampling_steps, latents):
    """The sampler's timesteps (and, for the flow families, its sigmas, the last 0) for `sampling_steps` steps:
    the scheduler's own, FLUX's resolution-dependent shift included."""
    scheduler = pipeline.scheduler
    if family_of(pipeline).sampler == "ddim":
        scheduler.set_timesteps(sampling_steps, device=latents.device)
        return SimpleNamespace(kind="ddim", scheduler=scheduler, timesteps=scheduler.timesteps, sigmas=None)
    import numpy as np
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        tokens = latents.shape[-2] * latents.shape[-1] // (4 if family_of(pipeline).name == "flux" else
                                                            pipeline.transformer.config.patch_size ** 2)
        kwargs["mu"] = calculate_shift(tokens, scheduler.config.get("base_image_seq_len", 256),
                                       scheduler.config.get("max_image_seq_len", 4096),
                                       scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        kwargs["sigmas"] = np.linspace(1.0, 1 / sampling_steps, sampling_steps)  # FluxPipeline's
        scheduler.set_timesteps(device=latents.device, **kwargs)
    else:
        scheduler.set_timesteps(sampling_steps, device=latents.device)
    return SimpleNamespace(kind="flow", scheduler=scheduler, timesteps=scheduler.timesteps,
                           sigmas=scheduler.sigmas.to(latents.device))


def ddim_step(plan, i, output, latents):
    """DDIM (eta 0) from step i: the next latents and the one-step prediction of the clean latents."""
    step = plan.scheduler.step(output, plan.timesteps[i], latents, eta=0.0)
    return {"prev_sample": step.prev_sample, "pred_original_sample": step.pred_original_sample}


def flow_step(plan, i, output, latents):
    """The flow-matching Euler step from sigma_i to sigma_i+1 (x + (s' - s) v) and the clean prediction x - s v."""
    sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
    latents = latents.float()
    return {"prev_sample": latents + (sigma_next - sigma) * output.float(),
            "pred_original_sample": latents - sigma * output.float()}


STEPS = {"ddim": ddim_step, "flow": flow_step}


def sample_latents(pipeline, model, latents, cond, sampling_steps, guidance_scale, grad_steps=0, stop_at=None,
                   step_fn=None, trajectory=None):
    """The family's sampler from `latents` in `sampling_steps` steps; the final latents.

    model: the denoiser to call (the pipeline's, or accelerate's wrapper of it). grad_steps: the last K steps run with
    gradient (DRaFT-K), the others without, so the gradient reaches the denoiser through those K calls only.
    stop_at: stop at that step index, run it with gradient and return its one-step prediction of the clean latents
    (ReFL). step_fn(plan, i, output, latents) -> {"prev_sample", "pred_original_sample", ...}: the step (default the
    family's deterministic one, ddim_step or flow_step; `plan` is schedule()'s); with `trajectory` (a list) every
    step's dict is appended to it. Call it under torch.no_grad() to sample without any gradient.
    """
    plan = schedule(pipeline, sampling_steps, latents)
    step_fn = step_fn or STEPS[plan.kind]
    for i, t in enumerate(plan.timesteps[:None if stop_at is None else stop_at + 1]):
        with torch.set_grad_enabled(torch.is_grad_enabled() and (i >= sampling_steps - grad_steps or i == stop_at)):
            output = denoise(pipeline, model, latents, t, cond, guidance_scale)
            step = step_fn(plan, i, output, latents)
            if trajectory is not None:
                trajectory.append(step)
            if i == stop_at:
                return step["pred_original_sample"]
            latents = step["prev_sample"]
    return latents


def decode(vae, latents):
    """Latents to images B x 3 x H x W in [0, 1], as the pipeline decodes them (and as rewards take them)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def generate_images(pipeline, prompts, keys, size, sampling_steps, guidance_scale, batch_size=8):
    """Images (B x 3 x H x W in [0, 1], on the CPU) of prompts[i] from the noise of keys[i], without gradient.
    size: an int (square) or (height, width)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    images, model = [], denoiser(pipeline)
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            noise = start_noise(pipeline, keys[start:start + batch_size], size, model.device)
            cond = conditioning(pipeline, chunk, guidance_scale, size)
            latents = sample_latents(pipeline, model, noise, cond, sampling_steps, guidance_scale)
            images.append(decode(pipeline.vae, latents).cpu())
    return torch.cat(images)


def to_pil(images):
    """Tensors B x 3 x H x W in [0, 1] -> PIL images (rounded as the pipeline's numpy_to_pil does)."""
    from PIL import Image
    array = (images.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


# ---- tiny pipelines from configs ---------------------------------------------------------------------------------

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8)
# SDXL's UNet: cross-attention on both encoders' states side by side, pooled + 6 time ids added to the time embedding
TINY_SDXL_UNET = dict(TINY_UNET, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=32)
TINY_FLOW_VAE = dict(TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False)  # SD3's and FLUX's VAEs: a shift, no quant convs
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407, projection_dim=32)
TINY_T5 = dict(d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
               vocab_size=64, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
TINY_SD3 = dict(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
                pos_embed_max_size=32)
TINY_FLUX = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                 guidance_embeds=True, axes_dims_rope=(4, 6, 6))
T5_WORDS = ("a an the one two three four red blue green yellow purple orange black white circle circles square "
            "squares triangle triangles cube photo of").split()


def write_t5_tokenizer(folder, max_length=32):
    """A T5 tokenizer (Unigram, T5's special tokens) over a small word list, written by save_pretrained as
    transformers saves T5's: built here, nothing downloaded."""
    from transformers import T5TokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [
        ("\u2581" + w, -1.0) for w in T5_WORDS]
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length).save_pretrained(folder)
    return folder


def make_tiny_pipeline(folder, family="sd", seed=0, t5=True):
    """A pipeline of the family (sd, sdxl, sd3, flux) with its parts and layout but tiny sizes and random weights
    (2-layer CLIP text encoders with CLIP's real tokenizer, a 1-layer T5 with a small local vocabulary, a VAE that
    halves the resolution, the family's own schedule), saved with save_pretrained into `folder`: load it by path as a
    real one. `t5=False`: SD3 without its T5 encoder. Returns the folder.

        make_tiny_pipeline("tiny-sd"); pipeline = load_pipeline("tiny-sd")
    """
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5TokenizerFast)
    if family not in FAMILY_NAMES:
        raise InputError(f"family {family!r}: choose from {', '.join(FAMILY_NAMES)}")
    torch.manual_seed(seed)
    token_files = write_clip_tokenizer_files(os.path.join(folder, "tokenizer.files"))
    clip_tokenizer = CLIPTokenizer.from_pretrained(token_files, model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    parts = dict(tokenizer=clip_tokenizer)
    if family in ("sd", "sdxl"):
        # Stable Diffusion's own schedule (scaled linear betas, 1000 training steps)
        parts.update(unet=diffusers.UNet2DConditionModel(**(TINY_UNET if family == "sd" else TINY_SDXL_UNET)),
                     vae=AutoencoderKL(**TINY_VAE), text_encoder=clip, scheduler=DDIMScheduler(
                         beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1))
        if family == "sd":
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            parts.update(text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)),
                         tokenizer_2=clip_tokenizer)
    else:
        t5_folder = write_t5_tokenizer(os.path.join(folder, "t5.files"))
        t5_parts = (T5EncoderModel(T5Config(**TINY_T5)), T5TokenizerFast.from_pretrained(t5_folder))
        parts.update(vae=AutoencoderKL(**TINY_FLOW_VAE))
        if family == "sd3":
            parts.update(transformer=diffusers.SD3Transformer2DModel(**TINY_SD3),
                         text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)),
                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)),
                         tokenizer_2=clip_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                         text_encoder_3=t5_parts[0] if t5 else None, tokenizer_3=t5_parts[1] if t5 else None)
        else:
            parts.update(transformer=diffusers.FluxTransformer2DModel(**TINY_FLUX), text_encoder=clip,
                         text_encoder_2=t5_parts[0], tokenizer_2=t5_parts[1],
                         scheduler=FlowMatchEulerDiscreteScheduler(
                             shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                             base_image_seq_len=256, max_image_seq_len=4096))
    pipeline = getattr(diffusers, FAMILY_NAMES[family])(**parts)
    pipeline.save_pretrained(folder)
    import shutil
    for scratch in ("tokenizer.files", "t5.files"):
        shutil.rmtree(os.path.join(folder, scratch), ignore_errors=True)
    return folder
