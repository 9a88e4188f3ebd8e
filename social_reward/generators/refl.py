"""ReFL (Xu et al. 2023, ImageReward's ReFL.py): sample without gradient up to a step drawn from the last quarter, take
that step with gradient and its one-step prediction of the clean image, decode, score; the loss, relu(2 - reward) for
ImageReward's standardised reward, -reward for any other, times 1e-3. Its optimizer steps are DRaFT's loop
(draft.pathwise_updates) with this loss; the training loop calls it as it calls draft.py and grpo.py:

    columns = METRICS; run.update(run_flags(flags)); updates = prepare(trainer)

    stop = refl_stop(sampling_steps=40, seed=0, step=1)       # one of 30..39
    loss, reward, raw = refl_batch_loss(unet, pipeline, rewards, prompts, noise, 40, stop, 7.5, (512, 512))
"""
import random

import torch

from social_reward.generators.draft import pathwise_updates
from social_reward.generators.sampling import conditioning, decode, noise_seed, sample_latents

REFL_MARGIN, REFL_GRAD_SCALE = 2.0, 1e-3  # ReFL.py: loss = relu(2 - reward).mean() * grad_scale (1e-3)


METRICS = ()


def run_flags(flags):
    return {}


def refl_loss(rewards, normalised):
    """ReFL's loss, per scorer: ImageReward's relu(2 - reward) (its margin of 2 is in ImageReward's standardised
    units) for imagereward: scorers, -reward for every other, whose gradient does not vanish whatever its range
    (PickScore near 20, the aesthetic predictor near 5-7: the hinge would be flat there); weighted, times ReFL's 1e-3.
    """
    kinds = rewards.kinds()
    return REFL_GRAD_SCALE * sum(
        weight * (torch.relu(REFL_MARGIN - normalised[name]) if kinds[name] == "imagereward" else -normalised[name])
        for name, weight in zip(rewards.names, rewards.weights)).mean()


def refl_stop(sampling_steps, seed, step):
    """ReFL's stop step, drawn per optimizer step (the same on every process) from the last quarter of the steps."""
    late = max(1, sampling_steps // 4)
    return random.Random(noise_seed("refl", seed, step)).randrange(sampling_steps - late, sampling_steps)


def refl_batch_loss(model, pipeline, rewards, prompts, noise, sampling_steps, stop_at, guidance_scale, size,
                    gather=None):
    """(loss, total rewards, raw scores by scorer) of one ReFL batch: sample from `noise` without gradient up to step
    `stop_at`, run it with gradient and decode its one-step prediction of the clean latents, score (each scorer
    normalised, then weighted); loss = refl_loss."""
    cond = conditioning(pipeline, prompts, guidance_scale, size)
    latents = sample_latents(pipeline, model, noise, cond, sampling_steps, guidance_scale, stop_at=stop_at)
    raw = rewards.scores(decode(pipeline.vae, latents), prompts, check_finite=False)
    normalised = rewards.normalize(raw, prompts, gather)
    return refl_loss(rewards, normalised), rewards.combine(normalised), raw


def prepare(trainer):
    """ReFL's optimizer steps for the training loop: DRaFT's loop with a stop step drawn for each optimizer step."""
    f = trainer.flags
    return pathwise_updates(trainer, lambda prompts, noise, step: refl_batch_loss(
        trainer.model, trainer.pipeline, trainer.rewards, prompts, noise, f.sampling_steps,
        refl_stop(f.sampling_steps, f.seed, step), f.guidance_scale, trainer.size, trainer.gather))
