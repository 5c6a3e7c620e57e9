"""The optimizer update alone: the trainer's per-tensor Adam against MXNet's multi-tensor AdamW kernel.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/bench_optimizer.py --preset transformer_multi30k \
        --vocab 8000 --steps 50

`trainer`: `dist_nmt.train.make_optimizer` + `distributed.apply_update`, exactly what an update runs (MXNet 1.9.1's
Adam does not aggregate: one `adam_update` call per parameter tensor). `multi_adamw`: `contrib.multi_adamw_update`
in groups of 50 (its kernel's limit) with weight decay 0 and Adam's bias correction folded into the learning rate,
which is Adam's update in exact arithmetic but not in float32: its kernel computes the moments as
`beta * (m - g) + g` instead of `beta * m + (1 - beta) * g`, so weights drift by float rounding. The JSON gives
both times and that drift (max |w_multi - w_trainer| after the timed updates). A decision aid: training does not
use the multi-tensor kernel.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the trainer's process set-up (tcmalloc, threads) before MXNet is imported
    from dist_nmt import environment

    environment.init([__file__, *sys.argv[1:]])

import mxnet as mx
import numpy as np

from dist_nmt import distributed
from dist_nmt.config import load_config
from dist_nmt.train import build_model_for, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
MULTI_ADAMW_MAX_TENSORS = 50  # MultiAdamKernelParam::N in MXNet 1.9.1 src/operator/contrib/adamw-inl.h


def fill_grads(params: list, seed: int) -> None:
    """Deterministic random gradients of mixed magnitudes (token sums over ~4k tokens), marked fresh as a backward
    would (the Trainer refuses stale ones)."""
    rng = np.random.RandomState(seed)
    for p in params:
        p.grad()[:] = rng.randn(*p.shape).astype(np.float32) * 10.0 ** rng.uniform(-2, 2)
        p.data()._fresh_grad = True  # the flag backward sets, on the weight array


def multi_adamw_step(params: list, moments: list, t: int, lr: float, optim, rescale: float) -> None:
    """One Adam update of every tensor through `multi_adamw_update` (wd 0, bias correction in the lr)."""
    lr_t = lr * math.sqrt(1 - optim.beta2 ** t) / (1 - optim.beta1 ** t)
    for start in range(0, len(params), MULTI_ADAMW_MAX_TENSORS):
        group = params[start:start + MULTI_ADAMW_MAX_TENSORS]
        means, variances = zip(*moments[start:start + MULTI_ADAMW_MAX_TENSORS], strict=True)
        weights = [p.data() for p in group]
        n = len(group)
        mx.nd.contrib.multi_adamw_update(weights, [p.grad() for p in group], list(means), list(variances), rescale,
                                         out=weights, lrs=[lr_t] * n, wds=[0.0] * n, etas=[1.0] * n,
                                         beta1=optim.beta1, beta2=optim.beta2, epsilon=optim.epsilon)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="transformer_multi30k", help="configs/models/<name>.yaml")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    distributed.init_world()
    cfg = load_config(ROOT / "configs" / "models" / f"{args.preset}.yaml", ["train.max_updates=1", *args.overrides])
    if cfg.optim.weight_decay:
        raise SystemExit("optim.weight_decay > 0: AdamW's decoupled decay is another algorithm than Adam's L2 term")
    rescale = 1.0 / 4096  # as apply_update divides by the global target-token count
    models = [build_model_for(cfg, args.vocab, mx.cpu()) for _ in range(2)]  # same seed: same initial weights
    lists = [[p for p in m.collect_params().values() if p.grad_req != "null"] for m in models]
    trainer = make_optimizer(cfg, models[0])
    moments = [(mx.nd.zeros(p.shape), mx.nd.zeros(p.shape)) for p in lists[1]]
    times: dict[str, list[float]] = {"trainer": [], "multi_adamw": []}
    for t in range(1, args.steps + 1):
        for params in lists:
            fill_grads(params, seed=t)
        mx.nd.waitall()
        start = time.perf_counter()
        distributed.apply_update(trainer, 1.0 / rescale)
        mx.nd.waitall()
        times["trainer"].append(time.perf_counter() - start)
        start = time.perf_counter()
        multi_adamw_step(lists[1], moments, t, cfg.optim.lr, cfg.optim, rescale)
        mx.nd.waitall()
        times["multi_adamw"].append(time.perf_counter() - start)
    drift = max(float(np.abs(a.data().asnumpy() - b.data().asnumpy()).max()) for a, b in zip(*lists, strict=True))
    result = {"preset": args.preset, "vocab": args.vocab, "tensors": len(lists[0]),
              "parameters": sum(int(np.prod(p.shape)) for p in lists[0]), "steps": args.steps,
              **{f"{name}_ms_best": round(1e3 * min(v), 3) for name, v in times.items()},
              **{f"{name}_ms_median": round(1e3 * statistics.median(v), 3) for name, v in times.items()},
              "max_abs_weight_drift": drift}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
