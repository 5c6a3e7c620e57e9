#!/usr/bin/env bash
# One command for the first GPU machine: build the GPU environment, then for the tiny and Multi30k configs, in fp16
# with dynamic loss scaling, on 1 GPU and on all GPUs of the node (horovodrun -np <gpus>):
#   - ranks bit-identical (every rank dumps its parameters; consistency check every 50 updates),
#   - resume == uninterrupted (UPDATES/2 then resume to UPDATES, bit-identical per rank),
#   - loss-scale trace sane (no skips after the first 10% of updates; final scale >= 1),
#   - tokens/s per GPU, printed as one JSON line per run.
#   bash scripts/gpu_check.sh                 # UPDATES=300 by default; OUT=runs/gpu_check
# Not run here (no GPU on the development machine); see README "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-300}
OUT=${OUT:-runs/gpu_check}
[ "${SKIP_BOOTSTRAP:-0}" = 1 ] || GPU=1 bash scripts/bootstrap.sh
PY=.venv/bin/python
NGPU=$(nvidia-smi -L | grep -c '^GPU')
[ "$NGPU" -ge 1 ] || { echo "gpu_check: no GPU visible (nvidia-smi -L)"; exit 1; }
export HOROVOD_GLOO_TIMEOUT_SECONDS=300 PYTHONPATH=$PWD

run() {  # run CONFIG NP RUN_DIR MAX_UPDATES DUMP_DIR
  local cmd=("$PY" -m dist_nmt.train --config "$1" "train.run_dir=$3" "train.max_updates=$4"
             precision.dtype=fp16 precision.loss_scaling=dynamic train.eval_every_updates=100000
             train.validate_at_end=false data.test= train.save_every_updates=$(( UPDATES / 2 ))
             train.log_every_updates=10 dist.consistency_check_every_updates=50)
  if [ "$2" = 1 ]; then DIST_NMT_DUMP_PARAMS=$5 "${cmd[@]}"
  else DIST_NMT_DUMP_PARAMS=$5 .venv/bin/horovodrun -np "$2" -H "localhost:$2" "${cmd[@]}"; fi
}

for config in configs/tiny.yaml configs/multi30k.yaml; do
  "$PY" -m dist_nmt.cli prepare --config "$config"
  for np in 1 "$NGPU"; do
    name=$(basename "$config" .yaml)-np$np; dir=$OUT/$name
    rm -rf "$dir"
    run "$config" "$np" "$dir/full" "$UPDATES" "$dir/full/dump"
    run "$config" "$np" "$dir/split" $(( UPDATES / 2 )) "$dir/split/dump-half"
    run "$config" "$np" "$dir/split" "$UPDATES" "$dir/split/dump"
    "$PY" - "$dir" "$np" "$name" "$UPDATES" <<'PYEOF'
import json, sys
from pathlib import Path
import mxnet as mx, numpy as np
dir, np_, name, updates = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
load = lambda p: {k: v.asnumpy() for k, v in mx.nd.load(str(p)).items()}
full = [load(dir / "full" / "dump" / f"rank{r}.params") for r in range(np_)]
split = [load(dir / "split" / "dump" / f"rank{r}.params") for r in range(np_)]
same = lambda a, b: a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
records = [json.loads(l) for l in (dir / "full" / "metrics.jsonl").read_text().splitlines()]
train = [r for r in records if r["kind"] == "train"]
late = [r for r in train if r["update"] > updates // 10]
late_skips = late[-1]["skipped"] - late[0]["skipped"] if late else 0
result = {"run": name, "gpus": np_, "updates": updates,
          "ranks_identical": all(same(full[0], f) for f in full),
          "resume_equals_uninterrupted": all(same(f, s) for f, s in zip(full, split)),
          "skipped_total": train[-1]["skipped"], "skipped_after_first_10pct": late_skips,
          "loss_scale_trace": [r["loss_scale"] for r in train][::5], "final_loss": train[-1]["loss"],
          "tokens_per_s_per_gpu": float(np.median([r["tokens_per_s"] for r in train[1:]])) / np_}
result["ok"] = (result["ranks_identical"] and result["resume_equals_uninterrupted"] and late_skips == 0
                and train[-1]["loss_scale"] >= 1)
print(json.dumps(result))
sys.exit(0 if result["ok"] else 1)
PYEOF
  done
done
