"""Sampling for every family: the noise each sample starts from (keyed, so a sample is the same in any batching), the
text conditioning, one denoiser call with guidance, the family's scheduler plan, one sampling loop with a pluggable
step (DRaFT's gradient steps, ReFL's stop, GRPO's noisy steps), decoding to images in [0, 1].

    noise = start_noise(pipeline, [(42, "a red cube", 0)], (1024, 1024), "cuda")  # sample 0 of the prompt at seed 42
    cond = conditioning(pipeline, ["a red cube"], 7.5, (1024, 1024))       # embeddings, pooled, time ids, ...
    latents = sample_latents(pipeline, denoiser(pipeline), noise, cond, 50, 7.5, grad_steps=1)  # DRaFT-1
    images = decode(pipeline.vae, latents)                                 # B x 3 x H x W in [0, 1]
    images = generate_images(pipeline, ["a red cube"], [(42, "a red cube", 0)], (1024, 1024), 50, 7.5)  # no gradient
"""
import hashlib
import json
from types import SimpleNamespace

import torch

from social_reward.generators.families import denoiser, family_of


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
