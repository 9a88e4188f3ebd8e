"""The one place every script and notebook gets its CLIP from: open_clip names and config files, OpenAI-format
checkpoints (read without running pickled code), OpenAI's own weights from the hub cache.

    model, preprocess, tokenizer = load_model()                       # OpenAI ViT-L/14, as the paper
    model, preprocess, tokenizer = load_model(checkout_path="clip_epoch_4_global_step_final.pth")
    model, preprocess, tokenizer = load_model("assets/tiny-clip.json", pretrained="none")
"""
import contextlib
import logging
import os

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from social_reward.errors import InputError
from social_reward.models import DEFAULT_MODEL, DEFAULT_PRETRAINED
from social_reward.models.hub import hub_offline_unless_reachable
from social_reward.models.weights import assign_weights, load_weights


def resolve_model_name(model=DEFAULT_MODEL):
    """An open_clip model name, or the path of an open_clip model-config JSON file (registered under its file stem)."""
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise InputError(f"--model {model}: no such model-config file")
        open_clip.add_model_config(model)
        model = os.path.splitext(os.path.basename(model))[0]
    config = open_clip.get_model_config(model)
    if config is None:
        raise InputError(f"--model {model}: not an open_clip model name (see open_clip.list_models()) nor a config .json file")
    if "hf_model_name" in config.get("text_cfg", {}):
        raise InputError(f"--model {model}: its text tower is a Hugging Face model; these scripts load CLIPs with "
                         f"OpenAI's text tower")
    return model


def tower_settings(name):
    """open_clip builds a ViT's blocks on nn.MultiheadAttention, whose inference fast path runs attention unfused on a
    CPU; its "custom" blocks hold the same tensors under the same names and call scaled_dot_product_attention, as
    OpenAI's CLIP does: the same arithmetic (equal image embeddings), about 5% less time for a ViT-L/14 image."""
    vision = open_clip.get_model_config(name)["vision_cfg"]
    if vision.get("block_type") or "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
        return {}
    return {"vision_cfg": {**vision, "block_type": "custom"}}


@contextlib.contextmanager
def _open_clip_quiet():
    """open_clip logs to the root logger what this module reports itself (random init, a failed download)."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def empty_model(name):
    """The model's structure on the meta device, no memory and no init: for weights that fill every tensor."""
    with torch.device("meta"), _open_clip_quiet():
        return open_clip.create_model(name, pretrained=None, device="meta", **tower_settings(name))


def load_model(model=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED, checkout_path=None, device="cpu"):
    """Build (model, preprocess, tokenizer) in fp32, in eval mode.

    model:         an open_clip model name, or the path of an open_clip model-config JSON file.
    pretrained:    an open_clip weights tag ("openai"), a local weights file, or "none" (random init).
    checkout_path: an OpenAI-format state dict (fp16 or fp32), e.g. one written by train_pair_pos_neg.py;
                   it holds every tensor, so `pretrained` is then not loaded at all.
    """
    name = resolve_model_name(model)
    weights_file = checkout_path or (pretrained if pretrained and os.path.isfile(pretrained) else None)
    if weights_file:
        clip = load_weights(empty_model(name), weights_file)
    elif pretrained in (None, "", "none"):
        with _open_clip_quiet():
            clip = open_clip.create_model(name, pretrained=None)
        if tower_settings(name):
            # open_clip's own random init of this model (its custom blocks would draw the attention weights ~6x
            # larger than nn.MultiheadAttention does), in the faster blocks
            clip = assign_weights(empty_model(name), clip.state_dict(), "the random init")
    elif pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in pretrained:
        raise InputError(f"--pretrained {pretrained}: no such weights file")
    else:
        if not open_clip.get_pretrained_cfg(name, pretrained):
            raise InputError(f"--pretrained {pretrained}: not a weights tag of {name} "
                             f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}), nor a file")
        try:
            with _open_clip_quiet(), hub_offline_unless_reachable():
                clip = open_clip.create_model(name, pretrained=pretrained, **tower_settings(name))
        except RuntimeError:
            raise InputError(f"could not download the '{pretrained}' weights of {name} (no network, or not in the hub cache); "
                             f"pass a local file instead: --pretrained /path/to/weights.pt (or .bin, .safetensors)") from None
    preprocess = image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)
    return clip.to(device).eval(), preprocess, open_clip.get_tokenizer(name)
