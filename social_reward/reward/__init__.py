"""The reward as a function for other people's loops: differentiable (Reward), several on one scale (the one
normalisation rule, RewardMix), the DDPO-style callable (reward_fn), and the same callable on a scoring server.
"""
