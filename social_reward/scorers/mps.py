"""MPS (Kwai-Kolors, CVPR 2024: multi-dimensional human preference) from its MPS_overall_checkpoint.pth, scored as its
evaluation scripts (eval_overall_mps_on_hpdv2.py, infer_one_sample) score: a CLIP ViT-H/14 (transformers' CLIPModel)
whose image tokens pass through MPS's condition module, which attends to the prompt's tokens that resemble the
condition words; the score is logit_scale.exp() times the cosine of the prompt's embedding and the module's first token.

    model, preprocess, tokenizer = load_mps("MPS_overall_checkpoint.pth", "CLIP-ViT-H-14-laion2B-s32B-b79K/")
    image_tokens = model.encode_image(preprocess(Image.open("a.png"))[None])
    score = model.pair_scores(image_tokens, tokenizer(["a cat astronaut"]))

The checkpoint is a whole pickled module (`torch.save(model)` of MPS's trainer.models.clip_model.CLIPModel; its README
loads it with a bare torch.load). It is read here by a restricted unpickler (read_pickled_module): every class the file
names becomes an inert record of its pickled state, and the only callables the file may reach are torch's tensor
rebuilders and a few containers, so no code from the file runs (SPEC.md, defect 5); the weights and the CLIP config are
then taken from those records. `processor` is the folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer and
preprocessor_config.json), which MPS's scripts load as their processor and tokenizer.
"""
import collections
import json
import os
import pickle
import re

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from social_reward.errors import InputError, described
from social_reward.models.weights import assign_weights
from social_reward.scorers.base import Scorer, check_folder_option, check_weights_file
from social_reward.scorers.preprocess import ClipImageProcessor

# the condition MPS's evaluation scores its overall preference with (infer_one_sample's default)
CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
             "instance, texture, quantity, attributes, position, number, location, word, things.")


# a prompt token takes part when its best similarity to a condition token is over this share of the prompt's best
CONDITION_THRESHOLD = 0.3


DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


CLIP_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id",
                  "bos_token_id", "eos_token_id")


CLIP_VISION_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
                    "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps")


class Pickled:
    """An object of a class the file names, rebuilt as data only: the arguments and state it was pickled with."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) state
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def append(self, item):  # list-like and dict-like pickled objects add their items through these
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("items", []).extend(items)

    def __setitem__(self, key, value):
        self.__dict__.setdefault("mapping", {})[key] = value


def _pickled_class(module, name):
    return type(name, (Pickled,), {"pickled_as": f"{module}.{name}"})


def _reconstructor(cls, base, state):  # copyreg's, without calling base's __init__
    obj = Pickled.__new__(cls if isinstance(cls, type) and issubclass(cls, Pickled) else Pickled)
    obj.args = (state,)
    return obj


def _rebuild_from_type(func, new_type, args, state):
    """torch's _rebuild_from_type_v2 (a tensor of a subclass, e.g. a buffer of transformers 5's), as a plain tensor when
    `func` is one of torch's tensor rebuilders; otherwise an inert record."""
    if func in (torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter):
        return func(*args)
    return Pickled(func, new_type, args, state)


# what the file may call: torch's tensor rebuilders (as torch.load(weights_only=True) allows), containers, dtypes
ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
           ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
           ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
           ("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): torch.Size,
           ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type, ("torch", "Tensor"): torch.Tensor,
           ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
           ("copyreg", "_reconstructor"): _reconstructor,
           **{("torch", name): getattr(torch, name) for name in ("float16", "float32", "bfloat16", "float64", "int64",
                                                                 "int32", "uint8", "bool")}}


PYTHON2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class DataUnpickler(pickle.Unpickler):
    """pickle's Unpickler whose globals are ALLOWED's or, for anything else, an inert Pickled subclass."""
    classes = {}

    def find_class(self, module, name):
        module = PYTHON2_NAMES.get(module, module)  # torch pickles with protocol 2, which names these the old way
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        return self.classes.setdefault((module, name), _pickled_class(module, name))


class data_pickle:  # the pickle_module torch.load reads the archive's data.pkl with
    Unpickler = DataUnpickler
    __name__ = "mps.data_pickle"

    @staticmethod
    def load(f, **kwargs):
        return DataUnpickler(f, **kwargs).load()


