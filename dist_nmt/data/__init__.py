"""Parallel data: raw text -> joint BPE vocabulary -> encoded arrays -> token-budget batches sharded across ranks.

    from dist_nmt.data import BatchStream, EncodedSplit, Vocab, collate, prepare, vocab_path

    prepare(cfg.data)                                             # primary rank / before launch; no-op if unchanged
    train = EncodedSplit.load(cfg.data.prepared_dir, "train")
    stream = BatchStream(train.src_lengths, train.tgt_lengths, cfg.train.max_tokens, cfg.train.seed,
                         rank=world.rank, num_shards=world.size)
    for epoch, index, plan in stream.iterate(epoch, index):     # index plans (BatchPlan)
        batch = collate(train, plan)                             # Batch: batch.src, batch.tgt_in, ...
    Vocab.load(vocab_path(cfg.data.prepared_dir)).decode(ids)    # detokenized text for BLEU
"""
from dist_nmt.data.batch import (
    Batch,
    BatchPlan,
    PaddingEfficiency,
    collate,
    padding_efficiency,
    plan_padding_efficiency,
    random_batch,
)
from dist_nmt.data.bucketing import ROWS_MULTIPLE, BucketPlan, plan_buckets
from dist_nmt.data.dataset import EncodedSplit, prepare, vocab_path
from dist_nmt.data.rundata import RunData
from dist_nmt.data.sharding import BatchStream, make_global_batches, next_position
from dist_nmt.data.text import DataError, read_lines, split_paths
from dist_nmt.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "ROWS_MULTIPLE", "UNK_ID", "Batch", "BatchPlan", "BatchStream", "BucketPlan",
    "DataError", "EncodedSplit", "PaddingEfficiency", "RunData", "Vocab", "collate", "make_global_batches",
    "next_position", "padding_efficiency", "plan_buckets", "plan_padding_efficiency", "prepare", "random_batch",
    "read_lines", "split_paths", "vocab_path",
]
