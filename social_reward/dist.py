"""Images and prompts in, scores out: the one piece of code every script encodes with (validation, scoring, comparison,
generator evaluation, best-of-N, the trunk cache's fill). It works on what a scorers.Scorer holds: a model with
`encode_image(images, normalize=True)` and `encode_text(tokens, normalize=True)`, its preprocess and tokenizer; or, for
a model whose text encoder attends to the image (ImageReward), `encode_image` and `pair_scores` (see attended_scores).

    features = encode_images(model, preprocess, ["a.png", "b.png"], "cpu")
    scores = prompt_image_scores(model, preprocess, tokenizer, ["a cat", "a dog"], ["a.png", "b.png"], "cpu")

Under `accelerate launch` or `torchrun` (several processes), each process encodes a contiguous share of the images and
prompts and every process gets the whole result, so a script scores as one process would, N times faster; it only
writes and prints where is_main_process(). prompt_image_scores gathers only scores: each process encodes its share of
the distinct images and the prompts of their requests, and the embeddings stay where they were made.

    device = process_device(args.device)          # under several GPU processes: this process's GPU
    scores = prompt_image_scores(...)             # the same tensor in every process
    if is_main_process():
        write(scores)
"""
import os

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def distributed():
    """accelerate's PartialState when this process is one of several (accelerate launch, torchrun), else None. The
    first call creates the process group (gloo on CPUs, nccl on GPUs, each process bound to its own GPU); a single
    process creates none."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def is_main_process():
    """Whether this process writes outputs and prints: the only one, or the main one of several."""
    state = distributed()
    return state is None or state.is_main_process


def wait_for_everyone():
    """A barrier across the processes (nothing with one process)."""
    state = distributed()
    if state is not None:
        state.wait_for_everyone()


def process_device(device):
    """The device this process encodes on: `device`, except that under several processes "cuda" is this process's
    own GPU. Call before the model is loaded onto it."""
    state = distributed()
    if state is not None and torch.device(device).type == "cuda" and torch.device(device).index is None:
        return str(state.device)
    return device


def across_processes(encode, items):
    """encode(items) (a tensor with a row per item), with the items split across the processes: each encodes a
    contiguous share, and every process returns the whole tensor, in order. One process: encode(items)."""
    state = distributed()
    if state is None:
        return encode(items)
    bounds = [len(items) * i // state.num_processes for i in range(state.num_processes + 1)]
    mine = encode(items[bounds[state.process_index]:bounds[state.process_index + 1]])
    parts = [None] * state.num_processes
    torch.distributed.all_gather_object(parts, mine)
    parts = [part for part in parts if len(part)]
    return torch.cat(parts) if parts else mine
