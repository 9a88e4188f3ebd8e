import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CLIP, run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from social_reward.errors import InputError
from social_reward.models.clip import load_model
from data_set import PromptImagePair
from train_pair_pos_neg import finetune_model
from validate import validate_image_pair_classifier


def break_pairs(case, pairs, tmp_path):
    """Write a pair file with one mistake in it; return its path and what the error line must name."""
    path = str(tmp_path / "pairs.parquet")
    if case == "missing parquet":
        return str(tmp_path / "nope.parquet"), "nope.parquet: no such parquet file"
    if case == "not parquet":
        pairs.to_csv(tmp_path / "pairs.csv")
        return str(tmp_path / "pairs.csv"), "pairs.csv: not a readable parquet file"
    if case == "missing column":
        pairs = pairs.drop(columns="neg_path")
        expected = "missing column 'neg_path'"
    elif case == "zero rows":
        pairs, expected = pairs.iloc[:0], "pairs.parquet: no rows"
    elif case == "null prompt":
        pairs.loc[2, "prompt"], expected = None, "row 2, column 'prompt': expected a string, got null"
    elif case == "missing image":
        pairs.loc[4, "pos_path"], expected = "/no/such.png", "row 4, column 'pos_path': no such image file '/no/such.png'"
    elif case == "zero-byte image":
        (tmp_path / "empty.png").write_bytes(b"")
        pairs.loc[5, "neg_path"] = str(tmp_path / "empty.png")
        expected = f"row 5, column 'neg_path': empty (zero-byte) image file '{tmp_path / 'empty.png'}'"
    elif case == "not an image":
        (tmp_path / "notes.png").write_text("these are notes")
        pairs.loc[6, "pos_path"] = str(tmp_path / "notes.png")
        expected = f"row 6, column 'pos_path': {tmp_path / 'notes.png'}: cannot read image"
    pairs.to_parquet(path)
    return path, expected


CASES = ["missing parquet", "not parquet", "missing column", "zero rows", "null prompt", "missing image",
         "zero-byte image", "not an image"]


def run(script, pairs_file, tmp_path, *extra):
    if script == "validate.py":
        args = [pairs_file, "--device", "cpu"]
    else:
        args = ["--training_file", pairs_file, "--save_folder", str(tmp_path / "run"), "--n_epochs", "1"]
    return run_script(script, *args, "--model", TINY_CLIP, "--pretrained", "none", "--num_workers", "1", *extra)


def assert_one_line_error(result, expected):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


@pytest.mark.parametrize("script", ["validate.py", "train_pair_pos_neg.py"])
@pytest.mark.parametrize("case", CASES)
def test_bad_data_ends_in_one_line_naming_the_culprit(script, case, shapes_pairs, tmp_path):
    pairs_file, expected = break_pairs(case, shapes_pairs, tmp_path)
    assert_one_line_error(run(script, pairs_file, tmp_path), expected)


@pytest.mark.parametrize("script, flags, expected", [
    ("validate.py", ["--batch_size", "0"], "--batch_size must be at least 1"),
    ("train_pair_pos_neg.py", ["--batch_size", "0"], "--batch_size must be at least 1 (got 0)"),
    ("train_pair_pos_neg.py", ["--n_epochs", "0"], "--n_epochs must be at least 1 (got 0)"),
])
def test_bad_numbers_end_in_one_line(script, flags, expected, shapes_pairs, tmp_path):
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    assert_one_line_error(run(script, str(tmp_path / "pairs.parquet"), tmp_path, *flags), expected)


@pytest.mark.parametrize("flag", ["--training_mode", "--loss_name"])
def test_an_unknown_mode_or_loss_lists_the_choices(flag, shapes_pairs, tmp_path):
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    result = run("train_pair_pos_neg.py", str(tmp_path / "pairs.parquet"), tmp_path, flag, "nonsense")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid choice: 'nonsense' (choose from" in result.stderr


def test_the_data_is_checked_before_the_model_loads(shapes_pairs, tmp_path):
    # a model name that does not exist would fail the load; the data's error comes first
    with pytest.raises(InputError, match="missing column 'prompt'"):
        validate_image_pair_classifier(shapes_pairs.drop(columns="prompt"), model="no-such-model")
    with pytest.raises(InputError, match="missing column 'prompt'"):
        finetune_model(shapes_pairs.drop(columns="prompt"), save_folder=str(tmp_path), model="no-such-model")


@pytest.mark.parametrize("script", ["validate.py", "train_pair_pos_neg.py"])
def test_skip_bad_images_skips_the_pairs_and_says_which(script, shapes_pairs, tmp_path):
    (tmp_path / "notes.png").write_text("these are notes")
    (tmp_path / "empty.png").write_bytes(b"")
    shapes_pairs.loc[1, "pos_path"] = str(tmp_path / "notes.png")
    shapes_pairs.loc[2, "neg_path"] = str(tmp_path / "empty.png")
    shapes_pairs.loc[3, "neg_path"] = "/no/such.png"
    shapes_pairs.to_parquet(tmp_path / "pairs.parquet")
    result = run(script, str(tmp_path / "pairs.parquet"), tmp_path, "--skip_bad_images")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"skipping pairs with unreadable images: 3 images, first: /no/such.png, {tmp_path / 'empty.png'}, "
            f"{tmp_path / 'notes.png'}; 21 pairs left") in result.stdout + result.stderr


