"""The policy-gradient pieces of GRPO for diffusion models, as pure functions of tensors and a diffusers scheduler,
so any family's sampling loop can call them: a sampling step with noise injected and its log-probability (DDIM with
eta > 0 as DDPO, Black et al. 2023; the SDE form of the flow-matching Euler sampler as Flow-GRPO, Liu et al. 2025),
group-standardised advantages, the clipped importance-ratio loss and the KL penalty to the reference model.

    plan = generators.schedule(pipeline, steps, latents)          # the family's timesteps (and sigmas)
    check_noisy_sampler(plan.scheduler)
    step_fn = lambda plan, i, output, x: noisy_step(plan.scheduler, output, i, x, noise=noise(i))._asdict()
    final = generators.sample_latents(pipeline, model, latents, cond, steps, 1.0, step_fn=step_fn, trajectory=taken)
    advantages = group_advantages(rewards, group_size)            # rewards: [prompts * group_size], prompt-major
    trained = trained_steps(plan.scheduler, timestep_fraction)      # the steps that inject noise (noise there only)
    step = noisy_step(plan.scheduler, output_now, i, x_i, prev_sample=x_next)   # the same step under the LoRA now
    loss = clipped_policy_loss(step.log_prob, old_log_prob_i, advantages, clip_range)
    loss = loss + kl_beta * kl_to_reference(step.mean, reference_mean, step.std).mean()
    stats = train_on_trajectory(predict, plan.scheduler, trajectory, log_probs, advantages, trained, clip_range,
                                kl_beta, accelerator.backward, reference=lora_off)  # that, for every trained step

A step's log-probability is the mean over the latent's elements of the Gaussian log-density of prev_sample (as both
DDPO and Flow-GRPO take it), so ratios and clip ranges are per element (both use a clip range of 1e-4).
"""
import contextlib
import math
from typing import NamedTuple

import torch

from social_reward.errors import InputError
from social_reward.generators.sampling import (
    STEPS,
    conditioning,
    decode,
    denoise,
    sample_latents,
    schedule,
    start_noise,
)

# the noise each sampler injects by default: DDPO's eta, Flow-GRPO's noise_level
DEFAULT_NOISE_LEVEL = {"DDIMScheduler": 1.0, "FlowMatchEulerDiscreteScheduler": 0.7}


ADVANTAGE_CLIP = 5.0  # DDPO's and Flow-GRPO's adv_clip_max


LOW_NOISE = 0.1  # a step whose std is under this share of the largest step's is not trained (trained_steps)


class NoisyStep(NamedTuple):
    prev_sample: torch.Tensor  # B x ...: the next latents (the given ones when prev_sample was passed)
    log_prob: torch.Tensor     # [B]: the mean over elements of log N(prev_sample; mean, std^2)
    mean: torch.Tensor         # B x ...: the step's Gaussian mean, a function of the model output
    std: torch.Tensor          # B x 1 ...: its standard deviation, a function of the schedule alone


def sampler_kind(scheduler):
    """The noise-injecting form this scheduler has ("DDIMScheduler" or "FlowMatchEulerDiscreteScheduler"), else None."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    for kind in (DDIMScheduler, FlowMatchEulerDiscreteScheduler):
        if isinstance(scheduler, kind):
            return kind.__name__
    return None


def check_noisy_sampler(scheduler, noise_level=None):
    """Raise InputError unless the scheduler (after set_timesteps) injects noise at every step, so that each step has
    a log-probability: DDIM or flow-matching Euler, a positive noise level, no step of zero variance."""
    kind = sampler_kind(scheduler)
    if kind is None:
        raise InputError(f"--method grpo: the sampler {type(scheduler).__name__} cannot inject noise with a known "
                         f"log-probability; GRPO samples with DDIM (eta > 0) or flow-matching Euler as an SDE")
    level = DEFAULT_NOISE_LEVEL[kind] if noise_level is None else noise_level
    if not level > 0:
        raise InputError(f"--noise_level {level}: must be above 0 (GRPO needs noise injected at every step)")
    probe = torch.zeros(1, 1)
    for i in range(len(scheduler.timesteps)):
        std = step_std(scheduler, i, probe, level)
        if not (std > 0).all():
            raise InputError(f"--method grpo: step {i} of {type(scheduler).__name__} injects no noise (its variance "
                             f"is 0, e.g. set_alpha_to_one at the last DDIM step); GRPO needs noise at every step")


def step_std(scheduler, i, sample, noise_level):
    """The standard deviation of step i's Gaussian (broadcastable to sample)."""
    return _ddim_std(scheduler, i, sample, noise_level) if sampler_kind(scheduler) == "DDIMScheduler" else \
        _flow_coefficients(scheduler, i, sample, noise_level)[2]


