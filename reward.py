"""The reward as a function, for other people's loops (ReFL, DRaFT, AlignProp, DDPO): any scorers.py spec, called on
decoded images, differentiable with respect to them.

    from reward import Reward, reward_fn
    reward = Reward.load("clip:clip_epoch_4_global_step_final.pth", "cuda")
    r = reward(images, prompts)       # images: B x 3 x H x W floats in [0, 1] (a VAE's (x / 2 + 0.5).clamp(0, 1))
    (-r.mean()).backward()            # the gradient reaches the images; the reward's own weights stay frozen

    fn = reward_fn("clip:clip_final.pth", "cuda")        # DDPO-style: fn(images, prompts, metadata) -> (rewards, {})
    fn = reward_fn({"pickscore:PickScore_v1": 1.0, "aesthetic:sac+logos+ava1-l14-linearMSE.pth": 0.5},
                   reward_norm="prompt")                 # several scorers, each normalised, then weighted

On tensors, each scorer's own preprocessing runs on the tensor (CLIP: the shortest side to the model's size, bicubic
with antialiasing, centre crop, mean/std; HPS v2: the longest side, then padded). On a list of PIL images it is the
scorer's own PIL preprocessing, so the rewards equal score.py's scores.

Scorers live on unrelated scales (cosines near 0.3, PickScore near 20, ImageReward around 0), so several are put on
one scale before their weights combine them (`normalize`, one place for every method): "none" (the scorer's own
score), "group" (standardised among the images of the same prompt in the batch: GRPO's groups), "prompt"
(standardised by a running buffer of each prompt's past rewards: DDPO's per-prompt stat tracking), "calibrated"
(t * score, t the scorer's calibration temperature: log-odds units, a difference of 1 is odds of e to 1).
"""
import numpy as np
import open_clip
import torch
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_model import InputError
from scorers import load_scorer, parse_spec

REWARD_NORMS = ("none", "group", "prompt", "calibrated")
NORM_EPS = 1e-6  # added to a standard deviation (DDPO's)
PROMPT_BUFFER, PROMPT_MIN_COUNT = 16, 16  # DDPO's per_prompt_stat_tracking defaults


def row_scores(model, image_features, tokens):
    """The model's score of image k (its encode_image features) for tokens[k], for each k, before score_scale."""
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
        """A Reward from a scorers.py spec ("clip:final.pth", "hpsv2:HPS_v2.1_compressed.pt", "pickscore:DIR", ...).
        gradient_checkpointing: recompute the image tower's blocks in the backward pass (memory at 512 px batches).
        calibration: a calibration.json (compare.py --calibrate) holding this scorer's entry: the reward is then
        t * score, in log-odds units (a file fitted for another scorer or weights is refused)."""
        temperature = None
        if calibration is not None:
            from calibration import read_calibration
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
        return scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.scorer.score_scale


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


# ---- several rewards on one scale ----------------------------------------------------------------------------------

class NonFiniteReward(InputError):
    """A scorer gave a non-finite reward (the message names the scorer and the prompt)."""


def group_ids(groups):
    """Labels (prompts, or any hashables; a tensor of them) -> a long tensor of group numbers in order of first sight."""
    if isinstance(groups, torch.Tensor):
        groups = groups.tolist()
    seen = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in groups], dtype=torch.long)


def standardize(values, groups, eps=NORM_EPS):
    """Each value standardised within its group: (v - group mean) / (group std + eps), population std; [N] -> [N],
    differentiable. `groups`: one label per value (the prompts, or group numbers).

        standardize(torch.tensor([1., 3., 10., 20.]), ["a", "a", "b", "b"])  # -> [-1, 1, -1, 1] (to 1e-6)
    """
    ids = group_ids(groups).to(values.device)
    count = torch.zeros(int(ids.max()) + 1, device=values.device).index_add_(0, ids, torch.ones_like(values))
    mean = torch.zeros_like(count).index_add_(0, ids, values) / count
    centred = values - mean[ids]
    std = (torch.zeros_like(count).index_add_(0, ids, centred ** 2) / count).sqrt()
    return centred / (std[ids] + eps)


