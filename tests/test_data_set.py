import io

import open_clip
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from social_reward.errors import InputError
from data_set import PromptImagePair, load_pairs

from conftest import TINY_CLIP as TINY_CLIP_PATH


def test_readme_example_works_unchanged(shapes_pairs, tmp_path):
    shapes_pairs.to_parquet(tmp_path / "data.parquet")
    df = pd.read_parquet(tmp_path / "data.parquet")
    preprocess_fn = torchvision.transforms.Compose([torchvision.transforms.Resize(224), torchvision.transforms.ToTensor()])
    dataset = PromptImagePair(df, preprocess_fn)
    text, pos_img, neg_img = dataset[0]
    assert text.shape == (77,) and text.dtype == torch.long
    assert pos_img.shape == neg_img.shape == (3, 224, 224)
    assert len(dataset) == 24


def test_items_are_the_prompts_clip_tokens_and_both_preprocessed_images(shapes_pairs):
    seen = []
    dataset = PromptImagePair(shapes_pairs, lambda image: seen.append(image.filename) or torch.zeros(1))
    text, _, _ = dataset[3]
    assert seen == [shapes_pairs.pos_path[3], shapes_pairs.neg_path[3]]
    assert torch.equal(text, open_clip.get_tokenizer("ViT-L-14-quickgelu")(shapes_pairs.prompt[3])[0])


def test_long_prompts_are_truncated_to_77_tokens_with_end_of_text_last(shapes_pairs):
    shapes_pairs.loc[0, "prompt"] = "a very long prompt " * 40
    text, _, _ = PromptImagePair(shapes_pairs, torchvision.transforms.ToTensor())[0]
    assert text.shape == (77,)
    assert text[-1].item() == 49407  # <end_of_text>


def test_a_tokenizer_can_be_passed(shapes_pairs):
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    text, _, _ = PromptImagePair(shapes_pairs, torchvision.transforms.ToTensor(), tokenizer)[0]
    assert text.shape == (16,)


def test_parquet_path_and_dataframe_give_the_same_items(shapes_pairs, tmp_path):
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    from_file = PromptImagePair(str(tmp_path / "pairs.parquet"), torchvision.transforms.ToTensor())[5]
    from_frame = PromptImagePair(shapes_pairs, torchvision.transforms.ToTensor())[5]
    assert all(torch.equal(a, b) for a, b in zip(from_file, from_frame))


def test_a_truncated_jpeg_loads_as_in_the_original(shapes_pairs, tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    shapes_pairs.loc[0, "pos_path"] = str(truncated)
    _, pos_img, _ = PromptImagePair(shapes_pairs, torchvision.transforms.ToTensor())[0]
    assert pos_img.shape == (3, 64, 64)


def test_a_missing_column_is_named(shapes_pairs):
    with pytest.raises(InputError, match="missing column 'neg_path'"):
        load_pairs(shapes_pairs.drop(columns="neg_path"))


def test_a_null_prompt_names_its_row(shapes_pairs):
    shapes_pairs.loc[7, "prompt"] = None
    with pytest.raises(InputError, match="row 7, column 'prompt'"):
        load_pairs(shapes_pairs)


def test_a_missing_image_file_names_the_row_and_path(shapes_pairs):
    shapes_pairs.loc[4, "neg_path"] = "/nowhere/image.png"
    with pytest.raises(InputError, match="row 4, column 'neg_path': no such image file '/nowhere/image.png'"):
        load_pairs(shapes_pairs)


def test_an_unreadable_image_names_the_file(shapes_pairs, tmp_path):
    (tmp_path / "not_an_image.png").write_text("hello")
    shapes_pairs.loc[2, "pos_path"] = str(tmp_path / "not_an_image.png")
    with pytest.raises(InputError, match="not_an_image.png: cannot read image"):
        PromptImagePair(shapes_pairs, torchvision.transforms.ToTensor())[2]


def test_zero_rows_missing_and_non_parquet_files_are_named(shapes_pairs, tmp_path):
    with pytest.raises(InputError, match="no rows"):
        load_pairs(shapes_pairs.iloc[:0])
    with pytest.raises(InputError, match="missing.parquet: no such parquet file"):
        load_pairs(str(tmp_path / "missing.parquet"))
    (tmp_path / "pairs.csv").write_text("prompt,pos_path,neg_path\n")
    with pytest.raises(InputError, match="pairs.csv: not a readable parquet file"):
        load_pairs(str(tmp_path / "pairs.csv"))


def test_a_large_jpeg_is_decoded_at_reduced_scale_keeping_twice_the_resize_target(tmp_path):
    from social_reward.data.images import DRAFT_MARGIN, open_image, resize_target
    Image.effect_noise((1600, 1200), 40).convert("RGB").save(tmp_path / "large.jpg", quality=90)
    Image.effect_noise((1600, 1200), 40).convert("RGB").save(tmp_path / "large.png")
    preprocess = torchvision.transforms.Compose([torchvision.transforms.Resize(64), torchvision.transforms.ToTensor()])
    assert resize_target(preprocess) == 64
    sizes = []
    record = lambda image: sizes.append(image.size) or preprocess(image)  # noqa: E731
    open_image(str(tmp_path / "large.jpg"), record, draft_size=64)
    open_image(str(tmp_path / "large.png"), record, draft_size=64)  # only JPEGs have a reduced-scale decode
    assert 64 * DRAFT_MARGIN <= min(sizes[0]) < 1200 and sizes[1] == (1600, 1200)


def test_images_are_decoded_in_full_by_default_and_at_reduced_scale_only_with_fast_decode(tmp_path):
    from social_reward.models.clip import load_model
    Image.effect_noise((1600, 1200), 40).convert("RGB").save(tmp_path / "large.jpg", quality=90)
    pairs = pd.DataFrame({"prompt": ["noise"], "pos_path": [str(tmp_path / "large.jpg")],
                          "neg_path": [str(tmp_path / "large.jpg")]})
    preprocess = load_model(TINY_CLIP_PATH, pretrained="none")[1]
    with Image.open(tmp_path / "large.jpg") as image:
        original = preprocess(image)  # the original: PIL opens the file, the transform sees every pixel
    _, default, _ = PromptImagePair(pairs, preprocess)[0]
    _, fast, _ = PromptImagePair(pairs, preprocess, fast_decode=True)[0]
    assert (default - original).abs().max() < 1e-6
    assert (fast - original).abs().max() > 1e-3


def test_importing_the_package_leaves_pils_truncated_images_setting_alone():
    """Only decoding training or scoring data loads truncated images (as the original's loader did); an import, such as
    the scoring server's, leaves PIL as it is."""
    import subprocess
    import sys
    code = ("import PIL.ImageFile, social_reward.data.pairs, social_reward.scoring.encoding, "
            "social_reward.serving.decoding, social_reward.training.clip; print(PIL.ImageFile.LOAD_TRUNCATED_IMAGES)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
