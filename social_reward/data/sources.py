"""Where pairs come from: the original pair table, and the public preference datasets as they are published.

    source = read_source("validation_data.parquet")                          # prompt, pos_path, neg_path
    source = read_source("pickapic_v2/data/test-*.parquet")                  # Pick-a-Pic shards, images inside
    source = read_source("HPD/test.json", image_root="HPD/test")             # HPD v2: ranked images per prompt
    source = read_source("ImageReward/data/test.json", image_root="ImageReward/data/test_images")
    source.pairs    # prompt, pos_path, neg_path: the pairs to train on and the original's accuracy (no ties)
    source.groups   # for a benchmark: every row's or entry's prompt, images and labels, for its own metric

Images are named as data/cells.py describes. Reading a source imports no model library.
"""
import glob
import json
import os
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from social_reward.data.cells import cell_ref, leaf_index
from social_reward.errors import InputError

TABLE = ("prompt", "pos_path", "neg_path")


BYTES_TABLE = ("prompt", "pos_image", "neg_image")


PICKAPIC = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


RANKED_JSON = {  # layout: (images key, ranks key); ranks: smaller is better
    "hpdv2_train": ("file_path", "human_preference"),  # 1 = preferred, turned into rank 0 (see _ranks)
    "hpdv2_test": ("image_path", "rank"),
    "imagereward": ("generations", "ranking"),
}


UNDERSTOOD = ("a pair table (prompt, pos_path, neg_path) or with image bytes (prompt, pos_image, neg_image); "
              "Pick-a-Pic parquet shards (caption, jpg_0, jpg_1, label_0, label_1); HPD v2 train.json "
              "(prompt, file_path, human_preference) or test.json (prompt, image_path, rank); ImageReward test.json "
              "(prompt, generations, ranking)")


@dataclass
class PairSource:
    name: str
    layout: str  # "table", "pickapic", "hpdv2_train", "hpdv2_test", "imagereward"
    pairs: pd.DataFrame  # prompt, pos_path, neg_path (+ entry for the benchmark layouts); index names the rows
    groups: pd.DataFrame = None  # benchmark layouts: entry, prompt, images (list), labels (list), one per row/entry
    left_out: str = None  # one line: what was left out of the pairs and why


