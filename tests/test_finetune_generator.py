import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CLIP, require_extra
from conftest import run_script as run_in_process
from safetensors.torch import load_file

from social_reward.training import generator as finetune_generator
from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.training.generator import finetune_generator as finetune
from social_reward.generators.draft import draft_batch_loss
from social_reward.generators.refl import refl_batch_loss, refl_stop
from social_reward.generators.lora import LORA_WEIGHTS, add_lora
from social_reward.generators.families import check_pipeline_folder, load_pipeline
from social_reward.generators.sampling import generate_images, start_noise
from social_reward.data.prompts import read_prompts
from social_reward.reward.mix import RewardMix

require_extra('generators', 'diffusers', 'peft', 'transformers')

PROMPTS = ["a red circle", "two blue squares", "three green triangles", "one yellow square"]
# tiny sizes: 32 px images (16 x 16 latents), 4 DDIM steps, no classifier-free guidance unless a test needs it
TINY_RUN = dict(sampling_steps=4, resolution=32, guidance_scale=1.0, learning_rate=1e-2, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The prompts file and a tiny CLIP's random init, the reward of every run: a fixed, smooth, arbitrary function of
    the image that gradient ascent through the LoRA can raise."""
    folder = tmp_path_factory.mktemp("files")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    torch.manual_seed(0)
    torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), folder / "init.pth")
    return {"prompts": str(folder / "prompts.txt"), "scorer": f"clip:{folder / 'init.pth'},model={TINY_CLIP}",
            "init": str(folder / "init.pth")}


@pytest.fixture(scope="module")
def trained(tiny_sd, files, tmp_path_factory):
    """A 12-step DRaFT-1 run, validated every 3 steps; the pipeline it trained is kept for inspection."""
    save_folder = str(tmp_path_factory.mktemp("run") / "lora")
    pipelines = []
    original = finetune_generator.load_pipeline
    finetune_generator.load_pipeline = lambda *args: pipelines.append(original(*args)) or pipelines[-1]
    try:
        final = finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=2, max_train_steps=12, save_every=3,
                         validation_prompts=files["prompts"], save_folder=save_folder, **TINY_RUN)
    finally:
        finetune_generator.load_pipeline = original
    return save_folder, final, pipelines[0]


def test_the_tiny_pipeline_tokenizes_as_open_clip_and_loads_by_path(tiny_sd):
    import open_clip
    pipeline = load_pipeline(tiny_sd)
    prompt = "Two red circles, a photo of Zürich!"
    ours = pipeline.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    reference = open_clip.get_tokenizer("ViT-L-14")([prompt])[0].tolist()
    n = reference.index(49407) + 1  # open_clip pads with 0 after the end-of-text token, SD's tokenizer repeats it
    assert ours[:n] == reference[:n] and len(ours) == 77
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"


def test_only_lora_tensors_change(trained, tiny_sd):
    _, _, pipeline = trained
    base = load_pipeline(tiny_sd)
    tuned_unet = pipeline.unet.state_dict()
    lora = {k for k in tuned_unet if "lora_" in k}
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    for name, tensor in base.unet.state_dict().items():
        assert torch.equal(tuned_unet[name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
                                      if name not in tuned_unet else name], tensor), name
    for part in ("vae", "text_encoder"):
        tuned = getattr(pipeline, part).state_dict()
        assert all(torch.equal(tuned[k], v) for k, v in getattr(base, part).state_dict().items()), part
    assert all(tuned_unet[k].abs().sum() > 0 for k in lora if ".lora_B." in k)  # every adapter moved from zero


def test_the_validation_reward_rises_over_a_short_run(trained):
    save_folder, _, _ = trained
    metrics = pd.read_csv(os.path.join(save_folder, "metrics.csv"))
    assert list(metrics.step) == list(range(13))
    val = metrics.dropna(subset=["val_reward"])
    assert list(val.step) == [0, 3, 6, 9, 12]
    slope = torch.tensor(val.val_reward.values).diff().mean().item()
    assert val.val_reward.iloc[-1] > val.val_reward.iloc[0] and slope > 0, val.val_reward.tolist()
    assert all(os.path.exists(os.path.join(save_folder, f"validation-{s}.png")) for s in val.step)


def test_the_saved_lora_loads_into_the_pipeline_and_reproduces_the_trained_generator(trained, tiny_sd):
    save_folder, final, pipeline = trained
    assert final == os.path.join(save_folder, LORA_WEIGHTS)
    assert sorted(glob.glob(os.path.join(save_folder, "checkpoint-*"))) == [
        os.path.join(save_folder, f"checkpoint-{s}") for s in (12, 3, 6, 9)]
    keys = [(0, prompt, 0) for prompt in PROMPTS]
    fresh = load_pipeline(tiny_sd)
    before = generate_images(fresh, PROMPTS, keys, 32, 4, 1.0)
    fresh.load_lora_weights(save_folder)
    after = generate_images(fresh, PROMPTS, keys, 32, 4, 1.0)
    assert (after - before).abs().max() > 1e-3
    assert torch.allclose(after, generate_images(pipeline, PROMPTS, keys, 32, 4, 1.0), atol=1e-5)


class CountingUNet(torch.nn.Module):
    """The UNet, counting its calls with and without gradient."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.with_grad, self.without_grad = unet, 0, 0

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.without_grad += 1
        return self.unet(*args, **kwargs)


@pytest.mark.parametrize("method, grad_steps, sampling_steps, expected_with_grad", [
    ("draft", 1, 4, 1), ("draft", 3, 4, 3), ("refl", 1, 8, 1)])
def test_each_method_takes_gradient_through_its_steps_only(method, grad_steps, sampling_steps, expected_with_grad,
                                                           tiny_sd, files):
    pipeline = load_pipeline(tiny_sd)
    lora_params = add_lora(pipeline, 4, 4)
    unet = CountingUNet(pipeline.unet)
    rewards = RewardMix.load(finetune_generator.parse_scorers([files["scorer"]]), "cpu")
    stop = refl_stop(sampling_steps, 0, 1)
    assert sampling_steps - sampling_steps // 4 <= stop < sampling_steps  # ReFL's late range: its 30-39 of 40
    noise = start_noise(pipeline, [(0,), (1,)], 32)
    if method == "draft":
        loss, _, _ = draft_batch_loss(unet, pipeline, rewards, PROMPTS[:2], noise, sampling_steps, grad_steps, 1.0,
                                      (32, 32))
    else:
        loss, _, _ = refl_batch_loss(unet, pipeline, rewards, PROMPTS[:2], noise, sampling_steps, stop, 1.0, (32, 32))
    assert unet.with_grad == expected_with_grad
    assert unet.with_grad + unet.without_grad == (sampling_steps if method == "draft" else stop + 1)
    loss.backward()
    assert sum(p.grad.abs().sum() for p in lora_params) > 0


def run_script(args, env=None, launcher=None):
    """finetune_generator.py's command line: in this process (its one thread), or under `launcher`'s processes."""
    if launcher is None:
        return run_in_process("scripts/finetune_generator.py", *args, env=env)
    return subprocess.run([sys.executable, *launcher, "scripts/finetune_generator.py", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


def script_args(tiny_sd, files, save_folder, *extra):
    return ["--pretrained_model", tiny_sd, "--prompts", files["prompts"], "--scorer", files["scorer"],
            "--sampling_steps", "4", "--resolution", "32", "--guidance_scale", "1", "--learning_rate", "1e-2",
            "--seed", "0", "--save_folder", str(save_folder), *extra]


def test_a_sigkilled_run_resumed_from_latest_ends_on_the_uninterrupted_lora(tiny_sd, files, tmp_path):
    args = ["--batch_size", "1", "--max_train_steps", "6", "--save_every", "2"]
    # the uninterrupted run in this process (one thread, as the scripts below): the same arithmetic
    finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=1, max_train_steps=6, save_every=2,
             save_folder=str(tmp_path / "whole"), **TINY_RUN)

    killed = tmp_path / "killed"
    run = subprocess.Popen([sys.executable, "scripts/finetune_generator.py", *script_args(tiny_sd, files, killed, *args)],
                           cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-2").exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (killed / LORA_WEIGHTS).exists(), "the run ended before it could be killed"

    resumed = run_script(script_args(tiny_sd, files, killed, *args, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, ours = load_file(tmp_path / "whole" / LORA_WEIGHTS), load_file(killed / LORA_WEIGHTS)
    assert expected.keys() == ours.keys() and all(torch.equal(expected[k], ours[k]) for k in expected)
    metrics = pd.read_csv(killed / "metrics.csv")
    assert list(metrics.step) == list(range(7))
    assert metrics.loss.tolist()[1:] == pd.read_csv(tmp_path / "whole" / "metrics.csv").loss.tolist()[1:]


def test_two_processes_end_on_the_lora_of_one_process_with_twice_the_batch(tiny_sd, files, tmp_path):
    # validation split across the processes (3 prompts: 2 and 1), in batches of 2: the mean of one process
    (tmp_path / "val.txt").write_text("\n".join(PROMPTS[:3]))
    finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=4, max_train_steps=3, save_every=3,
             save_folder=str(tmp_path / "one"), validation_prompts=str(tmp_path / "val.txt"), **TINY_RUN)
    two = run_script(script_args(tiny_sd, files, tmp_path / "two", "--train_batch_size", "2", "--max_train_steps", "3",
                                 "--checkpointing_steps", "3", "--validation_prompts", str(tmp_path / "val.txt"),
                                 "--validation_batch_size", "2"),
                     env={"ACCELERATE_USE_CPU": "1"},  # --standalone: a free port, whatever else runs here
                     launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    expected, ours = load_file(tmp_path / "one" / LORA_WEIGHTS), load_file(tmp_path / "two" / LORA_WEIGHTS)
    assert expected.keys() == ours.keys()
    # Adam's first steps are +-lr wherever a gradient is nonzero; the two runs' sums differ in float rounding only
    for k in expected:
        assert torch.allclose(expected[k], ours[k], rtol=0, atol=1e-4), (k, (expected[k] - ours[k]).abs().max())
    one_metrics, two_metrics = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert torch.allclose(torch.tensor(one_metrics.loss[1:].values), torch.tensor(two_metrics.loss[1:].values), atol=1e-5)
    one_val, two_val = one_metrics.val_reward.dropna().values, two_metrics.val_reward.dropna().values
    assert len(one_val) == len(two_val) == 2 and torch.allclose(torch.tensor(one_val), torch.tensor(two_val), atol=1e-6)
    assert torch.equal(pixels(tmp_path / "one" / "validation-0.png"), pixels(tmp_path / "two" / "validation-0.png"))


def pixels(path):
    from PIL import Image
    return torch.tensor(list(Image.open(path).getdata()))


def test_gradient_accumulation_of_two_batches_of_two_ends_on_the_lora_of_batch_four(tiny_sd, files, tmp_path):
    run = dict(max_train_steps=2, save_every=2, **TINY_RUN)
    one = finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=4, save_folder=str(tmp_path / "one"), **run)
    accumulated = finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=2, gradient_accumulation_steps=2,
                           save_folder=str(tmp_path / "acc"), **run)
    expected, ours = load_file(one), load_file(accumulated)
    assert all(torch.allclose(expected[k], ours[k], rtol=0, atol=1e-4) for k in expected)


def test_bf16_mixed_precision_runs_and_keeps_the_lora_in_fp32(tiny_sd, files, tmp_path):
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)  # accelerate fixes a process's precision at its first Accelerator
    try:
        final = finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=2, max_train_steps=1, save_every=1,
                         save_folder=str(tmp_path / "bf16"), mixed_precision="bf16", **TINY_RUN)
    finally:
        AcceleratorState._reset_state(True)
    lora = load_file(final)
    assert lora and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())


