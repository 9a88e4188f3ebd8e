"""HPSv3 (MizzenAI, ICCV 2025) from its HPSv3.safetensors, scored as the `hpsv3` package's HPSv3RewardInferencer
scores: Qwen2-VL-7B-Instruct reads one user turn (the image, then HPSv3's instruction holding the prompt and ending in
a <|Reward|> token); a small head on that token's last hidden state gives (mu, sigma), and mu is the score.

    model, preprocess, tokenizer = load_hpsv3("HPSv3.safetensors", "Qwen2-VL-7B-Instruct/")
    image_tokens = model.encode_image(preprocess(Image.open("a.png"))[None])
    mu = model.pair_scores(image_tokens, tokenizer(["a cat astronaut"]))       # HPSv3RewardInferencer.reward(...)[:, 0]

`base` is the folder of the model HPSv3 was fine-tuned from, Qwen2-VL-7B-Instruct, as the hub has it: its config.json,
tokenizer files, chat template and preprocessor_config.json are read; its weights are not (HPSv3.safetensors holds
every tensor the score uses). The model is built from transformers' Qwen2-VL vision tower and text model, which hold
HPSv3's tensors under the same names (HPSv3 trained with transformers 4.45, whose module layout this reads).

Like ImageReward, the score belongs to a (prompt, image) pair: encode_image gives the image's tokens (as many as its
resized size makes) and pair_scores splices them into each prompt's token sequence and runs the language model.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import nn

from social_reward.errors import InputError, described
from social_reward.models.weights import assign_weights, read_state_dict
from social_reward.scorers.base import Scorer, check_folder_option, check_weights_file

# HPSv3's prompt (hpsv3/dataset/data_collator_qwen.py: INSTRUCTION, then prompt_with_special_token): the text the model
# was trained to rate, with the user's prompt in it; the reward is read at <|Reward|>
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""


ASK = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


REWARD_TOKEN, IMAGE_TOKEN = "<|Reward|>", "<|image_pad|>"


PIXELS = 256 * 28 * 28  # prepare_batch: min_pixels = max_pixels, so every image is resized to about 256 tokens


MAX_RATIO = 200  # qwen-vl-utils' smart_resize refuses a longer side over 200 times the shorter


# the largest area smart_resize gives at PIXELS (56 x 6356, from a 1 x 200 image: 454 tokens), searched over every
# size of ratio <= 200; preprocess packs each image into a tensor of this capacity, so that a batch stacks
CAPACITY = 454 * 28 * 28


PACKED = 2 + 3 * CAPACITY  # (height, width), then the normalized pixels, channel-major, then zeros


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def smart_resize(height, width, factor=28, pixels=PIXELS):
    """The size qwen-vl-utils' fetch_image resizes an image to with min_pixels = max_pixels = `pixels`: each side
    rounded to a multiple of `factor`; if the area is then over (under) `pixels`, both sides scaled by the square root
    of the area ratio and floored (ceiled) to multiples of `factor`. At most 200:1."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"a {width} x {height} image: HPSv3 takes aspect ratios up to {MAX_RATIO}")
    new_height, new_width = (max(factor, round(side / factor) * factor) for side in (height, width))
    if new_height * new_width > pixels:
        scale = math.sqrt(height * width / pixels)
        new_height, new_width = (math.floor(side / scale / factor) * factor for side in (height, width))
    elif new_height * new_width < pixels:
        scale = math.sqrt(pixels / (height * width))
        new_height, new_width = (math.ceil(side * scale / factor) * factor for side in (height, width))
    return new_height, new_width


def pack(pixels):
    """Normalized images B x 3 x h x w (one size) -> B x PACKED: h, w, the pixels, zeros (differentiable)."""
    batch, _, height, width = pixels.shape
    size = pixels.new_tensor([height, width]).expand(batch, 2)
    return torch.cat([size, pixels.reshape(batch, -1), pixels.new_zeros(batch, PACKED - 2 - pixels[0].numel())], 1)


