import os

import pytest
import torch
from conftest import MICRO_CLIP, TINY_CLIP, assert_same_steps
from original import original_train

from social_reward.models.training_modes import TRAINING_MODES, trainable_parameters
from social_reward.errors import InputError
from social_reward.models.clip import load_model
from losses import TripletLoss
from train_pair_pos_neg import finetune_model
from validate import validate_image_pair_classifier


@pytest.mark.parametrize("mode", list(TRAINING_MODES))
def test_one_step_moves_the_same_tensors_in_the_same_directions_as_the_original(mode, shapes_pairs, tiny_init, tmp_path):
    learning_rate = 1e-3
    pairs = shapes_pairs.iloc[:12]
    expected = original_train(pairs, mode, len(pairs), 1, None, tiny_init, learning_rate, TINY_CLIP)
    ours = torch.load(finetune_model(pairs, mode, batch_size=12, n_epochs=1, save_folder=str(tmp_path / "run"),
                                     checkout_path=tiny_init, learning_rate=learning_rate, model=TINY_CLIP,
                                     num_workers=0), weights_only=True)
    assert_same_steps(ours, expected, torch.load(tiny_init, weights_only=True), learning_rate)


def test_frozen_tensors_get_no_gradient_and_the_frozen_trunk_no_backward_pass(tiny_init):
    model, preprocess, tokenizer = load_model(TINY_CLIP, checkout_path=tiny_init)
    trainable_parameters(model, "visual_last_layer")
    block_outputs = []
    model.visual.transformer.resblocks[2].register_forward_hook(lambda m, i, out: block_outputs.append(out))
    image_features, text_features, _ = model(torch.randn(4, 3, 64, 64), tokenizer(["a red circle"] * 2))
    TripletLoss()(text_features, *image_features.chunk(2)).backward()
    assert not block_outputs[0].requires_grad  # no autograd graph below the trained block
    for name, param in model.named_parameters():
        trained = name.startswith(("visual.transformer.resblocks.3.", "visual.ln_post."))
        assert (param.grad is not None) == trained, name


def test_checkpoints_keep_the_original_names_and_cadence(shapes_pairs, tiny_init, tmp_path):
    save_folder = tmp_path / "clip_finetune"
    # 10 pairs in batches of 3: 4 steps an epoch; a checkpoint every 3 steps and at each epoch end
    finetune_model(shapes_pairs.iloc[:10], "visual_last_layer", batch_size=3, n_epochs=2, save_folder=str(save_folder),
                   checkout_path=tiny_init, model=TINY_CLIP, num_workers=0, save_every=3)
    assert sorted(f for f in os.listdir(save_folder) if f.endswith(".pth")) == sorted([
        "clip_epoch_0_global_step_3.pth", "clip_epoch_0_global_step_4.pth", "clip_epoch_0_global_step_final.pth",
        "clip_epoch_1_global_step_6.pth", "clip_epoch_1_global_step_8.pth", "clip_epoch_1_global_step_final.pth"])
    final, last_step = save_folder / "clip_epoch_1_global_step_final.pth", save_folder / "clip_epoch_1_global_step_8.pth"
    assert os.path.samefile(final, last_step)  # one file on disk under both of the original's names
    state_dict = torch.load(final, weights_only=True)
    assert set(state_dict) == set(torch.load(tiny_init, weights_only=True))  # OpenAI format: no "module." prefix
    assert all(v.dtype == torch.float32 for v in state_dict.values() if v.is_floating_point())


def test_training_then_validating_learns_a_small_set(trained_micro):
    # conftest's trained_micro: 160 pairs, 4 epochs of the triplet loss (its run shared with the pairwise test)
    pairs = trained_micro["pairs"]
    before = validate_image_pair_classifier(pairs, trained_micro["init"], "cpu", num_workers=0, model=MICRO_CLIP)
    after = validate_image_pair_classifier(pairs, trained_micro["triplet"], "cpu", num_workers=0, model=MICRO_CLIP)
    assert before < 0.7 and after >= 0.85, (before, after)


def test_bad_flags_are_refused_before_the_model_loads(shapes_pairs, tmp_path):
    for kwargs, message in (({"loss_name": "contrastive"}, "--loss_name contrastive: unknown; choose from triplet"),
                            ({"training_mode": "text"}, "--training_mode text: unknown; choose from all, visual"),
                            ({"batch_size": 0}, "--batch_size must be at least 1"),
                            ({"n_epochs": 0}, "--n_epochs must be at least 1")):
        with pytest.raises(InputError, match=message):
            finetune_model(shapes_pairs, save_folder=str(tmp_path), model="no-such-model", **kwargs)


def test_train_mode_puts_only_the_frozen_blocks_in_eval(tiny_init):
    from social_reward.models.training_modes import train_mode
    model = load_model(TINY_CLIP, checkout_path=tiny_init)[0]
    trainable_parameters(model, "visual_upper_layers_textual_upper_layers")
    train_mode(model)
    assert model.training and model.visual.ln_post.training
    assert [b.training for b in model.visual.transformer.resblocks] == [False, True, True, True]
    assert [b.training for b in model.transformer.resblocks] == [False, False, True, True]