def test_a_non_finite_reward_stops_naming_the_step_or_is_skipped(tiny_sd, files, tmp_path, capsys):
    weights = torch.load(files["init"], weights_only=True)
    weights["visual.proj"][0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    scorer = f"clip:{tmp_path / 'nan.pth'},model={TINY_CLIP}"
    with pytest.raises(InputError, match=r"step 1: --scorer clip: a non-finite reward \(nan\) on the prompt '"):
        finetune(tiny_sd, files["prompts"], scorer, batch_size=2, max_train_steps=2, save_every=1,
                 save_folder=str(tmp_path / "stop"), **TINY_RUN)
    assert not glob.glob(str(tmp_path / "stop" / "checkpoint-*"))
    finetune(tiny_sd, files["prompts"], scorer, batch_size=2, max_train_steps=2, save_every=2,
             save_folder=str(tmp_path / "skip"), skip_nonfinite_loss=True, **TINY_RUN)
    assert "skipped 2 steps with a non-finite loss" in capsys.readouterr().out
    assert all(v.abs().sum() == 0 for k, v in load_file(tmp_path / "skip" / LORA_WEIGHTS).items() if "lora_B" in k)


@pytest.mark.parametrize("nan_at", [1, 2])
def test_a_nonfinite_reward_in_either_micro_batch_drops_the_whole_accumulation_window(nan_at, tiny_sd, files, tmp_path,
                                                                                      capsys, monkeypatch):
    """One optimizer step of two micro-batches (--gradient_accumulation_steps 2); the reward of micro-batch 1 or 2 is
    nan: the window is dropped, so the LoRA stays at its init (lora_B zero) though the other micro-batch was finite."""
    from social_reward.reward.differentiable import Reward
    calls, real = [], Reward.score

    def score(self, images, prompts):
        calls.append(1)
        scores = real(self, images, prompts)
        return scores * float("nan") if len(calls) == nan_at else scores
    monkeypatch.setattr(Reward, "score", score)
    final = finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=1, max_train_steps=1, save_every=1,
                     gradient_accumulation_steps=2, skip_nonfinite_loss=True, save_folder=str(tmp_path / "run"),
                     **TINY_RUN)
    assert len(calls) == 2 and "skipped 1 steps with a non-finite loss" in capsys.readouterr().out
    assert all(v.abs().sum() == 0 for k, v in load_file(final).items() if "lora_B" in k)


