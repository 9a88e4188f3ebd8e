import math
import os
import subprocess
import sys

import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from conftest import ROOT, TINY_CLIP, run_script, require_extra
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from social_reward.models.clip import load_model
from social_reward.scoring.comparison import compare
from social_reward.scoring.intervals import wilson_interval
from social_reward.scorers.registry import load_scorer
from social_reward.scoring.ranking import rank_images, score_images
from social_reward.scoring.validation import evaluate_source

require_extra('peers', 'transformers')
require_extra('mine', 'duckdb', 'sqlglot')

PROMPT = "two red circles"


@pytest.fixture
def images(tmp_path):
    """Six images of different sizes and aspect ratios (HPS v2 pads them), one RGBA."""
    paths = []
    for i, (size, mode) in enumerate([((80, 60), "RGB"), ((50, 90), "RGB"), ((64, 64), "RGBA"), ((120, 40), "RGB"),
                                      ((33, 47), "RGB"), ((200, 150), "RGB")]):
        image = Image.effect_noise(size, 30 + 10 * i).convert(mode)
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    return paths


def save_tiny_pickscore(folder):
    """A tiny random transformers CLIPModel (32 px images), saved as PickScore_v1's folder is."""
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                         max_position_embeddings=77, vocab_size=49408),
                        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=32)
    CLIPModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def pickscore_folder(tmp_path):
    return save_tiny_pickscore(tmp_path / "pickscore")


def test_pickscore_scores_are_transformers_own_cosine_times_logit_scale(pickscore_folder, images):
    from transformers import CLIPImageProcessor, CLIPModel
    ours = rank_images(PROMPT, images, scorer=f"pickscore:{pickscore_folder}", device="cpu", num_workers=0)
    model = CLIPModel.from_pretrained(pickscore_folder).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt").pixel_values
        image_features = model.get_image_features(pixel_values=pixels)
        # the same token ids (CLIP's BPE, as open_clip has it): transformers' tokenizer needs files from the hub
        text_features = model.get_text_features(input_ids=open_clip.get_tokenizer("ViT-L-14")([PROMPT]))
        image_features, text_features = (getattr(f, "pooler_output", f) for f in (image_features, text_features))
        expected = model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1)[0]
    theirs = pd.Series(expected.numpy(), index=images)
    assert ours.score.values == pytest.approx(theirs[ours.path].values, abs=1e-4)
    assert list(ours.path) == list(theirs.sort_values(ascending=False).index)


def test_hpsv2_scores_equal_its_preprocessing_and_scoring_rebuilt_step_by_step(tmp_path, images):
    torch.manual_seed(0)
    model = load_model(TINY_CLIP, pretrained="none")[0]
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "HPS_tiny.pt")
    scorer = load_scorer(f"hpsv2:{tmp_path / 'HPS_tiny.pt'},model={TINY_CLIP}")
    ours = score_images(PROMPT, images, scorer.model, scorer.preprocess, scorer.tokenizer)
    expected = []
    for path in images:  # hpsv2 img_score.score: ResizeMaxSize(224) on the tensor, pad 0, normalize; model(image, text)
        tensor = TF.to_tensor(Image.open(path).convert("RGB"))
        height, width = tensor.shape[1:]
        scale = 64 / max(height, width)
        new = tuple(round(d * scale) for d in (height, width))
        tensor = TF.resize(tensor, new, TF.InterpolationMode.BICUBIC)
        pad_h, pad_w = 64 - new[0], 64 - new[1]
        tensor = TF.pad(tensor, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        tensor = TF.normalize(tensor, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        with torch.no_grad():
            image_features, text_features, _ = model.eval()(tensor[None], open_clip.get_tokenizer("ViT-L-14")([PROMPT]))
        expected.append((image_features @ text_features.T).item())
    assert torch.allclose(ours, torch.tensor(expected), atol=1e-6)


def test_the_aesthetic_score_is_its_mlp_on_the_normalized_image_embedding(tmp_path, images, tiny_init):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "aesthetic.pth")
    ranking = rank_images("any prompt at all", images, scorer=f"aesthetic:{tmp_path / 'aesthetic.pth'},clip={tiny_init},"
                          f"model={TINY_CLIP}", device="cpu", num_workers=0)
    clip, preprocess, _ = load_model(TINY_CLIP, checkout_path=tiny_init)
    with torch.no_grad():
        expected = mlp(clip.encode_image(torch.stack([preprocess(Image.open(p)) for p in ranking.path]), normalize=True))
    assert ranking.score.values == pytest.approx(expected[:, 0].numpy(), abs=1e-5)


def test_the_95_percent_interval_is_wilsons_computed_by_hand():
    # 8 of 10: p = 0.8, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96 * sqrt(0.016 + 0.009604) / 1.38416
    p, low, high = wilson_interval(8, 10)
    centre, half = (0.8 + 1.96 ** 2 / 20) / (1 + 1.96 ** 2 / 10), 1.96 * math.sqrt(0.016 + 1.96 ** 2 / 400) / (1 + 1.96 ** 2 / 10)
    assert p == 0.8 and (low, high) == pytest.approx((centre - half, centre + half))
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_compare_accuracy_per_scorer_equals_validate_and_the_picture_has_a_column_per_scorer(shapes_pairs, tiny_init,
                                                                                              tmp_path):
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    torch.manual_seed(1)
    torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), tmp_path / "other.pth")
    scorers = {"a": f"clip:{tiny_init},model={TINY_CLIP}", "b": f"clip:{tmp_path / 'other.pth'},model={TINY_CLIP}"}
    table = compare([str(tmp_path / "pairs.parquet")], scorers, out=str(tmp_path / "out"), prompts=3, device="cpu",
                    num_workers=0)
    for name, spec in scorers.items():
        expected = evaluate_source(str(tmp_path / "pairs.parquet"), device="cpu", num_workers=0, scorer=spec)["accuracy"]
        assert table[table.scorer == name].accuracy.item() == pytest.approx(100 * expected)
    agreement = pd.read_csv(tmp_path / "out" / "agreement.csv", index_col=0)
    assert agreement.loc["a", "a"] == 1.0 and 0 <= agreement.loc["a", "b"] <= 1
    assert open(tmp_path / "out" / "table.md").read().startswith("| scorer |")
    with Image.open(tmp_path / "out" / "comparison.png") as picture:
        assert picture.size[0] == 2 * 192 and picture.size[1] == 3 * (34 + 192 + 24)


