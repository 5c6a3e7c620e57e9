"""The one training step: the benchmarks run the trainer's own step, and the Horovod seam pins one convention."""
import importlib.util
import subprocess
import sys

import mxnet as mx
import numpy as np

from dist_nmt import distributed
from dist_nmt.config import load_config
from dist_nmt.data import random_batch
from dist_nmt.step import train_step
from dist_nmt.train import build_model_for, make_optimizer, uses_fused_ops
from support import ROOT

TINY = ["model.transformer.d_model=32", "model.transformer.d_ff=64", "model.transformer.num_heads=2",
        "model.transformer.num_enc_layers=1", "model.transformer.num_dec_layers=1"]


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _params(model) -> dict[str, np.ndarray]:
    return {k: v.data().asnumpy() for k, v in model.collect_params().items()}


def test_config_and_data_import_without_mxnet():
    code = ("import sys, dist_nmt.config, dist_nmt.data, dist_nmt.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith('mxnet')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_benchmark_step_is_the_trainer_step():
    distributed.init_world()
    bench = _load_bench("bench_train")
    cfg = bench.preset_config("tiny", tuple(TINY))
    batch = random_batch(8, 7, 9, vocab_size=50, seed=3)
    bench_model = build_model_for(cfg, 50, mx.cpu())
    step = bench.trainer_step(cfg, bench_model, batch)
    for _ in range(3):
        step()
    model = build_model_for(cfg, 50, mx.cpu())
    trainer = make_optimizer(cfg, model)
    for _ in range(3):  # the loss path the trainer picks (fused when the library loads)
        train_step(model, trainer, [batch], mx.cpu(), 1.0, cfg.optim, batch.num_tgt_tokens,
                   uses_fused_ops(cfg, mx.cpu()))
    got, want = _params(bench_model), _params(model)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert any(not np.array_equal(want[k], v) for k, v in _params(build_model_for(cfg, 50, mx.cpu())).items())


def test_horovod_normalisation_is_pinned_to_a_sum_in_both_branches():
    distributed.init_world()
    cfg = load_config("configs/tiny.yaml", TINY)
    for average_in_framework, scale in ((True, 1 / 8), (False, 1.0)):  # CPU/old NCCL (size 8) vs NCCL >= 2.10
        trainer = make_optimizer(cfg, build_model_for(cfg, 50, mx.cpu()))
        trainer._average_in_framework, trainer._scale, trainer._postscale_factor = average_in_framework, scale, 1.0
        distributed.sum_in_collective(trainer)
        assert (trainer._average_in_framework, trainer._scale, trainer._postscale_factor) == (True, 1.0, 1.0)
