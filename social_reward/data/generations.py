"""Generated images to evaluate or select from, in the two layouts the field uses, read into one table with columns
generator, style, prompt, sample, image (a path, image bytes or a parquet cell reference).

    generations = read_generations(["generations.parquet"])               # generator, prompt, image[, sample, style]
    generations = read_generations(["hps_images/"], prompts="benchmark/")   # HPS v2: <generator>/<style>/<index>.jpg

A table (parquet, csv, or a pandas DataFrame in a notebook) has columns `generator`, `prompt`, `image` (a path,
relative to the table's folder or absolute, or the image's bytes: in parquet, read a row group's image column at a
time as the images are encoded; pandas and pyarrow write a table as one row group (up to 1Mi rows) unless told
otherwise, and that one is read whole: write it with `row_group_size=100`) and optionally `sample` (which of a
prompt's images this is; by default the order of appearance within a generator and prompt) and `style`. HPS v2's
benchmark layout is `ROOT/<generator>/<style>/<index:05d>.jpg` with prompts in `PROMPTS/<style>.json` (a list; the
index is the position); ROOT is one generator's folder or a folder of several.
"""
import glob
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from social_reward.data.cells import cell_ref, parse_cell
from social_reward.data.sources import _check_cells_not_null
from social_reward.errors import InputError

COLUMNS = ["generator", "style", "prompt", "sample", "image"]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_generations(sources, prompts=None, need_generator=True):
    """One table of every generation in `sources` (tables, DataFrames, HPS v2 image folders); a mistake raises one
    InputError line naming the file, the column or the image. `prompts`: the folder of HPS v2's <style>.json files."""
    sources = [sources] if isinstance(sources, (str, pd.DataFrame)) else list(sources)
    frames = []
    for source in sources:
        if isinstance(source, pd.DataFrame):
            frames.append(_table(source, "the DataFrame", None, need_generator))
        elif os.path.isdir(source):
            frames.append(_hps_layout(source, prompts))
        elif os.path.isfile(source):
            frames.append(_table(_read_table(source), source, os.path.dirname(os.path.abspath(source)),
                                 need_generator))
        else:
            raise InputError(f"{source}: no such generations table or image folder")
    generations = pd.concat(frames, ignore_index=True)
    generations.attrs["notes"] = [note for frame in frames for note in frame.attrs.get("notes", [])]
    duplicated = generations.duplicated(["generator", "style", "prompt", "sample"])
    if duplicated.any():
        row = generations[duplicated].iloc[0]
        raise InputError(f"generator {row.generator!r} has two images for sample {row['sample']} of the prompt "
                         f"{row.prompt!r}: give each a distinct `sample`")
    return generations


