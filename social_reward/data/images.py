"""One image, decoded and preprocessed, for every loader: the training pairs, the scoring code and the trunk cache.
An unreadable image ends in one line naming it and its place; a truncated JPEG loads with its missing part grey, as
the original's loader did: PIL's LOAD_TRUNCATED_IMAGES, which the first image read here sets (PIL has no switch per
image, so it stays set in that process), never an import (the scoring server, which refuses truncated uploads,
imports this package without it).

    pixels = open_image("a.png", preprocess, where="row 3, column 'pos_path'")
    pixels = open_image(ref, preprocess, draft_size(preprocess, fast_decode=True))   # JPEG at reduced scale
"""
from PIL import Image, ImageFile
from torchvision.transforms import Resize

from social_reward.data.cells import describe, image_file
from social_reward.errors import InputError


def load_truncated_images():
    """As the original: a truncated JPEG loads (the missing part grey) instead of stopping a long run."""
    ImageFile.LOAD_TRUNCATED_IMAGES = True


def readable(ref):
    """Whether PIL can identify and verify the image (a path, bytes or a parquet cell) as an image (no full decode)."""
    load_truncated_images()
    try:
        with Image.open(image_file(ref)) as image:
            image.verify()
        return True
    except Exception:
        return False


# With --fast_decode, JPEGs are decoded at a reduced scale (PIL's draft: DCT scaling by 1/2, 1/4, 1/8) that keeps at
# least this many times the resize target on the shortest side; the exact antialiased resize then runs on far fewer
# pixels. The scores then differ slightly from the original's full-scale decoding, so it is not the default.
DRAFT_MARGIN = 2


def resize_target(preprocess):
    """The shortest-side size the first Resize of a torchvision Compose makes, or None."""
    for transform in getattr(preprocess, "transforms", ()):
        if isinstance(transform, Resize):
            return transform.size if isinstance(transform.size, int) else min(transform.size)
    return None


def draft_size(preprocess, fast_decode):
    """The reduced-scale decoding target for open_image: None (full decoding, the original's) unless fast_decode."""
    return resize_target(preprocess) if fast_decode else None


def open_image(path, preprocess, draft_size=None, where=None):
    """Decode one image (a path, bytes, or a parquet cell; with draft_size, a JPEG at reduced scale, at least
    draft_size * DRAFT_MARGIN on its shortest side) and preprocess it; an unreadable one raises InputError naming it,
    after `where` (its row and column)."""
    load_truncated_images()
    try:
        with Image.open(image_file(path)) as image:
            if draft_size and image.format == "JPEG":
                image.draft(image.mode if image.mode in ("RGB", "L") else None, (draft_size * DRAFT_MARGIN,) * 2)
            return preprocess(image)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        raise InputError(f"{where + ': ' if where else ''}{describe(path)}: cannot read image ({reason})") from None
