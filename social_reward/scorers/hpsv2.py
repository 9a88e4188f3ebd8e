"""hpsv2: HPS v2 / v2.1 (Wu et al. 2023), an open_clip ViT-H-14 whose file holds {"state_dict": ...}; its score is
the cosine similarity, on images padded to a square as HPS v2 evaluates them.

    scorer = load_scorer("hpsv2:HPS_v2.1_compressed.pt")
"""
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision.transforms import Compose, ToTensor

from social_reward.models.clip import load_model
from social_reward.scorers.base import Scorer, check_weights_file
from social_reward.scorers.preprocess import TensorPreprocess


def hps_tensor_preprocess(size=224):
    """HPS v2's evaluation preprocessing on a tensor: the longest side to `size` (bicubic, antialiased) and padded with
    0, centred, OpenAI's mean/std (its ResizeMaxSize, which runs on a tensor)."""
    return TensorPreprocess(size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode="longest")


def hps_preprocess(size=224):
    """HPS v2's evaluation preprocessing of a PIL image: RGB (an RGBA image too: the model takes 3 channels), ToTensor,
    then hps_tensor_preprocess. HPS v2 skips the padding too when the longest side is already `size`; this pads such
    an image, so that every image has the model's input shape."""
    return Compose([lambda image: image.convert("RGB"), ToTensor(), hps_tensor_preprocess(size)])


def check(spec, path, options):
    check_weights_file(spec, path)


def load(path, options, device):
    model, _, tokenizer = load_model(options.get("model", "ViT-H-14"), path, None, device)
    size = model.visual.image_size[0]
    return Scorer(model, hps_preprocess(size), tokenizer, model.logit_scale.exp().item(), hps_tensor_preprocess(size))