def fake_disk(free_after_calls):
    """shutil.disk_usage reporting plenty of room for the first `free_after_calls` calls, then 1 MB."""
    calls, real = [], shutil.disk_usage

    def disk_usage(path):
        calls.append(path)
        usage = real(path)
        free = usage.free if len(calls) <= free_after_calls else 2**20
        return namedtuple("usage", "total used free")(usage.total, usage.total - free, free)
    return disk_usage


def test_a_full_disk_refuses_the_checkpoint_naming_the_folder_and_keeps_the_previous_one(tiny_sd, files, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(1))
    save_folder = str(tmp_path / "run")
    with pytest.raises(InputError, match=rf"{save_folder}: not enough free space to write checkpoint-2: it needs "
                                         rf"[0-9.]+ MB, 1.0 MB are free; nothing was written, the previous checkpoint"):
        finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=2, max_train_steps=3, save_every=1,
                 save_folder=save_folder, **TINY_RUN)
    assert sorted(os.listdir(save_folder)) == ["checkpoint-1", "metrics.csv"]
    assert load_file(os.path.join(save_folder, "checkpoint-1", LORA_WEIGHTS))
    monkeypatch.undo()
    resumed = finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=2, max_train_steps=2, save_every=1,
                       save_folder=save_folder, resume_from_checkpoint="latest", **TINY_RUN)
    assert os.path.exists(resumed)