def read_source(source, image_root=None, check_files=True):
    """Read pairs from a DataFrame, a parquet file, several (a list, a glob, a folder), or a benchmark json.

    Raises InputError naming the file, the row or entry, and the column or key. check_files=False leaves missing
    and empty image files of a pair table to pairs.drop_unreadable_pairs (--skip_bad_images).
    """
    if isinstance(source, PairSource):
        return source
    if isinstance(source, pd.DataFrame):
        return _table(source, "the DataFrame", None, check_files)
    files = _expand(source)
    if files[0].endswith(".json"):
        if len(files) > 1:
            raise InputError(f"{', '.join(files)}: give one json file at a time")
        return _ranked_json(files[0], image_root, check_files)
    schema = _schema(files[0])
    if set(PICKAPIC) & set(schema.names):
        return _pickapic(files, schema)
    if len(files) > 1:
        raise InputError(f"{files[0]}: several files are read only for Pick-a-Pic shards; this one has columns "
                         f"{', '.join(schema.names)}")
    try:
        frame = pd.read_parquet(files[0], columns=[c for c in schema.names if c not in ("pos_image", "neg_image")])
    except Exception as e:
        raise InputError(f"{files[0]}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return _table(frame, files[0], files[0], check_files, schema.names)


def _expand(source):
    """The files a source names: one path, a list of paths, a glob, or a folder of .parquet files."""
    names = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files = []
    for name in map(str, names):
        if os.path.isdir(name):
            found = sorted(glob.glob(os.path.join(name, "**", "*.parquet"), recursive=True))
            if not found:
                raise InputError(f"{name}: a folder with no .parquet files in it")
        elif glob.has_magic(name):
            found = sorted(glob.glob(name))
            if not found:
                raise InputError(f"{name}: no file matches")
        elif not os.path.isfile(name):
            raise InputError(f"{name}: no such {'json' if name.endswith('.json') else 'parquet'} file")
        else:
            found = [name]
        files += found
    if not files:
        raise InputError("no pair file given")
    return files


def _schema(file):
    try:
        return pq.read_schema(file)
    except Exception as e:
        raise InputError(f"{file}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def _check_strings(frame, columns, where):
    for column in columns:
        not_str = ~frame[column].map(lambda v: isinstance(v, str))
        if not_str.any():
            row = not_str.values.argmax()
            value = frame[column].iloc[row]
            raise InputError(f"{where}: row {frame.index[row]}, column {column!r}: expected a string, got "
                             f"{'null' if pd.isna(value) else repr(value)}")


def _table(df, where, file, check_files, names=None):
    """The original layout (image paths), or the same with the images as bytes (binary columns)."""
    names = list(names if names is not None else df.columns)
    image_columns = ("pos_image", "neg_image") if ({"pos_image", "neg_image"} & set(names)
                                                   and not {"pos_path", "neg_path"} & set(names)) else ("pos_path", "neg_path")
    needed = ("prompt", *image_columns)
    if not set(needed) & set(names):
        raise InputError(f"{where}: not a layout understood (columns: {', '.join(map(str, names))}); understood: {UNDERSTOOD}")
    missing = [c for c in needed if c not in names]
    if missing:
        raise InputError(f"{where}: missing column {', '.join(repr(c) for c in missing)} "
                         f"(needs {', '.join(needed)}; has {', '.join(map(str, names))})")
    if len(df) == 0:
        raise InputError(f"{where}: no rows")
    if not (df.index.is_unique and pd.api.types.is_integer_dtype(df.index)):
        df = df.reset_index(drop=True)
    _check_strings(df, ["prompt"] + ([] if image_columns[0] == "pos_image" else list(image_columns)), where)
    if image_columns[0] == "pos_image":
        if file is None:  # a DataFrame already holds the bytes: they name the images themselves
            for column in image_columns:
                bad = ~df[column].map(lambda v: isinstance(v, (bytes, bytearray)) and len(v) > 0)
                if bad.any():
                    raise InputError(f"{where}: row {df.index[bad.values.argmax()]}, column {column!r}: "
                                     f"expected image bytes, got {'empty bytes' if isinstance(df[column][bad].iloc[0], bytes) else 'null or not bytes'}")
            pairs = pd.DataFrame({"prompt": df.prompt, "pos_path": df.pos_image, "neg_path": df.neg_image})
        else:
            _check_cells_not_null(file, image_columns, np.arange(len(df)))
            pairs = pd.DataFrame({"prompt": df.prompt,
                                  "pos_path": [cell_ref(file, i, "pos_image") for i in range(len(df))],
                                  "neg_path": [cell_ref(file, i, "neg_image") for i in range(len(df))]}, index=df.index)
        return PairSource(where, "table", pairs)
    for column in image_columns if check_files else ():
        sizes = df[column].map(lambda path: os.path.getsize(path) if os.path.isfile(path) else -1)
        if (sizes <= 0).any():
            row = (sizes <= 0).values.argmax()
            problem = "no such image file" if sizes.iloc[row] < 0 else "empty (zero-byte) image file"
            raise InputError(f"{where}: row {df.index[row]}, column {column!r}: {problem} {df[column].iloc[row]!r}")
    extra = [c for c in df.columns if c not in TABLE]
    return PairSource(where, "table", df[list(TABLE) + extra])


def _check_cells_not_null(file, columns, rows):
    """Null image cells among `rows`, found from the file's statistics (reading only row groups that have nulls)."""
    parquet = pq.ParquetFile(file)
    start = 0
    for group in range(parquet.num_row_groups):
        meta = parquet.metadata.row_group(group)
        for column in columns:
            stats = meta.column(leaf_index(parquet, column)).statistics
            if stats is not None and stats.has_null_count and stats.null_count == 0:
                continue
            values = parquet.read_row_group(group, columns=[column]).column(0)
            nulls = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False)) + start
            nulls = nulls[np.isin(nulls, rows)]
            if len(nulls):
                raise InputError(f"{file}: row {nulls[0]}, column {column!r}: the image cell is null")
        start += meta.num_rows


