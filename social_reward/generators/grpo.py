"""GRPO for diffusion models (DDPO, Black et al. 2023; Flow-GRPO, Liu et al. 2025), as a method the training loop
calls (generators/draft.py and refl.py expose the same three names):

    columns = METRICS                 # its diagnostics, columns of metrics.csv
    run.update(run_flags(flags))      # the flags a checkpoint must share to be resumed
    updates = prepare(trainer)        # each next(updates): one optimizer step's forward and backward, its metrics

A round samples --sample_batch_size prompts x --group_size images without gradient (noise injected at the trained
steps), scores them and standardises each reward within its group; then --num_inner_epochs passes over the round, in
minibatches of --train_batch_size prompts' groups, an optimizer step each: the gradient of the clipped importance-ratio
loss (and the KL to the base) accumulated over the trained steps and the minibatch's micro-batches (its images split
--gradient_accumulation_steps ways; sampling runs a micro-batch at a time too). The first minibatch of a round is
on-policy (ratio 1); every later one was sampled by older weights, and the clip bounds how far its ratio moves them.

The tensor maths are pure functions of tensors and a diffusers scheduler, so any family's sampling loop can call them:
a sampling step with noise injected and its log-probability (DDIM with eta > 0 as DDPO; the SDE form of the
flow-matching Euler sampler as Flow-GRPO), group-standardised advantages, the clipped loss, the KL to the reference.

    plan = generators.schedule(pipeline, steps, latents)          # the family's timesteps (and sigmas)
    trained = trained_steps(plan.scheduler, timestep_fraction)      # the steps that inject noise (noise there only)
    check_noisy_sampler(plan.scheduler, steps=trained)
    step = noisy_step(plan.scheduler, output, i, x_i, noise=noise)                    # sampling: x_{i+1}, log p
    advantages = group_advantages(rewards, group_size)            # rewards: [prompts * group_size], prompt-major
    step = noisy_step(plan.scheduler, output_now, i, x_i, prev_sample=x_next)   # the same step under the LoRA now
    loss = clipped_policy_loss(step.log_prob, old_log_prob_i, advantages, clip_range)
    loss = loss + kl_beta * kl_to_reference(step.mean, reference_mean, step.std).mean()
    stats = train_on_trajectory(predict, plan.scheduler, trajectory, log_probs, advantages, trained, clip_range,
                                kl_beta, accelerator.backward, reference=lora_off)  # that, for every trained step

A step's log-probability is the mean over the latent's elements of the Gaussian log-density of prev_sample (as both
DDPO and Flow-GRPO take it), so ratios and clip ranges are per element (both use a clip range of 1e-4).
"""
import contextlib
import copy
import math
from typing import NamedTuple

import torch

from social_reward.errors import InputError
from social_reward.generators.sampling import (
    STEPS,
    conditioning,
    decode,
    denoise,
    noise_seed,
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


def check_noisy_sampler(scheduler, noise_level=None, steps=None):
    """Raise InputError unless the scheduler (after set_timesteps) injects noise at each step GRPO trains (`steps`,
    default trained_steps' at --timestep_fraction 1), so that each has a log-probability: DDIM or flow-matching Euler,
    a positive noise level, no trained step of zero variance. The other steps sample deterministically, so a DDIM
    scheduler with set_alpha_to_one (its last step's variance 0, a step trained_steps leaves out) is accepted.

        check_noisy_sampler(pipeline.scheduler)   # after set_timesteps; InputError naming what cannot work
    """
    kind = sampler_kind(scheduler)
    if kind is None:
        raise InputError(f"--method grpo: the sampler {type(scheduler).__name__} cannot inject noise with a known "
                         f"log-probability; GRPO samples with DDIM (eta > 0) or flow-matching Euler as an SDE")
    level = DEFAULT_NOISE_LEVEL[kind] if noise_level is None else noise_level
    if not level > 0:
        raise InputError(f"--noise_level {level}: must be above 0 (GRPO needs noise injected at the steps it trains)")
    probe = torch.zeros(1, 1)
    for i in trained_steps(scheduler, 1.0, level) if steps is None else steps:
        std = step_std(scheduler, i, probe, level)
        if not (std > 0).all():
            raise InputError(f"--method grpo: step {i} of {type(scheduler).__name__} injects no noise (its variance "
                             f"is 0, e.g. set_alpha_to_one at the last DDIM step); GRPO trains only steps with noise")


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
                        backward, reference=None, noise_level=None, context=None, finite=None):
    """The GRPO loss of a batch of trajectories over the trained `steps`, each step's share (1 / len(steps))
    back-propagated at once through `backward` (accelerator.backward) so that one step's graph is alive at a time.
    trajectory[i]: the latents before step i (trajectory[i + 1] after it); old_log_probs[i]: their log-probability
    when sampled. reference (a context manager switching the LoRA off) gives the KL's reference model when kl_beta > 0.
    context(last) -> the context a step's forward and backward run in (accelerate's no_sync(model) but at the last
    backward of an optimizer step: the processes' gradients are averaged once); finite(loss) -> False stops before
    that step's backward and returns None (the non-finite guard dropping the optimizer step). Returns the mean loss,
    policy loss, KL and the fraction of ratios outside the clip range (floats).

        stats = train_on_trajectory(predict, scheduler, latents, log_probs, advantages, [0, 1, 2], 1e-4, 0.0,
                                    lambda loss: loss.backward())
    """
    totals = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "clipped": 0.0}
    for n, i in enumerate(steps):
        with context(n == len(steps) - 1) if context else contextlib.nullcontext():
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
            if finite is not None and not finite(loss):
                return None
            backward(loss / len(steps))
        ratio = torch.exp(step.log_prob.detach() - old_log_probs[i])
        totals["loss"] += loss.item() / len(steps)
        totals["policy_loss"] += policy_loss.item() / len(steps)
        totals["kl"] += kl.item() / len(steps)
        totals["clipped"] += ((ratio - 1).abs() > clip_range).float().mean().item() / len(steps)
    return totals


