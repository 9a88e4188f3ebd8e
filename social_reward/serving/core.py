"""Scoring a batch of requests as reward_fn would score each alone: the reward loaded from the server's flags (checked
in one line first, --reward_norm prompt refused: its statistics would make a request's scores depend on other
clients), one forward pass a kind of input, then each request's own normalisation and non-finite check. An error is
a Refusal: 4xx for the request's fault, 500 for the server's.

    core = ScoringCore(*load_reward("clip:final.pth", "cpu"), "cpu")
    answers = core.score_batch([(images, prompts), (other_images, other_prompts)])
"""
import collections

import numpy as np
import torch

from social_reward.devices import inference_precision
from social_reward.errors import InputError, described
from social_reward.reward.mix import reward_fn
from social_reward.reward.normalization import reward_norm_for
from social_reward.serving.limits import Refusal


def reward_args(specs, reward_weights=None, reward_norm=None, calibration=None):
    """(reward_fn's spec, reward_norm, whether it is plain) from the server's flags, checked in one line each before
    any model loads: a single spec without normalisation is plain (its scores, info {}), anything else reward_fn's
    mix of {spec: weight}. --reward_norm prompt is refused: a server answers each request on its own images alone."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if reward_weights is not None and len(reward_weights) != len(specs):
        raise InputError(f"--reward_weights: {len(reward_weights)} weights for {len(specs)} specs")
    reward_norm = reward_norm_for(reward_norm, calibration)
    if reward_norm == "prompt":
        raise InputError("--reward_norm prompt: not served, as its running per-prompt statistics change with every "
                         "request and the same images would score differently depending on who called before; serve "
                         "group or a --calibration, and normalise by prompt in the trainer (from raw)")
    twice = [spec for spec in specs if specs.count(spec) > 1]
    if twice:
        raise InputError(f"{twice[0]}: given twice; give each spec once (--reward_weights weighs them)")
    plain = len(specs) == 1 and reward_weights is None and reward_norm == "none"
    return (specs[0] if plain else dict(zip(specs, reward_weights or [1.0] * len(specs)))), reward_norm, plain


def load_reward(specs, device="cpu", reward_weights=None, reward_norm=None, calibration=None):
    """(reward_fn's callable, whether it is plain) for the server's flags (reward_args). The server scores with what
    reward_fn builds."""
    spec, reward_norm, plain = reward_args(specs, reward_weights, reward_norm, calibration)
    return reward_fn(spec, device, reward_norm=reward_norm, calibration=calibration), plain


class ScoringCore:
    """Scores a batch of requests [(images, prompts)] in one forward pass a kind of input (PIL images together, float
    tensors by size), then answers each request as reward_fn would have answered it alone: its own normalisation
    (a "group" is the request's images, never another client's) and its own non-finite check."""

    def __init__(self, fn, plain, device, precision="fp32"):
        self.mix, self.plain, self.device, self.precision = fn.mix, plain, device, precision
        inference_precision(device, precision)  # an unknown precision is refused here, at start-up

    def describe(self):
        return {"spec": list(self.mix.names), "model": {name: type(r.model).__name__ for name, r in
                zip(self.mix.names, self.mix.rewards)}, "device": str(self.device), "precision": self.precision,
                "reward_norm": self.mix.reward_norm}

    def _raw(self, requests):
        """{name: scores [total images]} of the requests' images, in order."""
        groups = collections.defaultdict(list)  # requests whose images stack into one call
        for i, (images, _) in enumerate(requests):
            groups["pil" if isinstance(images, list) else tuple(images.shape[1:])].append(i)
        raw = [None] * len(requests)
        with torch.inference_mode(), inference_precision(self.device, self.precision):
            for members in groups.values():
                prompts = [p for i in members for p in requests[i][1]]
                images = [requests[i][0] for i in members]
                # tensors go to the model's device first: their preprocessing then runs there, batched, as it does
                # in a trainer whose VAE decoded them on its GPU
                images = sum(images, []) if isinstance(images[0], list) else torch.cat(images).to(self.device)
                scores = self.mix.scores(images, prompts, check_finite=False)
                start = 0
                for i in members:
                    n = len(requests[i][1])
                    raw[i] = {name: values[start:start + n].cpu() for name, values in scores.items()}
                    start += n
        return raw

    def answer(self, raw, prompts):
        """One request's answer from its raw scores, as reward_fn's callable computes it."""
        message = self.mix.nonfinite_message(raw, prompts)
        if message:
            raise Refusal(422, message)
        if self.plain:
            scores, info = raw[self.mix.names[0]], {}
        else:
            try:
                scores, info = self.mix.combine(self.mix.normalize(raw, prompts)), raw
            except InputError as e:
                raise Refusal(400, str(e)) from None
        answer = {"scores": scores.tolist()}
        if info:
            answer["raw"] = {name: values.tolist() for name, values in info.items()}
        temperatures = {n: r.temperature for n, r in zip(self.mix.names, self.mix.rewards) if r.temperature}
        if temperatures:  # score.py's: the probability that each image beats the request's median image
            from social_reward.scoring.calibration import win_probability
            answer["probabilities"] = {n: win_probability(raw[n].numpy(), float(np.median(raw[n].numpy())), t
                                                          ).tolist() for n, t in temperatures.items()}
        return answer

    def score_batch(self, requests):
        """[answer dict or Refusal] for the requests [(images, prompts)], in order. A batch that fails as a whole (an
        error, or out of memory) is scored request by request, so that only the request at fault fails."""
        try:
            raws = self._raw(requests)
        except Exception as e:
            if len(requests) > 1:
                return [answer for request in requests for answer in self.score_batch([request])]
            return [refusal(e)]
        answers = []
        for (_, prompts), raw in zip(requests, raws):
            try:
                answers.append(self.answer(raw, prompts))
            except Exception as e:
                answers.append(refusal(e))
        return answers


def refusal(error):
    """The Refusal an error in scoring one request answers: 4xx for the request's fault, else 500."""
    if isinstance(error, Refusal):
        return error
    if isinstance(error, InputError) and not device_error(error.__context__):
        return Refusal(400, str(error).strip().splitlines()[-1])
    if isinstance(error, InputError):  # the device failed, not the request
        error = error.__context__
    return Refusal(500, f"scoring failed ({described(error)})")


def device_error(error):
    """Whether an error is the accelerator's (a CUDA error): the server's fault, never the request's."""
    return isinstance(error, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(error)
