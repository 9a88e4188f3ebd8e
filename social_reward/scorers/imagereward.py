"""ImageReward (THUDM/ImageReward) from its ImageReward.pt: BLIP's ViT-L/16 image tower, BLIP's BERT text encoder that
cross-attends to the image's tokens, and ImageReward's MLP on the text encoder's first token, built from transformers'
BLIP classes (ports of BLIP's own) with ImageReward.pt's tensors mapped onto them.

    model, preprocess, tokenizer = load_imagereward("ImageReward.pt", "bert-base-uncased/")
    image_tokens = model.encode_image(preprocess(Image.open("a.png"))[None])
    reward = model.pair_scores(image_tokens, tokenizer(["a cat astronaut"]))   # ImageReward's score(prompt, image)

The score is a property of a (prompt, image) pair, not a dot product of two embeddings: scoring/encoding.py encodes each
distinct image once and runs the text encoder per pair (see encoding.prompt_image_scores).
"""
import json
import math
import os
import re

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from social_reward.errors import InputError
from social_reward.models.weights import assign_weights, read_state_dict
from social_reward.scorers.base import Scorer, check_weights_file
from social_reward.scorers.preprocess import TensorPreprocess

# ImageReward's reward is its MLP's output standardised with these (ImageReward.py: self.mean, self.std)
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072


MAX_TOKENS = 35  # ImageReward's score(): padding="max_length", truncation=True, max_length=35


# ImageReward's med_config.json: BERT-base with cross-attention (its encoder_width is replaced by the image tower's width)
BERT_BASE = {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
             "pad_token_id": 0, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


BERT_SIZES = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]


VIT_HEAD_WIDTH = 64  # BLIP's ViTs split attention into 64-wide heads (ViT-L/16: 1024 = 16 x 64); the file cannot say


# names inside a ViT block: BLIP's (timm's) -> transformers' BlipEncoderLayer
VIT_BLOCK_NAMES = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                   "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


VIT_NAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


# tensors of the file the score does not use: BLIP's contrastive projections, and position_ids (a constant arange)
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def our_name(key):
    """ImageReward.pt's name of a tensor -> its name in ImageReward below; None for a tensor the score does not use.
    A name of neither kind comes back as it is (load_imagereward then reports it as unexpected)."""
    if key.startswith(UNUSED):
        return None
    if key.startswith("blip.text_encoder."):  # transformers' BLIP text model keeps BLIP's names
        return "text." + key.removeprefix("blip.text_encoder.")
    if key.startswith("mlp.layers."):
        return "mlp." + key.removeprefix("mlp.layers.")
    if not key.startswith("blip.visual_encoder."):
        return key
    name = key.removeprefix("blip.visual_encoder.")
    block = re.fullmatch(r"blocks\.(\d+)\.(\w+\.\w+|norm\d)\.(weight|bias)", name)
    if block and block[2] in VIT_BLOCK_NAMES:
        return f"vision.encoder.layers.{block[1]}.{VIT_BLOCK_NAMES[block[2]]}.{block[3]}"
    return "vision." + VIT_NAMES[name] if name in VIT_NAMES else key


class ImageReward(nn.Module):
    """ImageReward's score: image tokens from the ViT; the BERT encoder reads the prompt attending to them; the MLP
    (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations, as in its file) on the first token, standardised."""

    def __init__(self, vision_config, text_config, pad_token_id=0):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = nn.Sequential(nn.Linear(text_config.hidden_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                 nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                 nn.Linear(16, 1))
        self.pad_token_id, self.image_size = pad_token_id, vision_config.image_size

    def encode_image(self, pixels, normalize=True):
        """The image tokens [B, N, D] the text encoder attends to (`normalize` is ignored: there is no embedding)."""
        return self.vision(pixel_values=pixels).last_hidden_state

    def pair_scores(self, image_features, tokens):
        """ImageReward's reward of each row: prompt tokens[i] (ids [B, 35], padded with pad_token_id) on the image
        whose tokens are image_features[i]. Every image token is attended to (ImageReward's mask is all ones)."""
        attention_mask = (tokens != self.pad_token_id).long()
        hidden = self.text(input_ids=tokens, attention_mask=attention_mask,
                           encoder_hidden_states=image_features).last_hidden_state
        return ((self.mlp(hidden[:, 0]) - REWARD_MEAN) / REWARD_STD)[:, 0]


class ImageRewardTokenizer:
    """BERT's WordPiece from a local folder (as BertTokenizer.save_pretrained writes it, e.g. bert-base-uncased/) with
    BLIP's added tokens ([DEC] as bos, [ENC]): prompts -> ids [B, 35], padded and truncated as ImageReward's score."""

    def __init__(self, folder):
        from transformers import BertTokenizer
        self.bert = BertTokenizer.from_pretrained(folder, local_files_only=True)
        self.bert.add_special_tokens({"bos_token": "[DEC]"})
        self.bert.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.pad_token_id = self.bert.pad_token_id

    def __len__(self):
        return len(self.bert)

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.empty(0, MAX_TOKENS, dtype=torch.long)
        return self.bert(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                         return_tensors="pt").input_ids


def _to_rgb(image):
    return image.convert("RGB")


def image_preprocess(size=224):
    """ImageReward's _transform: shortest side to `size` (bicubic, PIL), centre crop, then RGB (so a palette image is
    resized before it becomes RGB, as its code does), ToTensor, OpenAI's mean/std."""
    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), _to_rgb, ToTensor(),
                    Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])