# ---- a round: sampling, the minibatches, one optimizer step's forward and backward ----------------------------------

class Round(NamedTuple):
    prompts: list                # B: the prompt of each image, a group's images consecutive
    latents: torch.Tensor        # (T + 1) x B x ...: the latents before each sampling step, and the last
    log_probs: torch.Tensor      # T x B: each step's log-probability when sampled (0 at a deterministic step)
    raw: dict                    # {scorer: [B]}: the raw scores
    total: torch.Tensor = None   # [B]: the reward, each scorer normalised (--reward_norm) and weighted
    advantages: torch.Tensor = None  # [B]: the total standardised within its group


def micro_batch(flags):
    """Images a micro-batch holds: a minibatch's (--train_batch_size x --group_size) split --gradient_accumulation_steps
    ways (training/flags.py's check_grpo_flags has checked that it divides)."""
    return flags.train_batch_size * flags.group_size // (flags.gradient_accumulation_steps or 1)


def grpo_sample(model, pipeline, rewards, prompts, keys, sampling_steps, guidance_scale, size, noise_level=None,
                noisy_steps=None):
    """GRPO's sampling, without gradient: one image of each prompt, from the start noise of its key (keys[i], e.g.
    ("train", seed, epoch, prompt index, sample)), noise injected at the `noisy_steps` (default every step; keyed by the
    image's key and the step) and the family's deterministic step at the others, decoded and scored. A Round of these
    images, without total or advantages.

        batch = grpo_sample(denoiser(pipeline), pipeline, rewards, ["a cat"] * 4, [(0, k) for k in range(4)], 10,
                            7.5, (512, 512), noisy_steps=trained_steps(pipeline.scheduler))
    """
    device = pipeline._execution_device
    start = start_noise(pipeline, keys, size, device)
    cond = conditioning(pipeline, prompts, guidance_scale, size)
    noisy = set(range(sampling_steps) if noisy_steps is None else noisy_steps)
    steps = []

    def step_fn(plan, i, output, latents):
        if i not in noisy:  # a step not trained: its noise would only add variance to the advantages
            return {**STEPS[plan.kind](plan, i, output, latents), "log_prob": torch.zeros(len(latents), device=device)}
        noise = start_noise(pipeline, [tuple(key) + (i,) for key in keys], size, device)
        return noisy_step(plan.scheduler, output, i, latents, noise_level, noise=noise)._asdict()
    with torch.no_grad():
        final = sample_latents(pipeline, model, start, cond, sampling_steps, guidance_scale, step_fn=step_fn,
                               trajectory=steps)
        raw = rewards.scores(decode(pipeline.vae, final), prompts, check_finite=False)
    latents = torch.stack([start.float()] + [step["prev_sample"].float() for step in steps])
    return Round(list(prompts), latents, torch.stack([step["log_prob"] for step in steps]), raw)


