"""Reward models side by side: our CLIP checkpoints, HPS v2, PickScore, the LAION aesthetic predictor, ImageReward,
HPSv3 and MPS, from local files.

    scorer = load_scorer("clip:clip_epoch_4_global_step_final.pth")                  # ours (OpenAI format)
    scorer = load_scorer("clip:openai")                                              # OpenAI's ViT-L/14
    scorer = load_scorer("hpsv2:HPS_v2.1_compressed.pt")                             # {"state_dict": open_clip ViT-H-14}
    scorer = load_scorer("pickscore:PickScore_v1/")                                  # transformers CLIPModel folder
    scorer = load_scorer("aesthetic:sac+logos+ava1-l14-linearMSE.pth,clip=ViT-L-14.pt")
    scorer = load_scorer("imagereward:ImageReward.pt,tokenizer=bert-base-uncased/")
    scorer = load_scorer("hpsv3:HPSv3.safetensors,base=Qwen2-VL-7B-Instruct/")      # Qwen2-VL-7B + HPSv3's head
    scorer = load_scorer("mps:MPS_overall_checkpoint.pth,processor=CLIP-ViT-H-14-laion2B-s32B-b79K/")

A Scorer is what encoding.py (and so every script) uses of a model: `model.encode_image(images, normalize=True)`
and `model.encode_text(tokens, normalize=True)`, whose row-wise dot product orders the images as the model does;
`preprocess` and `tokenizer`; `score_scale`, which turns that dot product into the model's own score (PickScore's
logit_scale.exp()); `softmax_scale`, the logit scale of Pick-a-Pic's tie-aware metric; `tensor_preprocess`, the
preprocessing of a float tensor B x 3 x H x W in [0, 1], differentiable (for a reward's gradient).
A model whose text attends to the image (ImageReward, HPSv3, MPS) has no encode_text: `encode_image` gives its image
tokens and `pair_scores(image_features, tokens)` the score of each row; encoding.py scores it pair by pair.
"""
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2
from torch import nn
from torchvision.transforms import InterpolationMode, Normalize


class TensorPreprocess(nn.Module):
    """An evaluation preprocessing on a B x 3 x H x W tensor, differentiable: float in [0, 1] (a reward's images), or
    uint8 (a PIL image's pixels, resized as transformers' CLIPImageProcessor resizes them). As open_clip's
    `image_transform` does on PIL images: `resize_mode` "shortest" (the shortest side to the size, a centre crop),
    "longest" (the longest side to the size, padded with `fill` out of 255, centred) or "squash" (straight to
    height x width); `interpolation` "bicubic" or "bilinear", antialiased as PIL resizes. `crop_offset` "round" is
    torchvision's centre crop, "floor" CLIPImageProcessor's (a pixel apart when the excess is odd).

        TensorPreprocess((224, 224), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "bilinear", "squash")(images)
    """

    def __init__(self, size, mean, std, interpolation="bicubic", resize_mode="shortest", fill=0, crop_offset="round"):
        super().__init__()
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.interpolation = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
        self.resize_mode, self.fill, self.crop_offset = resize_mode, fill, crop_offset
        self.normalize = Normalize(mean, std)

    def _resize(self, images, size, interpolation=None):
        # torchvision's v2 resize, as CLIPImageProcessor's: on uint8 pixels v1's bicubic rounds differently (by 1/255)
        return TF2.resize(images, size, interpolation or self.interpolation, antialias=True)

    def forward(self, images):
        height, width = images.shape[-2:]
        if self.resize_mode == "squash":
            images = self._resize(images, list(self.size))
        elif self.resize_mode == "longest":
            images = self._pad(self._keep_ratio(images, max(height / self.size[0], width / self.size[1])))
        else:
            # a square size: torchvision's Resize(int) (the long side floored); else open_clip's ResizeKeepRatio, to
            # which open_clip passes no interpolation (so bicubic)
            square = self.size[0] == self.size[1]
            images = (self._resize(images, self.size[0]) if square else self._keep_ratio(
                images, min(height / self.size[0], width / self.size[1]), InterpolationMode.BICUBIC))
            images = self._crop(images)
        if images.dtype == torch.uint8:
            images = images.float() / 255
        return self.normalize(images)

    def _keep_ratio(self, images, ratio, interpolation=None):
        height, width = images.shape[-2:]
        new = [round(height / ratio), round(width / ratio)]
        return images if new == [height, width] else self._resize(images, new, interpolation)

    def _pad(self, images):
        pad_h, pad_w = (max(s - n, 0) for s, n in zip(self.size, images.shape[-2:]))
        fill = self.fill if images.dtype == torch.uint8 else self.fill / 255
        return TF.pad(images, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=fill)

    def _crop(self, images):
        if self.crop_offset == "round":
            return TF.center_crop(images, list(self.size))
        top, left = ((n - s) // 2 for n, s in zip(images.shape[-2:], self.size))
        return images[..., top:top + self.size[0], left:left + self.size[1]]


def open_clip_tensor_preprocess(cfg):
    """The tensor counterpart of an open_clip model's evaluation transform, from its own preprocess config
    (`clip.visual.preprocess_cfg`, open_clip's PreprocessCfg as a dict: size, mean/std, interpolation, resize_mode,
    fill_color).

        open_clip_tensor_preprocess(clip.visual.preprocess_cfg)(images)  # B x 3 x H x W in [0, 1]
    """
    return TensorPreprocess(cfg["size"], cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"),
                            cfg.get("resize_mode", "shortest"), cfg.get("fill_color", 0))