def test_skipping_leaves_the_accuracy_of_the_readable_pairs(shapes_pairs, tiny_init, tmp_path):
    (tmp_path / "notes.png").write_text("these are notes")
    broken = shapes_pairs.copy()
    broken.loc[0, "pos_path"] = str(tmp_path / "notes.png")
    skipped = validate_image_pair_classifier(broken, tiny_init, "cpu", num_workers=0, model=TINY_CLIP,
                                             skip_bad_images=True)
    assert skipped == validate_image_pair_classifier(shapes_pairs.iloc[1:], tiny_init, "cpu", num_workers=0,
                                                     model=TINY_CLIP)


def test_safetensors_checkpoints_keep_the_names_and_load(shapes_pairs, tiny_init, tmp_path):
    final = finetune_model(shapes_pairs.iloc[:6], "visual_last_layer", batch_size=3, n_epochs=1,
                           save_folder=str(tmp_path / "run"), checkout_path=tiny_init, model=TINY_CLIP,
                           num_workers=0, save_format="safetensors")
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("clip_")) == [
        "clip_epoch_0_global_step_2.safetensors", "clip_epoch_0_global_step_final.safetensors"]
    from_safetensors = load_model(TINY_CLIP, checkout_path=final)[0].state_dict()
    torch.save(from_safetensors, tmp_path / "same.pth")
    from_pth = load_model(TINY_CLIP, checkout_path=str(tmp_path / "same.pth"))[0].state_dict()
    assert all(torch.equal(from_safetensors[k], from_pth[k]) for k in from_pth)


def train_args(pairs_file, init, save_folder, *extra):
    return ["--training_file", pairs_file, "--training_mode", "all", "--batch_size", "2", "--n_epochs", "3",
            "--save_folder", save_folder, "--model", TINY_CLIP, "--checkout_path", init, "--learning_rate", "1e-3",
            "--num_workers", "0", "--save_every", "3", *extra]


