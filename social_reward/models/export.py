"""A checkpoint published for other people's code, the work of scripts/export.py: open_clip's `local-dir:` folder, or
a transformers CLIPModel folder (as PickScore ships), each with a README.md model card; the export is loaded back and
its embeddings checked against the checkpoint's before it appears under `out`.

    export("clip_model/clip_epoch_4_global_step_final.pth", "transformers", "social-reward-hf")
    model = transformers.CLIPModel.from_pretrained("social-reward-hf")   # processor: CLIPProcessor, same folder
"""
import hashlib
import json
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import save_file

from social_reward.errors import InputError
from social_reward.models import DEFAULT_MODEL, EXPORT_FORMATS
from social_reward.models.clip import load_model, resolve_model_name
from social_reward.outputs import check_new_folder, folder_written_whole

TOLERANCE = 1e-4  # largest difference of an exported embedding from the checkpoint's, per element


# Config keys the mapping reads, or that change nothing a ViT CLIP computes at inference; any other key must keep
# open_clip's default for transformers' CLIPModel (plain pre-norm blocks, class-token and end-of-text pooling) to be
# the same function.
MAPPED_TOP = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale", "output_dict"}


MAPPED_VISION = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
                 "output_tokens", "block_type", "attn_pooler_queries", "attn_pooler_heads"}


MAPPED_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id", "eos_id",
               "output_tokens", "block_type", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}


SOT_TOKEN, EOT_TOKEN = 49406, 49407  # CLIP's <|startoftext|>, <|endoftext|> (the largest id: OpenAI pools at argmax)


def _unmapped(cfg, mapped, defaults):
    return [f"{key}={value!r}" for key, value in cfg.items()
            if key not in mapped and not key.startswith("timm_") and value != getattr(defaults, key, object())]


