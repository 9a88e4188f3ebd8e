import json
import math
import os
import re
import socket

import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_CLIP, assert_gradient_reaches_the_pixels, mixed_mode_images, tensor_with_grad
from conftest import require_extra
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.scoring.comparison import compare
from social_reward.scoring.encoding import prompt_image_scores
from social_reward.scorers.imagereward import ImageReward, our_name, text_config, vision_config, vit_config
from social_reward.scoring.ranking import rank_images
from social_reward.scorers.registry import load_scorer

require_extra('peers', 'transformers')

KEYS_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "imagereward_keys.txt")
WORDS = ["a", "two", "red", "blue", "cat", "dog", "on", "the", "mat", "circles", "square", "astronaut", "##s", "in",
         "snow", "painting", "of", "photo", "green", "big"]
# the tiny model: ViT width 128 (2 heads of 64), 2 blocks, patch 16 at 224 px; BERT width 64, 2 layers, 2 heads
VIT_WIDTH, VIT_BLOCKS, BERT_WIDTH, BERT_LAYERS, BERT_HEADS, BERT_MLP, POSITIONS = 128, 2, 64, 2, 2, 128, 40
PROMPTS = ["Two RED circles", "a cat astronaut in the snow",
           " ".join(["a big green painting of a blue square on the mat"] * 4)]  # 44 words: truncated to 35 tokens


@pytest.fixture
def bert_folder(tmp_path):
    """A small uncased WordPiece vocabulary, saved as BertTokenizer.save_pretrained writes bert-base-uncased."""
    from transformers import BertTokenizer
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    return str(tmp_path / "bert")


def tiny_imagereward_tensors(vocab_size, seed=0):
    """Random tensors under ImageReward.pt's names (ImageReward(med_config).state_dict(), its module layout) at the
    tiny sizes: weights ~ 1/sqrt(fan in) so that every layer moves the reward."""
    generator = torch.Generator().manual_seed(seed)

    def linear(prefix, n_out, n_in):
        return {prefix + ".weight": torch.randn(n_out, n_in, generator=generator) / math.sqrt(n_in),
                prefix + ".bias": 0.1 * torch.randn(n_out, generator=generator)}

    def norm(prefix, width):
        return {prefix + ".weight": 1 + 0.1 * torch.randn(width, generator=generator),
                prefix + ".bias": 0.1 * torch.randn(width, generator=generator)}

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    tensors = {v + "cls_token": 0.5 * torch.randn(1, 1, VIT_WIDTH, generator=generator),
               v + "pos_embed": 0.5 * torch.randn(1, 197, VIT_WIDTH, generator=generator),
               v + "patch_embed.proj.weight": torch.randn(VIT_WIDTH, 3, 16, 16, generator=generator) / 28,
               v + "patch_embed.proj.bias": 0.1 * torch.randn(VIT_WIDTH, generator=generator)}
    for i in range(VIT_BLOCKS):
        block = f"{v}blocks.{i}."
        tensors |= norm(block + "norm1", VIT_WIDTH) | linear(block + "attn.qkv", 3 * VIT_WIDTH, VIT_WIDTH)
        tensors |= linear(block + "attn.proj", VIT_WIDTH, VIT_WIDTH) | norm(block + "norm2", VIT_WIDTH)
        tensors |= linear(block + "mlp.fc1", 4 * VIT_WIDTH, VIT_WIDTH) | linear(block + "mlp.fc2", VIT_WIDTH, 4 * VIT_WIDTH)
    tensors |= norm(v + "norm", VIT_WIDTH)
    tensors |= {t + "embeddings.position_ids": torch.arange(POSITIONS)[None],
                t + "embeddings.word_embeddings.weight": torch.randn(vocab_size, BERT_WIDTH, generator=generator),
                t + "embeddings.position_embeddings.weight": torch.randn(POSITIONS, BERT_WIDTH, generator=generator)}
    tensors |= norm(t + "embeddings.LayerNorm", BERT_WIDTH)
    for i in range(BERT_LAYERS):
        layer = f"{t}encoder.layer.{i}."
        for attention, context_width in (("attention", BERT_WIDTH), ("crossattention", VIT_WIDTH)):
            tensors |= linear(f"{layer}{attention}.self.query", BERT_WIDTH, BERT_WIDTH)
            tensors |= linear(f"{layer}{attention}.self.key", BERT_WIDTH, context_width)
            tensors |= linear(f"{layer}{attention}.self.value", BERT_WIDTH, context_width)
            tensors |= linear(f"{layer}{attention}.output.dense", BERT_WIDTH, BERT_WIDTH)
            tensors |= norm(f"{layer}{attention}.output.LayerNorm", BERT_WIDTH)
        tensors |= linear(layer + "intermediate.dense", BERT_MLP, BERT_WIDTH)
        tensors |= linear(layer + "output.dense", BERT_WIDTH, BERT_MLP) | norm(layer + "output.LayerNorm", BERT_WIDTH)
    tensors |= linear("blip.vision_proj", 256, VIT_WIDTH) | linear("blip.text_proj", 256, BERT_WIDTH)
    for index, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, BERT_WIDTH), (128, 1024), (64, 128), (16, 64), (1, 16))):
        tensors |= linear(f"mlp.layers.{index}", n_out, n_in)
    return tensors


