import os

import open_clip
import pytest
import torch
from conftest import TINY_CLIP

from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.models.training_modes import make_optimizer, trainable_parameters
from social_reward.models.weights import read_state_dict


@pytest.fixture(scope="module")
def vit_l14():
    """OpenAI's ViT-L/14 architecture on the meta device: every tensor name and shape, no memory."""
    with torch.device("meta"):
        return open_clip.create_model("ViT-L-14-quickgelu", device="meta")


def names(model, *prefixes):
    return {n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)}


def trained(model, mode):
    params = trainable_parameters(model, mode)
    names_ = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in names_}
    return names_


def visual_blocks(*indices):
    return tuple(f"visual.transformer.resblocks.{i}" for i in indices)


def text_blocks(*indices):
    return tuple(f"transformer.resblocks.{i}" for i in indices)


def test_vit_l14_quickgelu_has_openais_446_tensors(vit_l14):
    state_dict = vit_l14.state_dict()
    assert len(state_dict) == 446
    assert {"visual.proj", "text_projection", "logit_scale", "visual.transformer.resblocks.23.attn.in_proj_weight",
            "transformer.resblocks.11.mlp.c_proj.bias", "token_embedding.weight"} <= set(state_dict)
    assert len(vit_l14.visual.transformer.resblocks) == 24 and len(vit_l14.transformer.resblocks) == 12
    assert type(vit_l14.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_all_trains_every_tensor_but_logit_scale_which_the_triplet_loss_never_uses(vit_l14):
    assert trained(vit_l14, "all") == {n for n, _ in vit_l14.named_parameters()} - {"logit_scale"}
    trainable_parameters(vit_l14, "all", train_logit_scale=True)
    assert vit_l14.logit_scale.requires_grad


def test_visual_trains_the_whole_image_tower_only(vit_l14):
    expected = names(vit_l14, "visual")
    assert {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
            "visual.ln_post.bias", "visual.proj"} <= expected
    assert trained(vit_l14, "visual") == expected


def test_visual_upper_layers_trains_last_three_blocks_and_ln_post_only(vit_l14):
    assert trained(vit_l14, "visual_upper_layers") == names(vit_l14, *visual_blocks(21, 22, 23), "visual.ln_post")


def test_visual_last_layer_trains_last_block_and_ln_post_only(vit_l14):
    assert trained(vit_l14, "visual_last_layer") == names(vit_l14, *visual_blocks(23), "visual.ln_post")


def test_visual_and_textual_upper_layers_train_three_and_two_top_blocks_and_the_heads(vit_l14):
    assert trained(vit_l14, "visual_upper_layers_textual_upper_layers") == names(
        vit_l14, *visual_blocks(21, 22, 23), "visual.ln_post", *text_blocks(10, 11), "ln_final", "text_projection")


def test_deeper_mode_trains_four_and_three_top_blocks_and_the_heads(vit_l14):
    assert trained(vit_l14, "visual_upper_layers_textual_upper_layers_deeper") == names(
        vit_l14, *visual_blocks(20, 21, 22, 23), "visual.ln_post", *text_blocks(9, 10, 11), "ln_final", "text_projection")


def test_partial_modes_leave_visual_proj_frozen_as_the_published_recipe(vit_l14):
    for mode in ("visual_upper_layers", "visual_last_layer", "visual_upper_layers_textual_upper_layers",
                 "visual_upper_layers_textual_upper_layers_deeper"):
        trainable_parameters(vit_l14, mode)
        assert not vit_l14.visual.proj.requires_grad


def test_modes_count_blocks_from_the_top_on_any_depth():
    model = load_model(TINY_CLIP, pretrained="none")[0]  # 4 image blocks, 4 text blocks
    assert trained(model, "visual_last_layer") == names(model, *visual_blocks(3), "visual.ln_post")
    assert trained(model, "visual_upper_layers_textual_upper_layers") == names(
        model, *visual_blocks(1, 2, 3), "visual.ln_post", *text_blocks(2, 3), "ln_final", "text_projection")


def test_textual_modes_use_adamw_and_the_others_adam(vit_l14):
    params = [torch.nn.Parameter(torch.zeros(1))]
    assert type(make_optimizer(params, "visual_upper_layers_textual_upper_layers", 1e-3)) is torch.optim.AdamW
    assert type(make_optimizer(params, "visual_upper_layers_textual_upper_layers_deeper", 1e-3)) is torch.optim.AdamW
    for mode in ("all", "visual", "visual_upper_layers", "visual_last_layer"):
        assert type(make_optimizer(params, mode, 1e-3)) is torch.optim.Adam


def test_an_openai_format_fp16_state_dict_loads_into_the_fp32_model(tmp_path):
    torch.manual_seed(1)
    source = load_model(TINY_CLIP, pretrained="none")[0]
    fp16 = {k: v.half() for k, v in source.state_dict().items()}
    torch.save(fp16, tmp_path / "fp16.pth")
    model = load_model(TINY_CLIP, checkout_path=str(tmp_path / "fp16.pth"))[0]
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, fp16[name].float()), name


def test_loading_a_checkpoint_gives_the_same_model_as_building_it_and_copying_the_weights(tiny_init):
    loaded = load_model(TINY_CLIP, checkout_path=tiny_init)[0]
    built = load_model(TINY_CLIP, pretrained="none")[0]
    built.load_state_dict(torch.load(tiny_init, weights_only=True))
    text = torch.randint(0, 49408, (2, 77))
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(text), built.encode_text(text))
        assert torch.equal(loaded.encode_image(image), built.encode_image(image))


