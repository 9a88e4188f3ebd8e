"""Social Reward (ICLR 2024) on open_clip: a CLIP reward model learnt from a community's implicit feedback, and the
toolkit around it. A folder a capability (docs/architecture.md draws the layers):

    models/      CLIP loading, weights files, training modes, export     data/       pair layouts, images, orders
    scorers/     every reward model, one registry                       scoring/    images and prompts to scores
    reward/      the reward as a function, normalised and mixed         serving/    the reward behind HTTP
    mining/      community logs to pairs (DuckDB, Spark)               generators/ diffusers families, sampling, methods
    training/    both trainers and what they share                      synthetic/  the demo's world

    from social_reward.scoring.validation import validate_image_pair_classifier
    from social_reward.reward.mix import reward_fn
"""