def test_a_sigkilled_run_resumed_from_latest_ends_on_the_uninterrupted_weights(shapes_pairs, tiny_init, tmp_path):
    pairs_file = str(tmp_path / "pairs.parquet")
    shapes_pairs.iloc[:8].to_parquet(pairs_file)  # 8 pairs, batch 2: 4 steps an epoch, 12 in all, a save every 3
    assert run_script("train_pair_pos_neg.py", *train_args(pairs_file, tiny_init, str(tmp_path / "whole"))).returncode == 0

    killed = tmp_path / "killed"  # killed after step 6, in the middle of epoch 1: its resume skips 2 batches
    run = subprocess.Popen([sys.executable, "train_pair_pos_neg.py", *train_args(pairs_file, tiny_init, str(killed))],
                           cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not glob.glob(str(killed / "training_state_step_6")) and time.time() < deadline and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (killed / "clip_epoch_2_global_step_final.pth").exists(), "the run ended before it could be killed"
    for checkpoint in glob.glob(str(killed / "*.pth")):  # every checkpoint on disk is whole
        assert len(torch.load(checkpoint, weights_only=True)) == len(torch.load(tiny_init, weights_only=True))

    resumed_run = run_script("train_pair_pos_neg.py", *train_args(pairs_file, tiny_init, str(killed),
                                                                  "--resume_from_checkpoint", "latest"))
    assert resumed_run.returncode == 0, resumed_run.stderr[-2000:]
    whole = torch.load(tmp_path / "whole" / "clip_epoch_2_global_step_final.pth", weights_only=True)
    resumed = torch.load(killed / "clip_epoch_2_global_step_final.pth", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    metrics = pd.read_csv(killed / "metrics.csv")
    assert list(metrics.step) == list(range(1, 13))
    assert metrics.loss.tolist() == pd.read_csv(tmp_path / "whole" / "metrics.csv").loss.tolist()


def test_a_non_finite_loss_stops_naming_the_step_and_rows_and_writes_nothing(shapes_pairs, tiny_init, tmp_path):
    weights = torch.load(tiny_init, weights_only=True)
    weights["visual.proj"][0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    with pytest.raises(InputError, match=r"step 1 \(epoch 0\): the loss is not finite \(\[nan\]\) on the batch of rows \["):
        finetune_model(shapes_pairs.iloc[:4], "visual_last_layer", batch_size=4, n_epochs=1,
                       save_folder=str(tmp_path / "run"), checkout_path=str(tmp_path / "nan.pth"), model=TINY_CLIP,
                       num_workers=0)
    assert not glob.glob(str(tmp_path / "run" / "clip_*"))


def test_skip_nonfinite_loss_skips_and_counts_the_steps(shapes_pairs, tiny_init, tmp_path, capsys):
    weights = torch.load(tiny_init, weights_only=True)
    weights["visual.proj"][0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    finetune_model(shapes_pairs.iloc[:6], "visual_last_layer", batch_size=2, n_epochs=1,
                   save_folder=str(tmp_path / "run"), checkout_path=str(tmp_path / "nan.pth"), model=TINY_CLIP,
                   num_workers=0, skip_nonfinite_loss=True)
    assert "skipped 3 steps with a non-finite loss" in capsys.readouterr().out
    # every step was skipped, the last of the epoch included: its checkpoint is still there under the original's names
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("clip_")) == [
        "clip_epoch_0_global_step_0.pth", "clip_epoch_0_global_step_final.pth"]


PREPROCESS = image_transform_v2(PreprocessCfg(size=(32, 32)), is_train=False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(st.text(max_size=400), st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1"]),
                               st.integers(1, 90), st.integers(1, 90), st.sampled_from(["PNG", "JPEG", "WEBP", "GIF"])),
                     min_size=1, max_size=4))
def test_any_prompt_and_any_readable_image_give_a_well_formed_item(rows):
    with tempfile.TemporaryDirectory() as folder:
        records = []
        for i, (prompt, mode, width, height, fmt) in enumerate(rows):
            image = Image.new(mode, (width, height))
            path = os.path.join(folder, f"{i}.{fmt.lower()}")
            try:
                image.save(path, fmt)
            except (OSError, ValueError, KeyError):  # a mode this format cannot hold
                image.convert("RGB").save(path, fmt)
            records.append({"prompt": prompt, "pos_path": path, "neg_path": path})
        dataset = PromptImagePair(pd.DataFrame(records), PREPROCESS)
        for i in range(len(dataset)):
            text, pos, neg = dataset[i]
            assert text.shape == (77,) and text[0] == 49406  # <start_of_text>
            assert 49407 in text.tolist()  # <end_of_text>, kept when a long prompt is truncated
            assert pos.shape == neg.shape == (3, 32, 32) and torch.isfinite(pos).all()


@settings(max_examples=25, deadline=None)
@given(prompts=st.lists(st.one_of(st.text(max_size=20), st.none(), st.integers(), st.floats()), min_size=1, max_size=6))
def test_a_non_string_prompt_is_always_named_by_its_row(prompts):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "a.png")
        Image.new("RGB", (8, 8)).save(path)
        frame = pd.DataFrame({"prompt": pd.Series(prompts, dtype=object), "pos_path": path, "neg_path": path})
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            with pytest.raises(InputError, match=f"row {bad[0]}, column 'prompt'"):
                PromptImagePair(frame, PREPROCESS)
        else:
            assert len(PromptImagePair(frame, PREPROCESS)) == len(prompts)


def test_the_training_state_holds_no_second_copy_of_the_weights(shapes_pairs, tiny_init, tmp_path):
    finetune_model(shapes_pairs.iloc[:6], "visual_last_layer", batch_size=3, n_epochs=1, save_folder=str(tmp_path / "run"),
                   checkout_path=tiny_init, model=TINY_CLIP, num_workers=0)
    (state,) = glob.glob(str(tmp_path / "run" / "training_state_step_*"))
    largest = max(os.path.getsize(f) for f in glob.glob(os.path.join(state, "*")))
    assert largest < os.path.getsize(tiny_init) / 10  # optimizer state of the trained block, RNG, position


RUN_TWICE = """
import logging, warnings
from accelerate import Accelerator
from accelerate.state import AcceleratorState
print(AcceleratorState._shared_state == {})  # a fresh process's accelerate holds no state
Accelerator(cpu=True)
logger = logging.getLogger("a_library")  # a library's handler, made once per process at its first import
if not logger.handlers:
    logger.addHandler(logging.StreamHandler())
logger.warning("logged")
warnings.warn("careful")
"""


def test_run_script_gives_each_run_a_fresh_processs_state_and_its_own_warnings_and_logs(tmp_path):
    (tmp_path / "twice.py").write_text(RUN_TWICE)
    for _ in range(2):
        result = run_script(str(tmp_path / "twice.py"))
        assert result.returncode == 0 and result.stdout == "True\n", result.stderr
        assert "logged" in result.stderr and "UserWarning: careful" in result.stderr, result.stderr


@pytest.mark.parametrize("nan_at", [3, 4])
def test_a_nonfinite_micro_batch_drops_its_whole_accumulation_window(nan_at, shapes_pairs, tiny_init, tmp_path,
                                                                     monkeypatch):
    """8 pairs, batch 2, accumulation 2: two windows of two micro-batches; the loss of micro-batch 3 or 4 (the first or
    the second of window 2) is nan. The run then ends on the weights a clean run had after window 1: the window's
    other micro-batch, finite, must not reach the optimizer either."""
    from social_reward.training import losses

    def run(name, nan_at=None):
        calls = []

        class Triplet(losses.TripletLoss):
            def forward(self, *args):
                calls.append(1)
                loss = super().forward(*args)
                return loss * float("nan") if len(calls) == nan_at else loss
        monkeypatch.setattr(losses, "TripletLoss", Triplet)
        return finetune_model(shapes_pairs.iloc[:8], "all", batch_size=2, n_epochs=1, save_folder=str(tmp_path / name),
                              checkout_path=tiny_init, model=TINY_CLIP, learning_rate=1e-3, num_workers=0,
                              save_every=1, gradient_accumulation_steps=2, skip_nonfinite_loss=True)

    clean = tmp_path / "clean"
    run("clean")
    dropped = torch.load(run("dropped", nan_at=nan_at), weights_only=True)
    after_window_1 = torch.load(clean / "clip_epoch_0_global_step_1.pth", weights_only=True)
    assert sorted(f for f in os.listdir(tmp_path / "dropped") if f.startswith("clip_")) == [
        "clip_epoch_0_global_step_1.pth", "clip_epoch_0_global_step_final.pth"]
    assert all(torch.equal(dropped[k], after_window_1[k]) for k in after_window_1)
    assert not all(torch.equal(dropped[k], v) for k, v in torch.load(
        clean / "clip_epoch_0_global_step_final.pth", weights_only=True).items())  # window 2 did move the clean run


def test_a_run_into_a_folder_with_a_later_runs_state_keeps_its_own_newest_state(shapes_pairs, tiny_init, tmp_path):
    """A second run into a save_folder whose earlier run got further (training_state_step_1600) keeps the state it
    writes, so `--resume_from_checkpoint latest` resumes this run, not the earlier one."""
    save_folder = tmp_path / "run"
    (save_folder / "training_state_step_1600").mkdir(parents=True)
    (save_folder / "training_state_step_1600" / "progress.json").write_text("{}")
    finetune_model(shapes_pairs.iloc[:4], "visual_last_layer", batch_size=2, n_epochs=1, save_folder=str(save_folder),
                   checkout_path=tiny_init, model=TINY_CLIP, num_workers=0)
    assert sorted(f for f in os.listdir(save_folder) if f.startswith("training_state")) == ["training_state_step_2"]


def test_rotation_keeps_the_state_just_written_and_the_newest_others_it_wrote(tmp_path):
    """checkpoints.rotate with a limit of 4 over six checkpoints written one after the other: the four written last
    stay; a higher-numbered folder an earlier run left goes before this run's own."""
    from types import SimpleNamespace

    from social_reward.training.checkpoints import rotate
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    (tmp_path / "checkpoint-900").mkdir()  # an earlier run's, written before this run's
    os.utime(tmp_path / "checkpoint-900", (1, 1))
    for step in range(1, 7):
        (tmp_path / f"checkpoint-{step}").mkdir()
        os.utime(tmp_path / f"checkpoint-{step}", (step + 10, step + 10))
        rotate(accelerator, str(tmp_path / f"checkpoint-{step}"), "checkpoint-", keep=4)
        assert (tmp_path / f"checkpoint-{step}").exists()
    assert sorted(os.listdir(tmp_path), key=lambda n: int(n.split("-")[1])) == [
        "checkpoint-3", "checkpoint-4", "checkpoint-5", "checkpoint-6"]