def vit_config(width=1024, layers=24, patch=16, image_size=224, mlp_width=4096):
    """transformers' BlipVisionConfig of one of BLIP's ViTs (by default ImageReward's: create_vit('large'), ViT-L/16
    at 224 px); timm's LayerNorm eps 1e-6 and exact GELU, as BLIP's vit.py has them."""
    from transformers import BlipVisionConfig
    return BlipVisionConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // VIT_HEAD_WIDTH,
                            intermediate_size=mlp_width, image_size=image_size, patch_size=patch, hidden_act="gelu",
                            layer_norm_eps=1e-6)


def vision_config(state_dict):
    """The ViT's config, its sizes read from ImageReward.pt's tensors' shapes (ViT-L/16 at 224 px in the real file)."""
    patch = state_dict["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    blocks = {int(k.split(".")[3]) for k in state_dict if k.startswith("blip.visual_encoder.blocks.")}
    return vit_config(width=state_dict["blip.visual_encoder.cls_token"].shape[-1], layers=len(blocks), patch=patch,
                      image_size=patch * math.isqrt(state_dict["blip.visual_encoder.pos_embed"].shape[1] - 1),
                      mlp_width=state_dict["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0])


def text_config(med_config, encoder_width):
    """transformers' BlipTextConfig from a med_config.json (None: BERT-base, as ImageReward's), cross-attending to
    `encoder_width`-wide image tokens whatever the file says, as BLIP_Pretrain sets it."""
    from transformers import BlipTextConfig
    bert = dict(BERT_BASE)
    if med_config is not None:
        try:
            with open(med_config) as f:
                given = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"med_config={med_config}: not a readable JSON file ({type(e).__name__})") from None
        missing = [key for key in BERT_SIZES if key not in given] if isinstance(given, dict) else BERT_SIZES
        if missing:
            raise InputError(f"med_config={med_config}: not a BERT config (no {', '.join(missing)})")
        bert.update({key: given[key] for key in BERT_BASE if key in given})
    # transformers builds the cross-attention layers only in a decoder's config; pair_scores calls it as an encoder
    # (bidirectional self-attention), as ImageReward calls BLIP's
    return BlipTextConfig(**bert, encoder_hidden_size=encoder_width, is_decoder=True, bos_token_id=None,
                          eos_token_id=None, sep_token_id=None)  # ids for generation, which scoring does not do


def load_imagereward(path, tokenizer_folder, med_config=None, device="cpu"):
    """(model, preprocess, tokenizer) of an ImageReward.pt, in fp32 and eval mode.

    path:             ImageReward.pt (HF THUDM/ImageReward), the state dict of ImageReward's module.
    tokenizer_folder: BERT's uncased WordPiece (bert-base-uncased as save_pretrained writes it).
    med_config:       its med_config.json (default: BERT-base, which is what ImageReward's is).
    """
    state_dict = read_state_dict(path)
    if not all(any(k.startswith(p) for k in state_dict) for p in ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")):
        raise InputError(f"{path}: not an ImageReward checkpoint (no blip.visual_encoder.*, blip.text_encoder.* and "
                         f"mlp.* tensors)")
    tokenizer = ImageRewardTokenizer(tokenizer_folder)
    try:
        vision = vision_config(state_dict)
    except KeyError as e:
        raise InputError(f"{path}: not an ImageReward checkpoint (no {e.args[0]})") from None
    text = text_config(med_config, vision.hidden_size)
    words = state_dict.get("blip.text_encoder.embeddings.word_embeddings.weight")
    if words is not None and len(tokenizer) != len(words):
        raise InputError(f"tokenizer={tokenizer_folder}: {len(tokenizer)} tokens with BLIP's two added, the checkpoint "
                         f"embeds {len(words)}: not the vocabulary it was trained with (bert-base-uncased)")
    with torch.device("meta"):
        model = ImageReward(vision, text, tokenizer.pad_token_id)
    assign_weights(model, {our_name(k): v for k, v in state_dict.items() if our_name(k)}, path)
    positions = model.text.embeddings.position_ids  # a buffer no file holds: made again off the meta device
    model.text.embeddings.position_ids = torch.arange(positions.shape[-1]).expand(1, -1)
    return model.to(device).eval(), image_preprocess(vision.image_size), tokenizer


def check(spec, path, options):
    """The weights file, ImageReward's tokenizer folder (BERT's vocabulary) and its optional med_config.json exist."""
    check_weights_file(spec, path)
    folder = options.get("tokenizer")
    if not folder:
        raise InputError(f"--scorer {spec}: ImageReward needs BERT's tokenizer: tokenizer=DIR (bert-base-uncased as "
                         f"save_pretrained writes it)")
    if not os.path.isdir(folder):
        raise InputError(f"--scorer {spec}: tokenizer={folder}: no such folder")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in ("vocab.txt", "tokenizer.json")):
        raise InputError(f"--scorer {spec}: tokenizer={folder} has no vocab.txt nor tokenizer.json: not a BERT "
                         f"tokenizer folder")
    if "med_config" in options and not os.path.isfile(options["med_config"]):
        raise InputError(f"--scorer {spec}: med_config={options['med_config']}: no such file")


def load(path, options, device):
    model, preprocess, tokenizer = load_imagereward(path, options["tokenizer"], options.get("med_config"), device)
    # ImageReward was trained with a softmax over the MLP's outputs of the two images; its reward is that output
    # divided by REWARD_STD, so REWARD_STD * reward gives back the model's own preference probabilities.
    # On tensors, as ImageReward's ReFL feeds its score_gard: Resize(224), CenterCrop(224), Normalize
    return Scorer(model, preprocess, tokenizer, REWARD_STD,
                  TensorPreprocess(model.image_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