def test_the_trainer_refuses_a_checkpoint_the_disk_cannot_hold_and_keeps_the_previous_one(shapes_pairs, tiny_init,
                                                                                          tmp_path, monkeypatch):
    from train_pair_pos_neg import finetune_model
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(2))  # the first step's checkpoint and training state
    save_folder = str(tmp_path / "run")
    with pytest.raises(InputError, match=rf"{save_folder}: not enough free space to write clip_epoch_0_global_step_2"
                                         rf"\.pth: it needs [0-9.]+ MB, 1.0 MB are free"):
        finetune_model(shapes_pairs.iloc[:6], "visual_last_layer", batch_size=2, n_epochs=1, save_every=1,
                       save_folder=save_folder, checkout_path=tiny_init, model=TINY_CLIP, num_workers=0)
    assert sorted(os.listdir(save_folder)) == ["clip_epoch_0_global_step_1.pth", "metrics.csv",
                                               "training_state_step_1"]
    assert len(torch.load(os.path.join(save_folder, "clip_epoch_0_global_step_1.pth"), weights_only=True)) == len(
        torch.load(tiny_init, weights_only=True))


# ---- bad input: one line naming the culprit, nothing written --------------------------------------------------------

@pytest.mark.parametrize("part, expected", [
    ("unet", "the sd pipeline has no unet/"),
    ("tokenizer/tokenizer.json", "tokenizer/ has no tokenizer.json or vocab.json or spiece.model"),
    ("vae/diffusion_pytorch_model.safetensors", r"vae/ has no weights (*.safetensors or *.bin)"),
    ("model_index.json", "no model_index.json: not a diffusers pipeline folder")])
