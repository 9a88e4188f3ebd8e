"""Tiny pipelines of every supported family with random weights, made from configs and files written here (nothing
downloaded): the generator demo's and the tests' generators.

    make_tiny_pipeline("tiny-flux/", "flux")
"""
import os

import torch

from social_reward.errors import InputError
from social_reward.generators.families import FAMILY_NAMES
from social_reward.models.export import write_clip_tokenizer_files

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8)


# SDXL's UNet: cross-attention on both encoders' states side by side, pooled + 6 time ids added to the time embedding
TINY_SDXL_UNET = dict(TINY_UNET, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)


TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=32)


TINY_FLOW_VAE = dict(TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False)  # SD3's and FLUX's VAEs: a shift, no quant convs


TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407, projection_dim=32)


TINY_T5 = dict(d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
               vocab_size=64, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


TINY_SD3 = dict(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
                pos_embed_max_size=32)


TINY_FLUX = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                 guidance_embeds=True, axes_dims_rope=(4, 6, 6))


T5_WORDS = ("a an the one two three four red blue green yellow purple orange black white circle circles square "
            "squares triangle triangles cube photo of").split()


def write_t5_tokenizer(folder, max_length=32):
    """A T5 tokenizer (Unigram, T5's special tokens) over a small word list, written by save_pretrained as
    transformers saves T5's: built here, nothing downloaded."""
    from transformers import T5TokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [
        ("\u2581" + w, -1.0) for w in T5_WORDS]
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length).save_pretrained(folder)
    return folder


def make_tiny_pipeline(folder, family="sd", seed=0, t5=True):
    """A pipeline of the family (sd, sdxl, sd3, flux) with its parts and layout but tiny sizes and random weights
    (2-layer CLIP text encoders with CLIP's real tokenizer, a 1-layer T5 with a small local vocabulary, a VAE that
    halves the resolution, the family's own schedule), saved with save_pretrained into `folder`: load it by path as a
    real one. `t5=False`: SD3 without its T5 encoder. Returns the folder.

        make_tiny_pipeline("tiny-sd"); pipeline = load_pipeline("tiny-sd")
    """
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )
    if family not in FAMILY_NAMES:
        raise InputError(f"family {family!r}: choose from {', '.join(FAMILY_NAMES)}")
    torch.manual_seed(seed)
    token_files = write_clip_tokenizer_files(os.path.join(folder, "tokenizer.files"))
    clip_tokenizer = CLIPTokenizer.from_pretrained(token_files, model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    parts = dict(tokenizer=clip_tokenizer)
    if family in ("sd", "sdxl"):
        # Stable Diffusion's own schedule (scaled linear betas, 1000 training steps)
        parts.update(unet=diffusers.UNet2DConditionModel(**(TINY_UNET if family == "sd" else TINY_SDXL_UNET)),
                     vae=AutoencoderKL(**TINY_VAE), text_encoder=clip, scheduler=DDIMScheduler(
                         beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1))
        if family == "sd":
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            parts.update(text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)),
                         tokenizer_2=clip_tokenizer)
    else:
        t5_folder = write_t5_tokenizer(os.path.join(folder, "t5.files"))
        t5_parts = (T5EncoderModel(T5Config(**TINY_T5)), T5TokenizerFast.from_pretrained(t5_folder))
        parts.update(vae=AutoencoderKL(**TINY_FLOW_VAE))
        if family == "sd3":
            parts.update(transformer=diffusers.SD3Transformer2DModel(**TINY_SD3),
                         text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)),
                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)),
                         tokenizer_2=clip_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                         text_encoder_3=t5_parts[0] if t5 else None, tokenizer_3=t5_parts[1] if t5 else None)
        else:
            parts.update(transformer=diffusers.FluxTransformer2DModel(**TINY_FLUX), text_encoder=clip,
                         text_encoder_2=t5_parts[0], tokenizer_2=t5_parts[1],
                         scheduler=FlowMatchEulerDiscreteScheduler(
                             shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                             base_image_seq_len=256, max_image_seq_len=4096))
    pipeline = getattr(diffusers, FAMILY_NAMES[family])(**parts)
    pipeline.save_pretrained(folder)
    import shutil
    for scratch in ("tokenizer.files", "t5.files"):
        shutil.rmtree(os.path.join(folder, scratch), ignore_errors=True)
    return folder
