"""The original validate.py's work on OpenAI's own `clip` package, as a process of its own: what whole-process
comparisons of validate.py run against (it imports only what the original imported).

    python benchmarks/original_validate.py pairs.parquet weights.pth [batch_size] [scores.csv]

clip.load of a weights file (fp32 on a CPU), the package's preprocessing and tokenizer, every pair's prompt and both
images encoded, "Accuracy: N%" printed; the pairs' scores written to scores.csv when named.
"""
import sys
import warnings

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # its pkg_resources import warns
    import clip


class PromptImagePair(Dataset):
    def __init__(self, pairs, preprocess):
        self.pairs, self.preprocess = pairs, preprocess

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        row = self.pairs.iloc[i]
        return (clip.tokenize(row.prompt, truncate=True)[0], self.preprocess(Image.open(row.pos_path)),
                self.preprocess(Image.open(row.neg_path)))


@torch.no_grad()
def main(pairs_file, weights, batch_size=1024, scores_out=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load of a plain state dict warns before clip falls back
        model, preprocess = clip.load(weights, device="cpu", jit=False)
    model.eval()
    pos_scores, neg_scores = [], []
    for text, pos, neg in DataLoader(PromptImagePair(pd.read_parquet(pairs_file), preprocess), int(batch_size)):
        text, pos, neg = (f / f.norm(dim=-1, keepdim=True) for f in (model.encode_text(text), model.encode_image(pos),
                                                                      model.encode_image(neg)))
        pos_scores.append((text * pos).sum(1))
        neg_scores.append((text * neg).sum(1))
    pos, neg = torch.cat(pos_scores), torch.cat(neg_scores)
    print(f"Accuracy: {(pos >= neg).float().mean().item() * 100:.2f}%")
    if scores_out:
        pd.DataFrame({"pos_score": pos.numpy(), "neg_score": neg.numpy()}).to_csv(scores_out, index=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