def _pickapic(files, schema):
    """Pick-a-Pic shards: a row is (caption, jpg_0, jpg_1, label_0, label_1); ties and unlabeled rows are left out
    of the pairs, and kept in the groups for PickScore's tie-aware metric (unlabeled rows are not)."""
    frames = []
    for file in files:
        names = _schema(file).names if file != files[0] else schema.names
        missing = [c for c in PICKAPIC if c not in names]
        if missing:
            raise InputError(f"{file}: missing column {', '.join(repr(c) for c in missing)} for a Pick-a-Pic shard "
                             f"(has {', '.join(names)})")
        columns = [c for c in (*PICKAPIC[:1], *PICKAPIC[3:], "has_label", "image_0_uid", "image_1_uid") if c in names]
        frame = pq.read_table(file, columns=columns).to_pandas()
        _check_strings(frame, ["caption"], file)
        frame["file"], frame["file_row"] = file, np.arange(len(frame))
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    if len(rows) == 0:
        raise InputError(f"{files[0]}: no rows")
    labelled = rows.has_label.fillna(False).astype(bool) if "has_label" in rows else pd.Series(True, rows.index)
    labelled = (labelled & rows.label_0.notna() & rows.label_1.notna()).values
    tie = labelled & (rows.label_0 == rows.label_1).values
    for file, part in rows[labelled].groupby("file", sort=False):
        _check_cells_not_null(file, ("jpg_0", "jpg_1"), part.file_row.values)
    # an image that appears in several rows (the same uid) is named by its first cell, so it is decoded once
    first = {}
    refs = {}
    for side in ("0", "1"):
        cells = [cell_ref(f, r, f"jpg_{side}") for f, r in zip(rows.file, rows.file_row)]
        uids = rows[f"image_{side}_uid"] if f"image_{side}_uid" in rows else [None] * len(rows)
        refs[side] = np.array([first.setdefault(uid, cell) if isinstance(uid, str) else cell
                               for uid, cell in zip(uids, cells)], dtype=object)
    decided = labelled & ~tie
    zero_wins = (rows.label_0 > rows.label_1).values[decided]
    pos = np.where(zero_wins, refs["0"][decided], refs["1"][decided])
    neg = np.where(zero_wins, refs["1"][decided], refs["0"][decided])
    pairs = pd.DataFrame({"prompt": rows.caption[decided], "pos_path": pos, "neg_path": neg,
                          "entry": rows.index[decided]}, index=rows.index[decided])
    groups = pd.DataFrame({"entry": rows.index[labelled], "prompt": rows.caption[labelled],
                           "images": [list(p) for p in zip(refs["0"][labelled], refs["1"][labelled])],
                           "labels": [list(p) for p in zip(rows.label_0[labelled], rows.label_1[labelled])]})
    parts = [f"{tie.sum()} ties (label_0 == label_1)"] if tie.any() else []
    if (~labelled).any():
        parts.append(f"{(~labelled).sum()} unlabeled (has_label false or no label)")
    left_out = f"left out {len(rows) - len(pairs)} of {len(rows)} rows: {', '.join(parts)}" if parts else None
    if len(pairs) == 0:
        raise InputError(f"{files[0]}: no row with a preferred image ({left_out})")
    return PairSource(files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)", "pickapic", pairs,
                      groups, left_out)


def _ranked_json(file, image_root, check_files):
    """HPD v2 train.json / test.json or ImageReward's test.json: a list of entries, each a prompt with several images
    and their ranks. Each two images whose ranks differ make a pair, the better-ranked one preferred."""
    try:
        with open(file) as f:
            entries = json.load(f)
    except Exception as e:
        raise InputError(f"{file}: not a readable json file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        got = type(entries).__name__ if not isinstance(entries, list) else "an empty list" if not entries else "a list with non-objects"
        raise InputError(f"{file}: expected a list of objects (one per prompt), got {got}")
    keys = set(entries[0])
    layout = next((name for name, pair in RANKED_JSON.items() if set(pair) <= keys), None)
    if layout is None:
        raise InputError(f"{file}: not a layout understood (keys of entry 0: {', '.join(sorted(keys))}); "
                         f"understood: {UNDERSTOOD}")
    images_key, ranks_key = RANKED_JSON[layout]
    if image_root is None:  # HPD's own folders: train.json beside train/, test.json beside test/
        folder = os.path.dirname(file)
        beside = os.path.join(folder, os.path.splitext(os.path.basename(file))[0])
        image_root = beside if os.path.isdir(beside) else folder
    groups, pairs, equal = [], [], 0
    for i, entry in enumerate(entries):
        for key in ("prompt", images_key, ranks_key):
            if key not in entry:
                raise InputError(f"{file}: entry {i} has no key {key!r}")
        prompt, images, ranks = entry["prompt"], entry[images_key], entry[ranks_key]
        if not isinstance(prompt, str):
            raise InputError(f"{file}: entry {i}, key 'prompt': expected a string, got {prompt!r}")
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise InputError(f"{file}: entry {i}, key {images_key!r}: expected a list of image paths")
        if not isinstance(ranks, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranks):
            raise InputError(f"{file}: entry {i}, key {ranks_key!r}: expected a list of numbers")
        if len(images) != len(ranks):
            raise InputError(f"{file}: entry {i}: {len(images)} images in {images_key!r} but {len(ranks)} values in "
                             f"{ranks_key!r}")
        paths = [os.path.join(image_root, p) for p in images]
        for path in paths if check_files else ():
            if not os.path.isfile(path):
                raise InputError(f"{file}: entry {i}, key {images_key!r}: no such image file {path!r} "
                                 f"(under --image_root {image_root})")
        ranks = [1 - r for r in ranks] if layout == "hpdv2_train" else list(ranks)
        groups.append((i, prompt, paths, ranks))
        for a, b in combinations(range(len(paths)), 2):
            if ranks[a] == ranks[b]:
                equal += 1
            else:
                better, worse = (a, b) if ranks[a] < ranks[b] else (b, a)
                pairs.append((prompt, paths[better], paths[worse], i))
    if not pairs:
        raise InputError(f"{file}: no two images with different ranks in any entry")
    pairs = pd.DataFrame(pairs, columns=[*TABLE, "entry"])
    groups = pd.DataFrame(groups, columns=["entry", "prompt", "images", "labels"])
    left_out = f"left out {equal} image pairs with equal ranks" if equal else None
    return PairSource(file, layout, pairs, groups if layout != "hpdv2_train" else None, left_out)