@pytest.fixture
def tiny_imagereward(tmp_path, bert_folder):
    """(ImageReward.pt, med_config.json, its tensors): a tiny random ImageReward under the real file's names, and a
    tiny BERT med_config whose encoder_width (768) is wrong on purpose, as the real one's is (BLIP_Pretrain sets it)."""
    vocab_size = len(WORDS) + 5 + 2  # + BLIP's [DEC] and [ENC]
    tensors = tiny_imagereward_tensors(vocab_size)
    torch.save(tensors, tmp_path / "ImageReward.pt")
    med_config = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                  "hidden_dropout_prob": 0.1, "hidden_size": BERT_WIDTH, "initializer_range": 0.02,
                  "intermediate_size": BERT_MLP, "layer_norm_eps": 1e-12, "max_position_embeddings": POSITIONS,
                  "model_type": "bert", "num_attention_heads": BERT_HEADS, "num_hidden_layers": BERT_LAYERS,
                  "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": 768,
                  "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med_config))
    return str(tmp_path / "ImageReward.pt"), str(tmp_path / "med_config.json"), tensors


@pytest.fixture
def images(tmp_path):
    """Images of several sizes and modes: RGB larger and smaller than 224, a palette image, an RGBA one, a 1-bit one."""
    return mixed_mode_images(str(tmp_path))


