"""LoRA on a pipeline's denoiser through peft, at the family's targets, saved and loaded in diffusers' own format
(`pipeline.load_lora_weights(folder)` reads what save_lora writes).

    lora_params = add_lora(pipeline, rank=4, lora_alpha=4)
    save_lora(pipeline, "sd_lora/"); load_lora(load_pipeline("stable-diffusion-xl-base-1.0/"), "sd_lora/")
"""
import os

import torch

from social_reward.errors import InputError
from social_reward.generators.families import denoiser, family_of

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def add_lora(pipeline, rank=4, lora_alpha=None):
    """LoRA adapters on the denoiser's layers that diffusers' own LoRA script for the family adapts (peft, Gaussian A,
    zero B: the pipeline's output is unchanged until a step); returns the trainable LoRA parameters."""
    from peft import LoraConfig
    if rank < 1:
        raise InputError(f"--rank must be at least 1 (got {rank})")
    model = denoiser(pipeline)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha,
                                 init_lora_weights="gaussian", target_modules=list(family_of(pipeline).lora_targets)))
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(pipeline, folder, model=None):
    """folder/pytorch_lora_weights.safetensors through the family's save_lora_weights, with the adapter's LoraConfig
    (alpha included) in the file's lora_adapter_metadata as diffusers' own scripts write it, so load_lora_weights
    rebuilds the adapter at its own scale. `model`: the denoiser holding the adapter (default the pipeline's)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    family, model = family_of(pipeline), model if model is not None else denoiser(pipeline)
    state = get_peft_model_state_dict(model)
    if family.denoiser == "unet":  # the UNet scripts convert to diffusers' names, the transformer scripts do not
        state = convert_state_dict_to_diffusers(state)
    type(pipeline).save_lora_weights(folder, safe_serialization=True, **{
        f"{family.denoiser}_lora_layers": state,
        f"{family.denoiser}_lora_adapter_metadata": model.peft_config["default"].to_dict()})
    return os.path.join(folder, LORA_WEIGHTS)


def lora_tensors(pipeline, folder, flag="--lora"):
    """The LoRA file's tensors for the denoiser, under peft's names; a file of another family (prefix, module or
    shape that the denoiser lacks) is refused naming the first key that does not fit."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file
    path = os.path.join(folder, LORA_WEIGHTS)
    if not os.path.isfile(path):
        raise InputError(f"{flag} {folder}: no {LORA_WEIGHTS} (a fine-tuning's output_dir or checkpoint-STEP folder)")
    family, model = family_of(pipeline), denoiser(pipeline)
    state = load_file(path)
    prefix = family.denoiser + "."
    if not state or any(not k.startswith(prefix) for k in state):
        other = next((k for k in state if not k.startswith(prefix)), "no tensors")
        raise InputError(f"{flag} {folder}: not a LoRA of this {family.name} pipeline's {family.denoiser} ({other})")
    state = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items()})
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        name, _, end = key.rpartition(".lora_")
        module = modules.get(name) or modules.get(name + ".base_layer")
        base = getattr(module, "base_layer", module)
        ok = isinstance(base, torch.nn.Linear) and (tensor.shape[1] == base.in_features if end.startswith("A")
                                                   else tensor.shape[0] == base.out_features)
        if not ok:
            raise InputError(f"{flag} {folder}: a LoRA of another model than this {family.name} pipeline "
                             f"({prefix}{key} {tuple(tensor.shape)} fits no layer of its {family.denoiser})")
    return state


def set_lora_state_dict(pipeline, folder, model=None):
    """Load a saved LoRA's tensors into the adapter add_lora made (resuming a run)."""
    from peft.utils import set_peft_model_state_dict
    model = model if model is not None else denoiser(pipeline)
    result = set_peft_model_state_dict(model, lora_tensors(pipeline, folder, "--resume_from_checkpoint"),
                                       adapter_name="default")
    if result.unexpected_keys:
        raise InputError(f"{folder}: LoRA weights for another model or rank ({result.unexpected_keys[0]}, ...)")


def load_lora(pipeline, folder):
    """pipeline.load_lora_weights(folder) (alpha from the file's metadata), a LoRA of another family or a mistake
    refused in one line naming the folder."""
    lora_tensors(pipeline, folder)
    try:
        pipeline.load_lora_weights(folder)
    except Exception as e:
        raise InputError(f"--lora {folder}: does not fit this pipeline ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    return pipeline
