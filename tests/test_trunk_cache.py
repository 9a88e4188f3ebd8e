import glob
import os
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, TINY_CLIP, assert_same_steps, run_script
from PIL import Image

from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.models.training_modes import train_mode, trainable_parameters
from train_pair_pos_neg import finetune_model
from social_reward.training.trunk_cache import TowerHeads, TrunkCache, entry_is_whole, read_entry, tower_splits, trunk

README_MODE = "visual_upper_layers_textual_upper_layers"
LEARNING_RATE = 1e-3
def frozen_model(init, mode):
    clip, preprocess, tokenizer = load_model(TINY_CLIP, checkout_path=init)
    trainable_parameters(clip, mode)
    return train_mode(clip), preprocess, tokenizer


def cache_of(folder, init, mode, pairs, **kwargs):
    clip, preprocess, tokenizer = frozen_model(init, mode)
    images = list(dict.fromkeys(list(pairs.pos_path) + list(pairs.neg_path)))
    return TrunkCache(str(folder), clip, tower_splits(clip), preprocess, tokenizer, images,
                      list(dict.fromkeys(pairs.prompt)), **kwargs)


def train(pairs, mode, folder, init, **kwargs):
    return torch.load(finetune_model(pairs, mode, save_folder=str(folder), checkout_path=init, model=TINY_CLIP,
                                     learning_rate=LEARNING_RATE, num_workers=0, **kwargs), weights_only=True)


def relative_difference(ours, expected, start):
    """|ours - expected| over |expected - start|, over all tensors: how far apart two runs ended, against how far
    they moved."""
    apart = sum(((ours[k] - expected[k]) ** 2).sum() for k in expected).sqrt()
    moved = sum(((expected[k] - start[k].float()) ** 2).sum() for k in expected).sqrt()
    return (apart / moved).item()


@pytest.mark.parametrize("mode", [README_MODE, "visual_upper_layers", "visual", "visual_last_layer"])
def test_the_heads_on_the_trunk_outputs_give_the_model_outputs(mode, shapes_pairs, tiny_init):
    clip, preprocess, tokenizer = frozen_model(tiny_init, mode)
    splits = tower_splits(clip)
    images = torch.stack([preprocess(Image.open(p)) for p in shapes_pairs.pos_path[:4]])
    tokens = tokenizer(list(shapes_pairs.prompt[:4]))
    image_input = images if splits["image"] is None else trunk(clip, splits["image"], images)
    text_input = trunk(clip, splits["text"], tokens)
    text_input = [text_input, tokens] if splits["text"].trains else text_input
    for ours, expected in zip(TowerHeads(clip, splits)(image_input, text_input), clip(images, tokens)):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", [README_MODE, "visual_upper_layers", "visual"])
def test_a_cached_step_moves_the_weights_as_the_uncached_step(mode, shapes_pairs, tiny_init, tmp_path):
    pairs = shapes_pairs.iloc[:12]
    expected = train(pairs, mode, tmp_path / "plain", tiny_init, batch_size=12, n_epochs=1)
    cached = train(pairs, mode, tmp_path / "cached", tiny_init, batch_size=12, n_epochs=1,
                   trunk_cache=str(tmp_path / "cache"), trunk_cache_dtype="fp32")
    assert_same_steps(cached, expected, torch.load(tiny_init, weights_only=True), LEARNING_RATE)