def imagereward_forward(tensors, pixels, input_ids, attention_mask):
    """ImageReward.score_gard rebuilt in plain torch from its code (vit.py, med.py, ImageReward.py)."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."

    def linear(x, prefix):
        return F.linear(x, tensors[prefix + ".weight"], tensors[prefix + ".bias"])

    def layer_norm(x, prefix, eps):
        return F.layer_norm(x, x.shape[-1:], tensors[prefix + ".weight"], tensors[prefix + ".bias"], eps)

    # VisionTransformer.forward: patches, cls token, positions; Block: x + attn(norm1(x)), x + mlp(norm2(x)); norm
    x = F.conv2d(pixels, tensors[v + "patch_embed.proj.weight"], tensors[v + "patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([tensors[v + "cls_token"].expand(len(x), -1, -1), x], dim=1) + tensors[v + "pos_embed"]
    heads = VIT_WIDTH // 64
    for i in range(VIT_BLOCKS):
        block = f"{v}blocks.{i}."
        B, N, C = x.shape
        qkv = linear(layer_norm(x, block + "norm1", 1e-6), block + "attn.qkv")
        q, k, value = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        x = x + linear((attention @ value).transpose(1, 2).reshape(B, N, C), block + "attn.proj")
        x = x + linear(F.gelu(linear(layer_norm(x, block + "norm2", 1e-6), block + "mlp.fc1")), block + "mlp.fc2")
    image_embeds = layer_norm(x, v + "norm", 1e-6)

    # BertModel.forward, mode='multimodal': word + position embeddings; per layer self-attention with the padding
    # mask as -10000, cross-attention to every image token, the feed-forward; each sub-layer LayerNorm(out + input)
    def bert_attention(prefix, hidden, context, additive_mask):
        def heads_of(y):
            return y.view(*y.shape[:2], BERT_HEADS, -1).permute(0, 2, 1, 3)
        q, k, value = (heads_of(linear(source, f"{prefix}.self.{name}"))
                       for name, source in (("query", hidden), ("key", context), ("value", context)))
        scores = q @ k.transpose(-1, -2) / math.sqrt(BERT_WIDTH // BERT_HEADS) + additive_mask
        out = (scores.softmax(dim=-1) @ value).permute(0, 2, 1, 3).reshape(hidden.shape)
        return layer_norm(linear(out, f"{prefix}.output.dense") + hidden, f"{prefix}.output.LayerNorm", 1e-12)

    length = input_ids.shape[1]
    h = (tensors[t + "embeddings.word_embeddings.weight"][input_ids]
         + tensors[t + "embeddings.position_embeddings.weight"][:length])
    h = layer_norm(h, t + "embeddings.LayerNorm", 1e-12)
    padding = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    image_mask = (1.0 - torch.ones(image_embeds.shape[:2])[:, None, None, :]) * -10000.0
    for i in range(BERT_LAYERS):
        layer = f"{t}encoder.layer.{i}."
        h = bert_attention(layer + "attention", h, h, padding)
        h = bert_attention(layer + "crossattention", h, image_embeds, image_mask)
        h = layer_norm(linear(F.gelu(linear(h, layer + "intermediate.dense")), layer + "output.dense") + h,
                       layer + "output.LayerNorm", 1e-12)
    reward = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        reward = linear(reward, f"mlp.layers.{index}")
    return ((reward - 0.16717362830052426) / 1.0333394966054072)[:, 0]


def imagereward_inputs(bert_folder, prompt, image_path):
    """ImageReward.score's inputs: BLIP's tokenizer (BERT + [DEC] as bos + [ENC]), padded and truncated to 35, and its
    _transform(224): Resize(224, bicubic) on the PIL image, CenterCrop(224), RGB, ToTensor, OpenAI's mean/std."""
    from transformers import BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(bert_folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    text = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    transform = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                         lambda image: image.convert("RGB"), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    return transform(Image.open(image_path))[None], text.input_ids, text.attention_mask


def test_scores_equal_imagereward_forward_rebuilt_step_by_step(tiny_imagereward, bert_folder, images):
    path, med_config, tensors = tiny_imagereward
    scorer = load_scorer(f"imagereward:{path},tokenizer={bert_folder},med_config={med_config}")
    assert scorer.softmax_scale == 1.0333394966054072
    # every prompt with the images in a shifted order, and one image twice: encoded once, scored per pair; batch 2
    # puts each image's requests into more than one chunk
    prompts = [p for p in PROMPTS for _ in images] + [PROMPTS[0]]
    paired = [images[(i + j) % len(images)] for j in range(len(PROMPTS)) for i in range(len(images))] + [images[1]]
    ours = prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer, prompts, paired, "cpu", batch_size=2,
                               progress=False)
    with torch.no_grad():
        expected = torch.cat([imagereward_forward(tensors, *imagereward_inputs(bert_folder, prompt, image))
                              for prompt, image in zip(prompts, paired)])
    assert expected.std() > 0.1  # the scores differ between pairs: the comparison below means something
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()


def test_the_tokenizer_lowercases_truncates_to_35_and_pads_with_zeros(bert_folder):
    from social_reward.scorers.imagereward import ImageRewardTokenizer
    tokenizer = ImageRewardTokenizer(bert_folder)
    ids = tokenizer(PROMPTS)
    assert ids.shape == (3, 35) and ids.dtype == torch.long
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    assert ids[0, :6].tolist() == [vocab.index(w) for w in ("[CLS]", "two", "red", "circles", "[SEP]", "[PAD]")]
    assert ids[2, -1] == vocab.index("[SEP]") and (ids[2] != 0).all()
    assert len(tokenizer) == len(vocab) + 2 and tokenizer.bert.convert_tokens_to_ids("[ENC]") == len(vocab) + 1