def sample_round(trainer, prompts, keys, noisy_steps):
    """A round: `group_size` images of each prompt (sample k of prompt p from key (*keys[p], k)), sampled and scored a
    micro-batch at a time; then each scorer normalised over the whole round (--reward_norm, its prompt buffers fed by
    every process) and weighted into the total, and each total standardised within its group (the advantages).
    Reads trainer.model, .pipeline, .rewards, .size, .gather and .flags (group_size, sampling_steps, guidance_scale,
    noise_level, train_batch_size, gradient_accumulation_steps)."""
    f = trainer.flags
    prompts = [p for p in prompts for _ in range(f.group_size)]
    keys = [(*key, k) for key in keys for k in range(f.group_size)]
    size = micro_batch(f)
    parts = [grpo_sample(trainer.model, trainer.pipeline, trainer.rewards, prompts[s:s + size], keys[s:s + size],
                         f.sampling_steps, f.guidance_scale, trainer.size, f.noise_level, noisy_steps)
             for s in range(0, len(prompts), size)]
    raw = {name: torch.cat([part.raw[name] for part in parts]) for name in trainer.rewards.names}
    total = trainer.rewards.combine(trainer.rewards.normalize(raw, prompts, trainer.gather))
    return Round(prompts, torch.cat([part.latents for part in parts], 1), torch.cat([part.log_probs for part in parts],
                                                                                  1), raw, total,
                 group_advantages(total, f.group_size))


def minibatches(prompts, train_batch_size, num_inner_epochs, key):
    """The round's prompts (numbered 0..prompts-1) in the order GRPO trains on them: `num_inner_epochs` passes, each cut
    into minibatches of `train_batch_size` (the last may be short). The first pass keeps the sampling order, so its
    first minibatch is recomputed in the very micro-batches it was sampled in (on-policy: ratio 1, bit for bit on a
    CPU); each later pass is shuffled by a generator seeded with `key` and the pass, the same on every process.

        minibatches(4, 2, 2, (42, 0, 0))  # e.g. [[0, 1], [2, 3], [3, 0], [2, 1]]
    """
    order = []
    for inner in range(num_inner_epochs):
        ids = list(range(prompts)) if inner == 0 else torch.randperm(
            prompts, generator=torch.Generator().manual_seed(noise_seed("minibatches", *key, inner))).tolist()
        order += [ids[s:s + train_batch_size] for s in range(0, prompts, train_batch_size)]
    return order


def grpo_train(trainer, samples, images, noisy_steps, finite=None):
    """One optimizer step's forward and backward: the clipped ratio loss of the round `samples`' `images` (a
    minibatch, whole groups) against their sampling log-probabilities (plus --kl_beta times the KL to the base: the
    same denoiser, its LoRA switched off) over the trained steps, a micro-batch at a time, each micro-batch's share of
    the minibatch's mean back-propagated step by step; the processes' gradients are averaged at the last backward
    only. finite(loss) -> False drops the step (returns None). Returns train_on_trajectory's means over the minibatch, the advantages'
    mean and std (after the clamp), the mean within-group std of the total reward and the reward's and each raw
    score's mean. Reads trainer.accelerator, .model, .pipeline, .size, .accumulate (the loop's: a micro-batch's
    context, gradients synchronised when told) and .flags (as sample_round, and clip_range, kl_beta).

        stats = grpo_train(trainer, samples, list(range(16)), trained_steps(pipeline.scheduler))
    """
    f, accelerator, model, pipeline = trainer.flags, trainer.accelerator, trainer.model, trainer.pipeline
    plan = schedule(pipeline, f.sampling_steps, samples.latents[0])
    inner = accelerator.unwrap_model(model)

    @contextlib.contextmanager
    def lora_off():
        inner.disable_adapters()
        try:
            yield
        finally:
            inner.enable_adapters()

    size = micro_batch(f)
    chunks = [images[s:s + size] for s in range(0, len(images), size)]
    totals = dict.fromkeys(("loss", "policy_loss", "kl", "clipped"), 0.0)
    for n, chunk in enumerate(chunks):
        cond = conditioning(pipeline, [samples.prompts[k] for k in chunk], f.guidance_scale, trainer.size)
        share = len(chunk) / len(images)  # the minibatch's loss is the mean over its images
        last_chunk = n == len(chunks) - 1
        done = train_on_trajectory(
            lambda x, i: denoise(pipeline, model, x, plan.timesteps[i], cond, f.guidance_scale), plan.scheduler,
            samples.latents[:, chunk], samples.log_probs[:, chunk], samples.advantages[chunk], noisy_steps,
            f.clip_range, f.kl_beta, lambda loss: accelerator.backward(loss * share), lora_off, f.noise_level,
            lambda last: trainer.accumulate(last and last_chunk), finite)
        if done is None:
            return None
        for key in totals:
            totals[key] += done[key] * share
    used = samples.advantages[images].clamp(-ADVANTAGE_CLIP, ADVANTAGE_CLIP)
    total = samples.total[images].float()
    return {**totals, "adv_mean": used.mean().item(), "adv_std": used.std(unbiased=False).item(),
            "reward_std": total.view(-1, f.group_size).std(1, unbiased=False).mean().item(),
            "reward": total.mean().item(), **{f"reward_{name}": values[images].float().mean().item()
                                              for name, values in samples.raw.items()}}


# ---- the method the training loop calls ----------------------------------------------------------------------------

