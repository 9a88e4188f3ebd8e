"""The order of an epoch's training pairs: accelerate's seeded uniform shuffle (the original's), or, for pairs whose
images live in parquet, a shard-aware block order that reads each row group once per epoch.

    order = pair_order(pairs, shuffle=None, window=8, seed=42, batch_size=128, num_processes=1)  # None: uniform
    loader = DataLoader(dataset, batch_size=128, sampler=order)
"""
import numpy as np
import torch
from torch.utils.data import Sampler

from social_reward.data.cells import keep_row_groups, row_groups
from social_reward.errors import InputError


class BlockOrder(Sampler):
    """A shard-aware shuffle of pairs whose images live in parquet: each epoch shuffles the order of the row groups,
    deals them to the processes (each to the one with the fewest pairs so far), and each process shuffles the pairs
    within each window of `window` of its row groups. So each row group is read once per epoch, a process's memory
    holds a window's row groups, and the processes read disjoint row groups.

    `blocks[i]` is pair i's row group (cells.row_groups). Seeded by seed + epoch like accelerate's seedable
    sampler, so a resumed run (set_epoch, then accelerate's skip_first_batches) continues at the exact pair. With
    `num_processes` N > 1 the indices are laid out for accelerate's batch sharding (batch k goes to process k mod N):
    batch j * N + r holds process r's j-th batch, and each process's pairs are padded to the same number of full
    batches with its own first pairs (as accelerate pads a uniform order with the epoch's first pairs).

        order = BlockOrder(row_groups(pairs.pos_path), window=16, seed=42)
        loader = DataLoader(dataset, batch_size=128, sampler=order)   # loader.set_epoch / order.set_epoch(epoch)
    """

    def __init__(self, blocks, window, seed, batch_size=1, num_processes=1):
        self.window, self.seed, self.batch_size, self.num_processes = window, seed, batch_size, num_processes
        blocks = np.asarray(blocks)
        order = np.argsort(blocks, kind="stable")
        self.members = np.split(order, np.flatnonzero(np.diff(blocks[order])) + 1)  # pair positions per row group
        self.epoch, self._cached = 0, (None, None)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def process_orders(self):
        """This epoch's pair positions for each process, in the order that process reads them."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        dealt, counts = [[] for _ in range(self.num_processes)], np.zeros(self.num_processes, dtype=np.int64)
        for block in torch.randperm(len(self.members), generator=generator).tolist():
            process = int(counts.argmin())
            dealt[process].append(block)
            counts[process] += len(self.members[block])
        orders = []
        for blocks in dealt:
            windows = [np.concatenate([self.members[b] for b in blocks[i:i + self.window]])
                       for i in range(0, len(blocks), self.window)]
            orders.append(np.concatenate([w[torch.randperm(len(w), generator=generator).numpy()] for w in windows])
                          if windows else np.empty(0, dtype=np.int64))
        return orders

    def _indices(self):
        if self._cached[0] != self.epoch:
            orders = self.process_orders()
            if self.num_processes > 1:
                batches = -(-max(map(len, orders)) // self.batch_size)
                padded = [np.resize(order, batches * self.batch_size) for order in orders]
                # batch j * N + r is process r's j-th batch
                orders = [np.stack([p.reshape(batches, self.batch_size) for p in padded], 1).reshape(-1)]
            self._cached = (self.epoch, orders[0])
        return self._cached[1]

    def __len__(self):
        return len(self._indices())

    def __iter__(self):
        return iter(self._indices().tolist())


def pair_order(pairs, shuffle, window, seed, batch_size, num_processes):
    """The sampler of a training loader: None (a uniform shuffle, accelerate's seedable sampler: the original's order)
    or a BlockOrder of the pairs' row groups. `shuffle` None picks block for pairs whose images live in parquet
    cells (Pick-a-Pic shards, a pair table with image bytes) and uniform for image files (the original's tables).
    Sets this process's row-group cache (and its DataLoader workers') to hold a window."""
    if shuffle == "uniform":
        return None
    blocks = row_groups(pairs.pos_path)
    if blocks is None:
        if shuffle == "block":
            raise InputError("--shuffle block: the pairs' images are files, not parquet cells; a block order is for "
                             "pairs whose images live in parquet (use --shuffle uniform)")
        return None
    if len(np.unique(blocks)) < num_processes:
        raise InputError(f"--shuffle block: {len(np.unique(blocks))} row groups for {num_processes} processes; each "
                         f"process reads row groups of its own (use --shuffle uniform)")
    keep_row_groups(2 * window)  # two image columns per row group
    return BlockOrder(blocks, window, seed, batch_size, num_processes)
