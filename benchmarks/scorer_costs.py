"""What each of the seven scorers costs per image on this CPU, at its real size with random weights (the arithmetic, and
so the time, is that of the real weights); and its FLOPs per (prompt, image) pair, from which the H100 time on paper
follows.

    python benchmarks/scorer_costs.py --images 4 --repeats 2 --out benchmarks/results-scorer-costs-cpu.json
    python benchmarks/scorer_costs.py --scorers mps clip --images 2 --repeats 1      # a short run

- clip (ours: OpenAI CLIP ViT-L/14), hpsv2 (open_clip ViT-H-14), pickscore (transformers' CLIPModel of ViT-H-14's sizes,
  saved to a folder and loaded as `pickscore:FOLDER` loads it), aesthetic (ViT-L/14 and the LAION MLP's shapes, loaded
  as `aesthetic:MLP,clip=...` loads it), imagereward (ViT-L/16 and BLIP's BERT), mps (CLIP-H and its condition module):
  end to end through social_reward.scoring.encoding.prompt_image_scores (PNG decoding, preprocessing, tokenizing
  included), 512 px PNGs, a 12-word prompt each, float32 (MPS runs in fp16 on a GPU; a CPU without fp16 arithmetic runs
  it in fp32).
- hpsv3_7b, hpsv3_2b: Qwen2-VL-7B (HPSv3's, 8.3B parameters: 17 GB in bf16, more than this machine can spare) and the
  smaller real Qwen2-VL-2B, timed by parts in bf16 (HPSv3's dtype): the vision tower (675M parameters, the same in both)
  on one 448 x 448 image (1024 patches, 256 tokens after merging), then one decoder layer on the whole sequence, times
  the number of layers. The sequence: 256 image tokens + --text_tokens (HPSv3's instruction with the prompt in Qwen's
  chat: about 600; CLIP's BPE, which drops whitespace, counts 532 for it with a 14-word prompt).
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # imagereward_speed.py beside this file
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tests' CLIP processor folder (tiny_peers.write_clip_processor)
from imagereward_speed import imagereward_random, images_per_second, make_inputs  # noqa: E402

H100_BF16 = 989e12  # H100 SXM dense bf16 peak, FLOP/s (the data sheet's 1979 is with 2:4 sparsity)
UTILISATION = 0.4  # a typical share of the peak for inference at these sizes (on paper)
QWEN2_VL = {  # the language models' config.json values (Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2-VL-2B-Instruct)
    "hpsv3_7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4),
    "hpsv3_2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2)}
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2)


def best_seconds(function, repeats):
    function()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(params, tokens):
    return 2 * params * tokens


def hpsv3_parts(name, text_tokens, repeats, dtype=torch.bfloat16):
    """Seconds per image of Qwen2-VL's vision tower and of its language model (one layer timed, times the layers), and
    the FLOPs of each, for HPSv3 on Qwen2-VL of size `name`."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (Qwen2VisionTransformerPretrainedModel,
                                                                Qwen2VLTextModel)
    sizes = QWEN2_VL[name]
    config = Qwen2VLConfig(vision_config={**QWEN2_VL_VISION, "hidden_size": sizes["hidden_size"]},
                           text_config={**sizes, "num_hidden_layers": 1, "vocab_size": 1000, "rms_norm_eps": 1e-6,
                                        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}})
    torch.manual_seed(0)
    vision = Qwen2VisionTransformerPretrainedModel(config.vision_config).to(dtype).eval()
    patches = torch.randn(1024, 3 * 2 * 14 * 14, dtype=dtype)
    grid = torch.tensor([[1, 32, 32]])
    with torch.no_grad():
        vision_seconds = best_seconds(lambda: vision(patches, grid_thw=grid), repeats)
    vision_params = sum(p.numel() for p in vision.parameters())
    layer = Qwen2VLTextModel(config.text_config).to(dtype).eval()
    length = 256 + text_tokens
    embeds = torch.randn(1, length, sizes["hidden_size"], dtype=dtype)
    with torch.no_grad():
        layer_seconds = best_seconds(lambda: layer(inputs_embeds=embeds, use_cache=False), repeats)
    layer_params = sum(p.numel() for n, p in layer.named_parameters() if n.startswith("layers."))
    layers, width = sizes["num_hidden_layers"], sizes["hidden_size"]
    vision_flops = matmul_flops(vision_params, 1024) + QWEN2_VL_VISION["depth"] * 4 * 1024 ** 2 * 1280
    text_flops = layers * (matmul_flops(layer_params, length) + 4 * length ** 2 * width / 2)  # causal: half the pairs
    head_flops = matmul_flops(width * 1024 + 1024 * 16 + 16 * 2, 1)
    return {"vision_seconds": vision_seconds, "layer_seconds": layer_seconds, "layers": layers,
            "seconds_per_image": vision_seconds + layers * layer_seconds, "sequence_tokens": length,
            "vision_params": vision_params, "decoder_params": layers * layer_params,
            "flops_per_image": vision_flops + text_flops + head_flops, "vision_flops": vision_flops,
            "text_flops": text_flops, "dtype": str(dtype).removeprefix("torch.")}