def noisy_step(scheduler, model_output, i, sample, noise_level=None, noise=None, prev_sample=None):
    """Step i of the scheduler's timesteps (after set_timesteps) with noise injected: prev_sample = mean + std * noise,
    or, given prev_sample, its log-probability under this model output (the importance ratio's numerator).
    Computed in float32; differentiable through model_output. noise_level: DDIM's eta (default 1.0) or Flow-GRPO's
    noise level (default 0.7).

        step = noisy_step(pipeline.scheduler, noise_pred, i, latents, noise=torch.randn_like(latents))
    """
    kind = sampler_kind(scheduler)
    noise_level = DEFAULT_NOISE_LEVEL[kind] if noise_level is None else noise_level
    model_output, sample = model_output.float(), sample.float()
    if kind == "DDIMScheduler":
        # diffusers' own DDIM step with zero noise is the mean (prediction type, clipping and thresholding included)
        mean = scheduler.step(model_output, scheduler.timesteps[i], sample, eta=noise_level,
                              variance_noise=torch.zeros_like(sample)).prev_sample
        std = _ddim_std(scheduler, i, sample, noise_level)
    else:
        keep, velocity, std = _flow_coefficients(scheduler, i, sample, noise_level)
        mean = sample * keep + model_output * velocity
    if prev_sample is None:
        prev_sample = mean + std * noise.float()
    return NoisyStep(prev_sample, gaussian_log_prob(prev_sample.detach().float(), mean, std), mean, std)


def _ddim_std(scheduler, i, sample, eta):
    """DDIM's sigma_t(eta) (Song et al. 2021, eq. 16), from the cumulative alphas as diffusers' DDIM step reads them."""
    t = int(scheduler.timesteps[i])
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[t]
    alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    return (eta * variance.sqrt()).to(sample.device, torch.float32).reshape((1,) * sample.dim())


def _flow_coefficients(scheduler, i, sample, noise_level):
    """Flow-GRPO's SDE step from sigma to sigma_next (dt < 0) with the same marginals as the flow ODE:
    mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt, std = s sqrt(-dt), where
    s = noise_level sqrt(sigma / (1 - sigma)) (sigma = 1 read as the schedule's second sigma there, as Flow-GRPO does).
    Returns (the factor on x, the factor on v, std)."""
    sigmas = scheduler.sigmas.to(sample.device, torch.float32)
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    dt = sigma_next - sigma
    s = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[min(1, len(sigmas) - 1)], sigma)))
    shape = (1,) * sample.dim()
    keep = 1 + s ** 2 / (2 * sigma) * dt
    velocity = (1 + s ** 2 * (1 - sigma) / (2 * sigma)) * dt
    return keep.reshape(shape), velocity.reshape(shape), (s * torch.sqrt(-dt)).reshape(shape)


def gaussian_log_prob(x, mean, std):
    """The mean over each sample's elements of log N(x; mean, std^2): [B]."""
    log_density = -(x - mean) ** 2 / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, x.dim())))


