import json
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, run_script, require_extra
from PIL import Image
from safetensors.torch import save_file

from social_reward.models import export as export_module
from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.models.export import export, sha256
from social_reward.scorers.registry import load_scorer

require_extra('peers', 'transformers')

PROMPTS = ["two red circles on a white background", "a cat astronaut, digital art", "x" * 400]  # the last truncates


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init tiny CLIP's checkpoint, as train_pair_pos_neg.py writes it (.pth and .safetensors), its
    embeddings of three images and three prompts, and a folder for exports."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    clip, preprocess, tokenizer = load_model(TINY_CLIP, pretrained="none")
    with torch.no_grad():  # a logit scale of its own, so that a scorer scaling by it is seen to
        clip.logit_scale.fill_(3.0)
    state_dict = {k: v.contiguous() for k, v in clip.state_dict().items()}
    torch.save(state_dict, folder / "clip_epoch_1_global_step_final.pth")
    save_file(state_dict, folder / "clip_epoch_1_global_step_final.safetensors")
    images = []
    for i, size in enumerate([(80, 60), (50, 90), (64, 64)]):
        images.append(str(folder / f"{i}.png"))
        Image.effect_noise(size, 40 + 20 * i).convert("RGB").save(images[-1])
    pixels = torch.stack([preprocess(Image.open(p)) for p in images])
    with torch.no_grad():
        image_features = clip.encode_image(pixels, normalize=True)
        text_features = clip.encode_text(tokenizer(PROMPTS), normalize=True)
    return dict(folder=folder, pth=str(folder / "clip_epoch_1_global_step_final.pth"),
                safetensors=str(folder / "clip_epoch_1_global_step_final.safetensors"), images=images, pixels=pixels,
                tokens=tokenizer(PROMPTS), image_features=image_features, text_features=text_features,
                logit_scale=clip.logit_scale.exp().item())


@pytest.fixture(scope="module")
def open_clip_export(tiny):
    out = str(tiny["folder"] / "social-reward-open_clip")
    export(tiny["pth"], "open_clip", out, TINY_CLIP)
    return out


@pytest.fixture(scope="module")
def transformers_export(tiny):
    out = str(tiny["folder"] / "social-reward-hf")
    export(tiny["safetensors"], "transformers", out, TINY_CLIP)
    return out


def export_cli(*args):
    return run_script("scripts/export.py", *args)


def test_open_clip_export_loads_from_local_dir_and_gives_the_checkpoints_embeddings(tiny, open_clip_export):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_export}")
    model.eval()
    with torch.no_grad():  # open_clip's own preprocess and tokenizer for the folder, on the images' files
        pixels = torch.stack([preprocess(Image.open(p)) for p in tiny["images"]])
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(PROMPTS), normalize=True)
    assert torch.allclose(image_features, tiny["image_features"], rtol=0, atol=1e-4)
    assert torch.allclose(text_features, tiny["text_features"], rtol=0, atol=1e-4)
    assert sorted(os.listdir(open_clip_export)) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]


def test_open_clip_export_config_keeps_quick_gelu_and_the_preprocess(open_clip_export):
    with open(os.path.join(open_clip_export, "open_clip_config.json")) as f:
        config = json.load(f)
    assert config["model_cfg"] == {**json.load(open(TINY_CLIP)), "quick_gelu": True}
    assert config["preprocess_cfg"] == {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                        "std": list(open_clip.OPENAI_DATASET_STD),
                                        "interpolation": "bicubic", "resize_mode": "shortest"}
    model = open_clip.create_model(f"local-dir:{open_clip_export}")
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)


def test_transformers_export_loads_as_clip_model_and_gives_the_checkpoints_embeddings(tiny, transformers_export):
    from transformers import CLIPModel
    model = CLIPModel.from_pretrained(transformers_export).eval()
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=tiny["pixels"])
        text_features = model.get_text_features(input_ids=tiny["tokens"])  # open_clip's ids: padded with 0
    image_features, text_features = (F.normalize(getattr(f, "pooler_output", f), dim=-1)
                                     for f in (image_features, text_features))
    assert torch.allclose(image_features, tiny["image_features"], rtol=0, atol=1e-4)
    assert torch.allclose(text_features, tiny["text_features"], rtol=0, atol=1e-4)
    assert model.config.vision_config.hidden_act == model.config.text_config.hidden_act == "quick_gelu"
    assert model.logit_scale.exp().item() == pytest.approx(tiny["logit_scale"])


