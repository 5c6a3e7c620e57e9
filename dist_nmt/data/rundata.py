"""The prepared data one run needs, opened once per rank: vocabulary, encoded splits, this rank's batch streams.

    data = RunData.load(cfg.data, cfg.train, rank=world.rank, world_size=world.size)
    for plan in data.batches_at(epoch, index): batch = data.collate_train(plan)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dist_nmt.config import DataConfig, TrainConfig
from dist_nmt.data.batch import Batch, BatchPlan, collate
from dist_nmt.data.bucketing import ROWS_MULTIPLE, grid_length
from dist_nmt.data.dataset import EncodedSplit, vocab_path
from dist_nmt.data.sharding import BatchStream
from dist_nmt.data.text import read_lines, split_paths
from dist_nmt.data.vocab import Vocab
from dist_nmt.errors import DataError


@dataclass
class RunData:
    """Prepared data a run needs: vocabulary, encoded train/dev splits, this rank's batch streams, dev text.

    The global batch is `data_shards` batches (default: one per rank) of at most `train.max_tokens` each, times
    `train.accum_steps`. Each rank runs `data_shards / world_size` of the shards as extra micro-batches, so a fixed
    `train.data_shards` gives bit-for-bit the same global batches on any world size that divides it (resume a 4-rank
    checkpoint on 2 ranks, or check a 2-rank run against a 1-rank run).
    """

    vocab: Vocab
    train: EncodedSplit
    dev: EncodedSplit
    streams: list[BatchStream]
    dev_batches: list[BatchPlan]
    dev_sources: list[str]
    dev_references: list[str]
    data_shards: int

    @classmethod
    def load(cls, data: DataConfig, train: TrainConfig, rank: int, world_size: int) -> RunData:
        """Open the arrays written by `dist-nmt prepare`; error with the fix if they are missing."""
        prepared = Path(data.prepared_dir)
        if not (prepared / "manifest.json").is_file():
            raise DataError(f"no prepared data in {prepared} (data.prepared_dir); run "
                            f"`dist-nmt prepare --config <your config>` first")
        shards = train.data_shards or world_size
        if shards % world_size:
            raise DataError(f"train.data_shards={shards} must be a multiple of the number of processes "
                            f"({world_size}); use a multiple of {world_size}, or 0 for one shard per rank")
        train_split, dev = EncodedSplit.load(prepared, "train"), EncodedSplit.load(prepared, "dev")
        per_rank = shards // world_size
        streams = [BatchStream(train_split.src_lengths, train_split.tgt_lengths, train.max_tokens, train.seed,
                               rank * per_rank + i, shards) for i in range(per_rank)]
        try:
            dev_stream = BatchStream(dev.src_lengths, dev.tgt_lengths, train.max_tokens, 0, rank, world_size)
        except DataError:
            _dev_does_not_fit(dev, train.max_tokens)
            raise
        src_path, tgt_path = split_paths(data, "dev")
        return cls(Vocab.load(vocab_path(prepared)), train_split, dev, streams, dev_stream.epoch_batches(0),
                   list(read_lines(src_path)), list(read_lines(tgt_path)), shards)

    @property
    def batches_per_epoch(self) -> int:
        """Global steps per epoch (equal on every rank by construction)."""
        return self.streams[0].batches_per_epoch

    def batches_at(self, epoch: int, index: int) -> list[BatchPlan]:
        """This rank's batches (one per local data shard, all of one bucket) at data position (epoch, index)."""
        return [stream.epoch_batches(epoch)[index] for stream in self.streams]

    def collate_train(self, plan: BatchPlan) -> Batch:
        """numpy arrays for one training batch."""
        return collate(self.train, plan)


def _dev_does_not_fit(dev: EncodedSplit, max_tokens: int) -> None:
    """Dev pairs are never dropped, so one too long for a batch of train.max_tokens is named with the real fix."""
    longest = int(max(dev.src_lengths.max(initial=0), dev.tgt_lengths.max(initial=0)))
    needed = int(grid_length(longest + 1)) * ROWS_MULTIPLE
    if needed > max_tokens:
        raise DataError(f"data.dev holds a pair of {longest} subwords, which needs train.max_tokens >= {needed} to be "
                        f"batched (train.max_tokens={max_tokens}); raise train.max_tokens or shorten/remove that "
                        "pair (dev pairs are never dropped, so data.max_len does not apply)")
