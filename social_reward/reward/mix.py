"""Several rewards on one scale, combined by their weights (RewardMix: what the generator trainer optimises), and
the callable DDPO-style trainers call, reward_fn(spec)(images, prompts, metadata) -> (rewards, info), in process or
on a scoring server.

    fn = reward_fn("clip:clip_final.pth", "cuda")        # fn(images, prompts, metadata) -> (rewards, {})
    fn = reward_fn({"pickscore:PickScore_v1": 1.0, "aesthetic:sac+logos+ava1-l14-linearMSE.pth": 0.5},
                   reward_norm="prompt")                 # several scorers, each normalised, then weighted
    fn = reward_fn("http://10.0.0.5:8000")               # the same callable on scripts/serve.py
"""
import torch
from torch import nn

from social_reward.errors import InputError
from social_reward.reward.differentiable import Reward
from social_reward.reward.normalization import PromptStats, check_reward_norm, reward_norm_for, standardize
from social_reward.scorers.registry import parse_spec


class NonFiniteReward(InputError):
    """A scorer gave a non-finite reward (the message names the scorer and the prompt)."""


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
                                 f"(give --calibration FILE, scripts/compare.py --calibrate writes one)")
        self.prompt_stats = {name: PromptStats() for name in self.names} if reward_norm == "prompt" else None

    @classmethod
    def load(cls, named_specs, device="cpu", reward_norm="none", calibration=None, gradient_checkpointing=False):
        """From [(name, spec, weight)]; calibration (a calibration.json, read for every scorer) goes with
        reward_norm "calibrated" only (normalization.reward_norm_for)."""
        reward_norm = reward_norm_for(reward_norm, calibration)
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

    spec: one scorer spec, or {spec: weight} for several; reward_norm (none | group | prompt | calibrated) puts
    each scorer on one scale before the weights combine them ("group": among the images of the same prompt in one
    call; "prompt": a running buffer per prompt, kept by the callable across calls); calibration: a
    calibration.json, which makes "calibrated" the default. info is {} for one spec without normalisation, else {spec: its raw scores}.

        fn = reward_fn({"clip:a.pth": 1.0, "pickscore:PickScore_v1": 1.0}, "cuda", reward_norm="group")
        rewards, info = fn(images, prompts, metadata)     # info["pickscore:PickScore_v1"]: PickScore's own scores
        fn = reward_fn("http://10.0.0.5:8000")            # the same callable on a scoring server (scripts/serve.py)
    """
    if isinstance(spec, str) and spec.startswith(("http://", "https://")):
        if gradient_checkpointing or reward_norm or calibration:
            raise InputError(f"{spec}: a server's reward is set where it is served (scripts/serve.py --reward_norm, "
                             f"--calibration) and carries no gradient")
        from social_reward.reward.client import remote_reward_fn
        return remote_reward_fn(spec, device)
    specs = {spec: 1.0} if isinstance(spec, str) else dict(spec)
    reward_norm = reward_norm_for(reward_norm, calibration)
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
