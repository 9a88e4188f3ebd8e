"""DRaFT-K (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"): sample in
--sampling_steps steps, the last K with gradient, decode, score: loss = -reward. And the loop of the two pathwise
methods (the reward's gradient flows back through the sampler: DRaFT, and ReFL, refl.py), which refl.py shares.

The method as the training loop calls it (grpo.py and refl.py expose the same three names):

    columns = METRICS                 # its columns of metrics.csv beyond the loop's (none)
    run.update(run_flags(flags))      # the flags a checkpoint must share to be resumed (beyond the loop's)
    updates = prepare(trainer)        # each next(updates): one optimizer step's forward and backward, its metrics

    loss, reward, raw = draft_batch_loss(unet, pipeline, rewards, prompts, noise, 50, 1, 7.5, (512, 512))
"""
import torch

from social_reward.generators.sampling import conditioning, decode, sample_latents, start_noise

METRICS = ()


def run_flags(flags):
    return {}  # --grad_steps is among the loop's own


def draft_batch_loss(model, pipeline, rewards, prompts, noise, sampling_steps, grad_steps, guidance_scale, size,
                     gather=None):
    """(loss, total rewards, raw scores by scorer) of one DRaFT-K batch: sample from `noise` with gradient through the
    last `grad_steps` steps, decode, score (rewards: reward.RewardMix; each scorer normalised, then weighted); loss =
    -reward. `model`: the pipeline's denoiser (or accelerate's wrapper of it); `size`: (height, width); gather: the
    prompt buffers' gather under several processes."""
    cond = conditioning(pipeline, prompts, guidance_scale, size)
    latents = sample_latents(pipeline, model, noise, cond, sampling_steps, guidance_scale, grad_steps)
    raw = rewards.scores(decode(pipeline.vae, latents), prompts, check_finite=False)
    reward = rewards.combine(rewards.normalize(raw, prompts, gather))
    return -reward.mean(), reward, raw


def prepare(trainer):
    """DRaFT-K's optimizer steps for the training loop (pathwise_updates with draft_batch_loss)."""
    f = trainer.flags
    return pathwise_updates(trainer, lambda prompts, noise, step: draft_batch_loss(
        trainer.model, trainer.pipeline, trainer.rewards, prompts, noise, f.sampling_steps, f.grad_steps,
        f.guidance_scale, trainer.size, trainer.gather))


def pathwise_updates(trainer, batch_loss):
    """The optimizer steps of a pathwise method: each step's gradient accumulated over --gradient_accumulation_steps
    batches of --train_batch_size prompts (fewer at an epoch's end, as accelerate's accumulate ends a window there
    too), the processes' gradients averaged at its last batch. Yields each step's metrics (averaged over processes and
    batches), or None when a batch's loss was not finite (the guard then drops the whole step).
    batch_loss(prompts, noise, step) -> (loss, total rewards, raw scores by scorer). Reads trainer.accelerator,
    .batches, .progress, .pipeline, .size, .rewards and .flags.gradient_accumulation_steps.

        updates = pathwise_updates(trainer, lambda prompts, noise, step: draft_batch_loss(...))
    """
    accelerator, progress = trainer.accelerator, trainer.progress
    accumulation = trainer.flags.gradient_accumulation_steps or 1
    window, seen = 0, []
    for batch in trainer.batches:
        window += 1
        step = progress["step"] + 1
        last = window == accumulation or batch.last
        with trainer.accumulate(last):
            noise = start_noise(trainer.pipeline, batch.keys, trainer.size, accelerator.device)
            loss, reward, raw = batch_loss(batch.prompts, noise, step)
            if trainer.finite(loss, step, batch.prompts, trainer.rewards.nonfinite_message(raw, batch.prompts)):
                accelerator.backward(loss / accumulation)  # accelerate's accumulate scales the same way
                seen.append(trainer.average({"loss": loss.detach(), "reward": reward.detach().mean(), **{
                    f"reward_{name}": values.detach().mean() for name, values in raw.items()}}))
        if last:
            progress.update(epoch=batch.epoch, batches_done=batch.index + 1)
            taken = trainer.guard.end_window()
            yield {key: torch.tensor([s[key] for s in seen]).mean().item() for key in seen[0]} if taken else None
            window, seen = 0, []
