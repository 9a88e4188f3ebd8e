"""Fine-tune a text-to-image pipeline through a reward: LoRA on its denoiser, gradient from the reward of its own
images. Families: SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1 (generators.FAMILIES); flags named as diffusers' LoRA scripts'.

    accelerate launch finetune_generator.py --pretrained_model_name_or_path stable-diffusion-xl-base-1.0/ \
        --prompts prompts.txt --validation_prompts val_prompts.txt \
        --scorer ours=clip:clip_epoch_4_global_step_final.pth --output_dir ./sdxl_lora

Methods (--method):
  draft  DRaFT-K (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"): sample
         (DDIM, or the flow-matching Euler step for SD3/FLUX) in --sampling_steps steps, the last --grad_steps K of
         them with gradient, decode, loss = -reward.
  refl   ReFL (Xu et al. 2023, ImageReward's ReFL.py): sample without gradient up to a step drawn from the last quarter
         (ReFL's 30-39 of 40), predict the clean image from it in one step with gradient, decode,
         loss = relu(2 - reward) * 1e-3 for imagereward: scorers, -reward * 1e-3 for any other (docs/generators.md).
  grpo   GRPO (DDPO, Black et al. 2023; Flow-GRPO, Liu et al. 2025): --group_size images a prompt sampled with noise
         injected (DDIM eta > 0, or the flow sampler's SDE) at the trained steps (grpo.trained_steps: the first
         --timestep_fraction of the steps that inject noise; the near-deterministic last ones, and any left out,
         take the deterministic step), scored without gradient; advantages standardised within each group; a
         clipped importance-ratio loss over the trained steps, plus --kl_beta times the KL to the base (the LoRA
         switched off). metrics.csv and the progress bar show its diagnostics (GRPO_METRICS).
Each scorer is normalised by --reward_norm (none, group, prompt, calibrated: reward.py) before --reward_weights
combine them.
The result is diffusers LoRA weights, alpha in their metadata: `pipeline.load_lora_weights(output_dir)`. Devices,
processes and --mixed_precision come from `accelerate launch` (or the flag here); --train_batch_size is per process.
"""

from social_reward.generators.refl import refl_loss
from social_reward.generators.sampling import conditioning, decode, sample_latents


def method_loss(method, model, pipeline, rewards, prompts, noise, sampling_steps, grad_steps, guidance_scale, stop_at,
                size, gather=None):
    """(loss, total rewards, raw scores by scorer) of one DRaFT or ReFL batch: sample from `noise` with the method's
    gradient path, decode, score (rewards: reward.RewardMix). `model`: the pipeline's denoiser (or accelerate's
    wrapper of it); `size`: (height, width); gather: the prompt buffers' gather under several processes."""
    cond = conditioning(pipeline, prompts, guidance_scale, size)
    latents = sample_latents(pipeline, model, noise, cond, sampling_steps, guidance_scale,
                             grad_steps if method == "draft" else 0, stop_at if method == "refl" else None)
    raw = rewards.scores(decode(pipeline.vae, latents), prompts, check_finite=False)
    normalised = rewards.normalize(raw, prompts, gather)
    reward = rewards.combine(normalised)
    if method == "draft":
        return -reward.mean(), reward, raw
    return refl_loss(rewards, normalised), reward, raw