# GRPO's diagnostics, per optimizer step: the clipped surrogate alone, the KL to the base, the share of ratios outside
# the clip range, the advantages' mean and spread (after the clamp), the mean within-group std of the total reward (the
# signal the advantages standardise) and the LoRA gradient's norm before clipping (the loop's)
METRICS = ("policy_loss", "kl", "clipped", "adv_mean", "adv_std", "reward_std", "grad_norm")


# what a GRPO checkpoint trained; a checkpoint saying otherwise is of an older version and is refused
VERSION = "rounds of minibatches over the noisy steps (--sample_batch_size, --num_inner_epochs)"


def run_flags(flags):
    """The GRPO flags a checkpoint must share to be resumed (VERSION first: an older version's is refused naming it)."""
    return {"grpo_steps": VERSION, "group_size": flags.group_size, "clip_range": flags.clip_range,
            "timestep_fraction": flags.timestep_fraction, "kl_beta": flags.kl_beta, "noise_level": flags.noise_level,
            "sample_batch_size": flags.sample_batch_size, "num_inner_epochs": flags.num_inner_epochs}


def prepare(trainer):
    """GRPO's optimizer steps for the training loop: the sampler checked (InputError unless its trained steps inject
    noise), the round's start kept in checkpoints; returns the iterator rounds() makes."""
    f = trainer.flags
    probe = start_noise(trainer.pipeline, [()], trainer.size)
    scheduler = schedule(trainer.pipeline, f.sampling_steps, probe).scheduler
    check_noisy_sampler(scheduler, f.noise_level)
    noisy = trained_steps(scheduler, f.timestep_fraction, f.noise_level)
    start = RoundStart(trainer.lora_params, trainer.rewards)
    trainer.keep_in_checkpoints(start)
    return rounds(trainer, noisy, start)


class RoundStart:
    """The LoRA and the prompt buffers as they were when the round in flight was sampled. A checkpoint keeps them
    (accelerate's register_for_checkpointing), so a run resumed mid-round samples that round again, image for image,
    and goes on with the minibatches it had left."""

    def __init__(self, lora_params, rewards):
        self.lora_params, self.rewards, self.state = lora_params, rewards, {}

    @contextlib.contextmanager
    def sampling(self, resumed):
        """The context a round is sampled in: a new round's start is noted; a resumed round is sampled under the LoRA
        and buffers it started with, and the LoRA the checkpoint holds is put back after."""
        if not resumed:
            self.state = {"lora": [p.detach().clone() for p in self.lora_params],
                          "prompt_stats": copy.deepcopy(self.rewards.prompt_state())}  # buffers change in place
            yield
            return
        now = [p.detach().clone() for p in self.lora_params]
        self._load(self.state["lora"])
        self.rewards.load_prompt_state(self.state["prompt_stats"])
        try:
            yield
        finally:
            self._load(now)

    def _load(self, tensors):
        with torch.no_grad():
            for param, value in zip(self.lora_params, tensors):
                param.copy_(value)

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def rounds(trainer, noisy_steps, start):
    """GRPO's optimizer steps: for each batch of prompts (a round), sample it, then train its minibatches, yielding
    each optimizer step's metrics (averaged over the processes), or None when the non-finite guard dropped the step
    (a non-finite reward drops every step of its round, a non-finite loss its own). trainer.progress holds the
    position: the round's batch stays unconsumed (epoch, batches_done) until its last update, and round_updates counts
    the updates taken on it, so a checkpoint mid-round resumes there."""
    f, progress, rewards = trainer.flags, trainer.progress, trainer.rewards
    for batch in trainer.batches:
        resumed = progress.get("round_updates", 0)
        step = progress["step"] + 1
        with start.sampling(resumed):
            samples = sample_round(trainer, batch.prompts, batch.keys, noisy_steps)
        scored = trainer.finite(samples.total.sum(), step, batch.prompts,
                                rewards.nonfinite_message(samples.raw, samples.prompts))
        trainer.guard.end_window()  # a non-finite reward drops every step of its round (scored False), none taken
        order = minibatches(len(batch.prompts), f.train_batch_size, f.num_inner_epochs,
                            (f.seed, batch.epoch, batch.index))
        for update in range(resumed, len(order)):
            step = progress["step"] + 1
            images = [p * f.group_size + k for p in order[update] for k in range(f.group_size)]
            stats = grpo_train(trainer, samples, images, noisy_steps, lambda loss: trainer.finite(
                loss, step, [samples.prompts[k] for k in images[::f.group_size]])) if scored else None
            taken = trainer.guard.end_window() and stats is not None
            if update + 1 < len(order):
                progress["round_updates"] = update + 1
            else:
                progress.update(epoch=batch.epoch, batches_done=batch.index + 1, round_updates=0)
            yield trainer.average(stats) if taken else None