def test_pretrained_accepts_a_local_weights_file(tiny_init):
    via_pretrained = load_model(TINY_CLIP, pretrained=tiny_init)[0].state_dict()
    via_checkout = load_model(TINY_CLIP, checkout_path=tiny_init)[0].state_dict()
    assert all(torch.equal(via_pretrained[k], via_checkout[k]) for k in via_checkout)


def test_ddp_prefixed_and_wrapped_and_safetensors_state_dicts_load(tiny_init, tmp_path):
    from safetensors.torch import save_file
    state_dict = torch.load(tiny_init, weights_only=True)
    torch.save({"state_dict": {"module." + k: v for k, v in state_dict.items()}}, tmp_path / "ddp.pt")
    save_file(state_dict, str(tmp_path / "weights.safetensors"))
    for path in (tmp_path / "ddp.pt", tmp_path / "weights.safetensors"):
        loaded = read_state_dict(str(path))
        assert set(loaded) == set(state_dict) and all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def test_another_architecture_is_named_with_its_mismatch(tmp_path):
    torch.save(load_model("RN50", pretrained="none")[0].state_dict(), tmp_path / "rn50.pth")
    with pytest.raises(InputError, match=r"rn50.pth: does not fit this model architecture: missing keys"):
        load_model(TINY_CLIP, checkout_path=str(tmp_path / "rn50.pth"))


def test_a_pickle_with_a_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"visual.proj": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match=r"evil.pth: refused: it holds more than tensors \(posix.system\)"):
        load_model(TINY_CLIP, checkout_path=str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(InputError, match="notes.pth: not a checkpoint"):
        load_model(TINY_CLIP, checkout_path=str(tmp_path / "notes.pth"))


def test_model_names_configs_and_tags_are_checked_with_a_clear_message(tmp_path):
    with pytest.raises(InputError, match="--model ViT-Q-99: not an open_clip model name"):
        load_model("ViT-Q-99", pretrained="none")
    with pytest.raises(InputError, match="missing.json: no such model-config file"):
        load_model(str(tmp_path / "missing.json"), pretrained="none")
    with pytest.raises(InputError, match="--pretrained laion9b: not a weights tag of ViT-L-14-quickgelu"):
        load_model(pretrained="laion9b")
    with pytest.raises(InputError, match="--pretrained /no/such/weights.pt: no such weights file"):
        load_model(TINY_CLIP, pretrained="/no/such/weights.pt")


def test_openai_weights_out_of_reach_say_how_to_pass_a_local_file(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail at once, not after retries
    with pytest.raises(InputError, match="could not download the 'openai' weights of RN50-quickgelu.*--pretrained /path"):
        load_model("RN50-quickgelu", pretrained="openai")


def test_a_model_config_json_builds_that_architecture():
    model, preprocess, tokenizer = load_model(TINY_CLIP, pretrained="none")
    assert len(model.visual.transformer.resblocks) == 4 and model.text_projection.shape == (128, 64)
    assert preprocess.transforms[0].size == 64
    assert tokenizer(["a red circle"]).shape == (1, 77)


def test_a_torchscript_archive_as_openai_ships_loads(tiny_init, tmp_path):
    model = load_model(TINY_CLIP, checkout_path=tiny_init)[0]
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    loaded = load_model(TINY_CLIP, checkout_path=str(tmp_path / "scripted.pt"))[0].state_dict()
    expected = model.state_dict()
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


FAULTS_SCRIPT = """
import resource, sys
if {keep}:  # as run_cli does first, before the command imports what its work needs
    from social_reward.cli import keep_freed_memory
    keep_freed_memory()
import torch
import social_reward.models.clip  # a scoring command's libraries (torch, open_clip)
x = torch.ones(8, 257, 4096)  # a ViT-L/14 MLP activation at batch 8: 33.7 MB
for _ in range(5):
    torch.sigmoid(x)  # the heap settles
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.sigmoid(x)  # a fresh 33.7 MB output each time, freed at once
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_scripts_keep_freed_memory_instead_of_faulting_in_fresh_pages_for_each_large_tensor():
    import subprocess
    import sys
    faults = {keep: int(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT.format(keep=keep)], check=True,
                                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                                       ).stdout) for keep in (False, True)}
    assert faults[False] > 10 * 8000  # glibc's default: every output is a fresh mmap, 8,224 pages faulted in each
    # kept: the freed block is reused; at most a re-fault or two of it (8,224 pages each) where the kernel reclaims
    # while other tests run beside this one, against one a step without
    assert faults[True] < 3 * 8224


def test_random_init_is_open_clips_own_for_that_model_in_the_faster_blocks():
    torch.manual_seed(0)
    model = load_model(TINY_CLIP, pretrained="none")[0]
    torch.manual_seed(0)
    standard = open_clip.create_model("tiny-clip", pretrained=None)  # nn.MultiheadAttention's init in the image tower
    assert type(model.visual.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
    expected = standard.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    images, text = torch.randn(2, 3, 64, 64), open_clip.get_tokenizer("tiny-clip")(["a red circle", "a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), standard.eval().encode_image(images))
        torch.testing.assert_close(model.encode_text(text), standard.encode_text(text))