def test_cached_runs_end_near_the_uncached_run_and_a_second_run_reads_every_entry(shapes_pairs, tiny_init, tmp_path,
                                                                                   capsys):
    start = torch.load(tiny_init, weights_only=True)
    expected = train(shapes_pairs, README_MODE, tmp_path / "plain", tiny_init, batch_size=4, n_epochs=2)
    runs = {}
    for name, dtype in (("fp32", "fp32"), ("fp16", "fp16"), ("fp16 again", "fp16")):
        runs[name] = train(shapes_pairs, README_MODE, tmp_path / name, tiny_init, batch_size=4, n_epochs=2,
                           trunk_cache=str(tmp_path / "cache"), trunk_cache_dtype=dtype)
    # 12 steps of Adam at lr 1e-3: float noise in the trunk's arithmetic (another batch size) grows to this much;
    # measured 8e-4 (fp32 entries) and 1.2e-2 (fp16 entries)
    assert relative_difference(runs["fp32"], expected, start) < 3e-3
    assert relative_difference(runs["fp16"], expected, start) < 5e-2
    assert all(torch.equal(runs["fp16"][k], runs["fp16 again"][k]) for k in expected)
    plans = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trunk cache")]
    assert "48 images, 48 to compute" in plans[1] and "48 images, 0 to compute" in plans[2]
    assert "18 prompts, 0 to compute" in plans[2]


def test_two_processes_with_the_cache_end_on_the_weights_of_one_without(shapes_pairs, tiny_init, tmp_path):
    pairs_file = str(tmp_path / "pairs.parquet")
    shapes_pairs.iloc[:8].to_parquet(pairs_file)  # two optimizer steps of 4 pairs

    def run(launcher, name, batch_size, *extra, env=None):  # launcher None: one process, this one
        args = ["--training_file", pairs_file, "--training_mode", README_MODE, "--batch_size", str(batch_size),
                "--n_epochs", "1", "--save_folder", str(tmp_path / name), "--model", TINY_CLIP, "--checkout_path",
                tiny_init, "--learning_rate", str(LEARNING_RATE), "--num_workers", "0", *extra]
        if launcher is None:
            assert run_script("train_pair_pos_neg.py", *args).returncode == 0
        else:
            subprocess.run([sys.executable, "-m", *launcher, "train_pair_pos_neg.py", *args], cwd=ROOT, check=True,
                           capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        return torch.load(tmp_path / name / "clip_epoch_0_global_step_final.pth", weights_only=True)

    one = run(None, "one", 4)
    two = run(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "two", 2, "--trunk_cache",
              str(tmp_path / "cache"), "--trunk_cache_dtype", "fp32", env={"ACCELERATE_USE_CPU": "1"})
    assert_same_steps(two, one, torch.load(tiny_init, weights_only=True), LEARNING_RATE)
    entries = glob.glob(str(tmp_path / "cache" / "*" / "*.safetensors"))
    assert len(entries) == 16 + 8  # every distinct image and prompt once, whichever process wrote it
    assert not glob.glob(str(tmp_path / "cache" / "*" / "*.tmp"))


def test_entries_go_stale_with_the_weights_the_mode_the_decoding_and_the_image_file(shapes_pairs, tiny_init, tmp_path):
    pairs = shapes_pairs.iloc[:6]
    cache = cache_of(tmp_path / "cache", tiny_init, README_MODE, pairs)
    cache.fill(Accelerator(cpu=True), 4)
    assert cache.missing("image") == [] and cache.missing("text") == []

    torch.manual_seed(1)
    other_init = str(tmp_path / "other.pth")
    torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), other_init)
    for stale in (cache_of(tmp_path / "cache", other_init, README_MODE, pairs),
                  cache_of(tmp_path / "cache", tiny_init, "visual_last_layer", pairs)):
        assert len(stale.missing("image")) == len(cache.entries["image"])
    assert len(cache_of(tmp_path / "cache", tiny_init, README_MODE, pairs, fast_decode=True).missing("image")) == 12
    assert len(cache_of(tmp_path / "cache", tiny_init, README_MODE, pairs,
                        storage_dtype="fp32").missing("text")) == len(cache.entries["text"])

    changed = pairs.pos_path.iloc[0]
    Image.open(changed).rotate(90).save(changed)  # the same path, other pixels
    again = cache_of(tmp_path / "cache", tiny_init, README_MODE, pairs)
    assert again.missing("image") == [changed] and again.missing("text") == []
    again.fill(Accelerator(cpu=True), 4)
    clip, preprocess, _ = frozen_model(tiny_init, README_MODE)
    recomputed = trunk(clip, again.splits["image"], preprocess(Image.open(changed))[None])[0]
    torch.testing.assert_close(read_entry(again.entries["image"][changed]).float(), recomputed, atol=2e-3, rtol=1e-2)


