import os
import shutil

import pandas as pd
import pytest
from conftest import require_extra
import torch
from PIL import Image

from social_reward.errors import InputError
from social_reward.generators.generate import generate
from social_reward.generators.lora import add_lora
from social_reward.generators.families import load_pipeline
from social_reward.generators.sampling import start_noise

require_extra('generators', 'diffusers', 'peft', 'transformers')

PROMPTS = ["a red circle", "two blue squares", "three green triangles"]
TINY = dict(resolution=32, sampling_steps=4, guidance_scale=7.5, seed=3, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora(tiny_sd, tmp_path_factory):
    """LoRA weights with random (nonzero) B matrices, saved as the fine-tuning saves them."""
    from social_reward.generators.lora import save_lora
    pipeline = load_pipeline(tiny_sd)
    add_lora(pipeline, 4, 4)
    torch.manual_seed(1)
    for name, param in pipeline.unet.named_parameters():
        if ".lora_B." in name:
            param.data.normal_(0, 0.5)
    folder = str(tmp_path_factory.mktemp("lora"))
    save_lora(pipeline, folder)
    return folder


def pixels(path):
    return torch.tensor(list(Image.open(path).getdata()))


def test_the_table_reads_as_evaluate_generators_reads_generations(tiny_sd, tmp_path):
    from social_reward.data.generations import read_generations
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]))
    out = tmp_path / "gen"
    generate(tiny_sd, str(tmp_path / "prompts.txt"), "base", str(out), samples=2, **TINY)
    shutil.move(out, tmp_path / "moved")  # paths are relative to the table's folder
    generations = read_generations([str(tmp_path / "moved" / "generations.parquet")])
    assert len(generations) == 4 and set(generations.generator) == {"base"}
    assert all(os.path.isfile(image) for image in generations.image)
    assert sorted(zip(generations.prompt, generations["sample"])) == sorted((p, k) for p in PROMPTS[:2] for k in (0, 1))


def test_sample_k_of_a_prompt_starts_from_the_same_noise_for_every_generator(tiny_sd, lora, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "reversed.txt").write_text("\n".join(PROMPTS[::-1]))
    out = str(tmp_path / "gen")
    base = generate(tiny_sd, str(tmp_path / "prompts.txt"), "base", out, samples=2, batch_size=4, **TINY)
    # the same pipeline again, prompts in another order and other batches: the same image for each (prompt, sample)
    again = generate(tiny_sd, str(tmp_path / "reversed.txt"), "base-again", out, samples=2, batch_size=1, **TINY)
    tuned = generate(tiny_sd, str(tmp_path / "prompts.txt"), "tuned", out, samples=2, lora=lora, batch_size=4, **TINY)
    table = pd.read_parquet(os.path.join(out, "generations.parquet"))
    assert list(table.columns) == ["generator", "prompt", "sample", "image", "prompt_index"]
    assert len(table) == 18 and table.groupby("generator").size().to_dict() == {"base": 6, "base-again": 6, "tuned": 6}
    table["image"] = [os.path.join(out, image) for image in table.image]
    by_item = {name: rows.set_index(["prompt", "sample"]).image for name, rows in table.groupby("generator")}
    for item, path in by_item["base"].items():
        # other batches round the sums otherwise: a pixel level of 1 at most
        assert (pixels(path) - pixels(by_item["base-again"][item])).abs().max() <= 1, item
        assert (pixels(path) - pixels(by_item["tuned"][item])).abs().max() > 10, item  # the LoRA changed the image
    # the two samples of a prompt differ: each has its own noise
    assert not torch.equal(pixels(by_item["base"][(PROMPTS[0], 0)]), pixels(by_item["base"][(PROMPTS[0], 1)]))
    assert all(os.path.isfile(p) for p in table.image)
    assert len(base) == len(again) == len(tuned) == 6


