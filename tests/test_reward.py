import numpy as np
import pytest
import torch
from conftest import TINY_CLIP
from PIL import Image
from torchvision.transforms.functional import to_tensor

from social_reward.errors import InputError
from social_reward.reward.differentiable import Reward
from social_reward.reward.mix import reward_fn
from social_reward.scoring.ranking import rank_images

PROMPTS = ["two red circles", "one blue square", "three green triangles"]


@pytest.fixture
def photos(tmp_path):
    """Three RGB images of other sizes than the model's 64 px, so the preprocessing really resizes and crops."""
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(96, 80), (70, 120), (64, 64)]):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        pixels = (pixels.astype(float) * 0.3 + np.linspace(0, 170, size[0])[None, :, None]).astype(np.uint8)
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_reward_on_pil_images_equals_score_py(photos, tiny_init):
    reward = Reward.load(f"clip:{tiny_init},model={TINY_CLIP}")
    for prompt in PROMPTS:
        expected = rank_images(prompt, photos, checkout_path=tiny_init, model=TINY_CLIP, device="cpu")
        expected = dict(zip(expected.path, expected.score))
        ours = reward([Image.open(p) for p in photos], [prompt] * len(photos))
        assert torch.allclose(ours, torch.tensor([expected[p] for p in photos], dtype=torch.float32), atol=1e-5)


def test_tensor_images_differ_from_pil_only_by_resizing(photos, tiny_init):
    reward = Reward.load(f"clip:{tiny_init},model={TINY_CLIP}")
    images = [Image.open(p).convert("RGB") for p in photos]
    on_pil = reward(images, PROMPTS)
    on_tensors = torch.stack([reward(to_tensor(image)[None], [prompt])[0] for image, prompt in zip(images, PROMPTS)])
    # the 64 x 64 image is not resized: the same pixels, the same score; the others move by tensor vs PIL bicubic
    assert abs(on_tensors[2] - on_pil[2]) < 1e-6
    assert (on_tensors - on_pil).abs().max() < 5e-3


def test_hpsv2_tensor_preprocessing_is_its_pil_preprocessing(photos, tiny_init):
    # HPS v2 resizes the tensor ToTensor makes: the tensor path is the same arithmetic
    reward = Reward.load(f"hpsv2:{tiny_init},model={TINY_CLIP}")
    images = [Image.open(p).convert("RGB") for p in photos]
    on_tensors = torch.stack([reward(to_tensor(image)[None], [prompt])[0] for image, prompt in zip(images, PROMPTS)])
    assert torch.allclose(on_tensors, reward(images, PROMPTS), atol=1e-5)


def test_gradient_reaches_images_and_matches_finite_differences(tiny_init):
    reward = Reward.load(f"clip:{tiny_init},model={TINY_CLIP}").double()
    images = torch.rand(2, 3, 10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    images.requires_grad_(True)
    # fast mode: the Jacobian's product with random vectors, against the same by finite differences
    assert torch.autograd.gradcheck(lambda x: reward(x, PROMPTS[:2]), (images,), eps=1e-6, atol=1e-6, fast_mode=True)
    assert not any(p.requires_grad for p in reward.parameters())


def test_gradient_checkpointing_gives_the_same_gradient(tiny_init):
    images = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    grads, calls = [], []
    for checkpointing in (False, True):
        reward = Reward.load(f"clip:{tiny_init},model={TINY_CLIP}", gradient_checkpointing=checkpointing)
        first_block = reward.model.visual.transformer.resblocks[0]
        first_block = getattr(first_block, "block", first_block)
        runs = []
        first_block.register_forward_pre_hook(lambda *_: runs.append(1))
        x = images.clone().requires_grad_(True)
        reward(x, PROMPTS[:2]).sum().backward()
        grads.append(x.grad)
        calls.append(len(runs))
    assert calls == [1, 2]  # checkpointed: the block runs again in the backward pass
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_ddpo_style_callable(tiny_init):
    fn = reward_fn(f"clip:{tiny_init},model={TINY_CLIP}")
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    rewards, info = fn(images, PROMPTS, [{} for _ in PROMPTS])
    assert rewards.shape == (3,) and info == {}
    # ddpo-pytorch also hands uint8 B x H x W x C numpy arrays
    as_uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rewards_uint8, _ = fn(as_uint8, PROMPTS, None)
    assert torch.allclose(rewards, rewards_uint8, atol=2e-2)


@pytest.mark.parametrize("images, message", [
    (torch.full((1, 3, 8, 8), 1.5), "values must lie in [0, 1], found [1.5, 1.5]"),
    (torch.rand(3, 8, 8), "expected a float tensor B x 3 x H x W in [0, 1], got torch.float32 of shape (3, 8, 8)"),
    (torch.rand(1, 4, 8, 8), "of shape (1, 4, 8, 8)"),
    ("image.png", "got str"),
])
def test_bad_images_end_in_one_clear_line(tiny_init, images, message):
    reward = Reward.load(f"clip:{tiny_init},model={TINY_CLIP}")
    with pytest.raises(InputError) as error:
        reward(images, ["a prompt"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_one_prompt_per_image(tiny_init):
    reward = Reward.load(f"clip:{tiny_init},model={TINY_CLIP}")
    with pytest.raises(InputError, match="prompts: 1 for 2 images"):
        reward(torch.rand(2, 3, 8, 8), ["a prompt"])


def test_half_precision_images_as_an_fp16_vae_decodes_them(tiny_init):
    reward = Reward.load(f"clip:{tiny_init},model={TINY_CLIP}")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16):
        half = images.to(dtype)
        assert torch.allclose(reward(half, PROMPTS[:2]), reward(half.float(), PROMPTS[:2]))
