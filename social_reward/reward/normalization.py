"""Several rewards on one scale: which normalisation a reward runs with (one rule, reward_norm_for, which every
caller checks its flags with) and the arithmetic of each. Scorers live on unrelated scales (cosines near 0.3,
PickScore near 20, ImageReward around 0): "none" (the scorer's own score), "group" (standardised among the images of
the same prompt in the batch: GRPO's groups), "prompt" (standardised by a running buffer of each prompt's past
rewards: DDPO's per-prompt stat tracking), "calibrated" (t * score, t the scorer's calibration temperature: log-odds
units, a difference of 1 is odds of e to 1). It imports no torch (the arithmetic works on the tensors it is given),
so a script's flags name the normalisations before torch loads.
"""
import numpy as np

from social_reward.errors import InputError

REWARD_NORMS = ("none", "group", "prompt", "calibrated")
NORM_EPS = 1e-6  # added to a standard deviation (DDPO's)
PROMPT_BUFFER, PROMPT_MIN_COUNT = 16, 16  # DDPO's per_prompt_stat_tracking defaults


def reward_norm_for(reward_norm, calibration):
    """The normalisation a reward runs with, checked: `reward_norm` (unset: "calibrated" when a calibration file is
    given, else "none"). A calibration goes with "calibrated" only, and "calibrated" needs one. The one rule the
    fine-tuner, reward_fn and the server check their flags with.

        reward_norm_for(None, "calibration.json")   # -> "calibrated"
    """
    reward_norm = check_reward_norm(reward_norm or ("none" if calibration is None else "calibrated"))
    if (calibration is None) == (reward_norm == "calibrated"):
        raise InputError("--calibration goes with --reward_norm calibrated" if calibration is not None else
                         "--reward_norm calibrated: give --calibration FILE (scripts/compare.py --calibrate writes one)")
    return reward_norm


def check_reward_norm(reward_norm):
    if reward_norm not in REWARD_NORMS:
        raise InputError(f"--reward_norm {reward_norm}: unknown; choose from {', '.join(REWARD_NORMS)}")
    return reward_norm


def group_numbers(groups):
    """Labels (prompts, or any hashables; a tensor of them) -> their group numbers, in order of first sight."""
    groups = groups.tolist() if hasattr(groups, "tolist") else groups
    seen = {}
    return [seen.setdefault(g, len(seen)) for g in groups]


def standardize(values, groups, eps=NORM_EPS):
    """Each value standardised within its group: (v - group mean) / (group std + eps), population std; [N] -> [N],
    differentiable. `groups`: one label per value (the prompts, or group numbers).

        standardize(torch.tensor([1., 3., 10., 20.]), ["a", "a", "b", "b"])  # -> [-1, 1, -1, 1] (to 1e-6)
    """
    ids = values.new_tensor(group_numbers(groups)).long()
    count = values.new_zeros(int(ids.max()) + 1).index_add_(0, ids, values.new_ones(values.shape))
    mean = count.new_zeros(count.shape).index_add_(0, ids, values) / count
    centred = values - mean[ids]
    std = (count.new_zeros(count.shape).index_add_(0, ids, centred ** 2) / count).sqrt()
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
        mean, std = (values.new_tensor(column) for column in zip(*stats))
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
