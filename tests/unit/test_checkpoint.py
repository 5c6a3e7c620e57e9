"""Atomic checkpoints: round trip of params + optimizer state, corruption detection and fallback, pruning."""
import json

import mxnet as mx
import numpy as np
import pytest

from dist_nmt.checkpoint import Checkpointer, CheckpointError, average_params, load_arrays, load_optimizer_state, verify


def _net_and_trainer():
    mx.random.seed(0)
    net = mx.gluon.nn.Dense(3, in_units=4, prefix="dense_")
    net.initialize(mx.init.Xavier())
    trainer = mx.gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.1}, kvstore=None)
    return net, trainer


def _step(net, trainer, x):
    with mx.autograd.record():
        loss = (net(x) ** 2).sum()
    loss.backward()
    trainer.step(1)


def _save(ckpt, net, trainer, update, **extra):
    return ckpt.save(net, trainer, {"update": update, **extra})


def test_resume_from_checkpoint_continues_identically(tmp_path):
    x = mx.nd.array(np.random.RandomState(0).rand(2, 4))
    net, trainer = _net_and_trainer()
    for _ in range(3):
        _step(net, trainer, x)
    path = _save(Checkpointer(tmp_path, 3), net, trainer, 3)
    _step(net, trainer, x)
    expected = net.weight.data().asnumpy()

    net2, trainer2 = _net_and_trainer()
    net2.load_parameters(str(path / "model.params"))
    arrays, state = load_arrays(path)
    load_optimizer_state(trainer2, arrays, state["optimizer_update_counts"], mx.cpu())
    _step(net2, trainer2, x)
    np.testing.assert_allclose(net2.weight.data().asnumpy(), expected, rtol=0, atol=1e-7)


def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, caplog):
    net, trainer = _net_and_trainer()
    ckpt = Checkpointer(tmp_path, 5)
    first = _save(ckpt, net, trainer, 1)
    second = _save(ckpt, net, trainer, 2)
    params = second / "model.params"
    params.write_bytes(params.read_bytes()[:-10])  # truncated
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        verify(second)
    assert ckpt.latest_good() == first
    assert "skipping corrupt checkpoint" in caplog.text


def test_checkpoint_without_manifest_is_incomplete(tmp_path):
    net, trainer = _net_and_trainer()
    path = _save(Checkpointer(tmp_path, 5), net, trainer, 1)
    (path / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="not completely written"):
        verify(path)


def test_keep_last_prunes_and_best_is_kept(tmp_path):
    net, trainer = _net_and_trainer()
    ckpt = Checkpointer(tmp_path, 2)
    for update in range(1, 5):
        ckpt.save(net, trainer, {"update": update}, is_best=update == 2)
    assert [p.name for p in ckpt.list()] == ["ckpt-00000003", "ckpt-00000004"]
    assert json.loads((ckpt.directory / "best" / "state.json").read_text())["update"] == 2
    assert not list(ckpt.directory.glob(".tmp*"))


def test_average_of_two_checkpoints(tmp_path):
    net, trainer = _net_and_trainer()
    ckpt = Checkpointer(tmp_path, 5)
    a = net.weight.data().asnumpy()
    p1 = _save(ckpt, net, trainer, 1)
    net.weight.set_data(mx.nd.array(a + 2.0))
    p2 = _save(ckpt, net, trainer, 2)
    average_params([p1, p2], tmp_path / "avg.params")
    net.load_parameters(str(tmp_path / "avg.params"))
    np.testing.assert_allclose(net.weight.data().asnumpy(), a + 1.0, atol=1e-6)


def test_corrupt_is_moved_aside_never_deleted(tmp_path):
    net, trainer = _net_and_trainer()
    ckpt = Checkpointer(tmp_path, 5)
    first = _save(ckpt, net, trainer, 1)
    second = _save(ckpt, net, trainer, 2)
    (second / "MANIFEST.json").unlink()
    assert ckpt.latest_good() == first
    aside = list(ckpt.directory.glob("ckpt-00000002.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "model.params").is_file()
    assert ckpt.list() == [first]


def test_best_params_verified_with_fallback_by_recorded_bleu(tmp_path):
    net, trainer = _net_and_trainer()
    ckpt = Checkpointer(tmp_path, 5)
    for update, bleu in ((1, 3.0), (2, 7.0), (3, 7.0)):
        ckpt.save(net, trainer, {"update": update, "progress": {"best_bleu": bleu}}, is_best=update == 2)
    assert ckpt.best_params() == ckpt.directory / "best" / "model.params"
    params = ckpt.directory / "best" / "model.params"
    params.write_bytes(params.read_bytes()[:20])
    assert ckpt.best_params() == ckpt.path(2) / "model.params"  # highest BLEU, the earliest that reached it
    assert list(ckpt.directory.glob("best.corrupt-*")) and not (ckpt.directory / "best").exists()


def test_missing_or_file_checkpoint_is_named_as_such(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        verify(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="a file"):
        verify(tmp_path / "f")
