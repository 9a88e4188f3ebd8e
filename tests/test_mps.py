import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from conftest import assert_gradient_reaches_the_pixels, mixed_mode_images, tensor_with_grad
from conftest import require_extra
from tiny_peers import CONDITION_HEAD_DIM, CONDITION_HEADS, CONDITION_LAYERS, save_tiny_mps, tiny_clip_config

from social_reward.errors import InputError
from social_reward.scoring.encoding import prompt_image_scores
from social_reward.scorers.mps import CONDITION, read_pickled_module
from social_reward.scorers.registry import load_scorer

require_extra('peers', 'transformers')

PROMPTS = ["Two RED circles", "a cat astronaut in the snow, highly detailed, digital art",
           " ".join(["a big green painting of a blue square on the mat"] * 4)]  # 44 words: truncated to 77 tokens


@pytest.fixture(scope="module")
def tiny_mps(tmp_path_factory):
    """(MPS_overall_checkpoint.pth, laion's processor folder, its tensors): a tiny random MPS pickled whole, in half
    precision, under MPS's class names."""
    return save_tiny_mps(str(tmp_path_factory.mktemp("mps")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of several sizes and modes: RGB larger and smaller than 224, palette, RGBA, 1-bit."""
    return mixed_mode_images(str(tmp_path_factory.mktemp("images")))


# ---- MPS's infer_one_sample (eval_overall_mps_on_hpdv2.py) rebuilt step by step, in float32 -----------------------

def peer_clip(tensors):
    """MPS's XCLIPModel is transformers' CLIPModel (its subclass only changes what get_*_features return)."""
    from transformers import CLIPModel
    clip = CLIPModel(tiny_clip_config())
    clip.load_state_dict({k.removeprefix("model."): v.float() for k, v in tensors.items() if k.startswith("model.")},
                         strict=False)
    return clip.eval()


def cross_model(t, image, text, mask, tables=None):
    """Cross_model.forward: per layer, Residual(CrossAttention) then Residual(ParallelTransformerBlock), whose
    get_rotary_embedding reads the table it cached (`tables`: {layer: its pos_emb}) when it holds enough positions."""
    heads, head = CONDITION_HEADS, CONDITION_HEAD_DIM

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"])

    def rotate_half(x):
        x1, x2 = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
        return torch.cat((-x2, x1), -1)

    x = image
    for i in range(CONDITION_LAYERS):
        c, p = f"cross_model.layers.{i}.0.fn.", f"cross_model.layers.{i}.1.fn."
        h = norm(x, c + "norm")
        q = (h @ t[c + "to_q.weight"].T).reshape(*h.shape[:2], heads, head).permute(0, 2, 1, 3) * head ** -0.5
        k, v = (text @ t[c + "to_kv.weight"].T).chunk(2, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask.unsqueeze(1).repeat(1, heads, 1, 1)
        attention = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attention, v).permute(0, 2, 1, 3).reshape(*h.shape[:2], -1)
        ff, gate = (h @ t[c + "ff.0.weight"].T).chunk(2, dim=-1)
        x = out @ t[c + "to_out.weight"].T + (F.silu(gate) * ff) @ t[c + "ff.2.weight"].T + x

        h = norm(x, p + "norm")
        inner = heads * head
        q, k, v, ff = (h @ t[p + "fused_attn_ff_proj.weight"].T).split((inner, head, head, ff.shape[-1] * 2), dim=-1)
        q = q.reshape(*h.shape[:2], heads, head).permute(0, 2, 1, 3)
        freqs = torch.einsum("i,j->ij", torch.arange(h.shape[1]).float(), t[p + "rotary_emb.inv_freq"])
        positions = torch.cat((freqs, freqs), dim=-1)
        if tables and i in tables and tables[i].shape[-2] >= h.shape[1]:
            positions = tables[i][:h.shape[1]].float()
        q, k = (u * positions.cos() + rotate_half(u) * positions.sin() for u in (q, k))
        sim = torch.einsum("bhid,bjd->bhij", q * head ** -0.5, k)
        attention = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attention, v).permute(0, 2, 1, 3).reshape(*h.shape[:2], -1)
        ff, gate = ff.chunk(2, dim=-1)
        x = out @ t[p + "attn_out.weight"].T + (F.silu(gate) * ff) @ t[p + "ff_out.1.weight"].T + x
    return x


def peer_scores(tiny_mps, prompts, paths, threshold=0.3, tables=None):
    from transformers import AutoTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    _, processor, tensors = tiny_mps
    t = {k: v.float() for k, v in tensors.items()}
    clip, image_processor = peer_clip(tensors), CLIPImageProcessorPil.from_pretrained(processor)
    tokenizer = AutoTokenizer.from_pretrained(processor)

    def tokenize(caption):
        return tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    def text_features(ids):
        output = clip.text_model(input_ids=ids)
        return clip.text_projection(output.last_hidden_state), clip.text_projection(output.pooler_output)

    scores = []
    with torch.no_grad():
        for prompt, path in zip(prompts, paths):
            pixels = image_processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            text_f, text_pooled = text_features(tokenize(prompt))
            image_f = clip.visual_projection(clip.vision_model(pixel_values=pixels).last_hidden_state)
            condition_f, _ = text_features(tokenize(CONDITION))
            sim = torch.einsum("bid,bjd->bji", text_f, condition_f).max(dim=1, keepdim=True)[0]
            sim = sim / sim.max()
            mask = torch.where(sim > threshold, 0, float("-inf")).repeat(1, image_f.shape[1], 1)
            image = cross_model(t, image_f, text_f, mask, tables)[:, 0, :]
            image, text = image / image.norm(dim=-1, keepdim=True), text_pooled / text_pooled.norm(dim=-1, keepdim=True)
            scores.append((t["model.logit_scale"].exp() * text @ image.T)[0, 0])
    return torch.stack(scores)


def test_scores_equal_mps_infer_one_sample_rebuilt_step_by_step(tiny_mps, images):
    path, processor, _ = tiny_mps
    scorer = load_scorer(f"mps:{path},processor={processor},dtype=fp32")
    assert scorer.softmax_scale == 1.0  # the score holds logit_scale.exp() already
    prompts = [p for p in PROMPTS for _ in images] + [PROMPTS[0]]
    paired = [images[(i + j) % len(images)] for j in range(len(PROMPTS)) for i in range(len(images))] + [images[1]]
    ours = prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer, prompts, paired, "cpu", batch_size=2,
                               progress=False)
    expected = peer_scores(tiny_mps, prompts, paired)
    assert expected.std() > 0.1  # the scores differ between pairs: the comparison below means something
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()
    for start in range(0, len(images) * len(PROMPTS), len(images)):  # each prompt ranks its images the same way
        assert torch.equal(ours[start:start + 5].argsort(), expected[start:start + 5].argsort())


def test_a_rotary_table_cached_in_the_pickle_is_read_as_mps_reads_it(tiny_mps, images, tmp_path):
    """A module that ran before torch.save holds each ParallelTransformerBlock's pos_emb, and MPS's own code reads that
    table rather than one made again from inv_freq. Here layer 0 caches a table unlike its inv_freq's (the angles
    half again as large, over more positions than the image has tokens), layer 1 one too short to be read."""
    inv_freq = tiny_mps[2]["cross_model.layers.0.1.fn.rotary_emb.inv_freq"].float()
    freqs = torch.outer(torch.arange(300).float(), inv_freq)
    tables = {0: 1.5 * torch.cat((freqs, freqs), dim=-1), 1: torch.zeros(3, 2 * len(inv_freq))}
    path, processor, tensors = save_tiny_mps(str(tmp_path), rotary_tables=tables)
    scorer = load_scorer(f"mps:{path},processor={processor},dtype=fp32")
    prompts = PROMPTS[:1] * len(images)
    ours = prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer, prompts, images, "cpu",
                               batch_size=2, progress=False)
    cached = {i: table.half() for i, table in tables.items()}  # as pickled, in the module's half precision
    expected = peer_scores((path, processor, tensors), prompts, images, tables=cached)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()
    assert (ours - peer_scores((path, processor, tensors), prompts, images)).abs().max() > 1e-3  # the table mattered


def test_prompt_tokens_unlike_the_condition_words_are_masked_as_mps_masks_them(tiny_mps, images, monkeypatch):
    # the tiny model's prompt tokens are nearly all within 0.3 of the best; a stricter threshold masks many, and the
    # scores still follow MPS's rule
    path, processor, _ = tiny_mps
    scorer = load_scorer(f"mps:{path},processor={processor},dtype=fp32")
    prompts, paired = [PROMPTS[1]] * 3 + [PROMPTS[2]] * 2, images
    kept = prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer, prompts, paired, "cpu",
                               progress=False)
    monkeypatch.setattr("social_reward.scorers.mps.CONDITION_THRESHOLD", 0.75)
    masked = prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer, prompts, paired, "cpu",
                                 progress=False)
    assert (masked - kept).abs().min() > 1e-3
    assert torch.allclose(masked, peer_scores(tiny_mps, prompts, paired, threshold=0.75), atol=1e-5, rtol=0)


def test_by_default_it_runs_in_half_precision_as_mps_and_scores_near_float32(tiny_mps, images):
    path, processor, _ = tiny_mps
    half = load_scorer(f"mps:{path},processor={processor}")
    assert half.model.clip.visual_projection.weight.dtype == torch.float16
    full = load_scorer(f"mps:{path},processor={processor},dtype=fp32")
    scores = [prompt_image_scores(s.model, s.preprocess, s.tokenizer, PROMPTS[:2] * 2, images[:4], "cpu",
                                  progress=False) for s in (half, full)]
    assert (scores[0] - scores[1]).abs().max() < 0.02


def test_the_pickled_module_is_read_as_data_and_a_pickle_that_would_run_code_runs_none(tiny_mps, tmp_path):
    root = read_pickled_module(tiny_mps[0])
    assert type(root).pickled_as == "trainer.models.clip_model.CLIPModel"  # a record of the class, not the class

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({"model": RunsCode(), "weights": torch.zeros(2)}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="evil.pth: not an MPS checkpoint"):
        load_scorer(f"mps:{tmp_path / 'evil.pth'},processor={tiny_mps[1]}")
    assert not (tmp_path / "ran").exists()


def test_as_a_reward_it_scores_pil_images_as_score_does_and_passes_gradients_to_tensors(tiny_mps, images):
    from social_reward.reward.differentiable import Reward
    path, processor, _ = tiny_mps
    reward = Reward.load(f"mps:{path},processor={processor},dtype=fp32")
    prompts = PROMPTS[:2]
    with torch.no_grad():
        assert torch.allclose(reward([Image.open(p) for p in images[:2]], prompts),
                              peer_scores(tiny_mps, prompts, images[:2]), atol=1e-5, rtol=0)
    image = Image.open(images[0])  # RGB, 300 x 260
    pixels = tensor_with_grad(images[0])
    prepared = reward.scorer.tensor_preprocess(pixels)
    # on the tensor: torchvision's antialiased bicubic against PIL's, a few 1/255 apart
    assert prepared.shape == (1, 3, 224, 224) and (prepared - reward.scorer.preprocess(image)).abs().mean() < 0.03
    assert_gradient_reaches_the_pixels(reward, pixels, prompts[0])


@pytest.mark.parametrize("make, spec, expected", [
    (None, "mps:{tmp}/none.pth,processor={processor}", "{tmp}/none.pth: no such weights file"),
    (None, "mps:{path}", "mps needs processor=DIR, laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer"),
    (None, "mps:{path},processor={tmp}/nothing", "processor={tmp}/nothing: no such folder"),
    ("hps", "mps:{tmp}/HPS.pt,processor={processor}", "{tmp}/HPS.pt: not an MPS checkpoint"),
    ("safetensors", "mps:{tmp}/HPSv3.safetensors,processor={processor}", "HPSv3.safetensors: not an MPS checkpoint"),
    ("empty", "mps:{path},processor={tmp}/empty", "processor={tmp}/empty: not a tokenizer folder"),
    (None, "mps:{path},processor={processor},dtype=int8", "dtype=int8: choose from fp16, fp32"),
    ("cycle", "mps:{tmp}/cycle/MPS_overall_checkpoint.pth,processor={processor}", "its pickled modules are malformed"),
])
def test_bad_mps_inputs_end_in_one_line_naming_the_culprit(make, spec, expected, tiny_mps, images, tmp_path):
    from social_reward.scoring.ranking import rank_images
    path, processor, _ = tiny_mps
    if make == "hps":  # another scorer's checkpoint: HPS v2's {"state_dict": ...}
        torch.save({"state_dict": {"visual.proj": torch.zeros(4, 4)}}, tmp_path / "HPS.pt")
    if make == "safetensors":
        from safetensors.torch import save_file
        save_file({"visual.patch_embed.proj.weight": torch.zeros(2)}, tmp_path / "HPSv3.safetensors")
    if make == "empty":
        (tmp_path / "empty").mkdir()
    if make == "cycle":  # a module among its own children
        from tiny_peers import mps_layout_classes
        model = mps_layout_classes()[0](tiny_clip_config())
        model.cross_model._modules["loop"] = model.cross_model
        os.makedirs(tmp_path / "cycle")
        torch.save(model, tmp_path / "cycle" / "MPS_overall_checkpoint.pth")
    with pytest.raises(InputError) as error:  # run_cli prints it as "error: <message>", exit status 2
        rank_images("a cat", images[:1], device="cpu", num_workers=0,
                    scorer=spec.format(tmp=tmp_path, path=path, processor=processor))
    assert expected.format(tmp=tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_compare_sets_hpsv3_and_mps_beside_a_clip_scorer_on_pairs_and_hpd_v2(tiny_mps, shapes_pairs, tiny_init,
                                                                             tmp_path):
    import json

    import pandas as pd
    from conftest import TINY_CLIP
    from tiny_peers import save_tiny_hpsv3

    from social_reward.scoring.comparison import compare
    from social_reward.scorers.hpsv3 import ASK, INSTRUCTION
    pairs = shapes_pairs.head(4)
    pairs.to_parquet(tmp_path / "pairs.parquet")
    entries = [{"prompt": row.prompt, "image_path": [row.pos_path, row.neg_path, pairs.neg_path.iloc[(i + 1) % 4]],
                "rank": [1, 2, 3]} for i, row in enumerate(pairs.head(2).itertuples())]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    hpsv3_path, base, _ = save_tiny_hpsv3(str(tmp_path / "hpsv3"), [INSTRUCTION + ASK] + list(pairs.prompt))
    specs = {"ours": f"clip:{tiny_init},model={TINY_CLIP}", "hpsv3": f"hpsv3:{hpsv3_path},base={base},dtype=fp32",
             "mps": f"mps:{tiny_mps[0]},processor={tiny_mps[1]},dtype=fp32"}
    compare([str(tmp_path / "pairs.parquet"), str(tmp_path / "test.json")], specs, out=str(tmp_path / "out"),
            prompts=2, device="cpu", num_workers=0)
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(table.scorer.unique()) == ["ours", "hpsv3", "mps"]
    assert table["HPD v2 ranking accuracy"].notna().sum() == 3  # one for each scorer on test.json
    for name in ("hpsv3", "mps"):  # its accuracy is that of its own scores on the pairs
        scorer = load_scorer(specs[name])
        pos, neg = (prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer, pairs.prompt, pairs[c],
                                        "cpu", progress=False) for c in ("pos_path", "neg_path"))
        row = table[(table.scorer == name) & table.source.str.endswith("pairs.parquet")].iloc[0]
        assert row.accuracy == pytest.approx(100 * (pos >= neg).float().mean().item())