def test_a_pipeline_folder_missing_a_part_is_named(part, expected, tiny_sd, tmp_path):
    broken = shutil.copytree(tiny_sd, tmp_path / "sd")
    target = broken / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(InputError, match=re.escape(f"--pretrained_model {broken}: " + expected.replace("\\", ""))):
        check_pipeline_folder(str(broken))


def test_a_missing_part_ends_the_script_in_one_line(tiny_sd, files, tmp_path):
    broken = shutil.copytree(tiny_sd, tmp_path / "sd")
    shutil.rmtree(broken / "text_encoder")
    result = run_script(script_args(str(broken), files, tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --pretrained_model {broken}: the sd pipeline has no text_encoder/"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, expected", [
    (dict(grad_steps=5), "--grad_steps 5 is more than --sampling_steps 4"),
    (dict(rank=0), r"--rank must be at least 1 \(got 0\)"),
    (dict(method="ddpo"), "--method ddpo: unknown; choose from draft, refl"),
    (dict(reward_weights=[1.0, 2.0]), "--reward_weights: 2 weights for 1 --scorer"),
    (dict(resolution=31), "--resolution 31: must be a multiple of 2 for this sd pipeline")])
def test_bad_flags_are_refused_before_anything_loads(flags, expected, tiny_sd, files, tmp_path):
    run = {**TINY_RUN, **flags}
    with pytest.raises(InputError, match=expected):
        finetune(tiny_sd, files["prompts"], files["scorer"], save_folder=str(tmp_path / "run"), **run)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, name, expected", [
    ("", "empty.txt", "no prompts in it (empty, or only blank lines)"),
    ("\n  \n\n", "blank.txt", "no prompts in it (empty, or only blank lines)"),
    ("[]", "empty.json", "no prompts in it (empty, or only blank lines)"),
    (None, "missing.txt", "no such file")])
def test_empty_or_missing_prompts_are_refused(content, name, expected, tmp_path):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=rf"--prompts {tmp_path / name}: {expected.replace('(', '[(]').replace(')', '[)]')}"):
        read_prompts(str(tmp_path / name))


