"""The reward as a differentiable function, for other people's loops (ReFL, DRaFT, AlignProp): any scorer spec,
called on decoded images, its gradient reaching them; the scorer's own weights stay frozen.

    reward = Reward.load("clip:clip_epoch_4_global_step_final.pth", "cuda")
    r = reward(images, prompts)       # images: B x 3 x H x W floats in [0, 1] (a VAE's (x / 2 + 0.5).clamp(0, 1))
    (-r.mean()).backward()

On tensors, each scorer's own preprocessing runs on the tensor (CLIP: the shortest side to the model's size, bicubic
with antialiasing, centre crop, mean/std; HPS v2: the longest side, then padded). On a list of PIL images it is the
scorer's own PIL preprocessing, so the rewards equal scripts/score.py's scores.
"""
import numpy as np
import open_clip
import torch
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from social_reward.errors import InputError
from social_reward.scorers.registry import load_scorer


def row_scores(model, image_features, tokens):
    """The model's score of image k (its encode_image features) for tokens[k], for each k: the scorer's own score."""
    if hasattr(model, "pair_scores"):  # a scorer whose text encoder attends to the image (ImageReward)
        return model.pair_scores(image_features, tokens)
    return (image_features * model.encode_text(tokens, normalize=True)).sum(-1)


def as_image_tensor(images):
    """Check a batch of images and return it as a float tensor B x 3 x H x W in [0, 1]; uint8 B x H x W x 3 arrays
    (numpy or torch, as ddpo-pytorch hands them) are converted. Anything else ends in one clear line."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images: expected a float tensor B x 3 x H x W in [0, 1] or a list of PIL images, "
                         f"got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise InputError(f"images: a uint8 batch must be B x H x W x 3, got shape {tuple(images.shape)}")
        images = images.permute(0, 3, 1, 2).float() / 255
    if not images.is_floating_point() or images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"images: expected a float tensor B x 3 x H x W in [0, 1], got {images.dtype} of shape "
                         f"{tuple(images.shape)}")
    if images.dtype in (torch.float16, torch.bfloat16):  # an fp16 VAE's output: the reward computes in float32
        images = images.float()
    low, high = images.detach().aminmax()
    if low < 0 or high > 1:
        raise InputError(f"images: values must lie in [0, 1], found [{low.item():.3g}, {high.item():.3g}] "
                         f"(a VAE's output: (x / 2 + 0.5).clamp(0, 1))")
    return images


class Reward(nn.Module):
    """A scorer as a differentiable function of images: reward(images, prompts) -> float tensor [B], the scorer's own
    score (ours: the cosine similarity; PickScore: logit_scale.exp() times it). Its weights are frozen; gradient flows
    to tensor images whenever grad is enabled."""

    def __init__(self, scorer, gradient_checkpointing=False, temperature=None):
        super().__init__()
        self.model, self.scorer = scorer.model.eval().requires_grad_(False), scorer
        # open_clip checkpoints block by block (in eval mode too); any other tower is recomputed whole
        self.checkpoint_tower = gradient_checkpointing and not set_block_checkpointing(self.model)
        self.temperature, self.spec = temperature, None

    @classmethod
    def load(cls, spec, device="cpu", gradient_checkpointing=False, calibration=None):
        """A Reward from a scorer spec ("clip:final.pth", "hpsv2:HPS_v2.1_compressed.pt", "pickscore:DIR", ...).
        gradient_checkpointing: recompute the image tower's blocks in the backward pass (memory at 512 px batches).
        calibration: a calibration.json (scripts/compare.py --calibrate) holding this scorer's entry: the reward is then
        t * score, in log-odds units (a file fitted for another scorer or weights is refused)."""
        temperature = None
        if calibration is not None:
            from social_reward.scoring.calibration import read_calibration
            temperature = float(read_calibration(calibration, spec)["temperature"])
        reward = cls(load_scorer(spec, device), gradient_checkpointing, temperature)
        reward.spec = spec
        return reward

    @property
    def device(self):
        return next(self.model.parameters()).device

    def forward(self, images, prompts):
        """The reward of each image for its prompt: the scorer's own score, times the temperature when calibrated."""
        scores = self.score(images, prompts)
        return scores if self.temperature is None else scores * self.temperature

    def score(self, images, prompts):
        """The scorer's own score (score.py's), calibrated or not."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(images, (list, tuple)) and all(isinstance(image, Image.Image) for image in images):
            pixels = torch.stack([self.scorer.preprocess(image) for image in images])
        else:
            pixels = self.scorer.tensor_preprocess(as_image_tensor(images))
        if len(prompts) != len(pixels):
            raise InputError(f"prompts: {len(prompts)} for {len(pixels)} images; give one prompt per image")
        tokens = self.scorer.tokenizer(prompts).to(self.device)
        pixels = pixels.to(self.device)
        if self.checkpoint_tower and torch.is_grad_enabled():
            image_features = checkpoint(self.model.encode_image, pixels, True, use_reentrant=False)
        else:
            image_features = self.model.encode_image(pixels, normalize=True)
        scores = row_scores(self.model, image_features, tokens)
        # float32 at least (bf16 under autocast); a float64 model keeps float64 (gradient checks)
        return scores.to(torch.promote_types(scores.dtype, torch.float32))


def set_block_checkpointing(model):
    """Recompute each block of an open_clip image tower in the backward pass (of the model, or of the open_clip CLIP a
    scorer wraps as `.clip`); False when there is no such tower. The text tower needs none: prompts carry no gradient.
    (open_clip's own switch passes its faster blocks arguments they do not take; transformers checkpoints only in
    training mode, where BLIP's dropout is on.)"""
    inner = getattr(model, "clip", model)
    if not isinstance(inner, open_clip.CLIP):
        return False
    blocks = inner.visual.transformer.resblocks
    for i, block in enumerate(blocks):
        blocks[i] = CheckpointedBlock(block)
    return True


class CheckpointedBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, attn_mask=None):
        if torch.is_grad_enabled():
            return checkpoint(self.block, x, attn_mask=attn_mask, use_reentrant=False)
        return self.block(x, attn_mask=attn_mask)
