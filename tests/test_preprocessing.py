"""Preprocessing as each model's own code does it: the pickscore: crop as transformers' CLIPImageProcessor computes
it, and the tensor path (a reward's) from an open_clip model's own preprocess configuration."""
from dataclasses import asdict

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, require_extra
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision.transforms.functional import to_tensor

from social_reward.models.clip import load_model
from social_reward.scorers.registry import load_scorer
from social_reward.scorers.preprocess import open_clip_tensor_preprocess
from test_scorers_and_compare import save_tiny_pickscore

require_extra('peers', 'transformers')

PROMPT = "two red circles"
# resized to 32 on the shortest side, each leaves an odd excess on the long side (torchvision and transformers then
# crop a pixel apart); the last is square
ODD_SIZES = [(93, 64), (64, 101), (47, 33), (33, 57), (77, 40), (48, 48)]


@pytest.fixture(scope="module")
def odd_images():
    return [Image.effect_noise(size, 40 + 7 * i).convert("RGB").resize(size) for i, size in enumerate(ODD_SIZES)]


@pytest.fixture(scope="module")
def pickscore_folder(tmp_path_factory):
    return save_tiny_pickscore(tmp_path_factory.mktemp("pickscore") / "pickscore")


def transformers_pickscore(folder, images):
    """PickScore's own code path: CLIPImageProcessor, CLIPModel, logit_scale.exp() * cosine."""
    from transformers import CLIPImageProcessor, CLIPModel
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt").pixel_values
        image_features = model.get_image_features(pixel_values=pixels)
        # the same token ids (CLIP's BPE, as open_clip has it): transformers' tokenizer needs files from the hub
        text_features = model.get_text_features(input_ids=open_clip.get_tokenizer("ViT-L-14")([PROMPT]))
        image_features, text_features = (getattr(f, "pooler_output", f) for f in (image_features, text_features))
        return pixels, model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features)[0]


def pickscore_scores(scorer, pixels):
    with torch.no_grad():
        text = scorer.model.encode_text(scorer.tokenizer([PROMPT]))
        return scorer.model.encode_image(pixels) @ text[0]  # the text embedding carries logit_scale.exp()


def test_pickscore_equals_clip_image_processor_and_clip_model_on_odd_sized_images(pickscore_folder, odd_images):
    scorer = load_scorer(f"pickscore:{pickscore_folder}")
    their_pixels, theirs = transformers_pickscore(pickscore_folder, odd_images)
    pixels = torch.stack([scorer.preprocess(image) for image in odd_images])
    assert pixels.shape == their_pixels.shape
    assert torch.allclose(pixels, their_pixels, atol=1e-5)
    assert torch.allclose(pickscore_scores(scorer, pixels), theirs, atol=1e-4)


def test_pickscore_tensor_path_crops_where_its_pil_path_does(pickscore_folder, odd_images):
    scorer = load_scorer(f"pickscore:{pickscore_folder}")
    _, theirs = transformers_pickscore(pickscore_folder, odd_images)
    # a reward's float images: the same resize and crop, without the uint8 rounding between them
    pixels = torch.cat([scorer.tensor_preprocess(to_tensor(image)[None]) for image in odd_images])
    assert torch.allclose(pickscore_scores(scorer, pixels), theirs, atol=2e-2)
    shifted = torch.cat([scorer.tensor_preprocess(to_tensor(image)[None, :, :, 1:]) for image in odd_images[:1]])
    assert not torch.allclose(shifted, pixels[:1], atol=1e-2)  # a pixel off would show


@pytest.fixture(scope="module")
def squash_bilinear_clip():
    """The tiny CLIP whose own preprocess config asks for squashing, bilinear, and its own mean/std (as a pretrained
    tag's config sets it), with the PIL transform load_model builds from it."""
    torch.manual_seed(0)
    clip = load_model(TINY_CLIP, pretrained="none")[0]
    set_model_preprocess_cfg(clip, {**clip.visual.preprocess_cfg, "resize_mode": "squash", "interpolation": "bilinear",
                                    "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)})
    return clip, image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)


def test_tensor_and_pil_preprocessing_agree_for_a_squash_bilinear_open_clip_config(squash_bilinear_clip, odd_images):
    clip, preprocess = squash_bilinear_clip
    cfg = clip.visual.preprocess_cfg
    assert (cfg["resize_mode"], cfg["interpolation"]) == ("squash", "bilinear")
    tensor_preprocess = open_clip_tensor_preprocess(cfg)
    for image in odd_images:
        on_pil, on_tensor = preprocess(image), tensor_preprocess(to_tensor(image)[None])[0]
        assert on_tensor.shape == on_pil.shape == (3, 64, 64)
        # PIL rounds its resized pixels to 1/255; nothing else differs (a crop instead would be far off)
        assert (on_tensor - on_pil).abs().max() < 1.5 / 255 / min(cfg["std"])
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(TINY_CLIP)([PROMPT])
        text = clip.encode_text(tokens, normalize=True)
        pil_scores = clip.encode_image(torch.stack([preprocess(i) for i in odd_images]), normalize=True) @ text[0]
        tensor_scores = clip.encode_image(torch.cat([tensor_preprocess(to_tensor(i)[None]) for i in odd_images]),
                                          normalize=True) @ text[0]
    assert torch.allclose(tensor_scores, pil_scores, atol=5e-3)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [32, (32, 40)])
def test_every_open_clip_preprocess_config_has_the_same_pixels_on_tensors(resize_mode, interpolation, size, odd_images):
    cfg = asdict(PreprocessCfg(size=size, interpolation=interpolation, resize_mode=resize_mode))
    preprocess, tensor_preprocess = image_transform_v2(PreprocessCfg(**cfg), is_train=False), open_clip_tensor_preprocess(cfg)
    for image in odd_images:
        on_pil, on_tensor = preprocess(image), tensor_preprocess(to_tensor(image)[None])[0]
        assert on_tensor.shape == on_pil.shape
        # bicubic overshoots: PIL clips it to 0..255, the tensor keeps it; the mean difference stays at the rounding
        assert (on_tensor - on_pil).abs().mean() < 2 / 255 / min(cfg["std"])