class PromptStats:
    """DDPO's per-prompt stat tracking: each prompt's last `buffer_size` rewards; a reward is standardised by its
    prompt's buffer once that holds `min_count`, by the whole batch's until then. The buffer is the run's state
    (state_dict / load_state_dict: a resumed run continues it exactly).

        stats = PromptStats(); normalised = stats(rewards, prompts)
        stats.update(all_rewards, all_prompts); normalised = stats.normalize(my_rewards, my_prompts)  # processes
    """

    def __init__(self, buffer_size=PROMPT_BUFFER, min_count=PROMPT_MIN_COUNT):
        self.buffer_size, self.min_count, self.buffers, self.batch = buffer_size, min_count, {}, (0.0, 1.0)

    def update(self, values, prompts):
        """Add a batch's rewards (every process's, gathered) to the buffers."""
        # a non-finite reward (a step --skip_nonfinite_loss skips) would poison its prompt's buffer for good
        pairs = [(float(v), p) for v, p in zip(values.detach().double().cpu(), prompts) if np.isfinite(float(v))]
        for value, prompt in pairs:
            self.buffers[prompt] = (self.buffers.get(prompt, []) + [value])[-self.buffer_size:]
        if pairs:
            self.batch = (float(np.mean([v for v, _ in pairs])), float(np.std([v for v, _ in pairs])))

    def normalize(self, values, prompts):
        """(v - mean) / (std + eps) by each prompt's buffer (the last batch's statistics while it is short);
        differentiable in values, the statistics constant."""
        stats = [(np.mean(self.buffers[p]), np.std(self.buffers[p])) if len(self.buffers.get(p, ())) >= self.min_count
                 else self.batch for p in prompts]
        mean, std = (torch.tensor(column, dtype=values.dtype, device=values.device) for column in zip(*stats))
        return (values - mean) / (std + NORM_EPS)

    def __call__(self, values, prompts):
        self.update(values, prompts)
        return self.normalize(values, prompts)

    def state_dict(self):
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "buffers": self.buffers,
                "batch": list(self.batch)}

    def load_state_dict(self, state):
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers, self.batch = {p: list(v) for p, v in state["buffers"].items()}, tuple(state["batch"])


def check_reward_norm(reward_norm):
    if reward_norm not in REWARD_NORMS:
        raise InputError(f"--reward_norm {reward_norm}: unknown; choose from {', '.join(REWARD_NORMS)}")
    return reward_norm