def transformers_config(name, given=None):
    """The transformers CLIPConfig of an open_clip model, or an InputError naming what CLIPModel cannot express
    (`given`: the --model the user gave, for the message)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from transformers import CLIPConfig
    cfg = open_clip.get_model_config(name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    why = None
    if vision.get("timm_model_name"):
        why = f"its image tower is a timm model ({vision['timm_model_name']})"
    elif not isinstance(vision.get("layers", 12), int):
        why = "its image tower is a ResNet, not a ViT"
    elif text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        why = "its text tower or tokenizer is a Hugging Face model's"
    else:
        unmapped = ([k for k in cfg if k not in MAPPED_TOP]  # e.g. multimodal_cfg (CoCa), init_logit_bias (SigLIP)
                    + [f"vision_cfg.{k}" for k in _unmapped(vision, MAPPED_VISION, CLIPVisionCfg)]
                    + [f"text_cfg.{k}" for k in _unmapped(text, MAPPED_TEXT, CLIPTextCfg)])
        image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 16)
        if not isinstance(image_size, int) and len(set(image_size)) > 1:
            unmapped.append(f"vision_cfg.image_size={image_size} (not square)")
        if not isinstance(patch_size, int) and len(set(patch_size)) > 1:
            unmapped.append(f"vision_cfg.patch_size={patch_size} (not square)")
        if unmapped:
            why = f"transformers' CLIPModel has no counterpart for {', '.join(unmapped)}"
    if why:
        raise InputError(f"--model {given or name}: cannot export to transformers: {why}; --to open_clip can")
    as_int = lambda size: size if isinstance(size, int) else size[0]
    width, text_width = vision.get("width", 768), text.get("width", 512)
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"  # open_clip's nn.GELU is the exact (erf) GELU, as is "gelu"
    config = CLIPConfig(
        projection_dim=cfg["embed_dim"],
        vision_config=dict(hidden_size=width, intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
                           num_hidden_layers=vision.get("layers", 12),
                           num_attention_heads=width // vision.get("head_width", 64),
                           image_size=as_int(vision.get("image_size", 224)),
                           patch_size=as_int(vision.get("patch_size", 16)),
                           projection_dim=cfg["embed_dim"], hidden_act=act),
        # transformers pools the text at the first end-of-text token; open_clip at the largest token id: the same
        # position, since <|endoftext|> is the vocabulary's last id
        text_config=dict(hidden_size=text_width, intermediate_size=int(text_width * text.get("mlp_ratio", 4.0)),
                         num_hidden_layers=text.get("layers", 12), num_attention_heads=text.get("heads", 8),
                         max_position_embeddings=text.get("context_length", 77),
                         vocab_size=text.get("vocab_size", 49408),
                         projection_dim=cfg["embed_dim"], hidden_act=act,
                         bos_token_id=SOT_TOKEN, eos_token_id=EOT_TOKEN, pad_token_id=EOT_TOKEN))
    config.architectures = ["CLIPModel"]
    return config


def _block_tensors(source, target, state_dict):
    """One residual block's tensors under transformers' names: the fused attention input split into q, k, v."""
    out = {}
    for q_k_v, name in zip(state_dict[f"{source}.attn.in_proj_weight"].chunk(3), ("q_proj", "k_proj", "v_proj")):
        out[f"{target}.self_attn.{name}.weight"] = q_k_v
    for q_k_v, name in zip(state_dict[f"{source}.attn.in_proj_bias"].chunk(3), ("q_proj", "k_proj", "v_proj")):
        out[f"{target}.self_attn.{name}.bias"] = q_k_v
    for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        for kind in ("weight", "bias"):
            out[f"{target}.{theirs}.{kind}"] = state_dict[f"{source}.{ours}.{kind}"]
    return out


def transformers_state_dict(state_dict, config):
    """An OpenAI-format CLIP state dict under transformers' CLIPModel names."""
    out = {
        "logit_scale": state_dict["logit_scale"],
        "text_model.embeddings.token_embedding.weight": state_dict["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state_dict["positional_embedding"],
        "text_model.final_layer_norm.weight": state_dict["ln_final.weight"],
        "text_model.final_layer_norm.bias": state_dict["ln_final.bias"],
        "text_projection.weight": state_dict["text_projection"].T,
        "vision_model.embeddings.class_embedding": state_dict["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state_dict["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state_dict["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state_dict["visual.ln_pre.weight"],  # (sic) transformers' name
        "vision_model.pre_layrnorm.bias": state_dict["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state_dict["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state_dict["visual.ln_post.bias"],
        "visual_projection.weight": state_dict["visual.proj"].T,
    }
    for i in range(config.text_config.num_hidden_layers):
        out.update(_block_tensors(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", state_dict))
    for i in range(config.vision_config.num_hidden_layers):
        out.update(_block_tensors(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", state_dict))
    return {k: v.float().contiguous() for k, v in out.items()}


def write_clip_processor(folder, config, preprocess_cfg):
    """transformers' CLIPProcessor files for the model: CLIP's BPE written from open_clip's vocabulary and merges (the
    vocab.json and merges.txt OpenAI's CLIP folders ship; nothing downloaded) and the image steps of open_clip's
    preprocess (shortest side to the model's size, centre crop, mean/std). `folder` already holds config.json."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPProcessor
    write_clip_tokenizer_files(folder)
    # read back by transformers' own class for a CLIP (config.json says which), whichever its version
    tokenizer = AutoTokenizer.from_pretrained(folder, model_max_length=config.text_config.max_position_embeddings)
    for where_it_was_read in ("is_local", "local_files_only"):  # not for a published tokenizer_config.json
        tokenizer.init_kwargs.pop(where_it_was_read, None)
    size = config.vision_config.image_size
    pil_resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}[preprocess_cfg.get("interpolation", "bicubic")]
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                resample=pil_resample, image_mean=list(preprocess_cfg["mean"]),
                                image_std=list(preprocess_cfg["std"]))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    images.save_pretrained(folder)  # preprocessor_config.json too: where transformers 4 looks


def write_open_clip(clip, name, folder):
    """open_clip's local-dir layout: open_clip_config.json ({"model_cfg", "preprocess_cfg"}, as open_clip's
    save_for_hf writes it) and open_clip_model.safetensors."""
    model_cfg = open_clip.get_model_config(name)
    model_cfg["quick_gelu"] = bool(model_cfg.get("quick_gelu", False))  # explicit: QuickGELU and GELU are other models
    save_config_for_hf(clip, Path(folder) / "open_clip_config.json", model_cfg)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              os.path.join(folder, "open_clip_model.safetensors"))


def write_transformers(clip, name, folder):
    """A transformers CLIPModel folder: config.json, model.safetensors, and the CLIPProcessor's files."""
    config = transformers_config(name)
    config.logit_scale_init_value = clip.logit_scale.item()
    config.save_pretrained(folder)
    save_file(transformers_state_dict(clip.state_dict(), config), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    write_clip_processor(folder, config, clip.visual.preprocess_cfg)


def _probe_inputs(clip, tokenizer):
    torch.manual_seed(0)
    size = clip.visual.preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(2, 3, *size)
    tokens = tokenizer(["a photo of a cat wearing a space suit", "two red circles on a white background"])
    return images, tokens


@torch.no_grad()
def exported_embeddings(folder, to, images, tokens):
    """L2-normalised (image, text) embeddings from the export as its own library loads it."""
    if to == "open_clip":
        model = open_clip.create_model(f"local-dir:{folder}").eval()
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    from transformers import CLIPModel
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    features = [model.get_image_features(pixel_values=images), model.get_text_features(input_ids=tokens)]
    return [F.normalize(getattr(f, "pooler_output", f), dim=-1) for f in features]  # transformers >= 5: an output


@torch.no_grad()
def export_difference(folder, to, clip, tokenizer):
    """Largest difference between the export's embeddings and the checkpoint's, on random pixels and two prompts."""
    images, tokens = _probe_inputs(clip, tokenizer)
    ours = clip.encode_image(images, normalize=True), clip.encode_text(tokens, normalize=True)
    theirs = exported_embeddings(folder, to, images, tokens)
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


LOAD_EXAMPLES = {
    "open_clip": """```python
import open_clip, torch
from PIL import Image

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{folder}")
tokenizer = open_clip.get_tokenizer("local-dir:{folder}")
model.eval()
with torch.no_grad():
    image = model.encode_image(preprocess(Image.open("image.png")).unsqueeze(0), normalize=True)
    text = model.encode_text(tokenizer(["a cat astronaut, digital art"]), normalize=True)
score = (image * text).sum(-1)  # cosine similarity: higher is better
```""",
    "transformers": """```python
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

model = CLIPModel.from_pretrained("{folder}").eval()
processor = CLIPProcessor.from_pretrained("{folder}")
inputs = processor(text=["a cat astronaut, digital art"], images=[Image.open("image.png")],
                   padding="max_length", truncation=True, return_tensors="pt")
with torch.no_grad():
    image = model.get_image_features(pixel_values=inputs.pixel_values)
    text = model.get_text_features(input_ids=inputs.input_ids)
image, text = (F.normalize(getattr(f, "pooler_output", f), dim=-1) for f in (image, text))
score = (image * text).sum(-1)  # cosine similarity: higher is better
# PickScore's scale, as this repository's pickscore: scorer gives it: model.logit_scale.exp() * score
```

In the Social Reward repository, the folder is a `pickscore:` scorer, e.g.
`python scripts/score.py --prompt "a cat astronaut" a.png b.png --scorer pickscore:{folder}`; its score is
`logit_scale.exp()` times the cosine, which orders images the same way.""",
}


def model_card(to, folder, name, checkpoint, checkpoint_sha256, difference):
    """README.md of an export: what the model is, where it comes from, how to load it and how it scores."""
    cfg = open_clip.get_model_config(name)
    gelu = "QuickGELU" if cfg.get("quick_gelu") else "GELU"
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    tags = "\n".join(f"- {t}" for t in ("clip", "reward-model", "social-reward", "image-text-scoring"))
    return f"""---
library_name: {to}
tags:
{tags}
---
# {os.path.basename(os.path.abspath(folder))}: a Social Reward CLIP

A CLIP reward model: open_clip's `{name}` ({gelu} activations, {vision.get('image_size', 224)} px images,
{text.get('context_length', 77)}-token prompts, {cfg['embed_dim']}-dimensional embeddings) fine-tuned on preference
triplets (a prompt, the image people preferred, another image) with Social Reward's training script
(`train_pair_pos_neg.py`, "Social Reward: Evaluating and Enhancing Generative AI through Million-User Feedback from an
Online Creative Community", ICLR 2024). It scores how well an image answers a prompt, in the way the people whose
choices it learned from prefer.

## How it scores
score = cosine similarity of the L2-normalised image and prompt embeddings. Higher is better; compare the scores of
images made for the same prompt (a score's absolute value means little across prompts).

## Load it ({to})
{LOAD_EXAMPLES[to].format(folder=os.path.basename(os.path.abspath(folder)))}

## Source
- checkpoint: `{os.path.basename(checkpoint)}`, sha256 `{checkpoint_sha256}`
- exported with the Social Reward repository's `scripts/export.py --to {to}` (weights in float32); checked on export: the
  image and text embeddings of this folder differ from the checkpoint's by at most {difference:.1e}
"""


def export(checkpoint, to, out, model=DEFAULT_MODEL, overwrite=False):
    """Write the OpenAI-format `checkpoint` (as train_pair_pos_neg.py saves it) into the folder `out` in `to`'s
    layout ("open_clip" or "transformers") with a README.md model card; returns the largest difference of the
    export's embeddings from the checkpoint's. The folder appears whole: written beside `out`, checked, then renamed.

    Example:
        export("clip_model/clip_epoch_4_global_step_final.pth", "transformers", "social-reward-hf")
    """
    if to not in EXPORT_FORMATS:
        raise InputError(f"--to {to}: choose from {', '.join(EXPORT_FORMATS)}")
    check_new_folder(out, overwrite, keep=[checkpoint])
    name = resolve_model_name(model)
    if to == "transformers":
        transformers_config(name, model)  # an unmappable model fails here, before the checkpoint is read
    clip, _, tokenizer = load_model(model, checkout_path=checkpoint)
    with folder_written_whole(out) as tmp:
        (write_open_clip if to == "open_clip" else write_transformers)(clip, name, tmp)
        difference = export_difference(tmp, to, clip, tokenizer)
        if not difference <= TOLERANCE:
            raise RuntimeError(f"the {to} export's embeddings differ from the checkpoint's by {difference:.2e}")
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(to, os.path.abspath(out), name, checkpoint, sha256(checkpoint), difference))
        umask = os.umask(0o022)
        os.umask(umask)
        for file in os.listdir(tmp):  # safetensors writes its files readable by their owner only
            os.chmod(os.path.join(tmp, file), 0o666 & ~umask)
    return difference


def write_clip_tokenizer_files(folder):
    """vocab.json and merges.txt of CLIP's BPE (OpenAI's CLIP, and the text encoder of SD 1.x and 2.x), written from
    the vocabulary open_clip ships under the token names transformers' CLIPTokenizer uses; nothing downloaded."""
    from open_clip.tokenizer import SimpleTokenizer
    bpe = SimpleTokenizer()
    os.makedirs(folder, exist_ok=True)
    openai_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({openai_names.get(token, token): i for token, i in bpe.encoder.items()}, f, ensure_ascii=False)
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
