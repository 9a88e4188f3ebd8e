"""Where and in what precision a model computes: the default device, DataLoader workers for it, and the --precision
context. torch is imported by the functions, not by this module, so that a script's flags name the precisions
before torch loads.

    device = default_device()                                  # "cuda" when there is a GPU, else "cpu"
    with inference_precision(device, "bf16"):                  # autocast; "fp32" is the original's arithmetic
        scores = ...
"""
import contextlib
import os

from social_reward.errors import InputError

# --precision: the autocast dtype (torch's name), None for fp32 (no autocast: the original's arithmetic)
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def default_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_num_workers(device):
    """DataLoader workers: on a GPU, the CPUs this process may use, up to 8 (the original's fixed 9 ignored the
    machine); on a CPU none, since the model already uses every core and a decoding process only competes with it."""
    import torch
    return 0 if torch.device(device).type == "cpu" else min(8, len(os.sched_getaffinity(0)))


def inference_precision(device, precision="fp32"):
    """The context encoding runs in for --precision: fp32, the original's arithmetic (no autocast), or autocast to
    bf16/fp16 (matrix products in half precision: the fast path on a GPU, and in bf16 on a CPU with AVX512-BF16)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: unknown; choose from {', '.join(PRECISIONS)}")
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    import torch
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, PRECISIONS[precision]))