class RewardMix(nn.Module):
    """Several rewards, each normalised by `reward_norm` (none | group | prompt | calibrated), then combined by their
    weights: mix(images, prompts) -> (total [B], raw {name: [B]}), raw being each scorer's own score. Differentiable
    through every mode (group's statistics included; prompt's are constants). A scorer that fails on the images or
    gives a non-finite reward ends in one line naming it (and the prompt).

        mix = RewardMix.load([("pick", "pickscore:PickScore_v1", 1.0), ("aes", "aesthetic:sac.pth", 0.5)],
                             "cuda", reward_norm="prompt")
        total, raw = mix(images, prompts)       # total = 1.0 * norm(pick) + 0.5 * norm(aes)
    """

    def __init__(self, rewards, weights, reward_norm="none", names=None):
        super().__init__()
        self.reward_norm = check_reward_norm(reward_norm)
        self.rewards = nn.ModuleList(rewards)
        self.weights = [float(w) for w in weights]
        self.names = list(names or [f"reward{i}" for i in range(len(rewards))])
        if reward_norm == "calibrated":
            uncalibrated = [name for name, r in zip(self.names, rewards) if r.temperature is None]
            if uncalibrated:
                raise InputError(f"--reward_norm calibrated: no calibration for {', '.join(uncalibrated)} "
                                 f"(give --calibration FILE, compare.py --calibrate writes one)")
        self.prompt_stats = {name: PromptStats() for name in self.names} if reward_norm == "prompt" else None

    @classmethod
    def load(cls, named_specs, device="cpu", reward_norm="none", calibration=None, gradient_checkpointing=False):
        """From [(name, spec, weight)]; calibration (a calibration.json, read for every scorer) goes with
        reward_norm "calibrated" only."""
        check_reward_norm(reward_norm)
        if (calibration is None) != (reward_norm != "calibrated"):
            raise InputError("--calibration goes with --reward_norm calibrated" if calibration is not None else
                             "--reward_norm calibrated: give --calibration FILE (compare.py --calibrate writes one)")
        rewards = [Reward.load(spec, device, gradient_checkpointing, calibration) for _, spec, _ in named_specs]
        return cls(rewards, [w for _, _, w in named_specs], reward_norm, [name for name, _, _ in named_specs])

    def kinds(self):
        """Each scorer's kind (imagereward, clip, ...; None for a Reward made without a spec), by name."""
        return {name: r.spec and parse_spec(r.spec)[0] for name, r in zip(self.names, self.rewards)}

    def scores(self, images, prompts, check_finite=True):
        """{name: the scorer's own scores [B]} (float32), each checked finite (nonfinite_message) unless told not."""
        raw = {}
        for name, reward in zip(self.names, self.rewards):
            try:
                raw[name] = reward.score(images, prompts).float()
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                shape = (f"{tuple(images.shape)}, {images.dtype}" if isinstance(images, torch.Tensor)
                         else f"{len(images)} images")
                raise InputError(f"--scorer {name}: fails on the generator's images ({shape}): "
                                 f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from None
        message = check_finite and self.nonfinite_message(raw, prompts)
        if message:
            raise NonFiniteReward(message)
        return raw

    @staticmethod
    def nonfinite_message(raw, prompts):
        """The line naming the first scorer and prompt with a non-finite reward, or None."""
        for name, values in raw.items():
            bad = (~torch.isfinite(values.detach())).nonzero()
            if len(bad):
                k = int(bad[0])
                return f"--scorer {name}: a non-finite reward ({values[k].item()}) on the prompt {list(prompts)[k]!r}"
        return None

    def normalize(self, raw, prompts, gather=None):
        """{name: normalised rewards [B]}. gather(values, prompts) -> (every process's values, prompts): what the
        prompt buffers learn from under several processes (default: this batch alone)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = {}
        for name, reward in zip(self.names, self.rewards):
            values = raw[name]
            if self.reward_norm == "group":
                if len(set(prompts)) == len(prompts):
                    raise InputError("--reward_norm group: every prompt appears once in the batch, so each group is "
                                     "one image (group needs several images a prompt, as GRPO samples; use prompt)")
                values = standardize(values, prompts)
            elif self.reward_norm == "prompt":
                every_value, every_prompt = gather(values, prompts) if gather else (values, prompts)
                self.prompt_stats[name].update(every_value, every_prompt)
                values = self.prompt_stats[name].normalize(values, prompts)
            elif self.reward_norm == "calibrated":
                values = values * reward.temperature
            out[name] = values
        return out

    def combine(self, normalised):
        return sum(weight * normalised[name] for name, weight in zip(self.names, self.weights))

    def validation_reward(self, images, prompts):
        """The weighted sum of the raw scores (times each temperature when calibrated): a number without state, the
        same for an image whenever it is scored, so validations compare across steps ("group" and "prompt" would
        not)."""
        raw = self.scores(images, prompts, check_finite=False)  # a broken scorer's nan is shown, not raised
        if self.reward_norm == "calibrated":
            raw = {name: raw[name] * reward.temperature for name, reward in zip(self.names, self.rewards)}
        return self.combine(raw)

    def forward(self, images, prompts, gather=None):
        raw = self.scores(images, prompts)
        return self.combine(self.normalize(raw, prompts, gather)), raw

    def prompt_state(self):
        """The prompt buffers (the run's state beside the weights), or None."""
        return None if self.prompt_stats is None else {n: s.state_dict() for n, s in self.prompt_stats.items()}

    def load_prompt_state(self, state):
        if self.prompt_stats is not None and state:
            for name, stats in state.items():
                self.prompt_stats[name].load_state_dict(stats)


def reward_fn(spec, device="cpu", gradient_checkpointing=False, reward_norm=None, calibration=None):
    """The reward with the signature DDPO-style trainers call (ddpo-pytorch, TRL's DDPOTrainer and AlignProp,
    flow_grpo and Flow-Factory): fn(images, prompts, metadata) -> (rewards, info). Differentiable where grad is
    enabled (AlignProp); DDPO and GRPO call it without grad.

    spec: one scorers.py spec, or {spec: weight} for several; reward_norm (none | group | prompt | calibrated) puts
    each scorer on one scale before the weights combine them ("group": among the images of the same prompt in one
    call; "prompt": a running buffer per prompt, kept by the callable across calls); calibration: a
    calibration.json, which makes "calibrated" the default. info is {} for one spec without normalisation, else {spec: its raw scores}.

        fn = reward_fn({"clip:a.pth": 1.0, "pickscore:PickScore_v1": 1.0}, "cuda", reward_norm="group")
        rewards, info = fn(images, prompts, metadata)     # info["pickscore:PickScore_v1"]: PickScore's own scores
        fn = reward_fn("http://10.0.0.5:8000")            # the same callable on a scoring server (serve.py)
    """
    if isinstance(spec, str) and spec.startswith(("http://", "https://")):
        if gradient_checkpointing or reward_norm or calibration:
            raise InputError(f"{spec}: a server's reward is set where it is served (serve.py --reward_norm, "
                             f"--calibration) and carries no gradient")
        from reward_client import remote_reward_fn
        return remote_reward_fn(spec, device)
    specs = {spec: 1.0} if isinstance(spec, str) else dict(spec)
    reward_norm = reward_norm or ("none" if calibration is None else "calibrated")
    for one in specs:
        parse_spec(one)
    mix = RewardMix.load([(one, one, weight) for one, weight in specs.items()], device, reward_norm, calibration,
                         gradient_checkpointing)
    plain = isinstance(spec, str) and reward_norm == "none"

    def fn(images, prompts, metadata=None):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if plain:
            return mix.rewards[0].score(images, prompts), {}
        total, raw = mix(images, prompts)
        return total, raw

    fn.mix = mix  # its prompt buffers: fn.mix.prompt_state()
    return fn
