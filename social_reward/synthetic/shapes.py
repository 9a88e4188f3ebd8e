"""The demo's synthetic world of shapes: a prompt names a count, a colour and a shape ("two red circles"), and an
image draws it or draws another scene, so whether an image shows its prompt (its hidden quality) is always known.

    image = draw("two", "red", "circle", random.Random(0))
    pairs = make_pairs("pairs/", 100, seed=0)      # prompt, pos_path (draws it), neg_path (another scene)
"""
import os
import random

import pandas as pd
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (235, 210, 30),
           "purple": (140, 40, 170), "orange": (250, 130, 20)}


SHAPES = ("circle", "square", "triangle")


COUNTS = ("one", "two", "three")


SCENES = [(n, c, s) for n in COUNTS for c in COLOURS for s in SHAPES]


def prompt_for(count, colour, shape):
    return f"{count} {colour} {shape}{'s' if count != 'one' else ''}"


def draw(count, colour, shape, rng, size=64):
    """An image of `count` shapes of one colour, at random places and sizes, on a light background."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    canvas = ImageDraw.Draw(image)
    cells = rng.sample([(x, y) for x in range(2) for y in range(2)], COUNTS.index(count) + 1)
    for x, y in cells:  # one shape per quadrant, so shapes never overlap and the count stays readable
        r = rng.randint(size // 9, size // 5)
        cx = x * size // 2 + rng.randint(r, size // 2 - r)
        cy = y * size // 2 + rng.randint(r, size // 2 - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            canvas.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            canvas.rectangle(box, fill=COLOURS[colour])
        else:
            canvas.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def make_pairs(folder, n_pairs, seed):
    """Write `n_pairs` (prompt, matching image, image of another prompt) rows and their PNGs under `folder`."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n_pairs):
        scene, other = rng.sample(SCENES, 2)
        pos_path, neg_path = os.path.join(folder, f"{i}_pos.png"), os.path.join(folder, f"{i}_neg.png")
        draw(*scene, rng).save(pos_path)
        draw(*other, rng).save(neg_path)
        rows.append({"prompt": prompt_for(*scene), "pos_path": pos_path, "neg_path": neg_path})
    return pd.DataFrame(rows)
