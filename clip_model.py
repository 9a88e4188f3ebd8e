"""Model loading and training modes: the one place every script and notebook gets its CLIP from.

    model, preprocess, tokenizer = load_model()                       # OpenAI ViT-L/14, as the paper
    model, preprocess, tokenizer = load_model(checkout_path="clip_epoch_4_global_step_final.pth")
    model, preprocess, tokenizer = load_model("assets/tiny-clip.json", pretrained="none")
"""
import contextlib
import ctypes
import json
import logging
import os
import pickle
import re
import shutil
import socket
import sys
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass

import torch

from errors import InputError  # noqa: F401 - every script imports it from here
from errors import run_cli as one_line_errors

if "transformers" in sys.modules:
    import open_clip
else:  # open_clip imports transformers (about a second) for Hugging Face text towers, which no model here has
    sys.modules["transformers"] = None
    try:
        import open_clip
    finally:
        del sys.modules["transformers"]  # the pickscore: scorer imports it for itself
from open_clip.transform import PreprocessCfg, image_transform_v2

# OpenAI trained ViT-L/14 with QuickGELU; open_clip's plain "ViT-L-14" (nn.GELU) is another model for these weights.
DEFAULT_MODEL = "ViT-L-14-quickgelu"
DEFAULT_PRETRAINED = "openai"


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_num_workers(device):
    """DataLoader workers: on a GPU, the CPUs this process may use, up to 8 (the original's fixed 9 ignored the
    machine); on a CPU none, since the model already uses every core and a decoding process only competes with it."""
    return 0 if torch.device(device).type == "cpu" else min(8, len(os.sched_getaffinity(0)))


def add_model_flags(parser, inference=False):
    """The flags every script shares: which model and weights; with `inference`, where and how fast to encode."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name or model-config .json")
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED, help="open_clip weights tag, weights file, or none")
    parser.add_argument("--checkout_path", default=None, help="fine-tuned weights (OpenAI-format state dict)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="DataLoader workers (default: 0 on a CPU, else the CPUs here, at most 8)")
    parser.add_argument("--fast_decode", action="store_true",
                        help="decode JPEGs at reduced scale (PIL draft), then resize: faster, scores move slightly")
    if inference:
        parser.add_argument("--device", default=default_device())
        parser.add_argument("--batch_size", type=int, default=1024)
        parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                            help="fp32 (the original's), or autocast to bf16/fp16: faster, scores move slightly")


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_precision(device, precision="fp32"):
    """The context encoding runs in for --precision: fp32, the original's arithmetic (no autocast), or autocast to
    bf16/fp16 (matrix products in half precision: the fast path on a GPU, and in bf16 on a CPU with AVX512-BF16)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: unknown; choose from {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def keep_freed_memory():
    """Have the C library keep freed memory for reuse rather than hand it back to the system (glibc; elsewhere a no-op).

    glibc serves each allocation of 32 MB or more with a fresh mmap and unmaps it when freed. On a CPU a ViT-L/14 at
    batch 8 makes such tensors in every block (an MLP activation is 8 x 257 x 4096 floats, 33.7 MB), so every one of
    their pages is faulted in and zeroed again and again: 3.8 to 5.1 million page faults in a 24-pair validation here,
    against 0.8 million with this. The arithmetic, and so every score, is unchanged."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: mallopt's parameters below are glibc's
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap too, where a freed block is reused ...
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # ... and the heap's free top is kept, not returned


def run_cli(main):
    """Run a script's main(): a user's mistake ends in one line naming the culprit and exit status 2, not a traceback.
    The process keeps its freed memory (keep_freed_memory): a script's process is its own."""
    keep_freed_memory()
    one_line_errors(main)


def check_free_space(folder, nbytes, what):
    """Refuse to start writing `what` (about `nbytes`) into `folder` when its disk has less free space than that plus a
    margin (a tenth, and 16 MB for the file system's own blocks): one line naming the folder and the space needed,
    before anything is written, so that the previous checkpoint stays the newest whole one."""
    needed = int(nbytes * 1.1) + 16 * 2**20
    free = shutil.disk_usage(folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))).free
    if free < needed:
        raise InputError(f"{folder}: not enough free space to write {what}: it needs {needed / 2**20:.1f} MB, "
                         f"{free / 2**20:.1f} MB are free; nothing was written, the previous checkpoint is intact")


