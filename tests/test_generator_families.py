"""Every family the generator layer takes (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1), on tiny pipelines built from configs:
the sampler is the pipeline's own, DRaFT raises the reward, the saved LoRA (alpha != rank) reloads to the run's last
validation image, the tuned generator beats its base, and bad input ends in one line."""
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CLIP, require_extra
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.utils import make_grid

from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.training.generator import finetune_generator as finetune
from social_reward.scoring.leaderboard import evaluate_generators
from social_reward.generators.generate import generate
from social_reward.generators.families import (FAMILIES, FAMILY_NAMES as FAMILY_CLASSES, check_pipeline_folder,
    load_pipeline)
from social_reward.generators.lora import LORA_WEIGHTS, load_lora
from social_reward.generators.sampling import generate_images, pack, start_noise, to_pil

require_extra('generators', 'diffusers', 'peft', 'transformers')

PROMPTS = ["a red circle", "two blue squares", "three green triangles", "one yellow square"]
FAMILY_NAMES = ["sd", "sdxl", "sd3", "flux"]
# guidance on (FLUX: its guidance embedding), 32 px, 4 steps
GUIDANCE = {"sd": 3.0, "sdxl": 3.0, "sd3": 3.0, "flux": 3.5}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    torch.manual_seed(0)
    torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), folder / "init.pth")
    return {"prompts": str(folder / "prompts.txt"), "scorer": f"clip:{folder / 'init.pth'},model={TINY_CLIP}"}


@pytest.mark.parametrize("family, t5", [("sd", True), ("sdxl", True), ("sd3", True), ("sd3", False), ("flux", True)])
def test_the_sampler_is_the_pipelines_own(family, t5, tiny_pipelines):
    pipeline = load_pipeline(tiny_pipelines(family, t5))
    assert (pipeline.text_encoder_3 is not None) == t5 if family == "sd3" else True
    keys = [(0, prompt, 0) for prompt in PROMPTS[:2]]
    ours = generate_images(pipeline, PROMPTS[:2], keys, 32, 4, GUIDANCE[family])
    noise = start_noise(pipeline, keys, 32)
    theirs = pipeline(PROMPTS[:2], latents=pack(noise) if family == "flux" else noise, num_inference_steps=4,
                      guidance_scale=GUIDANCE[family], height=32, width=32, output_type="pt",
                      **({"eta": 0.0} if family in ("sd", "sdxl") else {})).images
    assert torch.allclose(ours, theirs.float(), atol=1e-6)


@pytest.fixture(scope="module")
def runs(tiny_pipelines, files, tmp_path_factory):
    """family -> the output_dir of an 8-step DRaFT-1 run (rank 4, alpha 8), validated at steps 0, 4 and 8."""
    made = {}

    def run(family):
        if family not in made:
            out = str(tmp_path_factory.mktemp(f"run-{family}") / "lora")
            finetune(tiny_pipelines(family), files["prompts"], files["scorer"], sampling_steps=4, resolution=32,
                     guidance_scale=GUIDANCE[family], learning_rate=1e-2, seed=0, train_batch_size=2,
                     max_train_steps=8, checkpointing_steps=4, validation_prompts=files["prompts"], output_dir=out,
                     rank=4, lora_alpha=8)
            made[family] = out
        return made[family]
    return run


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_draft_raises_the_reward_and_the_lora_reloads_to_the_last_validation_image(family, runs, tiny_pipelines,
                                                                                  files, tmp_path):
    out = runs(family)
    val = pd.read_csv(os.path.join(out, "metrics.csv")).dropna(subset=["val_reward"])
    assert list(val.step) == [0, 4, 8] and val.val_reward.is_monotonic_increasing, val.val_reward.tolist()
    with safe_open(os.path.join(out, LORA_WEIGHTS), "pt") as f:  # as diffusers' own scripts write it
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    name = FAMILIES[FAMILY_CLASSES[family]].denoiser
    assert metadata[f"{name}.lora_alpha"] == 8 and metadata[f"{name}.r"] == 4
    # generate.py --lora on the validation prompts at the run's seed: sample 0, the validation's noise
    generate(tiny_pipelines(family), files["prompts"], "tuned", str(tmp_path), lora=out, resolution=32,
             sampling_steps=4, guidance_scale=GUIDANCE[family], seed=0, device="cpu")
    table = pd.read_parquet(tmp_path / "generations.parquet")
    images = torch.stack([torch.tensor(np.array(Image.open(tmp_path / p))).permute(2, 0, 1) / 255.0
                          for p in table.image])
    grid = np.array(to_pil(make_grid(images, nrow=4, padding=2, pad_value=1.0)[None])[0], dtype=int)
    last = np.array(Image.open(os.path.join(out, "validation-8.png")), dtype=int)
    assert np.abs(grid - last).max() <= 1, np.abs(grid - last).mean()
    # and the tuned generator beats its base on evaluate_generators.py's leaderboard
    generate(tiny_pipelines(family), files["prompts"], "base", str(tmp_path), resolution=32, sampling_steps=4,
             guidance_scale=GUIDANCE[family], seed=0, device="cpu")
    board, _ = evaluate_generators([str(tmp_path / "generations.parquet")], {"reward": files["scorer"]},
                                   out=str(tmp_path / "evaluation"), device="cpu", num_workers=0)
    means = board[board["style"] == "all"].set_index("generator")["mean"]
    assert means["tuned"] > means["base"] and means["tuned"] == pytest.approx(val.val_reward.iloc[-1], abs=1e-3)