class Preprocess:
    """HPSv3's image preprocessing. On a PIL image (`pil`: fetch_image, then Qwen2-VL's processor): RGB, resized with
    PIL's bicubic to smart_resize's size (the processor's own resize then keeps that size), /255 in float64 as
    transformers' rescale does, the mean/std, packed. On a float tensor B x 3 x H x W in [0, 1] (a call;
    differentiable): torchvision's bicubic with antialias, as fetch_image resizes a tensor, the mean/std, packed.

        Preprocess()(images)   # B x PACKED
    """

    def __init__(self, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD, factor=28):
        self.mean, self.std, self.factor = list(mean), list(std), factor

    def _normalize(self, pixels):
        return (pixels - pixels.new_tensor(self.mean).view(3, 1, 1)) / pixels.new_tensor(self.std).view(3, 1, 1)

    def pil(self, image):
        image = image.convert("RGB")
        height, width = smart_resize(image.height, image.width, self.factor)
        image = image.resize((width, height), Image.BICUBIC)
        pixels = (TF.pil_to_tensor(image).double() * (1 / 255)).float()
        return pack(self._normalize(pixels)[None])[0]

    def __call__(self, images):
        height, width = smart_resize(*images.shape[-2:], self.factor)
        images = TF.resize(images, [height, width], TF.InterpolationMode.BICUBIC, antialias=True)
        return pack(self._normalize(images))


class VisionAngles(nn.Module):
    """The vision tower's 2-D rotary angles as HPSv3's transformers (4.45) made them: a table of position x frequency
    computed in the frequencies' own dtype, and cos and sin taken in it. HPSv3 casts its model to bf16, frequencies
    included, so its angles are bf16 products; transformers 5 computes them in float32, which moves bf16 scores. In
    float32 the two agree. Returns (cos, sin) [N, head_dim] for position_ids [N, 2] (each patch's row and column)."""

    def __init__(self, head_dim, theta=10000.0):
        super().__init__()
        dim = head_dim // 2
        self.inv_freq = nn.Buffer(1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim), persistent=False)

    def forward(self, x, position_ids):
        positions = torch.arange(int(position_ids.max()) + 1, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        angles = torch.outer(positions, self.inv_freq)[position_ids].flatten(1)  # the row's angles, then the column's
        angles = torch.cat([angles, angles], -1)
        return angles.cos().float(), angles.sin().float()


class HPSv3(nn.Module):
    """Qwen2-VL's vision tower and text model, and HPSv3's head: Linear 3584 -> 1024, ReLU, Dropout, Linear -> 16,
    ReLU, Linear -> 2 (mu, sigma), kept in float32 as HPSv3 keeps it."""

    def __init__(self, config, head_sizes, image_token_id, reward_token_id, pad_token_id):
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
            Qwen2VLTextModel,
        )
        self.visual = Qwen2VisionTransformerPretrainedModel(config.vision_config)
        self.language_model = Qwen2VLTextModel(config.text_config)
        (d0, d1), (d2, d3), (d4, d5) = head_sizes
        self.rm_head = nn.Sequential(nn.Linear(d1, d0), nn.ReLU(), nn.Dropout(0.05), nn.Linear(d3, d2), nn.ReLU(),
                                     nn.Linear(d5, d4))
        vision = config.vision_config
        self.patch, self.merge, self.frames = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.image_token_id, self.reward_token_id, self.pad_token_id = image_token_id, reward_token_id, pad_token_id

    def patches(self, image):
        """A normalized image 3 x h x w -> Qwen2-VL's flattened patches [h * w / patch^2, 3 * frames * patch^2] (the
        image as `frames` identical frames; patches ordered by merge block, as Qwen2-VL's image processor orders them)
        and its grid (1, h / patch, w / patch)."""
        p, m, t = self.patch, self.merge, self.frames
        rows, cols = image.shape[1] // p, image.shape[2] // p
        frames = image[None].expand(t, -1, -1, -1).reshape(t, 3, rows // m, m, p, cols // m, m, p)
        return frames.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(rows * cols, 3 * t * p * p), (1, rows, cols)

    def encode_image(self, pixels, normalize=True):
        """Packed images [B, PACKED] (Preprocess's) -> their tokens for the language model, float32 [B, 1 + T, D]: row
        0 holds each image's token count in its first entry, rows 1.. the tokens, zero past the count (`normalize`
        is ignored: there is no embedding)."""
        patches, grids = [], []
        for row in pixels:
            height, width = (int(v) for v in row[:2])
            image_patches, grid = self.patches(row[2:2 + 3 * height * width].view(3, height, width))
            patches.append(image_patches)
            grids.append(grid)
        grid_thw = torch.tensor(grids, device=pixels.device)
        merged = self.visual(torch.cat(patches), grid_thw=grid_thw).pooler_output
        counts = [rows * cols // self.merge ** 2 for _, rows, cols in grids]
        longest = max(counts)
        tokens = torch.stack([F.pad(chunk.float(), (0, 0, 0, longest - len(chunk))) for chunk in merged.split(counts)])
        header = tokens.new_zeros(len(tokens), 1, tokens.shape[-1])
        header[:, 0, 0] = torch.tensor(counts, dtype=tokens.dtype)
        return torch.cat([header, tokens], 1)

    def pair_scores(self, image_features, tokens):
        """HPSv3's mu for each row: prompt tokens[i] (HPSv3Tokenizer's, right-padded) with the image whose tokens are
        image_features[i] in place of its <|image_pad|>; the language model reads the sequence with plain positions
        0..L-1 on every rotary section (HPSv3's forward calls the text model without Qwen2-VL's 3-D positions)."""
        embed = self.language_model.embed_tokens
        sequences, reward_at = [], []
        for ids, features in zip(tokens, image_features):
            ids = ids[:int((ids != self.pad_token_id).nonzero().max()) + 1]
            at = int((ids == self.image_token_id).nonzero()[0])
            count = int(features[0, 0])
            image = features[1:1 + count].to(embed.weight.dtype)
            sequences.append(torch.cat([embed(ids[:at]), image, embed(ids[at + 1:])]))
            reward_at.append(count - 1 + int((ids == self.reward_token_id).nonzero()[0]))
        length = max(len(s) for s in sequences)
        pad = embed(torch.tensor([self.pad_token_id], device=tokens.device))
        inputs = torch.stack([torch.cat([s, pad.expand(length - len(s), -1)]) for s in sequences])
        mask = torch.stack([torch.arange(length, device=tokens.device) < len(s) for s in sequences]).long()
        hidden = self.language_model(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        rows = torch.arange(len(hidden), device=hidden.device)
        rewarded = hidden[rows, torch.tensor(reward_at, device=hidden.device)]
        return self.rm_head(rewarded.float())[:, 0]


class HPSv3Tokenizer:
    """Qwen2-VL's tokenizer from the base folder, with HPSv3's <|Reward|> added: prompts -> the ids of the chat HPSv3
    builds (the base model's chat template on one user turn, an image then INSTRUCTION + ASK, and the assistant's
    opening), right-padded, with one <|image_pad|> where the image's tokens go."""

    def __init__(self, folder):
        from transformers import AutoTokenizer
        try:
            self.qwen = AutoTokenizer.from_pretrained(folder, local_files_only=True, padding_side="right")
        except Exception as e:
            raise InputError(f"base={folder}: not a tokenizer folder ({described(e)})") from None
        self.qwen.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.template = chat_template(folder, self.qwen)
        self.pad_token_id = self.qwen.pad_token_id
        self.image_token_id, self.reward_token_id = self.qwen.convert_tokens_to_ids([IMAGE_TOKEN, REWARD_TOKEN])

    def __len__(self):
        return len(self.qwen)

    def text(self, prompt):
        """The chat HPSv3 scores `prompt` in, as text (the image as one <|image_pad|>)."""
        turn = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + ASK}]}]
        return self.qwen.apply_chat_template(turn, chat_template=self.template, tokenize=False,
                                             add_generation_prompt=True)

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.empty(0, 1, dtype=torch.long)
        ids = self.qwen([self.text(t) for t in texts], padding=True, return_tensors="pt").input_ids
        for text, row in zip(texts, ids):
            if (row == self.image_token_id).sum() != 1 or (row == self.reward_token_id).sum() != 1:
                raise InputError(f"prompt {text[:80]!r}: holds {IMAGE_TOKEN} or {REWARD_TOKEN}, which HPSv3 reserves")
        return ids