def test_transformers_export_tokenizer_gives_open_clips_ids_and_text_embeddings(tiny, transformers_export):
    from transformers import CLIPModel, CLIPProcessor
    processor = CLIPProcessor.from_pretrained(transformers_export)
    tokens = processor(text=PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    ends = (tiny["tokens"] == 49407).int().argmax(1)
    for ours, theirs, end in zip(tiny["tokens"], tokens, ends):  # equal up to the end-of-text token; padding differs
        assert torch.equal(ours[:end + 1], theirs[:end + 1])
    assert (tokens[0, ends[0]:] == 49407).all()  # transformers pads with <|endoftext|>: the first one is pooled
    model = CLIPModel.from_pretrained(transformers_export).eval()
    with torch.no_grad():
        text_features = model.get_text_features(input_ids=tokens)
    text_features = F.normalize(getattr(text_features, "pooler_output", text_features), dim=-1)
    assert torch.allclose(text_features, tiny["text_features"], rtol=0, atol=1e-4)


def test_pickscore_scorer_on_the_transformers_export_scores_cosine_times_logit_scale(tiny, transformers_export):
    scorer = load_scorer(f"pickscore:{transformers_export}")
    with torch.no_grad():
        score = (scorer.model.encode_image(tiny["pixels"]) * scorer.model.encode_text(tiny["tokens"])).sum(1)
    expected = (tiny["image_features"] * tiny["text_features"]).sum(1)
    assert torch.allclose(score, expected * tiny["logit_scale"], rtol=0, atol=1e-4 * tiny["logit_scale"])
    assert scorer.model.scale == pytest.approx(tiny["logit_scale"]) and scorer.softmax_scale == 1.0


@pytest.mark.parametrize("to", ["open_clip", "transformers"])
def test_model_card_says_what_the_model_is_how_to_load_and_score_it_and_names_the_checkpoint(
        tiny, open_clip_export, transformers_export, to):
    folder, checkpoint = {"open_clip": (open_clip_export, tiny["pth"]),
                          "transformers": (transformers_export, tiny["safetensors"])}[to]
    with open(os.path.join(folder, "README.md")) as f:
        card = f.read()
    assert card.startswith(f"---\nlibrary_name: {to}\n")
    assert "Social Reward" in card and "preference" in card and "cosine similarity" in card
    assert (f'create_model_and_transforms("local-dir:{os.path.basename(folder)}")' if to == "open_clip"
            else f'CLIPModel.from_pretrained("{os.path.basename(folder)}")') in card
    assert f"`{os.path.basename(checkpoint)}`, sha256 `{sha256(checkpoint)}`" in card


def test_a_failed_export_leaves_nothing_behind(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(export_module, "export_difference", lambda *args: 0.5)  # as a wrong mapping would measure
    with pytest.raises(RuntimeError, match="differ from the checkpoint's by 5.00e-01"):
        export(tiny["pth"], "transformers", str(tmp_path / "out"), TINY_CLIP)
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_the_folder_whole(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-weights.bin").write_text("old")
    export(tiny["pth"], "open_clip", str(out), TINY_CLIP, overwrite=True)
    assert sorted(os.listdir(out)) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]


def test_an_out_folder_holding_files_is_refused_naming_them_and_left_as_it_was(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = export_cli(tiny["pth"], "--to", "open_clip", "--out", out, "--model", TINY_CLIP)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --out {out}: holds other files (notes.txt); pass --overwrite to replace them"]
    assert os.listdir(out) == ["notes.txt"] and os.listdir(tmp_path) == ["out"]


def test_an_out_folder_holding_the_checkpoint_is_refused_even_with_overwrite(tmp_path, tiny, monkeypatch):
    (tmp_path / "save_folder").mkdir()
    checkpoint = tmp_path / "save_folder" / "clip_final.pth"
    checkpoint.write_bytes(open(tiny["pth"], "rb").read())
    with pytest.raises(InputError, match="holds .*clip_final.pth, which writing it would replace"):
        export(str(checkpoint), "open_clip", str(tmp_path / "save_folder"), TINY_CLIP, overwrite=True)
    monkeypatch.chdir(tmp_path / "save_folder")
    with pytest.raises(InputError, match=r"--out \.\.: holds the current folder"):
        export(tiny["pth"], "open_clip", "..", TINY_CLIP, overwrite=True)
    assert os.listdir(tmp_path / "save_folder") == ["clip_final.pth"]


TINY_CONFIG = json.load(open(TINY_CLIP))
LS_INIT_CONFIG = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "ls_init_value": 0.1}}  # layer scale


@pytest.mark.parametrize("model, message", [
    ("RN50", "--model RN50: cannot export to transformers: its image tower is a ResNet, not a ViT; --to open_clip can"),
    ("convnext_base", "--model convnext_base: cannot export to transformers: its image tower is a timm model "
                      "(convnext_base); --to open_clip can"),
    ("roberta-ViT-B-32", "--model roberta-ViT-B-32: its text tower is a Hugging Face model; these scripts load CLIPs "
                         "with OpenAI's text tower"),
    ("layer-scale.json", "--model {path}: cannot export to transformers: transformers' CLIPModel has no counterpart "
                         "for vision_cfg.ls_init_value=0.1; --to open_clip can"),
])
def test_a_model_transformers_cannot_hold_is_refused_in_one_line_before_anything_is_written(tmp_path, tiny, model,
                                                                                              message):
    if model.endswith(".json"):
        with open(tmp_path / model, "w") as f:
            json.dump(LS_INIT_CONFIG, f)
        model = str(tmp_path / model)
    result = export_cli(tiny["pth"], "--to", "transformers", "--out", tmp_path / "out", "--model", model)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message.format(path=model)}"]
    assert not (tmp_path / "out").exists()
