"""Training modes: which tensors of a CLIP the optimizer updates, as a table read by one function that freezes the
rest (the original wrote six copies of the same ten lines). Blocks count from the top of each tower, so a mode means
the same on any depth.

    params = trainable_parameters(model, "visual_upper_layers")     # the rest frozen (requires_grad_(False))
    optimizer = make_optimizer(params, "visual_upper_layers", 3e-5)  # Adam or AdamW, as the original
"""
from dataclasses import dataclass

from social_reward.errors import InputError


@dataclass(frozen=True)
class TrainingMode:
    visual_blocks: int  # the last k blocks of the image tower are trained; ALL: the whole tower
    text_blocks: int  # likewise for the text tower
    extra: tuple = ()  # other trained tensors, by name
    optimizer: str = "Adam"  # a torch.optim class, by name (so this table imports nothing)


ALL = -1
TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


TRAINING_MODES = {
    "all": TrainingMode(ALL, ALL, ("logit_scale",)),
    "visual": TrainingMode(ALL, 0),
    "visual_upper_layers": TrainingMode(3, 0, ("visual.ln_post",)),
    "visual_upper_layers_textual_upper_layers": TrainingMode(
        3, 2, ("visual.ln_post", "ln_final", "text_projection"), "AdamW"),
    "visual_upper_layers_textual_upper_layers_deeper": TrainingMode(
        4, 3, ("visual.ln_post", "ln_final", "text_projection"), "AdamW"),
    "visual_last_layer": TrainingMode(1, 0, ("visual.ln_post",)),
}


def _tower_prefixes(blocks, depth, whole_tower, block_prefix):
    if blocks == ALL:
        return whole_tower
    if blocks > depth:
        raise InputError(f"this model has {depth} blocks in {block_prefix.rsplit('.', 1)[0]}; the mode trains the last {blocks}")
    return tuple(f"{block_prefix}.{i}" for i in range(depth - blocks, depth))


def trainable_parameters(model, training_mode, train_logit_scale=False):
    """Freeze everything `training_mode` does not train (requires_grad_(False)) and return the trained parameters.

    Blocks are counted from the top of each tower, so a mode means the same on any depth. `logit_scale` only
    trains in mode "all" and only when the loss uses it (the triplet loss does not, so it never moves there).
    """
    mode = TRAINING_MODES[training_mode]
    if not (hasattr(model, "visual") and hasattr(model.visual, "transformer") and hasattr(model, "transformer")):
        raise InputError("training modes need a CLIP with a ViT image tower and OpenAI's text tower layout")
    prefixes = mode.extra
    prefixes += _tower_prefixes(mode.visual_blocks, len(model.visual.transformer.resblocks), ("visual",),
                                "visual.transformer.resblocks")
    prefixes += _tower_prefixes(mode.text_blocks, len(model.transformer.resblocks), TEXT_TOWER, "transformer.resblocks")
    if not train_logit_scale:
        prefixes = tuple(p for p in prefixes if p != "logit_scale")
    trained = []
    for name, param in model.named_parameters():
        train = any(name == p or name.startswith(p + ".") for p in prefixes)
        param.requires_grad_(train)
        if train:
            trained.append(param)
    return trained


def train_mode(model):
    """model.train(), with the transformer blocks that train nothing in eval mode.

    CLIP has no dropout, so eval changes one thing there: PyTorch runs its fused attention kernel (the inference
    fast path of nn.MultiheadAttention) on the frozen blocks of the text tower.
    """
    model.train()
    for blocks in (model.visual.transformer.resblocks, model.transformer.resblocks):
        for block in blocks:
            block.train(any(p.requires_grad for p in block.parameters()))
    return model


def make_optimizer(params, training_mode, learning_rate):
    """The optimizer the original used for the mode: Adam, or AdamW (torch's default weight decay)."""
    import torch
    return getattr(torch.optim, TRAINING_MODES[training_mode].optimizer)(params, lr=learning_rate)