def group_advantages(rewards, group_size):
    """GRPO's advantages: each reward standardised within its group (rewards prompt-major, `group_size` consecutive
    images a prompt), reward.standardize's arithmetic: (r - group mean) / (group std + 1e-6), population std.

        group_advantages(torch.tensor([1., 2., 3., 10., 10., 10.]), 3)  # -> [-1.22, 0, 1.22, 0, 0, 0]
    """
    from social_reward.reward.normalization import standardize
    if group_size < 2 or len(rewards) % group_size:
        raise InputError(f"--group_size {group_size}: {len(rewards)} rewards do not divide into groups of "
                         f"{group_size} (a group needs at least 2 images of one prompt)")
    # each group's mean taken out in float64 first: a score far from 0 (PickScore-like, near 72: float32's ulp there
    # is 8e-6) keeps its within-group spread's digits through the standardisation
    wide = rewards.double().view(-1, group_size)
    centred = (wide - wide.mean(1, keepdim=True)).flatten().to(rewards.dtype)
    return standardize(centred, torch.arange(len(rewards)) // group_size)


def clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range, advantage_clip=ADVANTAGE_CLIP):
    """PPO's clipped surrogate, as DDPO and Flow-GRPO take it: mean(max(-A r, -A clamp(r, 1 - c, 1 + c))) with
    r = exp(log_prob - old_log_prob) and A clamped to +-advantage_clip."""
    advantages = advantages.clamp(-advantage_clip, advantage_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()


def kl_to_reference(mean, reference_mean, std):
    """KL(N(mean, std^2) || N(reference_mean, std^2)) per element, averaged over each sample's elements: [B]. The
    reference is the model with its LoRA switched off on the same latents (Flow-GRPO divides by the flow step's s^2
    rather than the step's own variance s^2 (-dt); this is the KL of the two step distributions, so Flow-GRPO's beta
    is about beta x |dt| here: its 0.04 at 10 steps, 0.004)."""
    kl = (mean - reference_mean.detach()) ** 2 / (2 * std ** 2)
    return kl.mean(dim=tuple(range(1, mean.dim())))


def trained_steps(scheduler, timestep_fraction=1.0, noise_level=None):
    """The step indices GRPO trains on (scheduler after set_timesteps): the steps whose std is at least LOW_NOISE
    times the largest step's, and of those the first `timestep_fraction` (at least one), in sampling order as
    Flow-GRPO takes them (`range(int(num_steps * timestep_fraction))`).

    A step's log-probability gradient is (x' - mean) / std^2 times the mean's gradient: its noise grows as 1 / std
    while what it says about the reward does not, so the near-deterministic steps at the end (the flow sampler's last,
    sigma 0.003 -> 0; DDIM's two into t = 1 and t = 0) carry most of the gradient's noise and little of its signal
    (docs/generators.md). Flow-GRPO's timestep_fraction 0.99 leaves out exactly that last step of its 10.

        trained_steps(scheduler, 1.0)  # e.g. [0, 1, 2, 3] of DDIM's 6 steps, [0, 1, 2, 3, 4] of the flow's 6
    """
    kind = sampler_kind(scheduler)
    level = DEFAULT_NOISE_LEVEL[kind] if noise_level is None else noise_level
    stds = [float(step_std(scheduler, i, torch.zeros(1, 1), level)) for i in range(len(scheduler.timesteps))]
    noisy = [i for i, std in enumerate(stds) if std >= LOW_NOISE * max(stds)]
    return noisy[:max(1, int(len(noisy) * timestep_fraction + 1e-9))]


def train_on_trajectory(predict, scheduler, trajectory, old_log_probs, advantages, steps, clip_range, kl_beta,
                        backward, reference=None, noise_level=None):
    """The GRPO loss of a sampled batch over the trained `steps`, each step's share (1 / len(steps)) back-propagated
    at once through `backward` (accelerator.backward) so that one step's graph is alive at a time. reference (a
    context manager switching the LoRA off) gives the KL's reference model when kl_beta > 0. Returns the mean loss,
    policy loss, KL and fraction of clipped ratios (floats)."""
    totals = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "clipped": 0.0}
    for i in steps:
        step = noisy_step(scheduler, predict(trajectory[i], i), i, trajectory[i], noise_level,
                          prev_sample=trajectory[i + 1])
        loss = policy_loss = clipped_policy_loss(step.log_prob, old_log_probs[i], advantages, clip_range)
        kl = torch.zeros(())
        if kl_beta > 0:
            with torch.no_grad(), reference():
                reference_mean = noisy_step(scheduler, predict(trajectory[i], i), i, trajectory[i], noise_level,
                                            prev_sample=trajectory[i + 1]).mean
            kl = kl_to_reference(step.mean, reference_mean, step.std).mean()
            loss = loss + kl_beta * kl
        backward(loss / len(steps))
        ratio = torch.exp(step.log_prob.detach() - old_log_probs[i])
        totals["loss"] += loss.item() / len(steps)
        totals["policy_loss"] += policy_loss.item() / len(steps)
        totals["kl"] += kl.item() / len(steps)
        totals["clipped"] += ((ratio - 1).abs() > clip_range).float().mean().item() / len(steps)
    return totals