def resolve_model_name(model=DEFAULT_MODEL):
    """An open_clip model name, or the path of an open_clip model-config JSON file (registered under its file stem)."""
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise InputError(f"--model {model}: no such model-config file")
        open_clip.add_model_config(model)
        model = os.path.splitext(os.path.basename(model))[0]
    config = open_clip.get_model_config(model)
    if config is None:
        raise InputError(f"--model {model}: not an open_clip model name (see open_clip.list_models()) nor a config .json file")
    if "hf_model_name" in config.get("text_cfg", {}):
        raise InputError(f"--model {model}: its text tower is a Hugging Face model; these scripts load CLIPs with "
                         f"OpenAI's text tower")
    return model


def tower_settings(name):
    """open_clip builds a ViT's blocks on nn.MultiheadAttention, whose inference fast path runs attention unfused on a
    CPU; its "custom" blocks hold the same tensors under the same names and call scaled_dot_product_attention, as
    OpenAI's CLIP does: the same arithmetic (equal image embeddings), about 5% less time for a ViT-L/14 image."""
    vision = open_clip.get_model_config(name)["vision_cfg"]
    if vision.get("block_type") or "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
        return {}
    return {"vision_cfg": {**vision, "block_type": "custom"}}


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


@contextlib.contextmanager
def _open_clip_quiet():
    """open_clip logs to the root logger what this module reports itself (random init, a failed download)."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _hub_offline_unless_reachable(timeout=3.0):
    """Hugging Face hub downloads in offline mode (the hub library's own HF_HUB_OFFLINE switch) when one TCP connect
    to the hub (or to the HTTPS proxy, if one is set) fails within `timeout` seconds: files already in the hub cache
    are still used, and a machine without network gets its error in seconds, not after a minute of retried requests."""
    from huggingface_hub import constants
    before = constants.HF_HUB_OFFLINE
    if not before:
        hub = urllib.parse.urlparse(constants.ENDPOINT)
        proxy = urllib.request.getproxies().get("https")
        address = (hub.hostname, hub.port or 443)
        if proxy and not urllib.request.proxy_bypass(hub.hostname):
            proxy = urllib.parse.urlparse(proxy if "://" in proxy else "http://" + proxy)
            address = (proxy.hostname, proxy.port or 80)
        try:
            socket.create_connection(address, timeout=timeout).close()
        except OSError:
            constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def empty_model(name):
    """The model's structure on the meta device, no memory and no init: for weights that fill every tensor."""
    with torch.device("meta"), _open_clip_quiet():
        return open_clip.create_model(name, pretrained=None, device="meta", **tower_settings(name))


def load_model(model=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED, checkout_path=None, device="cpu"):
    """Build (model, preprocess, tokenizer) in fp32, in eval mode.

    model:         an open_clip model name, or the path of an open_clip model-config JSON file.
    pretrained:    an open_clip weights tag ("openai"), a local weights file, or "none" (random init).
    checkout_path: an OpenAI-format state dict (fp16 or fp32), e.g. one written by train_pair_pos_neg.py;
                   it holds every tensor, so `pretrained` is then not loaded at all.
    """
    name = resolve_model_name(model)
    weights_file = checkout_path or (pretrained if pretrained and os.path.isfile(pretrained) else None)
    if weights_file:
        clip = load_weights(empty_model(name), weights_file)
    elif pretrained in (None, "", "none"):
        with _open_clip_quiet():
            clip = open_clip.create_model(name, pretrained=None)
        if tower_settings(name):
            # open_clip's own random init of this model (its custom blocks would draw the attention weights ~6x
            # larger than nn.MultiheadAttention does), in the faster blocks
            clip = assign_weights(empty_model(name), clip.state_dict(), "the random init")
    elif pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in pretrained:
        raise InputError(f"--pretrained {pretrained}: no such weights file")
    else:
        if not open_clip.get_pretrained_cfg(name, pretrained):
            raise InputError(f"--pretrained {pretrained}: not a weights tag of {name} "
                             f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}), nor a file")
        try:
            with _open_clip_quiet(), _hub_offline_unless_reachable():
                clip = open_clip.create_model(name, pretrained=pretrained, **tower_settings(name))
        except RuntimeError:
            raise InputError(f"could not download the '{pretrained}' weights of {name} (no network, or not in the hub cache); "
                             f"pass a local file instead: --pretrained /path/to/weights.pt (or .bin, .safetensors)") from None
    preprocess = image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)
    return clip.to(device).eval(), preprocess, open_clip.get_tokenizer(name)


