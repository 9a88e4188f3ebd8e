"""Tiny random HPSv3 and MPS checkpoints in each peer's published layout, and the small files of the models they load
their tokenizers and processors from, made at test time (nothing downloaded). Used by tests/test_hpsv3.py,
tests/test_mps.py and docs/scorers.md's check against the peers' own code.

    ckpt, base, tensors = save_tiny_hpsv3(folder)     # HPSv3.safetensors, a Qwen2-VL-7B-Instruct-like base folder
    ckpt, processor, tensors = save_tiny_mps(folder)  # MPS_overall_checkpoint.pth (a pickled module), laion's folder
"""
import json
import math
import os
import sys
import types

import torch
from torch import nn

# ---- HPSv3 ---------------------------------------------------------------------------------------------------------

# Qwen2-VL's special tokens, in its tokenizer's order (ids follow the BPE vocabulary, as 151643.. follow Qwen2's)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-7B-Instruct's chat_template.json
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
# Qwen2's pre-tokenizer split (its tokenizer.json)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
BPE_SIZE = 700  # byte-level alphabet (256) and merges learnt from the instruction and prompts below
# the tiny Qwen2-VL: vision width 32 (2 heads of 16), 2 blocks; language model width 64 (4 heads of 16, 2 key/value
# heads), 2 layers; HPSv3's head at its real widths (1024, 16, 2)
VISION, VISION_DEPTH, VISION_HEADS, WIDTH, LAYERS, HEADS, KV_HEADS, MLP = 32, 2, 2, 64, 2, 4, 2, 128
CONFIG_VOCAB = BPE_SIZE + len(QWEN_SPECIALS) + 26  # Qwen2-VL's config pads its vocabulary (152064), as here