def read_pickled_module(path):
    """The root object of a torch.save(module) file, every module in it a Pickled record (no code from the file
    runs)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location="cpu", pickle_module=data_pickle, weights_only=False)
    except Exception as e:
        raise InputError(f"{path}: not a torch checkpoint ({described(e)})") from None


def module_tensors(record, prefix=""):
    """A pickled nn.Module's state dict, from its records: parameters and persistent buffers, children by name."""
    state, tensors = record.__dict__, {}
    for name, value in state.get("_parameters", {}).items():
        if value is not None:
            tensors[prefix + name] = value
    skipped = state.get("_non_persistent_buffers_set", set())
    for name, value in state.get("_buffers", {}).items():
        if value is not None and name not in skipped:
            tensors[prefix + name] = value
    odd = [name for name, value in tensors.items() if not isinstance(value, torch.Tensor)]
    if odd:
        raise InputError(f"the pickled module's {odd[0]}: a parameter or buffer that is not a tensor: not an MPS "
                         f"checkpoint")
    for name, child in state.get("_modules", {}).items():
        if isinstance(child, Pickled):
            tensors |= module_tensors(child, f"{prefix}{name}.")
    return tensors


def cached_rotary_tables(root):
    """{condition layer: the rotary table its ParallelTransformerBlock cached} for the layers whose pickled
    `cross_model.layers.N.1.fn` holds a pos_emb tensor."""
    layers = root.__dict__.get("_modules", {}).get("cross_model")
    layers = layers.__dict__.get("_modules", {}).get("layers") if isinstance(layers, Pickled) else None
    tables = {}
    for index, layer in (layers.__dict__.get("_modules", {}).items() if isinstance(layers, Pickled) else ()):
        residual = layer.__dict__.get("_modules", {}).get("1") if isinstance(layer, Pickled) else None
        block = residual.__dict__.get("_modules", {}).get("fn") if isinstance(residual, Pickled) else None
        table = block.__dict__.get("_buffers", {}).get("pos_emb") if isinstance(block, Pickled) else None
        if isinstance(table, torch.Tensor):
            tables[int(index)] = table
    return tables


def config_values(record, keys):
    """The given attributes of a pickled transformers config (a Pickled record, or a dict)."""
    values = record if isinstance(record, dict) else getattr(record, "__dict__", {})
    return {key: values[key] for key in keys if key in values}