def test_a_killed_compare_resumes_without_rescoring(shapes_pairs, tiny_init, tmp_path):
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    first = f"a=clip:{tiny_init},model={TINY_CLIP}"
    weights = tmp_path / "b.pth"
    torch.save(torch.load(tiny_init, weights_only=True), weights)
    command = [sys.executable, "scripts/compare.py", str(tmp_path / "pairs.parquet"), "--scorer", first, "--scorer",
               f"b=clip:{weights},model={TINY_CLIP}", "--out", str(tmp_path / "out"), "--device", "cpu"]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in run.stdout:  # killed as soon as the second scorer starts: the first one's scores are on disk
        if line.startswith("b: scoring"):
            run.kill()
            break
    run.wait()
    assert not (tmp_path / "out" / "table.csv").exists()
    os.chmod(tiny_init, 0)  # scorer a's weights can no longer be read: a rerun must not load them
    try:
        result = run_script(*command[1:])
    finally:
        os.chmod(tiny_init, 0o644)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a: scoring" not in result.stdout and "b: scoring" in result.stdout
    assert len(pd.read_csv(tmp_path / "out" / "table.csv")) == 2


@pytest.mark.parametrize("make, scorer, expected", [
    (None, "x=resnet:model.pt", "--scorer resnet:model.pt: unknown kind 'resnet'"),
    (None, "x=clip:{init},layers=3", "unknown option 'layers' for clip"),
    ("hps", "x=pickscore:{tmp}/HPS.pt", "pickscore takes a transformers model folder"),
    ("folder", "x=pickscore:{tmp}/empty", "has no config.json: not a transformers model folder"),
    (None, "x=clip:{init}", "the name 'x' is given twice"),
])
def test_bad_scorers_end_in_one_line_naming_the_spec(make, scorer, expected, shapes_pairs, tiny_init, tmp_path):
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    if make == "hps":
        torch.save({"state_dict": torch.load(tiny_init, weights_only=True)}, tmp_path / "HPS.pt")
    if make == "folder":
        (tmp_path / "empty").mkdir()
    specs = [scorer.format(init=tiny_init, tmp=tmp_path)]
    if "twice" in expected:
        specs.append(specs[0])
    result = run_script("scripts/compare.py", str(tmp_path / "pairs.parquet"), *[a for s in specs for a in ("--scorer", s)],
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


def test_the_demo_shows_the_fine_tuned_model_ahead_and_enhancing_generators(tmp_path, capsys):
    from demo import run_demo
    result = run_demo(str(tmp_path / "demo"), n_train=400, n_val=60, n_epochs=2)
    table = pd.read_csv(tmp_path / "demo" / "comparison" / "table.csv").set_index("scorer")
    assert table.accuracy["after"] > table.accuracy["before"]
    assert table.accuracy["after"] == pytest.approx(100 * result["after"])
    assert table.accuracy["before"] == pytest.approx(100 * result["before"])
    assert (tmp_path / "demo" / "comparison" / "comparison.png").exists()
    # best of 8 under the fine-tuned reward keeps far more images that draw their prompt than under the random one
    shares = result["best_of_8"]
    assert shares["after"] > shares["before"] + 0.2, shares
    assert f"best of 8: {shares['before'] * 100:.0f}% -> {shares['after'] * 100:.0f}% draw their prompt" in capsys.readouterr().out
    assert (tmp_path / "demo" / "best_of_8.png").exists()
    assert result["win_rate"] > 0.5  # the generator that follows its prompts more often ranks first