def test_a_lora_with_alpha_other_than_rank_reloads_at_its_own_scale(runs, tiny_pipelines):
    out = runs("sd")
    keys = [(0, prompt, 0) for prompt in PROMPTS]
    pipeline = load_pipeline(tiny_pipelines("sd"))
    load_lora(pipeline, out)
    scale = {module.scaling["default_0"] for module in pipeline.unet.modules() if hasattr(module, "scaling")
             and "default_0" in module.scaling}
    assert scale == {2.0}  # alpha 8 / rank 4, as trained (without the metadata it would be 1)
    assert generate_images(pipeline, PROMPTS, keys, 32, 4, GUIDANCE["sd"]).shape == (4, 3, 32, 32)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_refl_takes_its_one_step_clean_prediction_on_the_flow_families(family, tiny_pipelines, files, tmp_path):
    out = finetune(tiny_pipelines(family), files["prompts"], files["scorer"], method="refl", sampling_steps=4,
                   resolution=32, learning_rate=1e-2, seed=0, train_batch_size=2, max_train_steps=1,
                   checkpointing_steps=1, output_dir=str(tmp_path / "run"))
    assert any(v.abs().sum() > 0 for k, v in load_file(out).items() if "lora_B" in k)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_grpo_rounds_of_two_minibatches_in_micro_batches_train_every_family(family, tiny_pipelines, files, tmp_path):
    # a round of 2 prompts' groups trained in 2 minibatches, each in 2 micro-batches whose conditioning is made anew
    # (SDXL's time ids, SD3's pooled projections, FLUX's packing and guidance embedding), guidance on: the first step
    # on-policy, the second off-policy, and at the tiny learning rate the clip binds on it
    out = finetune(tiny_pipelines(family), files["prompts"], files["scorer"], method="grpo", sampling_steps=4,
                   resolution=32, guidance_scale=GUIDANCE[family], learning_rate=2e-2, seed=0, train_batch_size=1,
                   sample_batch_size=2, group_size=4, gradient_accumulation_steps=2, max_train_steps=2,
                   checkpointing_steps=2, output_dir=str(tmp_path / "run"))
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics.clipped[1] == 0 and metrics.clipped[2] > 0 and (metrics.grad_norm[1:] > 0).all()
    assert any(v.abs().sum() > 0 for k, v in load_file(out).items() if "lora_B" in k or "lora.up" in k)


# ---- bad input: one line naming the culprit ------------------------------------------------------------------------

def test_an_unsupported_pipeline_class_is_named_with_the_supported_ones(tiny_pipelines, tmp_path):
    folder = shutil.copytree(tiny_pipelines("sd"), tmp_path / "other")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(InputError, match=re.escape(
            f"--pretrained_model {folder}: a KandinskyPipeline pipeline is not supported; supported: "
            + ", ".join(FAMILIES))):
        check_pipeline_folder(str(folder))


@pytest.mark.parametrize("family, part", [("sdxl", "text_encoder_2"), ("sd3", "tokenizer_2"), ("flux", "transformer"),
                                          ("sd3", "text_encoder_3")])
def test_a_folder_missing_a_part_of_its_family_names_it(family, part, tiny_pipelines, tmp_path):
    folder = shutil.copytree(tiny_pipelines(family), tmp_path / family)
    shutil.rmtree(folder / part)
    with pytest.raises(InputError, match=re.escape(f"--pretrained_model {folder}: the {family} pipeline has no {part}/")):
        check_pipeline_folder(str(folder))


def test_a_fast_tokenizer_alone_is_a_tokenizer(tiny_pipelines):
    for family in FAMILY_NAMES:  # transformers 5 saves tokenizer.json alone, and the families load it
        assert not os.path.exists(os.path.join(tiny_pipelines(family), "tokenizer", "vocab.json"))
        assert check_pipeline_folder(tiny_pipelines(family)).name == family


def test_a_size_off_the_latent_grid_and_a_lora_of_another_family_are_refused(tiny_pipelines, runs, files, tmp_path):
    with pytest.raises(InputError, match=r"--height 34: must be a multiple of 4 for this flux pipeline"):
        generate(tiny_pipelines("flux"), files["prompts"], "base", str(tmp_path / "gen"), height=34, width=32,
                 device="cpu")
    with pytest.raises(InputError, match=r"--width 33: must be a multiple of 2 for this sd3 pipeline"):
        finetune(tiny_pipelines("sd3"), files["prompts"], files["scorer"], height=32, width=33,
                 output_dir=str(tmp_path / "run"))
    with pytest.raises(InputError, match=r"--lora .*: a LoRA of another model than this sdxl pipeline \(unet\..*fits no "
                                         r"layer of its unet\)"):
        load_lora(load_pipeline(tiny_pipelines("sdxl")), runs("sd"))
    with pytest.raises(InputError, match=r"--lora .*: not a LoRA of this flux pipeline's transformer \(unet\."):
        load_lora(load_pipeline(tiny_pipelines("flux")), runs("sd"))
    assert not (tmp_path / "run").exists()
