"""What every scorer kind hands the scoring code, and the checks of a spec's files that several kinds share.

A Scorer is what scoring/encoding.py (and so every script) uses of a model: `model.encode_image(images,
normalize=True)` and `model.encode_text(tokens, normalize=True)`, whose row-wise dot product is the model's own score
(ours: the cosine similarity; PickScore: logit_scale.exp() times it, its text embedding carrying the scale);
`preprocess` and `tokenizer`; `softmax_scale`, the logit scale Pick-a-Pic's tie-aware metric multiplies that score
by; `tensor_preprocess`, the preprocessing of a float tensor B x 3 x H x W in [0, 1], differentiable (for a reward's
gradient). A model whose text attends to the image (ImageReward, HPSv3, MPS) has no encode_text: `encode_image`
gives its image tokens and `pair_scores(image_features, tokens)` the score of each row; scoring/encoding.py scores it pair
by pair.
"""
import os
from dataclasses import dataclass

from social_reward.errors import InputError


@dataclass
class Scorer:
    model: object  # an nn.Module with encode_image and encode_text (or pair_scores)
    preprocess: object
    tokenizer: object
    softmax_scale: float = 100.0
    tensor_preprocess: object = None  # the same preprocessing on a B x 3 x H x W float tensor in [0, 1], differentiable


def check_weights_file(spec, path):
    """The spec's weights file exists (a folder there is most likely a PickScore model)."""
    if not os.path.isfile(path):
        raise InputError(f"--scorer {spec}: {path}: no such weights file" +
                         (" (a folder: a PickScore model? use pickscore:)" if os.path.isdir(path) else ""))


def check_folder_option(spec, options, option, holds):
    """The spec names the folder `option` (holding `holds`), and it exists."""
    kind = spec.partition(":")[0]
    if option not in options:
        raise InputError(f"--scorer {spec}: {kind} needs {option}=DIR, {holds}")
    if not os.path.isdir(options[option]):
        raise InputError(f"--scorer {spec}: {option}={options[option]}: no such folder ({holds})")
