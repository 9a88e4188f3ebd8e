import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_CLIP, assert_same_steps, run_script, save_tiny_init

from social_reward.synthetic.shapes import make_pairs

LEARNING_RATE = 1e-3


def train(launcher, tmp_path, name, pairs_file, init, batch_size, env=None, extra=()):
    """train_pair_pos_neg.py's final weights, launched by `launcher` (python -m LAUNCHER ...) or, with None, run in
    this process as one process of its own would run it (accelerate reads its settings from `env` either way)."""
    save_folder = tmp_path / name
    args = ["--training_file", pairs_file, "--training_mode", "all", "--batch_size", str(batch_size), "--n_epochs", "1",
            "--save_folder", str(save_folder), "--model", TINY_CLIP, "--checkout_path", init, "--learning_rate",
            str(LEARNING_RATE), "--num_workers", "0", *extra]
    if launcher is None:
        result = run_script("train_pair_pos_neg.py", *args, env=env)
    else:
        result = subprocess.run([sys.executable, "-m", *launcher, "train_pair_pos_neg.py", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(save_folder / "clip_epoch_0_global_step_final.pth", weights_only=True)


@pytest.fixture(scope="module")
def one_process_batch_4(tmp_path_factory):
    """The reference run, made once for the module: 8 of shapes_pairs' pairs (two optimizer steps of 4) from
    tiny_init's weights (seed 0, so every test's tiny_init is this one's start)."""
    folder = tmp_path_factory.mktemp("one_process_batch_4")
    pairs_file = str(folder / "pairs.parquet")
    make_pairs(str(folder / "images"), 24, seed=0).iloc[:8].to_parquet(pairs_file)
    init = save_tiny_init(str(folder / "init.pth"))
    return pairs_file, train(None, folder, "one", pairs_file, init, 4)


def test_two_processes_with_batch_2_end_on_the_weights_of_one_with_batch_4(one_process_batch_4, tiny_init, tmp_path):
    pairs_file, one = one_process_batch_4
    two = train(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path, "two", pairs_file,
                tiny_init, 2, env={"ACCELERATE_USE_CPU": "1"})
    assert_same_steps(two, one, torch.load(tiny_init, weights_only=True), LEARNING_RATE)


@pytest.mark.parametrize("how", ["flag", "accelerate_env"])
def test_gradient_accumulation_of_2_batches_of_2_ends_on_the_weights_of_batch_4(how, one_process_batch_4, tiny_init,
                                                                                tmp_path):
    pairs_file, one = one_process_batch_4
    if how == "flag":
        accumulated = train(None, tmp_path, "accumulated", pairs_file, tiny_init, 2,
                            extra=["--gradient_accumulation_steps", "2"])
    else:  # what accelerate's DeepSpeed launcher and configs set
        accumulated = train(None, tmp_path, "accumulated", pairs_file, tiny_init, 2,
                            env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"})
    assert_same_steps(accumulated, one, torch.load(tiny_init, weights_only=True), LEARNING_RATE)


def test_mixed_precision_from_accelerate_launch_is_applied_and_checkpoints_stay_fp32(one_process_batch_4, tiny_init,
                                                                                      tmp_path):
    pairs_file, fp32 = one_process_batch_4
    launcher = ["accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    bf16 = train(launcher, tmp_path, "bf16", pairs_file, tiny_init, 4)
    assert all(v.dtype == torch.float32 for v in bf16.values() if v.is_floating_point())
    # autocast ran the matrix products in bf16: the run ends on other weights than the fp32 one
    assert any(not torch.allclose(bf16[k], fp32[k], atol=1e-6) for k in fp32)
