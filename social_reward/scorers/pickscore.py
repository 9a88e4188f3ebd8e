"""pickscore: PickScore (Kirstain et al. 2023), a transformers CLIPModel folder as PickScore_v1 ships; its score is
logit_scale.exp() times the cosine similarity, as PickScore's own code computes it.

    scorer = load_scorer("pickscore:PickScore_v1/")
"""
import os

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from social_reward.errors import InputError
from social_reward.models import DEFAULT_MODEL
from social_reward.scorers.base import Scorer
from social_reward.scorers.preprocess import ClipImageProcessor


class PickScoreModel(nn.Module):
    """A transformers CLIPModel folder (PickScore_v1) scored as PickScore does: logit_scale.exp() * cos(text, image), the
    scale carried by the text embedding so that the dot product of the two embeddings is that score.
    Its processor is transformers' CLIPImageProcessor: RGB, the shortest side to the model's size (bicubic, on the uint8
    pixels), a centre crop whose offset is floored (torchvision rounds it), OpenAI mean/std; CLIP's BPE."""

    def __init__(self, folder):
        super().__init__()
        from transformers import CLIPModel
        try:
            self.clip = CLIPModel.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise InputError(f"pickscore:{folder}: not a transformers CLIPModel folder ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]})") from None
        self.size = size = self.clip.config.vision_config.image_size
        self.tensor_preprocess = ClipImageProcessor(size, size, resample="uint8")  # transformers 5's processor
        self.preprocess = self.tensor_preprocess.pil
        self.scale = self.clip.logit_scale.exp().item()

    @staticmethod
    def _features(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers >= 5: an output

    def encode_image(self, images, normalize=True):
        return F.normalize(self._features(self.clip.get_image_features(pixel_values=images)), dim=-1)

    def encode_text(self, tokens, normalize=True):
        # CLIP's causal mask keeps the padding after the end-of-text token out of its pooled output
        return self.scale * F.normalize(self._features(self.clip.get_text_features(input_ids=tokens)), dim=-1)


def check(spec, path, options):
    if not os.path.isdir(path):
        raise InputError(f"--scorer {spec}: pickscore takes a transformers model folder (config.json and weights, "
                         f"as save_pretrained writes them); {path} is {'a file' if os.path.exists(path) else 'missing'}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"--scorer {spec}: {path} has no config.json: not a transformers model folder")


def load(path, options, device):
    model = PickScoreModel(path).to(device).eval()
    # its score already carries logit_scale.exp(), which its own softmax reads: the metric's scale is 1
    return Scorer(model, model.preprocess, open_clip.get_tokenizer(DEFAULT_MODEL), 1.0, model.tensor_preprocess)
