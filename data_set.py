"""(prompt, preferred image, other image) triplets from a parquet file or a DataFrame."""
import os

import pandas as pd
from PIL import Image, ImageFile
from torchvision.transforms import Resize
from torch.utils.data import Dataset

from clip_model import DEFAULT_MODEL, InputError

# as the original: a truncated JPEG loads (the missing part grey) instead of stopping a long run
ImageFile.LOAD_TRUNCATED_IMAGES = True

COLUMNS = ("prompt", "pos_path", "neg_path")


def load_pairs(parquet_file_or_pandas_dataframe, check_files=True):
    """Read and check a pair table: the columns, at least one row, string prompts, image files that exist and are not empty.

    Raises InputError naming the file, the column or the row. Rows are named by the frame's index where it is a
    unique integer index (a parquet file's 0..n-1, or the rows a filtered frame kept), else by position.
    check_files=False leaves missing and empty image files to drop_unreadable_pairs (--skip_bad_images).
    """
    source = parquet_file_or_pandas_dataframe
    if isinstance(source, pd.DataFrame):
        df, where = source, "the DataFrame"
    else:
        where = str(source)
        if not os.path.isfile(where):
            raise InputError(f"{where}: no such parquet file")
        try:
            df = pd.read_parquet(where)
        except Exception as e:
            raise InputError(f"{where}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{where}: missing column {', '.join(repr(c) for c in missing)} "
                         f"(needs {', '.join(COLUMNS)}; has {', '.join(map(str, df.columns))})")
    if len(df) == 0:
        raise InputError(f"{where}: no rows")
    if not (df.index.is_unique and pd.api.types.is_integer_dtype(df.index)):
        df = df.reset_index(drop=True)
    for column in COLUMNS:
        not_str = ~df[column].map(lambda v: isinstance(v, str))
        if not_str.any():
            row = int(not_str.idxmax())
            value = df[column][row]
            raise InputError(f"{where}: row {row}, column {column!r}: expected a string, got "
                             f"{'null' if pd.isna(value) else repr(value)}")
    for column in ("pos_path", "neg_path") if check_files else ():
        sizes = df[column].map(lambda path: os.path.getsize(path) if os.path.isfile(path) else -1)
        if (sizes <= 0).any():
            row = int((sizes <= 0).idxmax())
            problem = "no such image file" if sizes[row] < 0 else "empty (zero-byte) image file"
            raise InputError(f"{where}: row {row}, column {column!r}: {problem} {df[column][row]!r}")
    return df


def readable(path):
    """Whether PIL can identify and verify the file as an image (cheap: no full decode)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def drop_unreadable_pairs(pairs):
    """The pairs whose two images both read, and a line saying what was skipped (None if nothing was)."""
    paths = pd.unique(pd.concat([pairs["pos_path"], pairs["neg_path"]], ignore_index=True))
    bad = sorted(p for p in paths if not readable(p))
    keep = ~(pairs["pos_path"].isin(bad) | pairs["neg_path"].isin(bad))
    if not keep.any():
        raise InputError(f"no pair left: every pair has an unreadable image (first: {', '.join(bad[:3])})")
    skipped = (f"skipping pairs with unreadable images: {len(bad)} images, first: {', '.join(bad[:5])}; "
               f"{keep.sum()} pairs left") if bad else None
    return pairs[keep], skipped


# JPEGs are decoded at a reduced scale (PIL's draft: DCT scaling by 1/2, 1/4, 1/8) that keeps at least this many
# times the resize target on the shortest side; the exact antialiased resize then runs on far fewer pixels.
DRAFT_MARGIN = 2


def resize_target(preprocess):
    """The shortest-side size the first Resize of a torchvision Compose makes, or None."""
    for transform in getattr(preprocess, "transforms", ()):
        if isinstance(transform, Resize):
            return transform.size if isinstance(transform.size, int) else min(transform.size)
    return None


def open_image(path, preprocess, draft_size=None, where=None):
    """Decode one image (a JPEG at reduced scale, at least draft_size * DRAFT_MARGIN on its shortest side) and
    preprocess it; an unreadable file raises InputError naming it, after `where` (its row and column)."""
    try:
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft(image.mode if image.mode in ("RGB", "L") else None, (draft_size * DRAFT_MARGIN,) * 2)
            return preprocess(image)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        raise InputError(f"{where + ': ' if where else ''}{path}: cannot read image ({reason})") from None


class PromptImagePair(Dataset):
    """Items are (text_tokens, pos_image, neg_image): the prompt's 77 CLIP token ids and both preprocessed images.

    Example:
        df = pd.read_parquet('data.parquet')
        preprocess_fn = torchvision.transforms.Compose([torchvision.transforms.Resize(224), torchvision.transforms.ToTensor()])
        dataset = PromptImagePair(df, preprocess_fn)
        text, pos_img, neg_img = dataset[0]

    `tokenizer` defaults to the tokenizer of the default model (OpenAI's CLIP BPE, truncated to 77 tokens).
    `with_row=True` puts the row number first in each item, so a training loop can name a batch's rows.
    """

    def __init__(self, parquet_file_or_pandas_dataframe, preprocess, tokenizer=None, with_row=False):
        self.df = load_pairs(parquet_file_or_pandas_dataframe)
        self.preprocess = preprocess
        self.with_row = with_row
        self.draft_size = resize_target(preprocess)
        if tokenizer is None:
            import open_clip
            tokenizer = open_clip.get_tokenizer(DEFAULT_MODEL)
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.df)

    def __getitem__(self, idx):
        prompt, pos_path, neg_path = self.df.iloc[idx][list(COLUMNS)]
        row = self.df.index[idx]
        item = (self.tokenizer(prompt)[0],
                open_image(pos_path, self.preprocess, self.draft_size, f"row {row}, column 'pos_path'"),
                open_image(neg_path, self.preprocess, self.draft_size, f"row {row}, column 'neg_path'"))
        return (row, *item) if self.with_row else item

