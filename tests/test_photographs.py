import os
import random

import pandas as pd
import skimage
from conftest import MICRO_CLIP

from train_pair_pos_neg import finetune_model
from validate import validate_image_pair_classifier

# the 19 real photographs shipped inside the scikit-image wheel, each with what a person would prompt for it
PHOTOGRAPHS = {
    "astronaut.png": "an astronaut in a white spacesuit in front of a flag",
    "brick.png": "a grey brick wall",
    "camera.png": "a photographer with a camera on a tripod",
    "cell.png": "a living cell under a microscope",
    "chelsea.png": "a ginger tabby cat",
    "clock_motion.png": "a clock on a wall, blurred by motion",
    "coffee.png": "a cup of coffee on a saucer",
    "coins.png": "old coins on a table",
    "grass.png": "a close-up of green grass",
    "gravel.png": "a close-up of gravel",
    "hubble_deep_field.jpg": "galaxies in deep space",
    "ihc.png": "stained tissue seen through a microscope",
    "moon.png": "the cratered surface of the moon",
    "motorcycle_left.png": "a motorcycle in a workshop",
    "page.png": "a printed page of text",
    "retina.jpg": "the retina of an eye",
    "rocket.jpg": "a rocket on the launch pad",
    "text.png": "a sign with painted text",
    "microaneurysms.png": "a photograph of blood vessels in an eye",
}


def test_a_small_model_learns_nineteen_real_photographs_from_chance_to_90_percent(tmp_path, micro_init):
    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    paths = {name: os.path.join(folder, name) for name in PHOTOGRAPHS}
    rng = random.Random(0)
    rows = [{"prompt": PHOTOGRAPHS[name], "pos_path": paths[name], "neg_path": paths[other]}
            for name in PHOTOGRAPHS for other in rng.sample([n for n in PHOTOGRAPHS if n != name], 2)]
    pairs = pd.DataFrame(rows)  # 38 pairs
    before = validate_image_pair_classifier(pairs, micro_init, "cpu", num_workers=0, model=MICRO_CLIP)
    final = finetune_model(pairs, "all", batch_size=8, n_epochs=8, save_folder=str(tmp_path / "run"),
                           checkout_path=micro_init, learning_rate=1e-3, model=MICRO_CLIP, num_workers=2)
    after = validate_image_pair_classifier(pairs, final, "cpu", num_workers=0, model=MICRO_CLIP)
    assert before <= 0.7 and after >= 0.9, (before, after)
