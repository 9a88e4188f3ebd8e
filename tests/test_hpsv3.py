import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from conftest import assert_gradient_reaches_the_pixels, mixed_mode_images, tensor_with_grad
from conftest import require_extra
from tiny_peers import HEADS, KV_HEADS, LAYERS, VISION, VISION_DEPTH, VISION_HEADS, WIDTH, save_tiny_hpsv3

from social_reward.errors import InputError
from social_reward.scoring.encoding import prompt_image_scores
from social_reward.scorers.hpsv3 import ASK, CAPACITY, INSTRUCTION, VisionAngles, smart_resize
from social_reward.scorers.registry import load_scorer

require_extra('peers', 'transformers')

PROMPTS = ["a red cat on the mat", "two dogs in the snow, a painting", "cute chibi anime cartoon fox, smiling"]
MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    """(HPSv3.safetensors, its base folder, its tensors): a tiny random HPSv3 under the real file's names."""
    return save_tiny_hpsv3(str(tmp_path_factory.mktemp("hpsv3")), [INSTRUCTION + ASK] + PROMPTS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of several sizes and modes: RGB larger and smaller than HPSv3's 448 x 448, palette, RGBA, 1-bit, a strip
    of ratio 45 (about 256 tokens each, more for the strip)."""
    return mixed_mode_images(str(tmp_path_factory.mktemp("images")), [
        ((300, 260), "RGB"), ((120, 200), "P"), ((230, 230), "RGBA"), ((900, 20), "RGB"), ((640, 480), "1")])


@pytest.fixture(scope="module")
def scorer(tiny_hpsv3):
    path, base, _ = tiny_hpsv3
    return load_scorer(f"hpsv3:{path},base={base},dtype=fp32")


# ---- HPSv3RewardInferencer.reward rebuilt step by step from its code (hpsv3 1.0.0, qwen-vl-utils, transformers 4.45)

def peer_size(height, width, factor=28, pixels=256 * 28 * 28):
    """qwen-vl-utils' smart_resize with min_pixels = max_pixels = 256 * 28 * 28 (HPSv3's prepare_batch)."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def peer_patches(path):
    """fetch_image (RGB, PIL bicubic to smart_resize's size), then Qwen2VLImageProcessor (rescale in float64, normalize
    in float32, the image as 2 frames, patches in merge-block order) in numpy: (patches, grid rows, grid columns)."""
    image = Image.open(path).convert("RGB")
    height, width = peer_size(image.height, image.width)
    image = image.resize((width, height), Image.BICUBIC)
    pixels = (np.array(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = ((pixels - MEAN.astype(np.float32)) / STD.astype(np.float32)).transpose(2, 0, 1)
    rows, cols = height // 14, width // 14
    patches = np.tile(pixels[None], (2, 1, 1, 1)).reshape(1, 2, 3, rows // 2, 2, 14, cols // 2, 2, 14)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(rows * cols, 3 * 2 * 14 * 14)
    return torch.from_numpy(patches), rows, cols


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def vision_tokens(t, patches, rows, cols):
    """Qwen2VisionTransformerPretrainedModel: Conv3d patches, 2-D rotary attention within the image, the merger."""
    def linear(x, name, bias=True):
        return F.linear(x, t[name + ".weight"], t[name + ".bias"] if bias else None)

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"], 1e-6)

    x = patches @ t["visual.patch_embed.proj.weight"].reshape(VISION, -1).T
    n, head = len(x), VISION // VISION_HEADS

    def in_blocks(positions):
        return positions.reshape(rows // 2, 2, cols // 2, 2).permute(0, 2, 1, 3).flatten()
    inv_freq = 1 / 10000 ** (torch.arange(0, head // 2, 2).float() / (head // 2))
    freqs = torch.cat([in_blocks(torch.arange(rows)[:, None].expand(rows, cols))[:, None] * inv_freq,
                       in_blocks(torch.arange(cols)[None].expand(rows, cols))[:, None] * inv_freq], 1)
    cos, sin = torch.cat([freqs, freqs], 1).cos()[:, None], torch.cat([freqs, freqs], 1).sin()[:, None]
    for i in range(VISION_DEPTH):
        b = f"visual.blocks.{i}."
        q, k, v = linear(norm(x, b + "norm1"), b + "attn.qkv").view(n, 3, VISION_HEADS, head).unbind(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attention = torch.einsum("nhd,mhd->hnm", q, k).div(math.sqrt(head)).softmax(-1)
        x = x + linear(torch.einsum("hnm,mhd->nhd", attention, v).reshape(n, VISION), b + "attn.proj")
        h = linear(norm(x, b + "norm2"), b + "mlp.fc1")
        x = x + linear(h * torch.sigmoid(1.702 * h), b + "mlp.fc2")  # quick_gelu
    x = norm(x, "visual.merger.ln_q").view(-1, 4 * VISION)
    return linear(F.gelu(linear(x, "visual.merger.mlp.0")), "visual.merger.mlp.2")


def peer_mu(t, ids, image, image_id, reward_id):
    """Qwen2VLRewardModelBT.forward: the image's tokens scattered at <|image_pad|>, the Qwen2 decoder with positions
    0..L-1 (it calls self.model with position_ids=None), rm_head on the hidden state at <|Reward|>, mu = output 0."""
    def rms(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * t[name]

    def linear(x, name, bias=False):
        return F.linear(x, t[name + ".weight"], t[name + ".bias"] if bias else None)

    x = t["model.embed_tokens.weight"][ids].clone()
    x[ids == image_id] = image
    length, head = len(ids), WIDTH // HEADS
    angles = torch.arange(length)[:, None] * (1 / 1e6 ** (torch.arange(0, head, 2).float() / head))
    cos, sin = torch.cat([angles, angles], 1).cos(), torch.cat([angles, angles], 1).sin()
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        h = rms(x, layer + "input_layernorm.weight")
        q = linear(h, layer + "self_attn.q_proj", True).view(length, HEADS, head).transpose(0, 1)
        k, v = (linear(h, layer + f"self_attn.{p}_proj", True).view(length, KV_HEADS, head).transpose(0, 1)
                .repeat_interleave(HEADS // KV_HEADS, 0) for p in "kv")
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attention = (q @ k.transpose(1, 2) / math.sqrt(head) + causal).softmax(-1)
        x = x + linear((attention @ v).transpose(0, 1).reshape(length, WIDTH), layer + "self_attn.o_proj")
        h = rms(x, layer + "post_attention_layernorm.weight")
        x = x + linear(F.silu(linear(h, layer + "mlp.gate_proj")) * linear(h, layer + "mlp.up_proj"),
                       layer + "mlp.down_proj")
    reward = rms(x, "model.norm.weight")[ids == reward_id][0]
    reward = F.relu(linear(F.relu(linear(reward, "rm_head.0", True)), "rm_head.3", True))
    return linear(reward, "rm_head.5", True)[0]


def peer_ids(base, prompt, count):
    """The processor's ids: Qwen2-VL-Instruct's chat (system turn, the user turn with the image, then INSTRUCTION + the
    reward prompt, the assistant's opening) with <|image_pad|> repeated once per image token; the tokenizer.json BPE
    with HPSv3's <|Reward|> added."""
    from tokenizers import AddedToken, Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken("<|Reward|>", special=True, normalized=False)])
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * count + "<|vision_end|>" + INSTRUCTION.format(text_prompt=prompt) + ASK
            + "<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor(tokenizer.encode(text).ids)
    return ids, tokenizer.token_to_id("<|image_pad|>"), tokenizer.token_to_id("<|Reward|>")


def peer_scores(tiny_hpsv3, prompts, paths):
    _, base, tensors = tiny_hpsv3
    scores = []
    with torch.no_grad():
        for prompt, path in zip(prompts, paths):
            image = vision_tokens(tensors, *peer_patches(path))
            ids, image_id, reward_id = peer_ids(base, prompt, len(image))
            scores.append(peer_mu(tensors, ids, image, image_id, reward_id))
    return torch.stack(scores)


def test_scores_equal_hpsv3s_inferencer_rebuilt_step_by_step(tiny_hpsv3, scorer, images):
    # every prompt with every image, in batches of 2 (padded on the right, as HPSv3 pads); one image twice
    prompts = [p for p in PROMPTS for _ in images] + [PROMPTS[0]]
    paired = [images[(i + j) % len(images)] for j in range(len(PROMPTS)) for i in range(len(images))] + [images[3]]
    ours = prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer, prompts, paired, "cpu", batch_size=2,
                               progress=False)
    expected = peer_scores(tiny_hpsv3, prompts, paired)
    assert expected.std() > 0.1  # the scores differ between pairs: the comparison below means something
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()
    for start in range(0, len(images) * len(PROMPTS), len(images)):  # each prompt ranks its images the same way
        assert torch.equal(ours[start:start + 5].argsort(), expected[start:start + 5].argsort())


def test_the_prompt_is_read_inside_hpsv3s_instruction_in_qwens_chat(scorer):
    text = scorer.tokenizer.text("a red fox")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|>\nYou are tasked with evaluating")
    assert "Textual prompt - a red fox\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n" \
        "<|im_end|>\n<|im_start|>assistant\n" in text and text.endswith("assistant\n")


def test_images_are_resized_to_about_256_tokens_and_the_extreme_ratio_fits_the_packed_tensor():
    assert smart_resize(260, 300) == (420, 504) and smart_resize(1024, 1024) == (448, 448)
    assert math.prod(smart_resize(1, 200)) == CAPACITY  # the largest area at ratio <= 200
    sizes = [(h, w) for h in (1, 3, 17, 90, 333, 1000, 4000) for w in (h, 2 * h + 1, 50 * h, 200 * h)]
    assert all(math.prod(smart_resize(h, w)) <= CAPACITY for h, w in sizes)
    with pytest.raises(InputError, match="aspect ratios up to 200"):
        smart_resize(10, 2010)


def test_in_bf16_the_vision_angles_are_bf16_products_as_hpsv3s_transformers_made_them():
    angles = VisionAngles(16).to(torch.bfloat16)
    positions = torch.tensor([[0, 0], [5, 31], [31, 2]])
    cos, _ = angles(None, positions)
    table = torch.outer(torch.arange(32, dtype=torch.bfloat16), angles.inv_freq)  # in bf16, as transformers 4.45's
    expected = torch.cat([table[positions].flatten(1)] * 2, -1).cos().float()
    assert cos.dtype == torch.float32 and torch.equal(cos, expected)
    exact, _ = VisionAngles(16)(None, positions)
    assert (cos - exact).abs().max() > 1e-3  # what float32 angles (transformers 5's) would change


def test_by_default_it_runs_in_bf16_as_hpsv3_with_its_head_in_float32(tiny_hpsv3, images):
    path, base, _ = tiny_hpsv3
    model = load_scorer(f"hpsv3:{path},base={base}").model
    assert model.visual.patch_embed.proj.weight.dtype == model.language_model.norm.weight.dtype == torch.bfloat16
    assert model.rm_head[0].weight.dtype == torch.float32


def test_as_a_reward_it_scores_pil_images_as_score_does_and_passes_gradients_to_tensors(tiny_hpsv3, images):
    from social_reward.reward.differentiable import Reward
    path, base, _ = tiny_hpsv3
    reward = Reward.load(f"hpsv3:{path},base={base},dtype=fp32")
    prompts = PROMPTS[:2]
    expected = peer_scores(tiny_hpsv3, prompts, images[:2])
    with torch.no_grad():
        assert torch.allclose(reward([Image.open(p) for p in images[:2]], prompts), expected, atol=1e-5, rtol=0)
    image = Image.open(images[0])  # RGB, 300 x 260
    pixels = tensor_with_grad(images[0])
    prepared, from_pil = reward.scorer.tensor_preprocess(pixels), reward.scorer.preprocess(image)
    # on the tensor: torchvision's antialiased bicubic (fetch_image's for tensors) against PIL's: a few 1/255 apart
    assert prepared.shape == (1, from_pil.numel()) and torch.equal(prepared[0, :2], from_pil[:2])
    assert (prepared[0] - from_pil).abs().sum() / (3 * 420 * 504) < 0.05
    assert_gradient_reaches_the_pixels(reward, pixels, prompts[0])


@pytest.mark.parametrize("make, spec, expected", [
    (None, "hpsv3:{tmp}/none.safetensors,base={base}", "{tmp}/none.safetensors: no such weights file"),
    (None, "hpsv3:{path}", "hpsv3 needs base=DIR, Qwen2-VL-7B-Instruct's files"),
    (None, "hpsv3:{path},base={tmp}/nothing", "base={tmp}/nothing: no such folder"),
    ("clip_base", "hpsv3:{path},base={tmp}/clip", "config.json is a 'clip' model, not Qwen2-VL"),
    ("other", "hpsv3:{tmp}/other.pt,base={base}", "{tmp}/other.pt: not an HPSv3 checkpoint"),
    ("small_vocabulary", "hpsv3:{path},base={tmp}/small", "tokens with <|Reward|>, the checkpoint embeds"),
    (None, "hpsv3:{path},base={base},dtype=fp8", "dtype=fp8: choose from bf16, fp32"),
    ("strip", "hpsv3:{path},base={base},dtype=fp32", "strip.png: cannot read image (InputError: a 3000 x 10 image: "
     "HPSv3 takes aspect ratios up to 200)"),
])
def test_bad_hpsv3_inputs_end_in_one_line_naming_the_culprit(make, spec, expected, tiny_hpsv3, images, tmp_path):
    from social_reward.scoring.ranking import rank_images
    path, base, _ = tiny_hpsv3
    paths = images[:1]
    if make == "clip_base":
        (tmp_path / "clip").mkdir()
        (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    if make == "other":  # another scorer's checkpoint: ImageReward-like tensors
        torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8), "mlp.layers.0.weight": torch.zeros(2, 8)},
                   tmp_path / "other.pt")
    if make == "small_vocabulary":  # a base folder whose tokenizer learnt a smaller vocabulary
        save_tiny_hpsv3(str(tmp_path), ["a small corpus"])
        os.rename(tmp_path / "Qwen2-VL-7B-Instruct", tmp_path / "small")
    if make == "strip":
        Image.new("RGB", (3000, 10)).save(tmp_path / "strip.png")
        paths = [str(tmp_path / "strip.png")]
    with pytest.raises(InputError) as error:  # run_cli prints it as "error: <message>", exit status 2
        rank_images("a cat", paths, device="cpu", num_workers=0,
                    scorer=spec.format(tmp=tmp_path, path=path, base=base))
    assert expected.format(tmp=tmp_path) in str(error.value) and "\n" not in str(error.value)
