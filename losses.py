"""The original's import path of the losses: `from losses import TripletLoss` (its notebooks' import). The losses
live in social_reward/training/losses.py; this module hands them on.

    loss_fn = TripletLoss(margin=0.3)
"""
from social_reward.training.losses import PairwiseLoss, TripletLoss  # noqa: F401