def test_a_half_written_entry_is_ignored_and_rewritten(shapes_pairs, tiny_init, tmp_path):
    pairs = shapes_pairs.iloc[:6]
    cache = cache_of(tmp_path / "cache", tiny_init, README_MODE, pairs, storage_dtype="fp32")
    cache.fill(Accelerator(cpu=True), 4)
    image = pairs.neg_path.iloc[2]
    path = cache.entries["image"][image]
    whole = read_entry(path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:  # what a file system without atomic renames could leave of a killed run
        f.write(data[:len(data) // 2])
    with open(path + ".123.tmp", "wb") as f:  # what a killed run leaves: its temporary file
        f.write(data[:100])
    assert not entry_is_whole(path, tuple(whole.shape), torch.float32)
    again = cache_of(tmp_path / "cache", tiny_init, README_MODE, pairs, storage_dtype="fp32")
    assert again.missing("image") == [image]
    again.fill(Accelerator(cpu=True), 4)
    torch.testing.assert_close(read_entry(path), whole, rtol=0, atol=1e-5)


def test_a_run_resumed_with_the_cache_ends_on_the_uninterrupted_weights(shapes_pairs, tiny_init, tmp_path):
    pairs, cache = shapes_pairs.iloc[:12], str(tmp_path / "cache")
    whole = train(pairs, README_MODE, tmp_path / "whole", tiny_init, batch_size=4, n_epochs=2, trunk_cache=cache)
    train(pairs, README_MODE, tmp_path / "stopped", tiny_init, batch_size=4, n_epochs=1, trunk_cache=cache,
          save_every=2)
    resumed = train(pairs, README_MODE, tmp_path / "stopped", tiny_init, batch_size=4, n_epochs=2, trunk_cache=cache,
                    resume_from_checkpoint="latest")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_the_cache_says_in_one_line_what_it_holds_and_refuses_to_start_without_room(shapes_pairs, tiny_init, tmp_path,
                                                                                   capsys, monkeypatch):
    pairs = shapes_pairs.iloc[:4]
    train(pairs, "visual", tmp_path / "run", tiny_init, batch_size=4, n_epochs=1, trunk_cache=str(tmp_path / "c"))
    train(pairs, "all", tmp_path / "run", tiny_init, batch_size=4, n_epochs=1, trunk_cache=str(tmp_path / "c"))
    visual, everything = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trunk cache")]
    assert visual == (f"trunk cache {tmp_path / 'c'} (fp16): image tower: trains whole, not cached; text tower: its "
                      f"final embedding (it trains nothing) (64), 4 prompts, 4 to compute; about 1.0 kB on disk")
    assert everything.endswith("nothing cached: image tower: trains whole, not cached; text tower: trains whole, "
                               "not cached")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match=r"--trunk_cache .*a_file: cannot be a folder here"):
        train(pairs, README_MODE, tmp_path / "file", tiny_init, batch_size=4, n_epochs=1,
              trunk_cache=str(tmp_path / "a_file"))
    monkeypatch.setattr("shutil.disk_usage", lambda path: namedtuple("Usage", "total used free")(10**9, 10**9, 1000))
    with pytest.raises(InputError, match=r"--trunk_cache .*: needs [\d.]+ kB more for its entries, 1\.0 kB free on that disk"):
        train(pairs, README_MODE, tmp_path / "full", tiny_init, batch_size=4, n_epochs=1,
              trunk_cache=str(tmp_path / "c"))
    assert not glob.glob(str(tmp_path / "full" / "*.pth"))
