"""Where pairs come from: the original pair table, and the public preference datasets as they are published.

    source = read_source("validation_data.parquet")                          # prompt, pos_path, neg_path
    source = read_source("pickapic_v2/data/test-*.parquet")                  # Pick-a-Pic shards, images inside
    source = read_source("HPD/test.json", image_root="HPD/test")             # HPD v2: ranked images per prompt
    source = read_source("ImageReward/data/test.json", image_root="ImageReward/data/test_images")
    source.pairs    # prompt, pos_path, neg_path: the pairs to train on and the original's accuracy (no ties)
    source.groups   # for a benchmark: every row's or entry's prompt, images and labels, for its own metric

An image is named in pos_path/neg_path by its file path, by the bytes themselves (a DataFrame with bytes columns),
or by a parquet cell `FILE#ROW/COLUMN`, read when an item loads: a few rows at a time, never a whole file.
"""
import glob
import io
import json
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from clip_model import InputError

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


# ---- images stored in parquet cells ------------------------------------------------------------------------------

def cell_ref(file, row, column):
    return f"{file}#{row}/{column}"


def parse_cell(ref):
    """(file, row, column) of a parquet-cell reference, or None for a path or bytes."""
    if not isinstance(ref, str) or "#" not in ref:
        return None
    file, _, place = ref.rpartition("#")
    row, _, column = place.partition("/")
    return (file, int(row), column) if row.isdigit() and column and file.endswith(".parquet") else None


def describe(ref):
    """An image reference as a person reads it in a message."""
    if isinstance(ref, (bytes, bytearray)):
        return f"<{len(ref)} bytes>"
    cell = parse_cell(ref)
    return f"{cell[0]}, row {cell[1]}, column {cell[2]!r}" if cell else str(ref)


class ParquetCells:
    """Reads single cells of parquet files, one row group's column at a time (the last `keep` kept), so memory holds a
    few row groups' images, never a file's. Rows read in order read each row group once. `bytes_read` counts the
    compressed bytes of the column chunks read (what a read costs the disk)."""

    LARGE = 128 << 20  # a row group's column of more bytes than this is said to cost its size in memory, once

    def __init__(self, keep=4):
        self.files, self.cached, self.keep, self.bytes_read, self.warned = {}, OrderedDict(), keep, 0, set()

    def read(self, file, row, column):
        parquet, starts = self.open(file)
        group = int(np.searchsorted(starts, row, side="right")) - 1
        key = (file, group, column)
        if key not in self.cached:
            chunk = parquet.metadata.row_group(group).column(leaf_index(parquet, column))
            if chunk.total_uncompressed_size > self.LARGE and (file, column) not in self.warned:
                self.warned.add((file, column))
                print(f"{file}: row group {group} holds {chunk.total_uncompressed_size / 2 ** 20:.0f} MB of column "
                      f"{column!r} ({starts[group + 1] - starts[group]} rows), read whole into memory (about 3x "
                      f"that); rewrite it with row_group_size=100 (pandas: to_parquet(..., row_group_size=100)) to "
                      f"read it a hundred rows at a time", file=sys.stderr)
            self.cached[key] = parquet.read_row_group(group, columns=[column]).column(0)
            self.bytes_read += chunk.total_compressed_size
            while len(self.cached) > self.keep:
                self.cached.popitem(last=False)
        self.cached.move_to_end(key)
        return self.cached[key][row - starts[group]].as_py()

    def open(self, file):
        """(ParquetFile, first row of each row group and the row count at the end) of `file`, opened once."""
        if file not in self.files:
            parquet = pq.ParquetFile(file, pre_buffer=False)
            starts = np.cumsum([0] + [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)])
            self.files[file] = (parquet, starts)
        return self.files[file]


def leaf_index(parquet, column):
    """The parquet column (leaf) index of a top-level column: the index a row group's column chunks are numbered by,
    which differs from the Arrow field's where a nested column comes before it."""
    schema = parquet.metadata.schema
    return next(i for i in range(len(schema)) if schema.column(i).path == column)


_cells = (None, None)  # (pid, ParquetCells): a DataLoader worker (a forked process) opens the files itself
_keep = 4  # row-group columns each process keeps (keep_row_groups)


def cells():
    """This process's ParquetCells."""
    global _cells
    if _cells[0] != os.getpid():
        _cells = (os.getpid(), ParquetCells(_keep))
    return _cells[1]


def read_cell(file, row, column):
    return cells().read(file, row, column)


def keep_row_groups(columns):
    """Keep `columns` row-group columns per process (at least the default 4): a block order's window of W row groups
    with two image columns needs 2 W. DataLoader workers forked after this call inherit it."""
    global _keep
    _keep = max(4, columns)
    cells().keep = _keep


def row_groups(refs):
    """The row group of each parquet-cell reference as one integer per ref, numbered across files in the order the
    files first appear; None if any ref is not a parquet cell (a path or bytes)."""
    places = [parse_cell(ref) for ref in refs]
    if not places or any(place is None for place in places):
        return None
    numbered, first = np.empty(len(places), dtype=np.int64), 0
    frame = pd.DataFrame([place[:2] for place in places], columns=["file", "row"])
    for file, part in frame.groupby("file", sort=False):
        starts = cells().open(file)[1]
        numbered[part.index.values] = first + np.searchsorted(starts, part.row.values, side="right") - 1
        first += len(starts) - 1
    return numbered


