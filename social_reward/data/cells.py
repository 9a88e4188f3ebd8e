"""Image references: an image is named in a pair table by its file path, by its bytes (a DataFrame with bytes
columns), or by a parquet cell `FILE#ROW/COLUMN`, read when an item loads, a row group's column at a time (never a
whole file). What opens one, names one in a message, and orders many for reading.

    ref = cell_ref("pickapic_v2/data/test-0.parquet", 12, "jpg_0")
    Image.open(image_file(ref)); describe(ref)     # "...test-0.parquet, row 12, column 'jpg_0'"
    order = location_order(refs)                    # cells file by file, row by row
"""
import io
import os
import sys
from collections import OrderedDict

import numpy as np
import pandas as pd
import pyarrow.parquet as pq


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