def test_the_start_noise_of_a_sample_is_the_same_in_any_batch(tiny_sd):
    pipeline = load_pipeline(tiny_sd)
    keys = [(3, prompt, k) for prompt in PROMPTS for k in range(2)]
    together = start_noise(pipeline, keys, 32)
    assert together.shape == (6, 4, 16, 16)
    assert all(torch.equal(together[i], start_noise(pipeline, [key], 32)[0]) for i, key in enumerate(keys))
    assert len({together[i].sum().item() for i in range(6)}) == 6


def test_a_generator_already_in_the_table_is_refused_unless_overwritten(tiny_sd, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS[0])
    out = str(tmp_path / "gen")
    generate(tiny_sd, str(tmp_path / "prompts.txt"), "base", out, **TINY)
    with pytest.raises(InputError, match=r"generations.parquet: already holds generator 'base' \(1 rows\)"):
        generate(tiny_sd, str(tmp_path / "prompts.txt"), "base", out, **TINY)
    generate(tiny_sd, str(tmp_path / "prompts.txt"), "base", out, samples=2, overwrite=True, **TINY)
    assert len(pd.read_parquet(os.path.join(out, "generations.parquet"))) == 2


def test_a_lora_folder_without_weights_is_named(tiny_sd, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS[0])
    with pytest.raises(InputError, match=f"--lora {tmp_path}: no pytorch_lora_weights.safetensors"):
        generate(tiny_sd, str(tmp_path / "prompts.txt"), "tuned", str(tmp_path / "gen"), lora=str(tmp_path), **TINY)


def test_a_repeated_prompt_keeps_its_lines_apart_and_the_table_reads_in_evaluate_generators(tiny_sd, tmp_path):
    from social_reward.data.generations import read_generations
    (tmp_path / "prompts.txt").write_text("\n".join([PROMPTS[0], PROMPTS[1], PROMPTS[0]]))
    out = tmp_path / "gen"
    generate(tiny_sd, str(tmp_path / "prompts.txt"), "base", str(out), samples=2, **TINY)
    table = read_generations([str(out / "generations.parquet")])  # refuses two images of one (prompt, sample)
    assert sorted(table[table.prompt == PROMPTS[0]]["sample"]) == [0, 1, 2, 3]
    rows = pd.read_parquet(out / "generations.parquet")
    assert list(rows.prompt_index) == [0, 0, 1, 1, 2, 2]
    first, second = (pixels(out / image) for image in rows.image[[0, 4]])
    assert (first - second).abs().max() > 10  # the second line's images start from their own noise


def test_a_stopped_run_started_again_goes_on_where_it_stopped(tiny_sd, tmp_path, monkeypatch):
    from social_reward.generators import generate as script
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    out = str(tmp_path / "gen")
    whole = generate(tiny_sd, str(tmp_path / "prompts.txt"), "whole", out, samples=2, batch_size=2, **TINY)
    calls, real = [], script.generate_images

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(script, "generate_images", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generate(tiny_sd, str(tmp_path / "prompts.txt"), "base", out, samples=2, batch_size=2, **TINY)
    monkeypatch.undo()
    with pytest.raises(InputError, match=r"rows.jsonl: a run of generator 'base' with --seed 3 was stopped here"):
        generate(tiny_sd, str(tmp_path / "prompts.txt"), "base", out, samples=2, batch_size=2, **{**TINY, "seed": 4})
    calls.clear()
    monkeypatch.setattr(script, "generate_images", dies_on_the_third_batch)
    resumed = generate(tiny_sd, str(tmp_path / "prompts.txt"), "base", out, samples=2, batch_size=2, **TINY)
    assert len(calls) == 1  # the four images written before the stop were not made again
    assert list(resumed["sample"]) == list(whole["sample"]) and list(resumed.prompt) == list(whole.prompt)
    for ours, theirs in zip(resumed.image, whole.image):
        assert (pixels(os.path.join(out, ours)) - pixels(os.path.join(out, theirs))).abs().max() <= 1
    assert not os.path.exists(os.path.join(out, "base", "rows.jsonl"))
