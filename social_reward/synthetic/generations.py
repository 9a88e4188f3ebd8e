"""A synthetic generator for the demo: images that draw their prompt's scene only sometimes (the world knows when),
in the generations table layout scripts/generate.py writes, with `follows`, the truth.

    candidates = make_generations("candidates/", "candidates", n_prompts=40, samples=8, follow_rate=0.25, seed=7)
"""
import os
import random

import pandas as pd

from social_reward.synthetic.shapes import SCENES, draw, prompt_for


def make_generations(folder, generator, n_prompts, samples, follow_rate, seed):
    """A synthetic generator: for each of `n_prompts` prompts, `samples` images that draw the prompt's scene with
    probability `follow_rate` (else another scene); the table as generate.py writes it, with `follows` (the truth)."""
    os.makedirs(folder, exist_ok=True)
    rng, scene_rng = random.Random(seed), random.Random(1234)  # the same prompts for every generator
    rows = []
    for p, scene in enumerate(scene_rng.sample(SCENES, n_prompts)):
        for k in range(samples):
            follows = rng.random() < follow_rate
            path = os.path.join(folder, f"{p:03d}_{k}.png")
            draw(*(scene if follows else rng.choice([s for s in SCENES if s != scene])), rng).save(path)
            rows.append({"generator": generator, "prompt": prompt_for(*scene), "sample": k, "image": path,
                         "follows": follows})
    return pd.DataFrame(rows)
