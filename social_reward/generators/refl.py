"""ReFL (Xu et al. 2023, ImageReward's ReFL.py): the step it stops sampling at, drawn from the last quarter, and its
loss, relu(2 - reward) for ImageReward's standardised reward, -reward for any other, times 1e-3.

    stop = refl_stop(sampling_steps=40, seed=0, step=1)       # one of 30..39
    loss = refl_loss(rewards, normalised)
"""
import random

import torch

from social_reward.generators.sampling import noise_seed

REFL_MARGIN, REFL_GRAD_SCALE = 2.0, 1e-3  # ReFL.py: loss = relu(2 - reward).mean() * grad_scale (1e-3)


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
