"""One rank per device id, on CPU: under `horovodrun -np 2` rank r trains on `mx.cpu(r)` (DIST_NMT_CPU_PER_RANK),
which exercises the same per-device optimizer bookkeeping as one GPU per rank. A resumed run must be bit-identical
to the uninterrupted one on both ranks."""
import json

import mxnet as mx
import numpy as np

from support import FAST, LAUNCH, PYTHON, hvd_train, run_cli

CPU_PER_RANK = {"DIST_NMT_CPU_PER_RANK": "1"}
COMMON = [*FAST, "train.log_every_updates=1", "dist.consistency_check_every_updates=2"]


def _load(path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def test_resume_with_one_device_per_rank_is_bit_identical_to_uninterrupted(tmp_path, prepared):
    full, split = tmp_path / "full", tmp_path / "split"
    hvd_train("gloo", [prepared, *COMMON, f"train.run_dir={full}", "train.max_updates=8"],
              env={**CPU_PER_RANK, "DIST_NMT_DUMP_PARAMS": str(full / "dump")})
    hvd_train("gloo", [prepared, *COMMON, f"train.run_dir={split}", "train.max_updates=4"], env=CPU_PER_RANK)
    # Before the fix rank 1 restarted Adam's step count at 1 here and the consistency check aborted at update 6.
    proc = hvd_train("gloo", [prepared, *COMMON, f"train.run_dir={split}", "train.max_updates=8"],
                     env={**CPU_PER_RANK, "DIST_NMT_DUMP_PARAMS": str(split / "dump")})
    assert "resumed from" in proc.stdout + proc.stderr
    for rank in (0, 1):
        want, got = _load(full / "dump" / f"rank{rank}.params"), _load(split / "dump" / f"rank{rank}.params")
        assert want.keys() == got.keys()
        differ = [k for k in want if not np.array_equal(want[k], got[k])]
        assert not differ, f"rank {rank}: resumed parameters differ from uninterrupted: {differ[:5]}"


def test_both_horovod_branches_sum_and_give_the_same_clipped_update():
    proc = run_cli([*LAUNCH["gloo"], PYTHON, "tests/integration/hvd_sum_branches.py"],
                   env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "120"})
    line = [line for line in proc.stdout.splitlines() if '{"cpu/' in line][-1]  # horovodrun prefixes "[0]<stdout>:"
    result = json.loads(line[line.index("{"):])
    assert result["cpu/pinned"]["reduced"] == result["nccl>=2.10/pinned"]["reduced"] == 3.0
    assert result["cpu/pinned"]["digest"] == result["nccl>=2.10/pinned"]["digest"]
    # Unpinned, Horovod's NCCL >= 2.10 branch averages: the norm clipping sees is 1/size of the truth.
    assert result["nccl>=2.10/horovod"]["reduced"] == 1.5
