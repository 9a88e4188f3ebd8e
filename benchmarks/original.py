"""The original scripts' arithmetic and costs, rebuilt on open_clip: the reference the benchmark and tests compare to.

What it keeps from the original: nothing frozen (its `requires_grad = False` set a plain attribute), so the
backward pass runs through the whole model and every tensor gets a gradient, while the optimizer holds only the
mode's tensors; text and both images encoded by separate calls; a model built with a random init and then
overwritten by the weights file; images decoded at full scale in the training process; two identical full
checkpoints at each epoch end; validation encoding every pair's prompt and images.
"""
import os

import open_clip
import torch
from torch.utils.data import DataLoader

from social_reward.data.pairs import PromptImagePair  # data_set.py's
from social_reward.models.clip import resolve_model_name
from social_reward.models.training_modes import make_optimizer, trainable_parameters
from social_reward.training.losses import TripletLoss  # losses.py's


def original_model(model_name, weights_file):
    """A random init, then the file's weights copied over it, as clip.load + load_state_dict did."""
    name = resolve_model_name(model_name)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    # a function, not a Compose: no Resize in sight, so images are decoded at full scale as the original did
    return model, (lambda image: preprocess(image)), open_clip.get_tokenizer(name)


def normalized(features):
    return features / features.norm(dim=-1, keepdim=True)


def original_train(pairs, training_mode, batch_size, n_epochs, save_folder, weights_file, learning_rate, model_name,
                   on_step=None, shuffle=True):
    """The original training loop; returns the final state dict. `on_step()` is called after each optimizer step."""
    model, preprocess, tokenizer = original_model(model_name, weights_file)
    optimizer = make_optimizer(trainable_parameters(model, training_mode), training_mode, learning_rate)
    for param in model.parameters():
        param.requires_grad_(True)  # what `module.requires_grad = False` amounted to
    loader = DataLoader(PromptImagePair(pairs, preprocess, tokenizer), batch_size=batch_size, shuffle=shuffle)
    loss_fn = TripletLoss()
    model.train()
    step = 0
    for epoch in range(n_epochs):
        for text, pos, neg in loader:
            loss = loss_fn(normalized(model.encode_text(text)), normalized(model.encode_image(pos)),
                           normalized(model.encode_image(neg)))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if on_step:
                on_step()
        if save_folder:
            os.makedirs(save_folder, exist_ok=True)
            torch.save(model.state_dict(), os.path.join(save_folder, f"clip_epoch_{epoch}_global_step_final.pth"))
            torch.save(model.state_dict(), os.path.join(save_folder, f"clip_epoch_{epoch}_global_step_{step}.pth"))
    return model.state_dict()


@torch.no_grad()
def original_scores(pairs, weights_file, model_name, batch_size=1024):
    """The original validation loop: (pos_scores, neg_scores), every pair's prompt and both images encoded."""
    model, preprocess, tokenizer = original_model(model_name, weights_file)
    model.eval()
    pos_scores, neg_scores = [], []
    for text, pos, neg in DataLoader(PromptImagePair(pairs, preprocess, tokenizer), batch_size=batch_size):
        text_features = normalized(model.encode_text(text))
        pos_scores.append((text_features * normalized(model.encode_image(pos))).sum(1))
        neg_scores.append((text_features * normalized(model.encode_image(neg))).sum(1))
    return torch.cat(pos_scores), torch.cat(neg_scores)