def write_qwen_tokenizer(folder, corpus):
    """tokenizer.json (a byte-level BPE learnt from `corpus`, Qwen2's split and specials) and tokenizer_config.json,
    as Qwen2-VL-7B-Instruct's folder has them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    first = tokenizer.token_to_id(QWEN_SPECIALS[0])
    config = {"add_prefix_space": False, "added_tokens_decoder": {
        str(first + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                         "special": True} for i, t in enumerate(QWEN_SPECIALS)},
        "additional_special_tokens": QWEN_SPECIALS[1:], "bos_token": None, "chat_template": QWEN_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "padding_side": "left",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return {t: first + i for i, t in enumerate(QWEN_SPECIALS)}


def write_qwen_base(folder, corpus):
    """A Qwen2-VL-7B-Instruct-like folder without weights: config.json (its keys, tiny sizes), the tokenizer,
    chat_template.json, preprocessor_config.json."""
    os.makedirs(folder, exist_ok=True)
    ids = write_qwen_tokenizer(folder, corpus)
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0,
              "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
              "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
              "video_token_id": ids["<|video_pad|>"], "hidden_act": "silu", "hidden_size": WIDTH,
              "initializer_range": 0.02, "intermediate_size": MLP, "max_position_embeddings": 32768,
              "max_window_layers": LAYERS, "model_type": "qwen2_vl", "num_attention_heads": HEADS,
              "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-06,
              "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
              "use_sliding_window": False,
              "vision_config": {"depth": VISION_DEPTH, "embed_dim": VISION, "mlp_ratio": 4, "num_heads": VISION_HEADS,
                                "in_chans": 3, "hidden_size": WIDTH, "patch_size": 14, "spatial_merge_size": 2,
                                "spatial_patch_size": 14, "temporal_patch_size": 2},
              "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}, "vocab_size": CONFIG_VOCAB}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(folder, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN_CHAT_TEMPLATE}, f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                   "processor_class": "Qwen2VLProcessor"}, f)
    return ids


def random_tensors(shapes, seed):
    """Random tensors of `shapes` ({name: shape}): weights ~ 1/sqrt(fan in), norms near 1, biases small, so that
    every layer moves the score."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1 and name.endswith("weight"):  # a norm's scale
            tensors[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            tensors[name] = 0.1 * torch.randn(shape, generator=generator)
        else:
            tensors[name] = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    return tensors


def hpsv3_shapes(vocab):
    """HPSv3.safetensors' names and shapes (transformers 4.45's Qwen2VLForConditionalGeneration + rm_head) at the tiny
    sizes, `vocab` rows in the embedding (the tokenizer's, <|Reward|> included)."""
    shapes = {"visual.patch_embed.proj.weight": (VISION, 3, 2, 14, 14)}
    for i in range(VISION_DEPTH):
        block = f"visual.blocks.{i}."
        shapes |= {block + "norm1.weight": (VISION,), block + "norm1.bias": (VISION,),
                   block + "norm2.weight": (VISION,), block + "norm2.bias": (VISION,),
                   block + "attn.qkv.weight": (3 * VISION, VISION), block + "attn.qkv.bias": (3 * VISION,),
                   block + "attn.proj.weight": (VISION, VISION), block + "attn.proj.bias": (VISION,),
                   block + "mlp.fc1.weight": (4 * VISION, VISION), block + "mlp.fc1.bias": (4 * VISION,),
                   block + "mlp.fc2.weight": (VISION, 4 * VISION), block + "mlp.fc2.bias": (VISION,)}
    merged = 4 * VISION
    shapes |= {"visual.merger.ln_q.weight": (VISION,), "visual.merger.ln_q.bias": (VISION,),
               "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
               "visual.merger.mlp.2.weight": (WIDTH, merged), "visual.merger.mlp.2.bias": (WIDTH,),
               "model.embed_tokens.weight": (vocab, WIDTH), "model.norm.weight": (WIDTH,),
               "lm_head.weight": (vocab, WIDTH)}
    head_dim = WIDTH // HEADS
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        shapes |= {layer + "self_attn.q_proj.weight": (WIDTH, WIDTH), layer + "self_attn.q_proj.bias": (WIDTH,),
                   layer + "self_attn.k_proj.weight": (KV_HEADS * head_dim, WIDTH),
                   layer + "self_attn.k_proj.bias": (KV_HEADS * head_dim,),
                   layer + "self_attn.v_proj.weight": (KV_HEADS * head_dim, WIDTH),
                   layer + "self_attn.v_proj.bias": (KV_HEADS * head_dim,),
                   layer + "self_attn.o_proj.weight": (WIDTH, WIDTH), layer + "mlp.gate_proj.weight": (MLP, WIDTH),
                   layer + "mlp.up_proj.weight": (MLP, WIDTH), layer + "mlp.down_proj.weight": (WIDTH, MLP),
                   layer + "input_layernorm.weight": (WIDTH,), layer + "post_attention_layernorm.weight": (WIDTH,)}
    shapes |= {"rm_head.0.weight": (1024, WIDTH), "rm_head.0.bias": (1024,), "rm_head.3.weight": (16, 1024),
               "rm_head.3.bias": (16,), "rm_head.5.weight": (2, 16), "rm_head.5.bias": (2,)}
    return shapes


def save_tiny_hpsv3(folder, corpus, seed=0):
    """(HPSv3.safetensors, the base folder, its tensors): a tiny random HPSv3 under the real file's names; the base
    folder's tokenizer learnt from `corpus`."""
    from safetensors.torch import save_file
    base = os.path.join(folder, "Qwen2-VL-7B-Instruct")
    ids = write_qwen_base(base, corpus)
    vocab = max(ids.values()) + 2  # + HPSv3's <|Reward|>, which resize_token_embeddings gives a row
    tensors = random_tensors(hpsv3_shapes(vocab), seed)
    tensors["model.embed_tokens.weight"] *= 2  # tokens of about unit norm into the first RMSNorm, as a trained model's
    tensors["rm_head.5.weight"] *= 10  # mu spread over tenths between images
    path = os.path.join(folder, "HPSv3.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    return path, base, tensors


# ---- MPS -----------------------------------------------------------------------------------------------------------

# the tiny CLIP: text and vision width 32, 2 layers, 2 heads; patch 32 at 224 px; MPS's condition module at
# projection width 32, 2 layers, 2 heads of 64 (Cross_model's default head width), feed-forward 4x
CLIP_WIDTH, CLIP_LAYERS, CLIP_HEADS, PATCH = 32, 2, 2, 32
CONDITION_LAYERS, CONDITION_HEADS, CONDITION_HEAD_DIM = 2, 2, 64


def write_clip_processor(folder):
    """laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer and processor files: CLIP's BPE (written from the vocabulary
    open_clip ships), tokenizer_config.json (77 tokens), preprocessor_config.json (CLIPImageProcessor, 224 px)."""
    from social_reward.models.export import write_clip_tokenizer_files
    write_clip_tokenizer_files(folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": 77, "errors": "replace", "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "tokenizer_class": "CLIPTokenizer"}, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}, f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}, f)
    return folder