def tower_flops(layers, width, tokens, mlp_ratio=4):
    """A transformer tower's FLOPs: its matrix products 2 x (4 + 2 x mlp_ratio) x width^2 per token and layer, and the
    attention's 4 x tokens^2 x width per layer."""
    return layers * (2 * (4 + 2 * mlp_ratio) * width ** 2 * tokens + 4 * tokens ** 2 * width)


VIT_L14 = tower_flops(24, 1024, 257)  # OpenAI's ViT-L/14 at 224 px: 256 patches and the class token
VIT_H14 = tower_flops(32, 1280, 257)
FLOPS = {  # per (prompt, image) pair; the text towers on 77 tokens
    "clip": VIT_L14 + tower_flops(12, 768, 77),
    "hpsv2": VIT_H14 + tower_flops(24, 1024, 77),
    "pickscore": VIT_H14 + tower_flops(24, 1024, 77),
    "aesthetic": VIT_L14 + 2 * (768 * 1024 + 1024 * 128 + 128 * 64 + 64 * 16 + 16),  # the prompt is not read
    # ViT-L/16 on 197 tokens; BLIP's BERT-base on 35 tokens, each layer cross-attending to the 197 image tokens
    # (queries and output 768 x 768 on the text, keys and values 1024 -> 768 on the image, the scores
    # 4 x 35 x 197 x 768)
    "imagereward": tower_flops(24, 1024, 197) + tower_flops(12, 768, 35)
    + 12 * (2 * 2 * 768 ** 2 * 35 + 2 * 2 * 1024 * 768 * 197 + 4 * 35 * 197 * 768)}


def vit_h14_clip_config():
    """transformers' CLIPConfig of laion's CLIP-ViT-H-14 (PickScore's and MPS's sizes)."""
    from transformers import CLIPConfig
    return CLIPConfig(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, hidden_act="gelu", projection_dim=1024),
                      vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                         num_attention_heads=16, patch_size=14, hidden_act="gelu", projection_dim=1024),
                      projection_dim=1024)


def pickscore_random(folder):
    """PickScore's layout at its real size (laion CLIP-ViT-H-14 as transformers' CLIPModel) with random weights, saved
    to `folder` and loaded as `pickscore:FOLDER` loads it."""
    from transformers import CLIPModel

    from social_reward.scorers.registry import load_scorer
    config = vit_h14_clip_config()
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return load_scorer(f"pickscore:{folder}")


def aesthetic_random(folder):
    """The LAION aesthetic predictor's MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, Linear layers at indices 0, 2, 4, 6,
    7) with random weights on a random ViT-L/14, loaded as `aesthetic:MLP,clip=none` loads it."""
    from safetensors.torch import save_file

    from social_reward.scorers.registry import load_scorer
    sizes, indices = [768, 1024, 128, 64, 16, 1], [0, 2, 4, 6, 7]
    torch.manual_seed(0)
    state = {}
    for index, (inputs, outputs) in zip(indices, zip(sizes, sizes[1:])):
        state[f"layers.{index}.weight"] = torch.randn(outputs, inputs) / inputs ** 0.5
        state[f"layers.{index}.bias"] = torch.zeros(outputs)
    path = os.path.join(folder, "aesthetic-mlp.safetensors")
    save_file(state, path)
    return load_scorer(f"aesthetic:{path},clip=none")


def random_scorer(name, folder):
    """(model, preprocess, tokenizer) of scorer `name` at its real size with random weights."""
    from social_reward.models.clip import load_model
    from social_reward.scorers.clip import clip_scorer
    from social_reward.scorers.hpsv2 import hps_preprocess
    if name == "mps":
        return mps_random(os.path.join(folder, "clip-tokenizer"))
    if name == "imagereward":
        return imagereward_random(folder)
    if name == "hpsv2":  # as `hpsv2:FILE` builds it, the weights random instead of the file's
        model, _, tokenizer = load_model("ViT-H-14", "none")
        return model, hps_preprocess(224), tokenizer
    scorer = {"clip": lambda: clip_scorer(pretrained="none"),
              "pickscore": lambda: pickscore_random(os.path.join(folder, "pickscore")),
              "aesthetic": lambda: aesthetic_random(folder)}[name]()
    return scorer.model, scorer.preprocess, scorer.tokenizer


