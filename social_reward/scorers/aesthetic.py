"""aesthetic: the LAION improved aesthetic predictor (an MLP on OpenAI's CLIP ViT-L/14 image embedding), which
ignores the prompt.

    scorer = load_scorer("aesthetic:sac+logos+ava1-l14-linearMSE.pth,clip=ViT-L-14.pt")
"""
import torch
from torch import nn

from social_reward.errors import InputError
from social_reward.models import DEFAULT_MODEL
from social_reward.models.clip import load_model
from social_reward.models.weights import read_state_dict
from social_reward.scorers.base import Scorer, check_weights_file
from social_reward.scorers.preprocess import open_clip_tensor_preprocess


class AestheticPredictor(nn.Module):
    """The LAION improved aesthetic predictor: its MLP on the L2-normalised CLIP image embedding. It ignores the
    prompt: encode_text gives 1 for every prompt, so the dot product with encode_image's [score] is the score."""

    def __init__(self, clip, mlp_path):
        super().__init__()
        state_dict = read_state_dict(mlp_path)
        weights = sorted((k for k in state_dict if k.startswith("layers.") and k.endswith(".weight")),
                         key=lambda k: int(k.split(".")[1]))
        if not weights or state_dict[weights[0]].shape[1] != clip.visual.output_dim:
            raise InputError(f"aesthetic:{mlp_path}: not the aesthetic predictor's MLP for this CLIP (layers.N.weight "
                             f"with {clip.visual.output_dim} inputs)")
        layers, last = [], 0
        for key in weights:  # Linear layers at their indices; Dropout (no weights) in between, as in its file
            index = int(key.split(".")[1])
            layers += [nn.Dropout(0.0) for _ in range(index - last)]
            out_features, in_features = state_dict[key].shape
            layers.append(nn.Linear(in_features, out_features))
            last = index + 1
        self.clip, self.layers = clip, nn.Sequential(*layers)
        self.layers.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state_dict.items()})

    def encode_image(self, images, normalize=True):
        return self.layers(self.clip.encode_image(images, normalize=True))

    def encode_text(self, tokens, normalize=True):
        return torch.ones(len(tokens), 1, device=tokens.device)


def check(spec, path, options):
    check_weights_file(spec, path)
    if "clip" not in options:
        raise InputError(f"--scorer {spec}: the aesthetic predictor needs the CLIP it reads: clip=PATH (OpenAI ViT-L/14 "
                         f"weights) or clip=openai")


def load(path, options, device):
    clip, preprocess, tokenizer = load_model(options.get("model", DEFAULT_MODEL), options["clip"], None, device)
    return Scorer(AestheticPredictor(clip, path).to(device).eval(), preprocess, tokenizer, 1.0,
                  open_clip_tensor_preprocess(clip.visual.preprocess_cfg))