def _read_table(path):
    try:
        if path.endswith(".parquet"):
            return _read_parquet(path)
        if path.endswith(".csv"):
            return pd.read_csv(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable table ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    raise InputError(f"{path}: a generations table is a .parquet or .csv file (or give an HPS v2 image folder)")


def _read_parquet(path):
    """A parquet generations table; an `image` column of bytes is not read: each cell becomes a reference to its place
    (cells.cell_ref), read a row group's column at a time when the images are encoded (ParquetCells.read), as
    Pick-a-Pic's shards are: memory grows with the largest row group's images, not with the table's (a table of one
    row group, pandas' and pyarrow's default, is read whole: peak RSS grew by 3.3x its image bytes at 2,000 images
    with benchmarks/bytes_table_memory.py --row_group_size 0; ParquetCells says so past 128 MB)."""
    schema = pq.read_schema(path)
    if "image" not in schema.names or not pa.types.is_binary(schema.field("image").type) and not \
            pa.types.is_large_binary(schema.field("image").type):
        return pd.read_parquet(path)
    frame = pd.read_parquet(path, columns=[name for name in schema.names if name != "image"])
    _check_cells_not_null(path, ["image"], np.arange(len(frame)))
    frame["image"] = [cell_ref(os.path.abspath(path), row, "image") for row in range(len(frame))]
    return frame


def _table(frame, where, folder, need_generator):
    required = ["generator", "prompt", "image"] if need_generator else ["prompt", "image"]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(f"{where}: no column {', '.join(map(repr, missing))} (found: {', '.join(map(str, frame.columns))}); "
                         f"a generations table has columns {', '.join(required)} and optionally sample, style")
    table = pd.DataFrame({"generator": frame["generator"].astype(str) if "generator" in frame else "candidates",
                          "style": frame["style"].astype(str) if "style" in frame else "all",
                          "prompt": frame["prompt"], "image": frame["image"]})
    for column in ("prompt", "image"):
        empty = table[column].isna() | table[column].map(lambda v: isinstance(v, str) and not v.strip())
        if empty.any():
            raise InputError(f"{where}: row {frame.index[empty.values.argmax()]}: empty {column!r}")
    if "sample" in frame:
        sample = pd.to_numeric(frame["sample"], errors="coerce")
        bad = sample.isna() | (sample != sample.round()) | (sample < 0)
        if bad.any():
            raise InputError(f"{where}: row {frame.index[bad.values.argmax()]}: 'sample' is "
                             f"{str(frame['sample'][bad].iloc[0])!r}, not a whole number >= 0")
        table["sample"] = sample.astype(int).values
    else:  # the order of appearance within a generator and prompt
        table["sample"] = table.groupby(["generator", "style", "prompt"], sort=False).cumcount()
    if folder is not None:
        table["image"] = [os.path.join(folder, image) if isinstance(image, str) and not os.path.isabs(image) else image
                          for image in table.image]
    missing = [i for i, image in enumerate(table.image)
               if isinstance(image, str) and parse_cell(image) is None and not os.path.isfile(image)]
    if missing:
        raise InputError(f"{where}: row {frame.index[missing[0]]}: no such image file {table.image[missing[0]]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return table[COLUMNS]


def _hps_layout(root, prompts):
    if prompts is None:
        raise InputError(f"{root}: an HPS v2 image folder needs --prompts DIR (the benchmark's <style>.json files)")
    style_files = sorted(glob.glob(os.path.join(prompts, "*.json")))
    if not style_files:
        raise InputError(f"--prompts {prompts}: no <style>.json prompt files there")
    styles = {}
    for path in style_files:
        try:
            with open(path) as f:
                listed = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a JSON list of prompts ({e})") from None
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise InputError(f"{path}: not a JSON list of prompts")
        styles[os.path.splitext(os.path.basename(path))[0]] = listed
    subfolders = _folders(root)
    # ROOT is one generator when its folders are styles, else a folder of generators
    if subfolders and all(d in styles for d in subfolders):
        generators = {os.path.basename(os.path.normpath(root)): root}
    else:
        generators = {d: os.path.join(root, d) for d in subfolders}
    if not generators:
        raise InputError(f"{root}: no generator folders (ROOT/<generator>/<style>/<index:05d>.jpg)")
    # a prompt listed twice in a style is two samples of it: sample k is its k-th place in the list
    occurrence = {style: pd.Series(listed).groupby(listed).cumcount().tolist() for style, listed in styles.items()}
    rows, notes = [], []
    for generator, folder in generators.items():
        style_folders = _folders(folder)
        if not style_folders:
            raise InputError(f"{folder}: generator {generator!r} has no style folders")
        for style in style_folders:
            if style not in styles:
                raise InputError(f"{os.path.join(folder, style)}: no prompts for style {style!r} in {prompts} "
                                 f"(styles there: {', '.join(styles)})")
            images = sorted(f for f in os.listdir(os.path.join(folder, style)) if f.lower().endswith(IMAGE_SUFFIXES))
            if not images:
                raise InputError(f"{os.path.join(folder, style)}: no images")
            for name in images:
                stem = os.path.splitext(name)[0]
                if not stem.isdigit():
                    raise InputError(f"{os.path.join(folder, style, name)}: not named by its prompt's index (00000.jpg)")
                if int(stem) >= len(styles[style]):
                    raise InputError(f"{os.path.join(folder, style, name)}: index {int(stem)} has no prompt "
                                     f"({style}.json lists {len(styles[style])})")
                rows.append((generator, style, styles[style][int(stem)], occurrence[style][int(stem)],
                             os.path.join(folder, style, name)))
            if len(images) < len(styles[style]):  # HPS v2 skips a missing image too, and says so
                notes.append(f"{generator}/{style}: {len(styles[style]) - len(images)} of {len(styles[style])} "
                             f"prompts have no image")
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["notes"] = notes
    return table


def _folders(path):
    """The folders in `path`, by name, leaving out hidden ones (.ipynb_checkpoints and the like)."""
    return sorted(d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def shared_items(generations):
    """The items (style, prompt, sample) every generator has, and for each generator how many of the others' items it
    lacks (an item is compared only across generators that both have it)."""
    items = generations.groupby("generator", sort=False).apply(
        lambda g: set(zip(g["style"], g["prompt"], g["sample"])), include_groups=False)
    every = set().union(*items)
    return set.intersection(*items), {generator: len(every - have) for generator, have in items.items()}
