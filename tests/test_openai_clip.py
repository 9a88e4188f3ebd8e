"""Against OpenAI's own CLIP code (the `clip` package the original scripts used), on the same weights and pairs."""
import json
import warnings

import torch
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # its pkg_resources import warns
    import clip
    from clip.model import build_model

from social_reward.models.clip import load_model
from social_reward.scoring.encoding import pair_scores
from validate import validate_image_pair_classifier

# OpenAI's build_model infers the architecture from the state dict, with 64-wide attention heads
OPENAI_LAYOUT = {"embed_dim": 64, "quick_gelu": True,
                 "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3}}


def test_validate_gives_the_original_clip_packages_scores_and_accuracy(shapes_pairs, tmp_path):
    config = tmp_path / "openai-layout.json"
    config.write_text(json.dumps(OPENAI_LAYOUT))
    torch.manual_seed(0)
    fp16 = {k: v.half() for k, v in load_model(str(config), pretrained="none")[0].state_dict().items()}
    torch.save(fp16, tmp_path / "weights.pth")  # fp16, as OpenAI ships its weights

    openai_model = build_model({k: v.clone() for k, v in fp16.items()}).float().eval()  # clip.load on a CPU
    openai_preprocess = clip.clip._transform(64)
    with torch.no_grad():
        text = openai_model.encode_text(clip.tokenize(list(shapes_pairs.prompt), truncate=True))
        pos = openai_model.encode_image(torch.stack([openai_preprocess(Image.open(p)) for p in shapes_pairs.pos_path]))
        neg = openai_model.encode_image(torch.stack([openai_preprocess(Image.open(p)) for p in shapes_pairs.neg_path]))
    text, pos, neg = (f / f.norm(dim=-1, keepdim=True) for f in (text, pos, neg))
    openai_pos, openai_neg = (text * pos).sum(1), (text * neg).sum(1)

    model, preprocess, tokenizer = load_model(str(config), checkout_path=str(tmp_path / "weights.pth"))
    assert torch.equal(tokenizer(list(shapes_pairs.prompt)), clip.tokenize(list(shapes_pairs.prompt), truncate=True))
    ours_pos, ours_neg = pair_scores(model, preprocess, tokenizer, shapes_pairs, "cpu", progress=False)
    assert torch.allclose(ours_pos, openai_pos, atol=1e-5) and torch.allclose(ours_neg, openai_neg, atol=1e-5)
    accuracy = validate_image_pair_classifier(shapes_pairs, str(tmp_path / "weights.pth"), "cpu", model=str(config))
    assert f"{accuracy * 100:.2f}" == f"{(openai_pos >= openai_neg).float().mean().item() * 100:.2f}"
