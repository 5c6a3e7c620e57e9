"""Context logic of the GPU path, proven on CPU: a rank on a non-default device (`mx.cpu(1)` stands in for
`gpu(1)`) keeps its optimizer state and step counts on its own device across a checkpoint, and the models create
their constants on the device they run on."""
import mxnet as mx
import numpy as np

from dist_nmt import distributed
from dist_nmt.checkpoint import load_optimizer_state, optimizer_state
from dist_nmt.config import load_config
from dist_nmt.data import random_batch
from dist_nmt.models.transformer import LayerNorm
from dist_nmt.step import train_step
from dist_nmt.train import build_model_for, make_optimizer

TINY = ["model.transformer.d_model=32", "model.transformer.d_ff=64", "model.transformer.num_heads=2",
        "model.transformer.num_enc_layers=1", "model.transformer.num_dec_layers=1",
        "model.transformer.dropout=0", "model.transformer.attention_dropout=0"]
BATCHES = [random_batch(8, 7, 9, vocab_size=50, seed=s) for s in range(5)]


def _setup(ctx, extra=()):
    distributed.init_world()
    cfg = load_config("configs/tiny.yaml", [*TINY, *extra])
    model = build_model_for(cfg, 50, ctx)
    return cfg, model, make_optimizer(cfg, model)


def _steps(cfg, model, trainer, ctx, batches):
    for batch in batches:
        train_step(model, trainer, [batch], ctx, 1.0, cfg.optim, batch.num_tgt_tokens)


def _params(model) -> dict[str, np.ndarray]:
    return {k: v.data().asnumpy() for k, v in model.collect_params().items()}


def test_resume_on_a_nonzero_device_continues_adams_step_count():
    # Rank 0 (device 0) writes the checkpoint; rank 1 (device 1) resumes from it. Restored into device 0's count
    # table, rank 1's Adam would restart its bias correction at t=1 and drift from rank 0.
    cfg, full, trainer = _setup(mx.cpu(1))
    _steps(cfg, full, trainer, mx.cpu(1), BATCHES)

    cfg, saver, saver_trainer = _setup(mx.cpu(0))
    _steps(cfg, saver, saver_trainer, mx.cpu(0), BATCHES[:3])
    arrays, counts = optimizer_state(saver_trainer)
    assert set(counts.values()) == {3}
    _, resumed, resumed_trainer = _setup(mx.cpu(1))
    for name, param in resumed.collect_params().items():
        param.set_data(saver.collect_params()[name].data().as_in_context(mx.cpu(1)))
    load_optimizer_state(resumed_trainer, arrays, counts, mx.cpu(1))
    _steps(cfg, resumed, resumed_trainer, mx.cpu(1), BATCHES[3:])

    assert set(resumed_trainer._optimizer._all_index_update_counts[1].values()) == {5}
    want, got = _params(full), _params(resumed)
    assert all(np.array_equal(want[k], got[k]) for k in want), "resumed rank on device 1 differs"


def test_optimizer_state_is_saved_from_the_cpu_and_restored_on_the_ranks_own_device():
    cfg, model, trainer = _setup(mx.cpu(1))
    _steps(cfg, model, trainer, mx.cpu(1), BATCHES[:2])
    arrays, counts = optimizer_state(trainer)
    assert arrays and {a.context for a in arrays.values()} == {mx.cpu(0)}  # what mx.nd.save records
    assert {s.context for state in trainer._updaters[0].states.values() for s in state} == {mx.cpu(1)}

    _, other, other_trainer = _setup(mx.cpu(2))
    load_optimizer_state(other_trainer, arrays, counts, mx.cpu(2))
    restored = other_trainer._updaters[0].states
    assert restored.keys() == trainer._updaters[0].states.keys()
    assert {s.context for state in restored.values() for s in state} == {mx.cpu(2)}
    _steps(cfg, other, other_trainer, mx.cpu(2), BATCHES[2:3])  # the update runs: every input on one device


def test_imperative_and_hybridized_forward_agree_on_a_nonzero_device(monkeypatch):
    # CPU ops accept inputs from cpu(0) and cpu(1) alike, but a GPU op refuses a cpu(0) input: so record the device
    # of every constant the imperative forward creates. F.ones/F.arange take the *current* context; MXNet 1.9.1's
    # HybridBlock.forward enters the first input's context before hybrid_forward (gluon/block.py), which keeps
    # them there as long as they are made inside a block's forward.
    created = []
    for name in ("ones", "zeros", "arange", "full"):
        def spy(*args, _make=getattr(mx.nd, name), **kwargs):
            out = _make(*args, **kwargs)
            created.append(out.context)
            return out
        monkeypatch.setattr(mx.nd, name, spy)
    batch = BATCHES[0]
    outs = []
    for hybridize in ("false", "true"):
        _, model, _ = _setup(mx.cpu(1), [f"train.hybridize={hybridize}"])
        x = [mx.nd.array(a, ctx=mx.cpu(1), dtype=a.dtype)
             for a in (batch.src, batch.src_valid_len, batch.tgt_in, batch.tgt_valid_len)]
        created.clear()
        logits = model(*x)  # (B, T, V)
        if hybridize == "false":
            assert created and set(created) == {mx.cpu(1)}, f"constants created on {set(created)}"
        assert logits.context == mx.cpu(1)
        outs.append(logits.asnumpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_builtin_layer_norm_computes_the_same_function_with_the_same_parameters():
    x = mx.nd.random.normal(shape=(3, 5, 16), ctx=mx.cpu(1)) * 3 + 1
    gemm, builtin = LayerNorm(16, prefix="ln_", builtin=False), LayerNorm(16, prefix="ln_", builtin=True)
    for norm in (gemm, builtin):
        norm.initialize(ctx=mx.cpu(1))
        norm.gamma.set_data(mx.nd.arange(16, ctx=mx.cpu(1)) / 8)
        norm.beta.set_data(mx.nd.ones(16, ctx=mx.cpu(1)) * 0.5)
    assert list(gemm.collect_params()) == list(builtin.collect_params())  # checkpoints load either way
    np.testing.assert_allclose(gemm(x).asnumpy(), builtin(x).asnumpy(), rtol=1e-4, atol=1e-5)