def test_as_a_reward_it_scores_pil_images_as_score_does_and_passes_gradients_to_tensors(tiny_imagereward,
                                                                                        bert_folder, images):
    from social_reward.reward.differentiable import Reward
    path, med_config, _ = tiny_imagereward
    reward = Reward.load(f"imagereward:{path},tokenizer={bert_folder},med_config={med_config}")
    prompts = [PROMPTS[1], PROMPTS[0]]
    expected = prompt_image_scores(reward.scorer.model, reward.scorer.preprocess, reward.scorer.tokenizer, prompts,
                                   images[:2], "cpu", progress=False)
    with torch.no_grad():
        assert torch.allclose(reward([Image.open(p) for p in images[:2]], prompts), expected, atol=1e-5, rtol=0)
    image = Image.open(images[0])  # RGB, 300 x 260
    pixels = tensor_with_grad(images[0])
    prepared = reward.scorer.tensor_preprocess(pixels)
    # on the tensor: ImageReward's ReFL preprocessing; PIL's bicubic and torch's antialiased one differ by a few 1/255
    assert prepared.shape == (1, 3, 224, 224) and (prepared - reward.scorer.preprocess(image)).abs().mean() < 0.03
    assert_gradient_reaches_the_pixels(reward, pixels, prompts[0])


def test_our_names_cover_exactly_the_real_checkpoints_625_tensors_with_their_shapes():
    rows = [line.split() for line in open(KEYS_FIXTURE) if not line.startswith("#")]
    shapes = {key: torch.Size(int(d) for d in shape.split(",")) for key, shape, _ in rows}
    assert len(shapes) == 625
    on_meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    vision = vision_config(on_meta)
    assert vision.to_dict() == vit_config().to_dict()  # ViT-L/16 at 224 px, as create_vit('large') makes it
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
            vision.image_size) == (1024, 24, 16, 16, 224)
    with torch.device("meta"):
        model = ImageReward(vision, text_config(None, vision.hidden_size))
    ours = {key: tensor.shape for key, tensor in model.state_dict().items()}
    mapped = {our_name(key): shape for key, shape in shapes.items() if our_name(key)}
    assert len(mapped) == len(ours) == 620 and mapped == ours
    assert sorted(k for k in shapes if our_name(k) is None) == [
        "blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias", "blip.text_proj.weight",
        "blip.vision_proj.bias", "blip.vision_proj.weight"]
    # the tiny test model has the real file's names, block and layer numbers aside
    def numbered(key):
        return re.sub(r"\.\d+\.", ".N.", key)
    assert {numbered(k) for k in tiny_imagereward_tensors(27)} == {numbered(k) for k in shapes}