def tiny_clip_config():
    """A tiny transformers CLIPConfig; the text config keeps the legacy eos_token_id 2 (CLIP-H's, whose pooling then
    takes the highest id: the first end-of-text token)."""
    from transformers import CLIPConfig
    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH,
                         num_hidden_layers=CLIP_LAYERS, num_attention_heads=CLIP_HEADS, max_position_embeddings=77,
                         hidden_act="gelu", projection_dim=CLIP_WIDTH, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=CLIP_LAYERS,
                           num_attention_heads=CLIP_HEADS, image_size=224, patch_size=PATCH, hidden_act="gelu",
                           projection_dim=CLIP_WIDTH),
        projection_dim=CLIP_WIDTH)


def _fake_modules(names):
    """Empty modules under `names` in sys.modules, so that classes claiming to live there pickle by those names."""
    made = {}
    for name in names:
        if name not in sys.modules:
            made[name] = sys.modules[name] = types.ModuleType(name)
    return made


def mps_layout_classes():
    """Classes named as MPS's (trainer.models.clip_model.CLIPModel, XCLIPModel; trainer.models.cross_modeling's
    Cross_model and its parts), holding tensors under MPS's names and shapes: a torch.save of their module pickles as
    MPS_overall_checkpoint.pth does. Only the layout: none of MPS's code."""
    from transformers import CLIPModel as HFCLIPModel

    def named(cls, module):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(sys.modules[module], cls.__name__, cls)
        return cls

    _fake_modules(["trainer", "trainer.models", "trainer.models.clip_model", "trainer.models.cross_modeling"])
    cm, xm = "trainer.models.clip_model", "trainer.models.cross_modeling"

    class LayerNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.register_buffer("bias", torch.zeros(dim))

    class RotaryEmbedding(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    class SwiGLU(nn.Module):
        pass

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

    class CrossAttention(nn.Module):
        def __init__(self, dim, dim_head, heads, ff_mult):
            super().__init__()
            self.norm, self.context_norm = LayerNorm(dim), nn.Identity()
            self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
            self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
            self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
            self.ff = nn.Sequential(nn.Linear(dim, 2 * ff_mult * dim, bias=False), SwiGLU(),
                                    nn.Linear(ff_mult * dim, dim, bias=False))

    class ParallelTransformerBlock(nn.Module):
        def __init__(self, dim, dim_head, heads, ff_mult):
            super().__init__()
            self.norm = LayerNorm(dim)
            self.rotary_emb = RotaryEmbedding(dim_head)
            self.fused_attn_ff_proj = nn.Linear(dim, heads * dim_head + 2 * dim_head + 2 * ff_mult * dim, bias=False)
            self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
            self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))
            self.register_buffer("pos_emb", None, persistent=False)

    class Cross_model(nn.Module):
        def __init__(self, dim, layer_num, dim_head, heads, ff_mult=4):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleList([
                Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult))]) for _ in range(layer_num))

    class XCLIPModel(HFCLIPModel):
        pass

    class CLIPModel(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.model = XCLIPModel(config)
            self.cross_model = Cross_model(config.projection_dim, CONDITION_LAYERS, CONDITION_HEAD_DIM,
                                           CONDITION_HEADS)

    for cls in (LayerNorm, RotaryEmbedding, SwiGLU, Residual, CrossAttention, ParallelTransformerBlock, Cross_model):
        named(cls, xm)
    return named(CLIPModel, cm), named(XCLIPModel, cm)


def save_tiny_mps(folder, seed=0, dtype=torch.float16, rotary_tables=None):
    """(MPS_overall_checkpoint.pth, the processor folder, its tensors): a tiny random MPS, its module pickled whole in
    half precision as MPS's is, under MPS's class names. rotary_tables: {layer: table} cached in those layers'
    ParallelTransformerBlock.pos_emb, as a module that ran before it was saved holds them."""
    os.makedirs(folder, exist_ok=True)
    processor = write_clip_processor(os.path.join(folder, "CLIP-ViT-H-14-laion2B-s32B-b79K"))
    mps_class, _ = mps_layout_classes()
    model = mps_class(tiny_clip_config())
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith(("position_ids", "inv_freq", "norm.bias",
                                                                              "logit_scale"))}
    tensors = random_tensors(shapes, seed)
    for key in tensors:
        if "embedding" in key:  # CLIP's embeddings near the scale of a trained one's
            tensors[key] = tensors[key] * 0.5 / tensors[key].std()
    model.load_state_dict(tensors, strict=False)
    model = model.to(dtype).eval()
    for index, table in (rotary_tables or {}).items():
        model.cross_model.layers[index][1].fn.pos_emb = table.to(dtype)
    path = os.path.join(folder, "MPS_overall_checkpoint.pth")
    torch.save(model, path)
    return path, processor, {k: v.to(dtype) for k, v in model.state_dict().items()}
