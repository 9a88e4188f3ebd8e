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
import os
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2
from torchvision.transforms import Compose, InterpolationMode, Normalize, PILToTensor, ToTensor
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import MaybeConvertMode

from clip_model import DEFAULT_MODEL, InputError, load_model, read_state_dict
from imagereward import REWARD_STD, load_imagereward

KINDS = {"clip": ("model",), "hpsv2": ("model",), "pickscore": (), "aesthetic": ("clip", "model"),
         "imagereward": ("tokenizer", "med_config"), "hpsv3": ("base", "dtype"), "mps": ("processor", "dtype")}
# the folder option each of these kinds needs, and what it holds
FOLDERS = {"hpsv3": ("base", "Qwen2-VL-7B-Instruct's files (config.json, tokenizer, chat template; no weights needed)"),
           "mps": ("processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer and preprocessor_config.json")}


@dataclass
class Scorer:
    model: nn.Module
    preprocess: object
    tokenizer: object
    score_scale: float = 1.0
    softmax_scale: float = 100.0
    tensor_preprocess: object = None  # the same preprocessing on a B x 3 x H x W float tensor in [0, 1], differentiable


def parse_spec(spec):
    """KIND:PATH[,key=value...] -> (kind, path, options); a mistake raises InputError naming the spec."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        raise InputError(f"--scorer {spec}: unknown kind {kind!r}; give KIND:PATH with KIND one of {', '.join(KINDS)}")
    path, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in KINDS[kind]:
            raise InputError(f"--scorer {spec}: unknown option {key!r} for {kind} "
                             f"(options: {', '.join(KINDS[kind]) or 'none'})")
        options[key] = value
    if not path:
        raise InputError(f"--scorer {spec}: no path")
    return kind, path, options


def check_spec(spec):
    """Cheap checks of a spec's files before any model loads: the file or folder exists and is of the right kind."""
    kind, path, options = parse_spec(spec)
    if kind == "clip" and path == "openai":
        return kind, path, options
    if kind == "pickscore":
        if not os.path.isdir(path):
            raise InputError(f"--scorer {spec}: pickscore takes a transformers model folder (config.json and weights, "
                             f"as save_pretrained writes them); {path} is {'a file' if os.path.exists(path) else 'missing'}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"--scorer {spec}: {path} has no config.json: not a transformers model folder")
        return kind, path, options
    if not os.path.isfile(path):
        raise InputError(f"--scorer {spec}: {path}: no such weights file" +
                         (" (a folder: a PickScore model? use pickscore:)" if os.path.isdir(path) else ""))
    if kind == "imagereward":
        check_imagereward_files(spec, options)
    if kind in FOLDERS:
        option, holds = FOLDERS[kind]
        if option not in options:
            raise InputError(f"--scorer {spec}: {kind} needs {option}=DIR, {holds}")
        if not os.path.isdir(options[option]):
            raise InputError(f"--scorer {spec}: {option}={options[option]}: no such folder ({holds})")
    if kind == "aesthetic" and "clip" not in options:
        raise InputError(f"--scorer {spec}: the aesthetic predictor needs the CLIP it reads: clip=PATH (OpenAI ViT-L/14 "
                         f"weights) or clip=openai")
    return kind, path, options


def parse_named_scorers(named_specs):
    """NAME=SPEC strings (or a {name: spec} dict) -> {name: spec}, checked (kinds, options, files) before any model
    loads."""
    if isinstance(named_specs, dict):
        named_specs = [f"{name}={spec}" for name, spec in named_specs.items()]
    scorers = {}
    for named in named_specs:
        name, eq, spec = named.partition("=")
        if not eq or not name or ":" in name:
            raise InputError(f"--scorer {named}: give NAME=KIND:PATH, e.g. ours=clip:clip_final.pth")
        if name in scorers:
            raise InputError(f"--scorer {named}: the name {name!r} is given twice")
        check_spec(spec)
        scorers[name] = spec
    if not scorers:
        raise InputError("give at least one --scorer NAME=KIND:PATH")
    return scorers


def check_imagereward_files(spec, options):
    """ImageReward's tokenizer folder (BERT's vocabulary) and its optional med_config.json exist."""
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


def clip_scorer(model=DEFAULT_MODEL, pretrained="openai", checkout_path=None, device="cpu"):
    """Our CLIP (the scripts' --model, --pretrained, --checkout_path): its score is the cosine similarity."""
    clip, preprocess, tokenizer = load_model(model, pretrained, checkout_path, device)
    return Scorer(clip, preprocess, tokenizer, 1.0, clip.logit_scale.exp().item(),
                  open_clip_tensor_preprocess(clip.visual.preprocess_cfg))


def load_scorer(spec, device="cpu"):
    """A Scorer from a spec; nothing is downloaded (`clip:openai`, `clip=openai` offline say which file to pass)."""
    kind, path, options = check_spec(spec)
    if kind == "clip":
        return clip_scorer(options.get("model", DEFAULT_MODEL), path, None, device)
    if kind == "hpsv2":
        model, _, tokenizer = load_model(options.get("model", "ViT-H-14"), path, None, device)
        size = model.visual.image_size[0]
        return Scorer(model, hps_preprocess(size), tokenizer, 1.0, model.logit_scale.exp().item(),
                      TensorPreprocess(size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode="longest"))
    if kind == "pickscore":
        model = PickScoreModel(path).to(device).eval()
        return Scorer(model, model.preprocess, open_clip.get_tokenizer(DEFAULT_MODEL), model.scale, model.scale,
                      model.tensor_preprocess)
    if kind == "imagereward":
        model, preprocess, tokenizer = load_imagereward(path, options["tokenizer"], options.get("med_config"), device)
        # ImageReward was trained with a softmax over the MLP's outputs of the two images; its reward is that output
        # divided by REWARD_STD, so REWARD_STD * reward gives back the model's own preference probabilities.
        # On tensors, as ImageReward's ReFL feeds its score_gard: Resize(224), CenterCrop(224), Normalize
        return Scorer(model, preprocess, tokenizer, 1.0, REWARD_STD,
                      TensorPreprocess(model.image_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    if kind == "hpsv3":  # its score is mu, the first of its head's (mu, sigma); see hpsv3_model.py
        from hpsv3_model import load_hpsv3
        model, preprocess, tokenizer = load_hpsv3(path, options["base"], options.get("dtype", "bf16"), device)
        return Scorer(model, preprocess, tokenizer, 1.0, 1.0, model.tensor_preprocess)
    if kind == "mps":  # its score is already logit_scale.exp() * cos, which its own softmax reads
        from mps import load_mps
        model, preprocess, tokenizer = load_mps(path, options["processor"], options.get("dtype", "fp16"), device)
        return Scorer(model, preprocess, tokenizer, 1.0, 1.0, model.tensor_preprocess)
    clip, preprocess, tokenizer = load_model(options.get("model", DEFAULT_MODEL), options["clip"], None, device)
    return Scorer(AestheticPredictor(clip, path).to(device).eval(), preprocess, tokenizer, 1.0, 1.0,
                  open_clip_tensor_preprocess(clip.visual.preprocess_cfg))


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


def hps_preprocess(size=224):
    """HPS v2's evaluation preprocessing: RGB (an RGBA image too: the model takes 3 channels), ToTensor, the longest
    side to `size` (its ResizeMaxSize: bicubic, on the tensor, so antialiased) and padded with 0, centred, OpenAI's
    mean/std. HPS v2 skips the padding too when the longest side is already `size`; this pads such an image, so that
    every image has the model's input shape."""
    return Compose([lambda image: image.convert("RGB"), ToTensor(),
                    TensorPreprocess(size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode="longest")])


class PickScoreModel(nn.Module):
    """A transformers CLIPModel folder (PickScore_v1) scored as PickScore does: logit_scale.exp() * cos(text, image).
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
        # RGB first, as PickScore's evaluation and CLIP's processor do: PIL resizes a palette or 1-bit image with
        # nearest neighbour whatever the filter asked for
        self.tensor_preprocess = TensorPreprocess(size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, crop_offset="floor")
        self.preprocess = Compose([MaybeConvertMode("RGB"), PILToTensor(), self.tensor_preprocess])
        self.scale = self.clip.logit_scale.exp().item()

    @staticmethod
    def _features(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers >= 5: an output

    def encode_image(self, images, normalize=True):
        return F.normalize(self._features(self.clip.get_image_features(pixel_values=images)), dim=-1)

    def encode_text(self, tokens, normalize=True):
        # CLIP's causal mask keeps the padding after the end-of-text token out of its pooled output
        return F.normalize(self._features(self.clip.get_text_features(input_ids=tokens)), dim=-1)


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
