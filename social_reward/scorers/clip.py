"""clip: our CLIP checkpoints (OpenAI format) or OpenAI's own weights, scored by the cosine similarity of the prompt
and image embeddings, as validate.py compares them.

    scorer = load_scorer("clip:clip_epoch_4_global_step_final.pth")
    scorer = load_scorer("clip:openai")                                  # OpenAI's ViT-L/14 (from the hub cache)
    scorer = clip_scorer(model, pretrained, checkout_path, "cuda")       # the scripts' --model/--pretrained/--checkout_path
"""
from social_reward.models import DEFAULT_MODEL
from social_reward.models.clip import load_model
from social_reward.scorers.base import Scorer, check_weights_file
from social_reward.scorers.preprocess import open_clip_tensor_preprocess


def clip_scorer(model=DEFAULT_MODEL, pretrained="openai", checkout_path=None, device="cpu"):
    """Our CLIP (the scripts' --model, --pretrained, --checkout_path): its score is the cosine similarity."""
    clip, preprocess, tokenizer = load_model(model, pretrained, checkout_path, device)
    return Scorer(clip, preprocess, tokenizer, clip.logit_scale.exp().item(),
                  open_clip_tensor_preprocess(clip.visual.preprocess_cfg))


def check(spec, path, options):
    if path != "openai":
        check_weights_file(spec, path)


def load(path, options, device):
    return clip_scorer(options.get("model", DEFAULT_MODEL), path, None, device)