@pytest.mark.parametrize("make, expected", [
    ("clip", "clip.pt: not an ImageReward checkpoint"),
    ("no_vocabulary", "tokenizer={tmp}/empty has no vocab.txt nor tokenizer.json: not a BERT tokenizer folder"),
    ("other_vocabulary", "tokenizer={tmp}/other: 8 tokens with BLIP's two added, the checkpoint embeds 27"),
])
def test_bad_imagereward_inputs_end_in_one_line_naming_the_culprit(make, expected, tiny_imagereward, bert_folder,
                                                                   images, tmp_path):
    path, med_config, _ = tiny_imagereward
    if make == "clip":
        torch.manual_seed(0)
        path = str(tmp_path / "clip.pt")
        torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), path)
    if make == "no_vocabulary":
        bert_folder = str(tmp_path / "empty")
        os.mkdir(bert_folder)
        (tmp_path / "empty" / "config.json").write_text("{}")
    if make == "other_vocabulary":
        from transformers import BertTokenizer
        (tmp_path / "vocab2.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
        bert_folder = str(tmp_path / "other")
        BertTokenizer(str(tmp_path / "vocab2.txt")).save_pretrained(bert_folder)
    with pytest.raises(InputError) as error:  # run_cli prints it as "error: <message>", exit status 2
        rank_images("a cat", images, device="cpu", num_workers=0,
                    scorer=f"imagereward:{path},tokenizer={bert_folder},med_config={med_config}")
    assert expected.format(tmp=tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_compare_sets_imagereward_beside_a_clip_scorer(tiny_imagereward, bert_folder, shapes_pairs, tiny_init, tmp_path):
    path, med_config, _ = tiny_imagereward
    pairs = shapes_pairs.head(8)
    pairs.to_parquet(tmp_path / "pairs.parquet")
    spec = f"imagereward:{path},tokenizer={bert_folder},med_config={med_config}"
    compare([str(tmp_path / "pairs.parquet")], {"ours": f"clip:{tiny_init},model={TINY_CLIP}", "ir": spec},
            out=str(tmp_path / "out"), prompts=2, device="cpu", num_workers=0)
    table = pd.read_csv(tmp_path / "out" / "table.csv").set_index("scorer")
    assert list(table.index) == ["ours", "ir"]
    scorer = load_scorer(spec)
    pos, neg = (prompt_image_scores(scorer.model, scorer.preprocess, scorer.tokenizer, pairs.prompt, pairs[column],
                                    "cpu", progress=False) for column in ("pos_path", "neg_path"))
    assert table.accuracy["ir"] == pytest.approx(100 * (pos >= neg).float().mean().item())


# ---- the PickScore scorer converts to RGB before resizing; a hub tag fails at once offline (the same issue) --------

@pytest.mark.parametrize("mode", ["P", "1"])
def test_pickscore_preprocesses_palette_and_1_bit_images_as_clips_processor(mode, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=49408),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "pickscore")
    scorer = load_scorer(f"pickscore:{tmp_path / 'pickscore'}")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for size in [(80, 60), (50, 90)]:
        image = Image.merge("RGB", [Image.effect_noise(size, 60 + 10 * c) for c in range(3)])
        image = image.quantize(16) if mode == "P" else image.convert(mode)
        theirs = processor(images=[image], return_tensors="pt").pixel_values[0]
        # a palette image resized before it becomes RGB is resized with nearest neighbour: differences of up to 2
        assert (scorer.preprocess(image) - theirs).abs().max() < 0.02  # one grey level: 1 / 255 / 0.26


@pytest.fixture
def offline(monkeypatch):
    """No network: a TCP connect fails at once (as a DNS failure does); the connects tried are recorded."""
    tried = []

    def refuse(address, *args, **kwargs):
        tried.append(address)
        raise OSError("Name or service not known")
    monkeypatch.setattr(socket, "create_connection", refuse)
    return tried


@pytest.fixture
def hub_downloads(monkeypatch):
    """Each hub download open_clip asks for, with whether the hub library was in offline mode then."""
    import huggingface_hub
    import open_clip.pretrained
    calls = []
    real = open_clip.pretrained.hf_hub_download

    def spy(*args, **kwargs):
        calls.append(huggingface_hub.constants.is_offline_mode())
        return real(*args, **kwargs)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", spy)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return calls


@pytest.fixture
def tiny_tag(monkeypatch, tmp_path):
    """A hub weights tag "hub" for the tiny CLIP (test/tiny-clip on the hub), and an empty hub cache."""
    import huggingface_hub
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-clip", {"hub": {"hf_hub": "test/tiny-clip/", "quick_gelu": True}})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return str(tmp_path / "hub")


def test_a_hub_tag_without_network_fails_at_once_in_the_hubs_offline_mode(offline, hub_downloads, tiny_tag):
    import huggingface_hub
    with pytest.raises(InputError, match=r"^could not download the 'hub' weights of tiny-clip \(no network, or not "
                                         r"in the hub cache\); pass a local file instead"):
        load_model(TINY_CLIP, pretrained="hub")
    assert offline == [("huggingface.co", 443)]  # one probe
    assert hub_downloads and all(hub_downloads)  # every download asked in offline mode: no request, no retry
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # and the switch is put back


def test_a_hub_tag_without_network_still_loads_from_the_hub_cache(offline, hub_downloads, tiny_tag):
    from safetensors.torch import save_file
    torch.manual_seed(3)
    weights = load_model(TINY_CLIP, pretrained="none")[0].state_dict()
    snapshot = os.path.join(tiny_tag, "models--test--tiny-clip", "snapshots", "0" * 40)
    os.makedirs(snapshot)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(snapshot, "open_clip_model.safetensors"))
    os.makedirs(os.path.join(tiny_tag, "models--test--tiny-clip", "refs"))
    with open(os.path.join(tiny_tag, "models--test--tiny-clip", "refs", "main"), "w") as f:
        f.write("0" * 40)
    model = load_model(TINY_CLIP, pretrained="hub")[0]
    assert hub_downloads and all(hub_downloads)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
