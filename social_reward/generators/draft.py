"""DRaFT-K (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"), and ReFL's
gradient path beside it: sample in --sampling_steps steps, the last K with gradient (or, for ReFL, up to a late step
then one step to the clean image with gradient), decode, score: loss = -reward (ReFL's loss: refl.py).

    loss, reward, raw = method_loss("draft", unet, pipeline, rewards, prompts, noise, 50, 1, 7.5, None, (512, 512))
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