def swiglu(x):
    x, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * x


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class ConditionLayer(nn.Module):
    """One layer of MPS's condition module (its cross_modeling.py Cross_model): the image tokens attend to the prompt's
    tokens (every head's query, one shared key/value head, the condition mask added), with a parallel SwiGLU
    feed-forward on the same normalized input; then parallel self-attention (rotary positions, one key/value head) and
    feed-forward. Pre-LayerNorm, residual around each half; no biases."""

    def __init__(self, dim, heads, head_dim, ff_width):
        super().__init__()
        self.heads, self.head_dim, self.ff_width = heads, head_dim, ff_width
        inner = heads * head_dim
        self.cross_norm, self.self_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * head_dim, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.cross_ff_in = nn.Linear(dim, 2 * ff_width, bias=False)
        self.cross_ff_out = nn.Linear(ff_width, dim, bias=False)
        self.fused = nn.Linear(dim, inner + 2 * head_dim + 2 * ff_width, bias=False)
        self.attn_out = nn.Linear(inner, dim, bias=False)
        self.self_ff_out = nn.Linear(ff_width, dim, bias=False)
        self.inv_freq = nn.Buffer(torch.empty(head_dim // 2))
        # the rotary table MPS's ParallelTransformerBlock caches (its non-persistent pos_emb) when the module ran
        # before it was pickled: MPS then reads that table, not one made again from inv_freq, and so does this
        self.register_buffer("cached_angles", None, persistent=False)

    def _heads(self, x):
        return x.view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x):
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    def forward(self, x, context, mask):
        scale = self.head_dim ** -0.5
        h = self.cross_norm(x)
        q = self._heads(self.to_q(h)) * scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        attention = (q @ k[:, None].transpose(-1, -2) + mask[:, None]).softmax(dim=-1)
        x = x + self.to_out(self._merge(attention @ v[:, None])) + self.cross_ff_out(swiglu(self.cross_ff_in(h)))

        h = self.self_norm(x)
        q, k, v, ff = self.fused(h).split([self.heads * self.head_dim, self.head_dim, self.head_dim,
                                          2 * self.ff_width], dim=-1)
        if self.cached_angles is not None and self.cached_angles.shape[-2] >= x.shape[1]:
            angles = self.cached_angles[:x.shape[1]]
        else:
            positions = torch.arange(x.shape[1], device=x.device, dtype=self.inv_freq.dtype)
            angles = torch.outer(positions, self.inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
        q, k = ((t * angles.cos() + rotate_half(t) * angles.sin()) for t in (self._heads(q), k))
        attention = ((q * scale) @ k[:, None].transpose(-1, -2)).softmax(dim=-1)
        return x + self.attn_out(self._merge(attention @ v[:, None])) + self.self_ff_out(swiglu(ff))


class MPS(nn.Module):
    """CLIP ViT-H/14 and MPS's condition module. encode_image gives the projected image tokens (CLIP's last hidden
    state, before its post-LayerNorm, through visual_projection: MPS's get_image_features); pair_scores the score."""

    def __init__(self, clip_config, layers, heads, head_dim, ff_width, condition_ids):
        super().__init__()
        from transformers import CLIPModel
        self.clip = CLIPModel(clip_config)
        self.condition = nn.ModuleList(ConditionLayer(clip_config.projection_dim, heads, head_dim, ff_width)
                                       for _ in range(layers))
        self.condition_ids = nn.Buffer(condition_ids, persistent=False)

    def encode_image(self, pixels, normalize=True):
        """Image tokens [B, 257, projection] (`normalize` is ignored: the module reads unnormalized tokens)."""
        dtype = self.clip.visual_projection.weight.dtype
        hidden = self.clip.vision_model(pixel_values=pixels.to(dtype)).last_hidden_state
        return self.clip.visual_projection(hidden)

    def text_tokens(self, ids):
        """(every token's projected last hidden state [B, 77, D], the end-of-text token's [B, D]): MPS's
        get_text_features; no attention mask, as MPS calls it (the padding's hidden states are read too)."""
        output = self.clip.text_model(input_ids=ids)
        return (self.clip.text_projection(output.last_hidden_state),
                self.clip.text_projection(output.pooler_output))

    def pair_scores(self, image_features, tokens):
        """MPS's score of each row: logit_scale.exp() * cos(the prompt's embedding, the condition module's first
        token), the module reading image_features[i] and attending to the tokens of prompt tokens[i] whose best dot
        product with a condition token is over CONDITION_THRESHOLD of that prompt's best (infer_one_sample, one pair
        at a time: the maximum is each prompt's own)."""
        text_all, text_pooled = self.text_tokens(tokens)
        condition, _ = self.text_tokens(self.condition_ids.expand(len(tokens), -1))
        similarity = (condition @ text_all.transpose(1, 2)).amax(dim=1, keepdim=True)  # [B, 1, 77]
        similarity = similarity / similarity.amax(dim=2, keepdim=True)
        mask = torch.zeros_like(similarity).masked_fill(similarity <= CONDITION_THRESHOLD, float("-inf"))
        x = image_features.to(text_all.dtype)
        for layer in self.condition:
            x = layer(x, text_all, mask)
        image = F.normalize(x[:, 0].float(), dim=-1)
        text = F.normalize(text_pooled.float(), dim=-1)
        return self.clip.logit_scale.exp().float() * (image * text).sum(-1)


class MPSTokenizer:
    """The CLIP tokenizer of the processor folder (laion's CLIP-ViT-H-14), as MPS's _tokenize calls it: padded to and
    truncated at its model_max_length (77) with its own padding token."""

    def __init__(self, folder):
        from transformers import AutoTokenizer
        try:
            self.clip = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise InputError(f"processor={folder}: not a tokenizer folder ({described(e)})") from None

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.clip.model_max_length
        if not texts:
            return torch.empty(0, length, dtype=torch.long)
        return self.clip(texts, max_length=length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids


def image_processor_config(folder):
    """(size, crop, mean, std) of the folder's preprocessor_config.json (CLIP's 224, 224 and OpenAI's mean/std without
    it)."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return 224, 224, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    with open(path) as f:
        config = json.load(f)
    size, crop = config.get("size", 224), config.get("crop_size", 224)
    size = size.get("shortest_edge", 224) if isinstance(size, dict) else size
    crop = crop.get("height", 224) if isinstance(crop, dict) else crop
    return size, crop, config.get("image_mean", OPENAI_DATASET_MEAN), config.get("image_std", OPENAI_DATASET_STD)


# MPS_overall_checkpoint.pth's names (trainer.models.clip_model.CLIPModel: .model, an XCLIPModel, and .cross_model, a
# Cross_model of Residual(CrossAttention), Residual(ParallelTransformerBlock) pairs) -> ours
CONDITION_NAMES = {"0.fn.norm": "cross_norm", "0.fn.to_q": "to_q", "0.fn.to_kv": "to_kv", "0.fn.to_out": "to_out",
                   "0.fn.ff.0": "cross_ff_in", "0.fn.ff.2": "cross_ff_out", "1.fn.norm": "self_norm",
                   "1.fn.fused_attn_ff_proj": "fused", "1.fn.attn_out": "attn_out", "1.fn.ff_out.1": "self_ff_out",
                   "1.fn.rotary_emb": ""}


def our_name(key):
    """The checkpoint's name of a tensor -> ours; None for CLIP's position_ids (a constant arange)."""
    if key.endswith("embeddings.position_ids"):
        return None
    if key.startswith("model."):
        return "clip." + key.removeprefix("model.")
    match = re.fullmatch(r"cross_model\.layers\.(\d+)\.(\d\.fn\.[\w.]+?)\.(weight|bias|inv_freq)", key)
    if match and match[2] in CONDITION_NAMES:
        name = CONDITION_NAMES[match[2]]
        return f"condition.{match[1]}.{name + '.' if name else ''}{match[3]}"
    return key


def load_mps(path, processor, dtype="fp16", device="cpu"):
    """(model, preprocess, tokenizer) of MPS, in eval mode.

    path:      MPS_overall_checkpoint.pth (the pickled module MPS's README links), read as data only.
    processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's folder (tokenizer files, preprocessor_config.json).
    dtype:     fp16 (MPS's own: its module is saved in half precision and run so) or fp32.
    """
    if dtype not in DTYPES:
        raise InputError(f"mps:{path}: dtype={dtype}: choose from {', '.join(DTYPES)}")
    if not os.path.isdir(processor):
        raise InputError(f"processor={processor}: no such folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer "
                         f"and preprocessor_config.json)")
    root = read_pickled_module(path)
    try:
        clip = getattr(root, "__dict__", {}).get("_modules", {}).get("model") if isinstance(root, Pickled) else None
        config = getattr(clip, "__dict__", {}).get("config") if isinstance(clip, Pickled) else None
        if config is None:
            raise InputError(f"{path}: not an MPS checkpoint (a pickled trainer.models.clip_model.CLIPModel, whose "
                             f".model is a transformers CLIPModel with its config)")
        tensors = {our_name(k): v for k, v in module_tensors(root).items() if our_name(k)}
        tables = cached_rotary_tables(root)
    except (RecursionError, AttributeError, TypeError, ValueError) as e:  # modules in a cycle, records of odd types
        raise InputError(f"{path}: not an MPS checkpoint (its pickled modules are malformed: {type(e).__name__})"
                         ) from None
    layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("condition.")})
    if not layers or "clip.logit_scale" not in tensors:
        raise InputError(f"{path}: not an MPS checkpoint (no cross_model.layers.* and model.logit_scale tensors)")
    from transformers import CLIPConfig
    clip_config = CLIPConfig(text_config=config_values(config.__dict__.get("text_config"), CLIP_TEXT_KEYS),
                             vision_config=config_values(config.__dict__.get("vision_config"), CLIP_VISION_KEYS),
                             **config_values(config, ("projection_dim", "logit_scale_init_value")))
    head_dim = tensors["condition.0.to_kv.weight"].shape[0] // 2
    heads = tensors["condition.0.to_q.weight"].shape[0] // head_dim
    ff_width = tensors["condition.0.cross_ff_out.weight"].shape[1]
    tokenizer = MPSTokenizer(processor)
    with torch.device("meta"):
        model = MPS(clip_config, len(layers), heads, head_dim, ff_width, torch.empty(0, dtype=torch.long))
    model.to(DTYPES[dtype])
    assign_weights(model, tensors, path)
    model.condition_ids = tokenizer(CONDITION)  # buffers no file holds, made again off the meta device
    for index, table in tables.items():
        if index < len(model.condition):
            model.condition[index].cached_angles = table.to(DTYPES[dtype])
    for embeddings in (model.clip.text_model.embeddings, model.clip.vision_model.embeddings):
        embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1]).expand(1, -1)
    size, crop, mean, std = image_processor_config(processor)
    model.tensor_preprocess = ClipImageProcessor(size, crop, mean, std, resample="pil")  # transformers 4's, MPS's
    return model.to(device).eval(), model.tensor_preprocess.pil, tokenizer


def check(spec, path, options):
    check_weights_file(spec, path)
    check_folder_option(spec, options, "processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer and "
                                                    "preprocessor_config.json")


def load(path, options, device):
    """Its score is already logit_scale.exp() * cos, which its own softmax reads."""
    model, preprocess, tokenizer = load_mps(path, options["processor"], options.get("dtype", "fp16"), device)
    return Scorer(model, preprocess, tokenizer, 1.0, model.tensor_preprocess)
