"""Weights files read without running pickled code (.pth/.pt/.bin state dicts, OpenAI's TorchScript .pt,
.safetensors) and put into a model, a mismatch named in one line.

    state_dict = read_state_dict("clip_epoch_4_global_step_final.pth")
    load_weights(model, "clip_epoch_4_global_step_final.pth")
"""
import os
import pickle
import re
import zipfile

import torch

from social_reward.errors import InputError


def is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_state_dict(path):
    """Tensors of a weights file (.pth/.pt/.bin state dict, OpenAI's TorchScript .pt, or .safetensors), never running pickled code."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such weights file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state_dict = load_file(path)
        elif is_torchscript(path):
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()  # OpenAI's own download format
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(e), re.IGNORECASE)
        if unsafe:  # weights_only refused to import a callable: the file could run code if loaded with pickle
            raise InputError(f"{path}: refused: it holds more than tensors ({unsafe.group(1)}), and loading it "
                             f"could run code") from None
        raise InputError(f"{path}: not a checkpoint (not a tensor pickle)") from None
    except Exception as e:
        raise InputError(f"{path}: not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    # checkpoints saved from a DDP-wrapped model carry a "module." prefix
    # TorchScript archives also carry these (the mask is a non-persistent buffer in an eager model)
    return {k.removeprefix("module."): v for k, v in state_dict.items()
            if k not in ("input_resolution", "context_length", "vocab_size", "attn_mask")}


def load_weights(model, path):
    """Load an OpenAI-format state dict (fp16 or fp32) into `model`, keeping the model's dtype; names the file on mismatch."""
    return assign_weights(model, read_state_dict(path), path)


def assign_weights(model, state_dict, source):
    """Put a state dict's tensors into `model` (a meta-device model takes them as they are, cast to its dtype)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("wrong shapes", wrong_shape)) if keys]
        raise InputError(f"{source}: does not fit this model architecture: {'; '.join(parts)}")
    on_meta = next(model.parameters()).is_meta
    # assign=True on a meta-device model skips paying for a random init that the file overwrites anyway
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, assign=on_meta)
    if on_meta and getattr(model, "attn_mask", None) is not None and model.attn_mask.is_meta:
        # the causal text mask is a non-persistent buffer: not in any file, so rebuild it as open_clip does
        n = model.attn_mask.shape[0]
        model.attn_mask = torch.full((n, n), float("-inf")).triu_(1)
    return model
