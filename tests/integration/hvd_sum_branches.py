"""Run under `horovodrun -np 2 --gloo`: both of Horovod 0.28.1's DistributedTrainer normalisation branches, pinned
to a sum by `distributed.sum_in_collective`, all-reduce to the sum and give the same clipped update.

Horovod's constructor (horovod/mxnet/__init__.py) picks the branch with `nccl_built() < 21000`:
  CPU / NCCL < 2.10: _average_in_framework=True,  _scale *= 1/size, _postscale_factor=1.0 (sum in the collective)
  NCCL >= 2.10:      _average_in_framework=False, _scale unchanged, _postscale_factor=1.0 (average in the collective)
Prints one JSON line on rank 0; exits non-zero (assertion) on any mismatch.
"""
import json
import sys

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np

from dist_nmt import distributed
from dist_nmt.config import load_config
from dist_nmt.data import random_batch
from dist_nmt.step import train_step
from dist_nmt.train import build_model_for

TINY = ["model.transformer.d_model=32", "model.transformer.d_ff=64", "model.transformer.num_heads=2",
        "model.transformer.num_enc_layers=1", "model.transformer.num_dec_layers=1",
        "model.transformer.dropout=0", "model.transformer.attention_dropout=0", "optim.clip_norm=0.05"]


def trainer_in_branch(cfg, model, branch: str, pin: bool):
    o = cfg.optim
    trainer = hvd.DistributedTrainer(model.collect_params(), "adam", {"learning_rate": o.lr, "wd": o.weight_decay})
    if branch == "cpu":  # what the constructor does when nccl_built() < 21000 (it already did, on this build)
        trainer._average_in_framework, trainer._scale = True, trainer._optimizer.rescale_grad / hvd.size()
    else:  # NCCL >= 2.10
        trainer._average_in_framework, trainer._scale = False, trainer._optimizer.rescale_grad
    trainer._postscale_factor = 1.0
    if pin:
        distributed.sum_in_collective(trainer)
    return trainer


def reduce_known(model, trainer, rank: int) -> float:
    """Every gradient := rank + 1 on this rank; returns the reduced value (sum over ranks = 1 + 2 = 3 at np=2)."""
    params = [p for p in model.collect_params().values() if p.grad_req != "null"]
    for p in params:
        p.list_grad()[0][:] = rank + 1
    grads = distributed.reduced_grads(trainer)
    values = np.unique(np.concatenate([g.asnumpy().ravel() for g in grads]))
    distributed.zero_grads(grads)
    assert len(values) == 1, values
    return float(values[0])


def main() -> None:
    world = distributed.init_world()
    assert world.size == 2, "run with horovodrun -np 2"
    cfg = load_config("configs/tiny.yaml", TINY)
    batches = [random_batch(8, 7, 9, vocab_size=50, seed=10 * s + world.rank) for s in range(3)]
    result = {}
    for branch in ("cpu", "nccl>=2.10"):
        for pin in (False, True):
            model = build_model_for(cfg, 50, mx.cpu())
            trainer = trainer_in_branch(cfg, model, branch, pin)
            reduced = reduce_known(model, trainer, world.rank)
            norms = []
            for i, batch in enumerate(batches):
                num_tgt = distributed.allreduce_sum(np.array([batch.num_tgt_tokens], np.float64),
                                                    name=f"ntok.{branch}.{pin}.{i}")[0]
                stats = train_step(model, trainer, [batch], mx.cpu(), 1.0, cfg.optim, num_tgt)
                norms.append(stats.grad_norm)
            result[f"{branch}/{'pinned' if pin else 'horovod'}"] = {
                "reduced": reduced, "grad_norms": norms, "digest": distributed.params_digest(model.collect_params())}
    pinned = [result["cpu/pinned"], result["nccl>=2.10/pinned"]]
    assert all(r["reduced"] == 3.0 for r in pinned), result
    assert pinned[0]["grad_norms"] == pinned[1]["grad_norms"], result
    assert min(pinned[0]["grad_norms"]) > cfg.optim.clip_norm, "clipping must be active for this check"
    assert pinned[0]["digest"] == pinned[1]["digest"], "clipped updates differ between Horovod's branches"
    assert result["nccl>=2.10/horovod"]["reduced"] == 1.5, "unpinned NCCL branch should average (control)"
    digests = distributed.allgather_object(pinned[0]["digest"], name="digests")
    assert digests[0] == digests[1], "ranks differ"
    if world.rank == 0:
        print(json.dumps(result))
    distributed.shutdown(barrier=True)


if __name__ == "__main__":
    sys.exit(main())