def grpo_sample(model, pipeline, rewards, prompts, keys, group_size, sampling_steps, guidance_scale, size,
                noise_level, gather=None, noisy_steps=None):
    """GRPO's sampling half, without gradient: `group_size` images of each prompt, noise injected at the
    `noisy_steps` (default every step; each image's start and step noise keyed by its key, the sample number and the
    step) and the family's deterministic step at the others, decoded and scored. Returns (the group's prompts, the
    latents before each step and the last, log_probs T x B (0 at a deterministic step), raw scores by scorer, the
    normalised total)."""
    prompts = [p for p in prompts for _ in range(group_size)]
    keys = [(*key, k) for key in keys for k in range(group_size)]
    device = pipeline._execution_device
    start = start_noise(pipeline, keys, size, device)
    cond = conditioning(pipeline, prompts, guidance_scale, size)
    noisy = set(range(sampling_steps) if noisy_steps is None else noisy_steps)
    steps = []

    def step_fn(plan, i, output, latents):
        if i not in noisy:  # a step not trained: its noise would only add variance to the advantages
            return {**STEPS[plan.kind](plan, i, output, latents), "log_prob": torch.zeros(len(latents), device=device)}
        noise = start_noise(pipeline, [key + (i,) for key in keys], size, device)
        return noisy_step(plan.scheduler, output, i, latents, noise_level, noise=noise)._asdict()
    with torch.no_grad():
        final = sample_latents(pipeline, model, start, cond, sampling_steps, guidance_scale, step_fn=step_fn,
                               trajectory=steps)
        raw = rewards.scores(decode(pipeline.vae, final), prompts, check_finite=False)
        total = rewards.combine(rewards.normalize(raw, prompts, gather))
    latents = [start.float()] + [step["prev_sample"].float() for step in steps]
    return prompts, cond, latents, torch.stack([step["log_prob"] for step in steps]), raw, total


def grpo_train(accelerator, model, pipeline, cond, latents, log_probs, total, group_size, sampling_steps,
               guidance_scale, noise_level, steps, clip_range, kl_beta):
    """GRPO's training half: group advantages of the total reward, the clipped ratio loss (and the KL to the base:
    the same denoiser, its LoRA switched off) over the trained steps, each back-propagated at once. Returns
    train_on_trajectory's means and the advantages' mean and std, the mean within-group std of the total reward."""
    plan = schedule(pipeline, sampling_steps, latents[0])
    advantages = group_advantages(total, group_size)
    used = advantages.clamp(-ADVANTAGE_CLIP, ADVANTAGE_CLIP)
    spread = {"adv_mean": used.mean().item(), "adv_std": used.std(unbiased=False).item(),
              "reward_std": total.float().view(-1, group_size).std(1, unbiased=False).mean().item()}
    inner = accelerator.unwrap_model(model)

    @contextlib.contextmanager
    def lora_off():
        inner.disable_adapters()
        try:
            yield
        finally:
            inner.enable_adapters()

    def predict(x, i):
        return denoise(pipeline, model, x, plan.timesteps[i], cond, guidance_scale)
    return {**train_on_trajectory(predict, plan.scheduler, latents, log_probs, advantages, steps, clip_range, kl_beta,
                                  accelerator.backward, lora_off, noise_level), **spread}