def write_clip_tokenizer_files(folder):
    """vocab.json and merges.txt of CLIP's BPE (OpenAI's CLIP, and the text encoder of SD 1.x and 2.x), written from
    the vocabulary open_clip ships under the token names transformers' CLIPTokenizer uses; nothing downloaded."""
    from open_clip.tokenizer import SimpleTokenizer
    bpe = SimpleTokenizer()
    os.makedirs(folder, exist_ok=True)
    openai_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({openai_names.get(token, token): i for token, i in bpe.encoder.items()}, f, ensure_ascii=False)
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


@dataclass(frozen=True)
class TrainingMode:
    visual_blocks: int  # the last k blocks of the image tower are trained; ALL: the whole tower
    text_blocks: int  # likewise for the text tower
    extra: tuple = ()  # other trained tensors, by name
    optimizer: type = torch.optim.Adam


ALL = -1
TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
TRAINING_MODES = {
    "all": TrainingMode(ALL, ALL, ("logit_scale",)),
    "visual": TrainingMode(ALL, 0),
    "visual_upper_layers": TrainingMode(3, 0, ("visual.ln_post",)),
    "visual_upper_layers_textual_upper_layers": TrainingMode(
        3, 2, ("visual.ln_post", "ln_final", "text_projection"), torch.optim.AdamW),
    "visual_upper_layers_textual_upper_layers_deeper": TrainingMode(
        4, 3, ("visual.ln_post", "ln_final", "text_projection"), torch.optim.AdamW),
    "visual_last_layer": TrainingMode(1, 0, ("visual.ln_post",)),
}


def _tower_prefixes(blocks, depth, whole_tower, block_prefix):
    if blocks == ALL:
        return whole_tower
    if blocks > depth:
        raise InputError(f"this model has {depth} blocks in {block_prefix.rsplit('.', 1)[0]}; the mode trains the last {blocks}")
    return tuple(f"{block_prefix}.{i}" for i in range(depth - blocks, depth))


def trainable_parameters(model, training_mode, train_logit_scale=False):
    """Freeze everything `training_mode` does not train (requires_grad_(False)) and return the trained parameters.

    Blocks are counted from the top of each tower, so a mode means the same on any depth. `logit_scale` only
    trains in mode "all" and only when the loss uses it (the triplet loss does not, so it never moves there).
    """
    mode = TRAINING_MODES[training_mode]
    if not (hasattr(model, "visual") and hasattr(model.visual, "transformer") and hasattr(model, "transformer")):
        raise InputError("training modes need a CLIP with a ViT image tower and OpenAI's text tower layout")
    prefixes = mode.extra
    prefixes += _tower_prefixes(mode.visual_blocks, len(model.visual.transformer.resblocks), ("visual",),
                                "visual.transformer.resblocks")
    prefixes += _tower_prefixes(mode.text_blocks, len(model.transformer.resblocks), TEXT_TOWER, "transformer.resblocks")
    if not train_logit_scale:
        prefixes = tuple(p for p in prefixes if p != "logit_scale")
    trained = []
    for name, param in model.named_parameters():
        train = any(name == p or name.startswith(p + ".") for p in prefixes)
        param.requires_grad_(train)
        if train:
            trained.append(param)
    return trained


def train_mode(model):
    """model.train(), with the transformer blocks that train nothing in eval mode.

    CLIP has no dropout, so eval changes one thing there: PyTorch runs its fused attention kernel (the inference
    fast path of nn.MultiheadAttention) on the frozen blocks of the text tower.
    """
    model.train()
    for blocks in (model.visual.transformer.resblocks, model.transformer.resblocks):
        for block in blocks:
            block.train(any(p.requires_grad for p in block.parameters()))
    return model


def make_optimizer(params, training_mode, learning_rate):
    """The optimizer the original used for the mode: Adam, or AdamW (torch's default weight decay)."""
    return TRAINING_MODES[training_mode].optimizer(params, lr=learning_rate)