def chat_template(folder, tokenizer):
    """The base model's chat template, as its processor reads it: chat_template.json, else chat_template.jinja, else
    the tokenizer's own."""
    path = os.path.join(folder, "chat_template.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)["chat_template"]
    if os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja")) as f:
            return f.read()
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise InputError(f"base={folder}: no chat template (chat_template.json, chat_template.jinja or the tokenizer's)")


def our_name(key):
    """HPSv3.safetensors' name of a tensor (transformers 4.45's Qwen2VLForConditionalGeneration, plus rm_head) -> its
    name in HPSv3 above; None for lm_head, which the score does not use. Later transformers' names (model.visual.,
    model.language_model.) map too."""
    if key.startswith("lm_head."):
        return None
    for old, new in (("model.visual.", "visual."), ("model.language_model.", "language_model."),
                     ("model.", "language_model.")):
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def read_tensors(path):
    """{name: tensor} of HPSv3's weights: a .safetensors read lazily (lm_head, 545M parameters at 7B, never read), or a
    tensor pickle (HPSv3's trainer saves {"model": state dict}); never running pickled code."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if our_name(k)}
        except Exception as e:
            raise InputError(f"{path}: not a safetensors file ({type(e).__name__})") from None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return read_state_dict(path)  # which says in one line why it is not a checkpoint
    if isinstance(tensors, dict) and isinstance(tensors.get("model"), dict):
        tensors = tensors["model"]
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return tensors


def base_config(folder):
    """transformers' Qwen2VLConfig from the base folder's config.json (Qwen2-VL-7B-Instruct's)."""
    if not os.path.isdir(folder):
        raise InputError(f"base={folder}: no such folder (Qwen2-VL-7B-Instruct's files: config.json, tokenizer)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"base={folder}: no config.json: not Qwen2-VL-7B-Instruct's folder")
    from transformers import Qwen2VLConfig
    with open(os.path.join(folder, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "qwen2_vl":
        raise InputError(f"base={folder}: config.json is a {model_type!r} model, not Qwen2-VL (model_type qwen2_vl)")
    return Qwen2VLConfig.from_pretrained(folder)


def image_mean_std(folder):
    """The image processor's mean and std (preprocessor_config.json; OpenAI's CLIP values, Qwen2-VL's, without it)."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    with open(path) as f:
        config = json.load(f)
    return config.get("image_mean", OPENAI_DATASET_MEAN), config.get("image_std", OPENAI_DATASET_STD)


def load_hpsv3(path, base, dtype="bf16", device="cpu"):
    """(model, preprocess, tokenizer) of HPSv3, in eval mode.

    path:  HPSv3.safetensors (HF MizzenAI/HPSv3), the state dict of HPSv3's Qwen2VLRewardModelBT.
    base:  Qwen2-VL-7B-Instruct's folder (config.json, tokenizer, chat template; no weights needed).
    dtype: bf16 (HPSv3's own: its config casts the model to bf16, the head stays float32) or fp32.
    """
    if dtype not in DTYPES:
        raise InputError(f"hpsv3:{path}: dtype={dtype}: choose from {', '.join(DTYPES)}")
    config = base_config(base)
    tensors = {our_name(k): v for k, v in read_tensors(path).items() if our_name(k)}
    if not all(any(k.startswith(p) for k in tensors) for p in ("visual.", "language_model.", "rm_head.")):
        raise InputError(f"{path}: not an HPSv3 checkpoint (no visual.*, model.* and rm_head.* tensors)")
    tokenizer = HPSv3Tokenizer(base)
    words = tensors.get("language_model.embed_tokens.weight")
    if words is not None and len(words) != len(tokenizer):
        raise InputError(f"base={base}: its tokenizer has {len(tokenizer)} tokens with {REWARD_TOKEN}, the checkpoint "
                         f"embeds {len(words)}: not the model HPSv3 was trained from (Qwen2-VL-7B-Instruct)")
    config.text_config.vocab_size = len(tokenizer)
    head = sorted((k for k in tensors if k.startswith("rm_head.") and k.endswith(".weight")))
    if head != ["rm_head.0.weight", "rm_head.3.weight", "rm_head.5.weight"]:
        raise InputError(f"{path}: not HPSv3's reward head (rm_head.0, .3, .5 linear layers; found {', '.join(head)})")
    with torch.device("meta"):
        model = HPSv3(config, [tuple(tensors[k].shape) for k in head], tokenizer.image_token_id,
                      tokenizer.reward_token_id, tokenizer.pad_token_id)
    model.to(DTYPES[dtype]).rm_head.float()
    assign_weights(model, tensors, path)
    # buffers no file holds, made again off the meta device and cast as HPSv3 casts its model (their rounding in bf16
    # is part of its scores)
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    vision = config.vision_config
    model.visual.rotary_pos_emb = VisionAngles(vision.embed_dim // vision.num_heads).to(DTYPES[dtype])
    model.language_model.rotary_emb = Qwen2VLRotaryEmbedding(config.text_config).to(DTYPES[dtype])
    model.tensor_preprocess = Preprocess(*image_mean_std(base), model.patch * model.merge)
    preprocess = model.tensor_preprocess.pil
    return model.to(device).eval(), preprocess, tokenizer


def check(spec, path, options):
    check_weights_file(spec, path)
    check_folder_option(spec, options, "base", "Qwen2-VL-7B-Instruct's files (config.json, tokenizer, chat template; "
                                               "no weights needed)")


def load(path, options, device):
    """Its score is mu, the first of its head's (mu, sigma)."""
    model, preprocess, tokenizer = load_hpsv3(path, options["base"], options.get("dtype", "bf16"), device)
    return Scorer(model, preprocess, tokenizer, 1.0, model.tensor_preprocess)