def test_prompts_come_from_text_json_and_pair_sources(shapes_pairs, tmp_path):
    (tmp_path / "p.json").write_text('["a cat", "a dog"]')
    assert read_prompts(str(tmp_path / "p.json")) == ["a cat", "a dog"]
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    assert read_prompts(str(tmp_path / "pairs.parquet")) == list(pd.unique(shapes_pairs.prompt))


def test_a_checkpoint_of_another_run_is_refused_naming_the_flag(trained, tiny_sd, files, tmp_path):
    save_folder, _, _ = trained
    with pytest.raises(InputError, match=r"checkpoint-6: a checkpoint of another run \(--rank 4 there, 8 here\)"):
        finetune(tiny_sd, files["prompts"], files["scorer"], batch_size=2, rank=8, max_train_steps=12,
                 save_folder=str(tmp_path / "other"), resume_from_checkpoint=os.path.join(save_folder, "checkpoint-6"),
                 **TINY_RUN)
    with pytest.raises(InputError, match="not a checkpoint of this script"):
        finetune(tiny_sd, files["prompts"], files["scorer"], save_folder=str(tmp_path / "other"),
                 resume_from_checkpoint=str(tmp_path), **TINY_RUN)
    assert not (tmp_path / "other").exists()


def test_a_reward_that_fails_on_the_generators_images_ends_in_one_line_naming_it(tiny_sd, files, tmp_path,
                                                                                monkeypatch):
    from social_reward.reward.differentiable import Reward

    class Broken(torch.nn.Module):
        temperature = spec = None

        def score(self, images, prompts):
            raise RuntimeError("expected input with 4 channels")
    monkeypatch.setattr(Reward, "load", lambda spec, device, gradient_checkpointing=False, calibration=None: Broken())
    with pytest.raises(InputError, match=r"--scorer broken: fails on the generator's images \(\(2, 3, 32, 32\), "
                                         r"torch.float32\): RuntimeError: expected input with 4 channels"):
        finetune(tiny_sd, files["prompts"], "broken=" + files["scorer"], batch_size=2, max_train_steps=1,
                 save_folder=str(tmp_path / "run"), **TINY_RUN)
    assert not glob.glob(str(tmp_path / "run" / "checkpoint-*"))


def test_the_checkpoint_limit_keeps_the_newest_and_a_resume_that_changes_the_data_order_is_refused(tiny_sd, files,
                                                                                                  tmp_path):
    out = str(tmp_path / "run")
    finetune(tiny_sd, files["prompts"], files["scorer"], train_batch_size=1, max_train_steps=4, checkpointing_steps=1,
             checkpoints_total_limit=2, output_dir=out, **TINY_RUN)
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-4", "metrics.csv", LORA_WEIGHTS]
    with pytest.raises(InputError, match=r"checkpoint-4: saved with gradient_accumulation_steps 1, resumed with 2: "
                                         r"the prompts that come next would differ"):
        finetune(tiny_sd, files["prompts"], files["scorer"], train_batch_size=1, max_train_steps=6, output_dir=out,
                 gradient_accumulation_steps=2, resume_from_checkpoint="latest", **TINY_RUN)
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-4", "metrics.csv", LORA_WEIGHTS]


def test_gradient_clipping_and_the_learning_rate_schedule_follow_the_flags(tiny_sd, files, tmp_path, monkeypatch):
    from accelerate import Accelerator
    norms, rates, real_clip = [], [], Accelerator.clip_grad_norm_

    def clip(self, parameters, max_norm, **kwargs):
        norms.append(max_norm)
        return real_clip(self, parameters, max_norm, **kwargs)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"])
                        or real_step(self, *a, **k))
    finetune(tiny_sd, files["prompts"], files["scorer"], train_batch_size=1, max_train_steps=4, checkpointing_steps=4,
             output_dir=str(tmp_path / "run"), lr_scheduler="linear", lr_warmup_steps=2, max_grad_norm=0.5,
             **TINY_RUN)
    assert norms == [0.5] * 4
    assert rates == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])  # warm-up over 2 steps, then linear decay to 0 at step 4
