"""The original's import path of the pair dataset: `from data_set import PromptImagePair` (its notebooks' import).
The dataset lives in social_reward/data/pairs.py; this module hands it on.

    df = pd.read_parquet('data.parquet')
    preprocess_fn = torchvision.transforms.Compose([torchvision.transforms.Resize(224), torchvision.transforms.ToTensor()])
    text, pos_img, neg_img = PromptImagePair(df, preprocess_fn)[0]
"""
from social_reward.data.pairs import PromptImagePair, load_pairs  # noqa: F401
