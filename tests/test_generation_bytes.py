"""A generations table of image bytes is read a row group at a time, as Pick-a-Pic's shards are, not whole."""
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from social_reward.data import cells as pair_cells
from social_reward.errors import InputError
from social_reward.data.generations import read_generations


def png_bytes(seed):
    buffer = io.BytesIO()
    Image.effect_noise((24, 24), 20 + seed).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def bytes_table(tmp_path):
    images = [png_bytes(i) for i in range(12)]
    table = pa.table({"generator": ["a"] * 6 + ["b"] * 6, "prompt": [f"p{i % 6}" for i in range(12)],
                      "image": pa.array(images, pa.binary())})
    path = str(tmp_path / "generations.parquet")
    pq.write_table(table, path, row_group_size=4)
    return path, images


def test_a_bytes_table_names_its_cells_and_they_read_back_a_row_group_at_a_time(bytes_table):
    path, images = bytes_table
    generations = read_generations([path])
    assert all(pair_cells.parse_cell(ref) for ref in generations.image)  # no bytes held in the table
    cells, before = pair_cells.cells(), pair_cells.cells().bytes_read
    read = [pair_cells.image_file(ref).getvalue() for ref in generations.image]
    assert read == images
    # 3 row groups of 4 images: each row group's image chunk read once, the column once in all
    meta = pq.ParquetFile(path).metadata
    column_once = sum(meta.row_group(g).column(2).total_compressed_size for g in range(meta.num_row_groups))
    assert cells.bytes_read - before == column_once


def test_a_null_image_cell_is_named_by_its_row(tmp_path):
    path = str(tmp_path / "g.parquet")
    pq.write_table(pa.table({"generator": ["a", "a"], "prompt": ["p", "q"],
                             "image": pa.array([png_bytes(0), None], pa.binary())}), path)
    with pytest.raises(InputError, match="row 1, column 'image'"):
        read_generations([path])


def test_a_row_group_too_large_to_hold_is_said_once_with_the_fix(bytes_table, capsys, monkeypatch):
    path, images = bytes_table
    monkeypatch.setattr(pair_cells.ParquetCells, "LARGE", 100)  # each 4-image row group is over it
    cells = pair_cells.ParquetCells()
    assert [cells.read(path, row, "image") for row in range(12)] == images
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "row group 0" in said[0] and "row_group_size=100" in said[0]


def test_cells_after_a_nested_column_count_their_own_column_chunk(tmp_path):
    images = [png_bytes(i) for i in range(4)]
    path = str(tmp_path / "nested.parquet")
    pq.write_table(pa.table({"meta": [{"a": i, "b": "x" * 50_000} for i in range(4)], "generator": ["a"] * 4,
                             "prompt": ["p"] * 4, "image": pa.array(images, pa.binary())}), path)
    cells = pair_cells.ParquetCells()
    assert [cells.read(path, row, "image") for row in range(4)] == images
    image_chunk = pq.ParquetFile(path).metadata.row_group(0).column(4)  # meta.a, meta.b, generator, prompt, image
    assert image_chunk.path_in_schema == "image" and cells.bytes_read == image_chunk.total_compressed_size
