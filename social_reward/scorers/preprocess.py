"""An evaluation preprocessing on image tensors, differentiable, as the scorers' own PIL preprocessings compute it:
what a reward applies to a generator's decoded images, and (on uint8 pixels) what PickScore's CLIPImageProcessor
computes on a PIL image.

    open_clip_tensor_preprocess(clip.visual.preprocess_cfg)(images)     # B x 3 x H x W in [0, 1]
"""
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
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

    def __init__(self, size, mean, std, interpolation="bicubic", resize_mode="shortest", fill=0, crop_offset="round",
                 crop=None):
        super().__init__()
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.crop = self.size if crop is None else tuple(crop) if isinstance(crop, (tuple, list)) else (crop, crop)
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
            return self.crop_and_normalize(images)
        return self.normalize(images.float() / 255 if images.dtype == torch.uint8 else images)

    def crop_and_normalize(self, images):
        """The centre crop, then the mean/std, of images already resized (uint8 pixels are scaled to [0, 1] first)."""
        images = self._crop(images)
        return self.normalize(images.float() / 255 if images.dtype == torch.uint8 else images)

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
            return TF.center_crop(images, list(self.crop))
        top, left = ((n - s) // 2 for n, s in zip(images.shape[-2:], self.crop))
        return images[..., top:top + self.crop[0], left:left + self.crop[1]]


def open_clip_tensor_preprocess(cfg):
    """The tensor counterpart of an open_clip model's evaluation transform, from its own preprocess config
    (`clip.visual.preprocess_cfg`, open_clip's PreprocessCfg as a dict: size, mean/std, interpolation, resize_mode,
    fill_color).

        open_clip_tensor_preprocess(clip.visual.preprocess_cfg)(images)  # B x 3 x H x W in [0, 1]
    """
    return TensorPreprocess(cfg["size"], cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"),
                            cfg.get("resize_mode", "shortest"), cfg.get("fill_color", 0))


class ClipImageProcessor:
    """transformers' CLIPImageProcessor, as PickScore and MPS preprocess with it: RGB, the shortest side to `size`
    (bicubic, the other side floored), a centre crop of `crop` whose offset is floored (torchvision's rounds it), /255,
    the mean/std. On a float tensor B x 3 x H x W in [0, 1] (a call): torchvision's antialiased bicubic, differentiable.
    On a PIL image (`pil`), resized as the processor each scorer's authors ran: resample "pil", transformers 4's (PIL's
    bicubic on the image, /255 in float64: MPS's), or "uint8", transformers 5's (torchvision's antialiased bicubic on
    the uint8 pixels, which v1's bicubic rounds differently: PickScore's here).

        processor = ClipImageProcessor(224, 224, resample="pil")
        processor.pil(image)    # 3 x 224 x 224
        processor(images)       # B x 3 x 224 x 224
    """

    def __init__(self, size=224, crop=224, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD, resample="uint8"):
        self.size, self.resample = size, resample
        self.tensor = TensorPreprocess(size, list(mean), list(std), crop_offset="floor", crop=crop)

    def __call__(self, images):
        return self.tensor(images)

    def pil(self, image):
        # RGB first: PIL resizes a palette or 1-bit image with nearest neighbour whatever the filter asked for (an RGB
        # image is not copied: open_clip's MaybeConvertMode, which PickScore's path used before, skipped it too)
        image = image if image.mode == "RGB" else image.convert("RGB")
        if self.resample == "uint8":
            return self.tensor(TF.pil_to_tensor(image))
        height, width = ((self.size, int(self.size * image.width / image.height)) if image.height <= image.width
                         else (int(self.size * image.height / image.width), self.size))
        image = image.resize((width, height), Image.BICUBIC)
        return self.tensor.crop_and_normalize((TF.pil_to_tensor(image).double() * (1 / 255)).float())
