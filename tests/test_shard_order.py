import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from accelerate.data_loader import BatchSamplerShard, skip_first_batches
from conftest import TINY_CLIP
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader

from social_reward.errors import InputError
from social_reward.models.clip import load_model
from social_reward.data.order import BlockOrder, pair_order
from data_set import PromptImagePair
from social_reward.data.cells import cells, row_groups
from social_reward.data.sources import read_source

# row groups of unequal sizes, as the last group of each shard is
BLOCKS = np.repeat(np.arange(9), [5, 5, 5, 5, 3, 5, 5, 5, 2])


def tiny_jpeg(i):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_shard(path, first, rows, row_group_size):
    """A Pick-a-Pic-layout shard of `rows` decided rows, each with two images of its own."""
    index = range(first, first + rows)
    pq.write_table(pa.table({
        "caption": [f"prompt {i}" for i in index], "has_label": [True] * rows,
        "image_0_uid": [f"{i}_0" for i in index], "image_1_uid": [f"{i}_1" for i in index],
        "jpg_0": pa.array([tiny_jpeg(2 * i) for i in index], pa.binary()),
        "jpg_1": pa.array([tiny_jpeg(2 * i + 1) for i in index], pa.binary()),
        "label_0": [float(i % 2) for i in index], "label_1": [1.0 - i % 2 for i in index]}),
        path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def shards(tmp_path):
    """Two shards: 10 rows in row groups of 4 (4, 4, 2), then 7 rows in row groups of 3 (3, 3, 1)."""
    return [write_shard(tmp_path / "train-0.parquet", 0, 10, 4), write_shard(tmp_path / "train-1.parquet", 10, 7, 3)]


def test_row_groups_number_each_pairs_row_group_across_files(shards):
    pairs = read_source(shards).pairs
    assert row_groups(pairs.pos_path).tolist() == [0] * 4 + [1] * 4 + [2] * 2 + [3] * 3 + [4] * 3 + [5]
    assert row_groups(["a.png", "b.png"]) is None


def test_block_order_visits_every_pair_once_and_holds_at_most_a_window_of_row_groups_open():
    for window in (1, 2, 3):
        order = np.array(list(BlockOrder(BLOCKS, window, seed=0)))
        assert sorted(order.tolist()) == list(range(len(BLOCKS)))
        blocks = BLOCKS[order]
        first = {b: np.flatnonzero(blocks == b)[0] for b in set(blocks)}
        last = {b: np.flatnonzero(blocks == b)[-1] for b in set(blocks)}
        open_blocks = [sum(first[b] <= i <= last[b] for b in first) for i in range(len(order))]
        # never more than a window of row groups read and not yet done; within a window the pairs are mixed
        assert max(open_blocks) <= window and (max(open_blocks) > 1) == (window > 1)


def test_block_order_differs_per_epoch_and_per_seed_and_repeats_for_the_same_ones():
    order = BlockOrder(BLOCKS, 2, seed=0)
    epoch_0 = list(order)
    order.set_epoch(1)
    epoch_1 = list(order)
    order.set_epoch(0)
    assert list(order) == epoch_0 != epoch_1
    assert list(BlockOrder(BLOCKS, 2, seed=1)) != epoch_0
    assert sorted(epoch_1) == sorted(epoch_0)


def test_a_loader_resumed_with_skip_first_batches_continues_at_the_exact_pair():
    loader = DataLoader(range(len(BLOCKS)), batch_size=4, sampler=BlockOrder(BLOCKS, 2, seed=3))
    loader.sampler.set_epoch(5)
    whole = [batch.tolist() for batch in loader]
    resumed_loader = DataLoader(range(len(BLOCKS)), batch_size=4, sampler=BlockOrder(BLOCKS, 2, seed=3))
    resumed_loader.sampler.set_epoch(5)
    resumed = [batch.tolist() for batch in skip_first_batches(resumed_loader, 4)]
    assert resumed == whole[4:]


def test_two_processes_read_disjoint_row_groups_in_full_batches_and_cover_the_epoch():
    order = BlockOrder(BLOCKS, 2, seed=0, batch_size=4, num_processes=2)
    order.set_epoch(1)
    per_process = []
    for rank in (0, 1):  # the batches accelerate's sharding hands each process
        batches = list(BatchSamplerShard(BatchSampler(order, 4, drop_last=False), num_processes=2, process_index=rank))
        assert all(len(batch) == 4 for batch in batches)
        per_process.append(batches)
    assert len(per_process[0]) == len(per_process[1])
    seen = [set(np.concatenate(batches).tolist()) for batches in per_process]
    assert set(BLOCKS[list(seen[0])]).isdisjoint(BLOCKS[list(seen[1])])
    assert seen[0] | seen[1] == set(range(len(BLOCKS)))
    # padding repeats a process's own first pairs only to fill its last batch
    assert sum(map(len, seen)) == len(BLOCKS)
    assert len(np.concatenate(per_process[0] + per_process[1])) - len(BLOCKS) < 2 * 4 + 5


def test_an_epoch_in_block_order_reads_each_row_group_once(shards):
    source = read_source(shards)
    preprocess, tokenizer = load_model(TINY_CLIP, pretrained="none")[1:]
    order = pair_order(source.pairs, None, 2, seed=0, batch_size=4, num_processes=1)
    assert isinstance(order, BlockOrder)
    reader = cells()
    before = reader.bytes_read
    for _ in DataLoader(PromptImagePair(source, preprocess, tokenizer), batch_size=4, sampler=order):
        pass
    every_group = sum(pq.ParquetFile(f).metadata.row_group(g).column(i).total_compressed_size
                      for f in shards for g in range(pq.ParquetFile(f).num_row_groups) for i in (4, 5))
    assert reader.bytes_read - before == every_group


def test_image_files_keep_the_uniform_shuffle_and_refuse_a_block_order(shapes_pairs):
    assert pair_order(shapes_pairs, None, 16, 0, 4, 1) is None
    assert pair_order(read_source(shapes_pairs).pairs, "uniform", 16, 0, 4, 1) is None
    with pytest.raises(InputError, match="--shuffle block"):
        pair_order(shapes_pairs, "block", 16, 0, 4, 1)


def test_a_block_order_needs_a_row_group_for_each_process(shards):
    pairs = read_source(shards[1]).pairs  # 3 row groups
    assert isinstance(pair_order(pairs, "block", 2, 0, 4, 3), BlockOrder)
    with pytest.raises(InputError, match="3 row groups for 4 processes"):
        pair_order(pairs, "block", 2, 0, 4, 4)