def mps_random(folder):
    """A full-size MPS (laion CLIP-ViT-H-14: vision 32 x 1280, text 24 x 1024; the condition module 4 layers of 1024, 16
    heads of 64) with random weights, its preprocessing and CLIP's tokenizer (the processor folder the tests write)."""
    from social_reward.scorers.mps import CONDITION, MPS, MPSTokenizer
    from social_reward.scorers.preprocess import ClipImageProcessor
    from tiny_peers import write_clip_processor
    tokenizer = MPSTokenizer(write_clip_processor(folder))
    torch.manual_seed(0)
    model = MPS(vit_h14_clip_config(), 4, 16, 64, 4096, tokenizer(CONDITION)).eval()
    for layer in model.condition:
        layer.inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    model.tensor_preprocess = ClipImageProcessor(resample="pil")  # as mps: loads it (transformers 4's processor)
    return model, model.tensor_preprocess.pil, tokenizer


def mps_flops():
    """MPS's FLOPs per pair: CLIP-H's image tower on 257 tokens, its text tower twice (prompt, condition) on 77, the
    condition module on 257 image tokens attending to 77."""
    vision, text = VIT_H14, 2 * tower_flops(24, 1024, 77)
    per_layer = (1024 * 1024 + 1024 * 128 + 1024 * 1024 + 1024 * 8192 + 4096 * 1024  # cross-attention, its feed-forward
                 + 1024 * (1024 + 128 + 8192) + 1024 * 1024 + 4096 * 1024)  # the parallel block
    condition = 4 * (2 * per_layer * 257 + 4 * 257 * 77 * 1024 + 4 * 257 ** 2 * 1024)
    return vision + text + condition


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["clip", "hpsv2", "pickscore", "aesthetic", "imagereward", "mps", "hpsv3_2b", "hpsv3_7b"]
    parser.add_argument("--scorers", nargs="+", default=names, choices=names)
    parser.add_argument("--images", type=int, default=4, help="PNGs scored end to end (all but hpsv3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the best is kept")
    parser.add_argument("--text_tokens", type=int, default=600, help="HPSv3's text tokens besides the image's 256")
    parser.add_argument("--out", default=None, help="results JSON")
    args = parser.parse_args()
    load = os.getloadavg()
    results = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads",
               "date": datetime.datetime.now().isoformat(" ", "seconds"),
               "load_at_start": load[0], "h100_bf16_peak": H100_BF16, "h100_utilisation": UTILISATION, "scorers": {}}
    with tempfile.TemporaryDirectory() as folder:
        images, prompts = make_inputs(folder, args.images)
        for name in args.scorers:
            if name.startswith("hpsv3"):
                result = hpsv3_parts(name, args.text_tokens, args.repeats)
                print(f"{name}: vision tower {result['vision_seconds']:.2f} s + {result['layers']} x "
                      f"{result['layer_seconds']:.2f} s a decoder layer over {result['sequence_tokens']} tokens = "
                      f"{result['seconds_per_image']:.1f} s per image (bf16, by parts)")
            else:
                model, preprocess, tokenizer = random_scorer(name, folder)
                flops = mps_flops() if name == "mps" else FLOPS[name]
                rate, shares = images_per_second(model, preprocess, tokenizer, prompts, images, args.repeats,
                                                 batch_size=8)
                result = {"seconds_per_image": 1 / rate, "images_per_second": rate, "shares": shares,
                          "flops_per_image": flops, "dtype": "float32"}
                del model, preprocess, tokenizer
                print(f"{name}: {rate:.3f} images/s ({1 / rate:.2f} s per image, end to end, fp32)")
            result["h100_ms_at_peak"] = 1e3 * result["flops_per_image"] / H100_BF16
            result["h100_ms_on_paper"] = result["h100_ms_at_peak"] / UTILISATION
            print(f"  {result['flops_per_image'] / 1e12:.3f} TFLOP per image: "
                  f"H100 {result['h100_ms_at_peak']:.2f} ms at "
                  f"the bf16 peak, {result['h100_ms_on_paper']:.1f} ms at {UTILISATION:.0%} of it (on paper)")
            results["scorers"][name] = result
    results["load_at_end"] = os.getloadavg()[0]
    print(f"{results['machine']}, {results['date']}, load average {load[0]:.1f} at the start, "
          f"{results['load_at_end']:.1f} at the end")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