def image_file(ref):
    """What PIL opens for an image reference: the path, or the bytes (from the DataFrame or the parquet cell)."""
    cell = parse_cell(ref)
    data = read_cell(*cell) if cell else ref
    if isinstance(data, (bytes, bytearray)):
        if not data:
            raise ValueError("empty image bytes")
        return io.BytesIO(data)
    if data is None:
        raise ValueError("null image cell")
    return data


def location_order(refs):
    """Positions of `refs` sorted so that parquet cells are read file by file, row by row (paths keep their order)."""
    keys = [(cell[0], cell[1], cell[2]) if (cell := parse_cell(r)) else ("", i, "") for i, r in enumerate(refs)]
    return sorted(range(len(refs)), key=keys.__getitem__)


# ---- reading a source ------------------------------------------------------------------------------------------

def read_source(source, image_root=None, check_files=True):
    """Read pairs from a DataFrame, a parquet file, several (a list, a glob, a folder), or a benchmark json.

    Raises InputError naming the file, the row or entry, and the column or key. check_files=False leaves missing
    and empty image files of a pair table to data_set.drop_unreadable_pairs (--skip_bad_images).
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


# ---- the benchmarks' own metrics, as their projects compute them ------------------------------------------------

def counted_correct(pos_score, neg_score):
    """Which pairs count as correct: cos(prompt, pos) >= cos(prompt, neg); a tie counts, as in the original."""
    return pos_score >= neg_score


def wilson_interval(successes, n, z=1.96):
    """A proportion successes / n (successes may count halves) and its 95% Wilson score interval: (p, low, high)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, centre - half, centre + half


def pickapic_accuracy(scores, labels, logit_scale, tie_threshold=0.0):
    """PickScore's accuracy (trainer/scripts/eval_preference_predictor.py): per row, p = softmax over the two images
    of logit_scale * score; a tie is predicted when |p1 - p0| <= tie_threshold; credit 1 when the prediction equals the
    label, 0.5 when either is a tie, else 0; the mean over rows. `scores`, `labels`: a (score_0, score_1) and a
    (label_0, label_1) per row."""
    scores = np.asarray(scores, dtype=np.float64) * logit_scale
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    label_0 = np.asarray(labels, dtype=np.float64)[:, 0]
    label = np.where(label_0 == 0.5, -1, np.where(label_0 == 1, 0, 1))  # -1: a tie
    pred = np.where(np.abs(probs[:, 1] - probs[:, 0]) <= tie_threshold, -1, np.where(probs[:, 0] > probs[:, 1], 0, 1))
    credit = np.where(label == pred, 1.0, np.where((label == -1) | (pred == -1), 0.5, 0.0))
    return credit.mean()


def hpd_ranking_accuracy(scores, ranks):
    """HPD v2's ranking accuracy (hpsv2 evaluation.evaluate_rank, inversion_score): per prompt, the images' positions
    by descending score (0 = best; equal scores in listed order) against the annotated ranks:
    1 - discordant pairs / (n(n-1)/2), a pair tied on either side not discordant; the mean over prompts."""
    accuracies = []
    for entry_scores, entry_ranks in zip(scores, ranks):
        order = np.argsort(-np.asarray(entry_scores, dtype=np.float64), kind="stable")
        position = np.empty(len(order))
        position[order] = np.arange(len(order))
        n = len(order)
        discordant = sum(1 for i, j in combinations(range(n), 2)
                         if (position[i] - position[j]) * (entry_ranks[i] - entry_ranks[j]) < 0)
        accuracies.append(1 - discordant / (n * (n - 1) / 2))
    return float(np.mean(accuracies))


def imagereward_accuracy(scores, ranks):
    """ImageReward's accuracy as HPS v2 computes it (calc_ImageReward): per prompt, over the image pairs whose
    annotated ranks differ, the fraction the scores order the same way (equal scores count as wrong); the mean over
    prompts (a prompt whose images all tie has no pair and is left out)."""
    accuracies = []
    for entry_scores, entry_ranks in zip(scores, ranks):
        right = total = 0
        for i, j in combinations(range(len(entry_ranks)), 2):
            if entry_ranks[i] != entry_ranks[j]:
                total += 1
                better, worse = (i, j) if entry_ranks[i] < entry_ranks[j] else (j, i)
                right += entry_scores[better] > entry_scores[worse]
        if total:
            accuracies.append(right / total)
    return float(np.mean(accuracies))


BENCHMARK_METRICS = {"pickapic": "Pick-a-Pic accuracy", "hpdv2_test": "HPD v2 ranking accuracy",
                     "imagereward": "ImageReward accuracy"}


def benchmark_metric(source, group_scores, logit_scale=100.0, tie_threshold=0.0):
    """(name, value) of the source's own benchmark metric from each group's image scores, or None for a pair table."""
    if source.groups is None or source.layout not in BENCHMARK_METRICS:
        return None
    labels = source.groups.labels.tolist()
    if source.layout == "pickapic":
        value = pickapic_accuracy(group_scores, labels, logit_scale, tie_threshold)
    elif source.layout == "hpdv2_test":
        value = hpd_ranking_accuracy(group_scores, labels)
    else:
        value = imagereward_accuracy(group_scores, labels)
    return BENCHMARK_METRICS[source.layout], value
