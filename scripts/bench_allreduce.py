"""All-reduce time vs message size and link rate on simulated hosts; fits the ring model and prints JSON.

Each "host" is a network namespace behind a Linux bridge (tests/integration/cluster.py), every link shaped to the
given rate (tc netem, or tbf where the kernel has no netem). `horovodrun --gloo` starts one worker per host; each
times `hvd.allreduce_` of fp32 tensors of every size (median of --repeats, after warm-up). Per (hosts, rate) it fits

    t(n) = a + 2 (p - 1) / p * n / B        (ring all-reduce: each worker sends and receives 2(p-1)/p of n bytes)

by least squares, and splits a into a0 + 2 (p - 1) * alpha over the host counts measured (a ring has 2(p-1) steps),
so the model extrapolates to 32 workers. Root only (namespaces). Timings need a quiet machine:

    sudo .venv/bin/python scripts/bench_allreduce.py                                  # full sweep, a few minutes
    sudo .venv/bin/python scripts/bench_allreduce.py --hosts 2 --rates 1gbit --sizes 65536 1048576 --repeats 2
    sudo .venv/bin/python scripts/bench_allreduce.py --rates none 100mbit 1gbit 10gbit \\
        --check-update tiny --check-rate 100mbit                                      # + measured 4-host update

`--check-update PRESET` also trains PRESET on 4 hosts (the tiny config's Multi30k data, no dropout) with the
links unshaped and shaped to --check-rate, and compares the measured increase of the median update time with the
model's prediction for the model's gradient bytes (`prediction_error` = (predicted - measured) / measured in the
JSON; no overlap is assumed, so a positive error means backward hid part of the all-reduce). The tiny model
all-reduces 0.93 MB per update: by the ring arithmetic ≈ 11 ms at 1 Gbit/s, easily lost in the noise of a
few-hundred-ms update, ≈ 110 ms at 100 Mbit/s. `projection` gives the model's all-reduce time per update for
transformer_base and transformer_big at 32 workers, fp32 and fp16 gradients, with tensor fusion.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the simulated cluster lives with the tests (integration/cluster.py)
log = logging.getLogger("bench_allreduce")
DEFAULT_SIZES = [2**k for k in range(12, 27, 2)]  # 4 KiB .. 64 MiB
FUSION_BYTES = 128 * 2**20  # HOROVOD_FUSION_THRESHOLD default: gradients go in buffers of at most this size


def worker(sizes: list[int], repeats: int) -> None:
    """Under horovodrun: time the all-reduce of each size; rank 0 prints one JSON line."""
    from dist_nmt import distributed

    distributed.configure_threads()
    world = distributed.init_world()
    import mxnet as mx

    out = {}
    for size in sizes:
        x = mx.nd.ones((size // 4,), dtype="float32")
        times = []
        for i in range(repeats + 2):
            mx.nd.waitall()
            t0 = time.perf_counter()
            distributed.allreduce_array_(x, name=f"b{size}.{i}").wait_to_read()
            times.append(time.perf_counter() - t0)
        out[size] = statistics.median(times[2:])
    if world.is_primary:
        print("BENCH " + json.dumps({"size": world.size, "seconds": out}), flush=True)
    distributed.shutdown(barrier=True)


def fit(points: list[tuple[int, float]], p: int) -> dict:
    """Least squares t = a + x / B with x = 2(p-1)/p * n; returns a (s), B (bytes/s) and the worst residual."""
    xs = [2 * (p - 1) / p * n for n, _ in points]
    ts = [t for _, t in points]
    mx_, mt = statistics.fmean(xs), statistics.fmean(ts)
    sxx = sum((x - mx_) ** 2 for x in xs)
    slope = sum((x - mx_) * (t - mt) for x, t in zip(xs, ts, strict=True)) / sxx if sxx else float("nan")
    a = mt - slope * mx_
    worst = max(abs(a + slope * x - t) / t for x, t in zip(xs, ts, strict=True))
    # A slope <= 0 (size did not matter at all within the noise) is reported as null: bandwidth not resolved.
    return {"a_s": a, "bandwidth_Bps": 1 / slope if slope > 0 else None, "max_rel_residual": worst}


def ring_seconds(model: dict, p: int, nbytes: float) -> float:
    """Model time of one fused all-reduce of `nbytes` over p workers."""
    a = model["a0_s"] + 2 * (p - 1) * model["alpha_s"]
    bandwidth = model["bandwidth_Bps"]
    return a + (2 * (p - 1) / p * nbytes / bandwidth if bandwidth else 0.0)


def update_comm_seconds(model: dict, p: int, grad_bytes: float) -> float:
    """All-reduce time per update: gradients in fusion buffers of FUSION_BYTES, plus the trainer's 3 small ones."""
    full, rest = divmod(grad_bytes, FUSION_BYTES)
    buffers = [FUSION_BYTES] * int(full) + ([rest] if rest else [])
    return sum(ring_seconds(model, p, b) for b in buffers) + 3 * ring_seconds(model, p, 32)


def sweep(args, cluster_cls) -> dict:
    """Measure every (hosts, rate) pair; returns the raw points and per-pair fits."""
    results = {}
    for hosts in args.hosts:
        with cluster_cls.create(hosts, Path(tempfile.mkdtemp(prefix="bench-ar-"))) as net:
            for rate in args.rates:
                for host in net.hosts:
                    net.shape(host, rate="" if rate == "none" else rate)
                cmd = [*net.exec_in(net.hosts[0]), *net.horovodrun(slots=1), sys.executable, __file__, "--worker",
                       "--repeats", str(args.repeats), "--sizes", *map(str, args.sizes)]
                env = net.env({"OMP_NUM_THREADS": "1", "HOROVOD_CYCLE_TIME": str(args.cycle_ms),
                               "HOROVOD_GLOO_TIMEOUT_SECONDS": "300", "PYTHONPATH": str(ROOT)})
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
                line = next((x for x in proc.stdout.splitlines() if "BENCH " in x), None)
                if proc.returncode or line is None:
                    raise RuntimeError(f"benchmark on {hosts} hosts at {rate} failed:\n{proc.stderr[-3000:]}")
                seconds = {int(k): v for k, v in json.loads(line.split("BENCH ", 1)[1])["seconds"].items()}
                points = sorted(seconds.items())
                results[f"{hosts}x{rate}"] = {"hosts": hosts, "rate": rate, "seconds": seconds,
                                              **fit(points, hosts)}
                log.info("%d hosts at %s: %s", hosts, rate, results[f"{hosts}x{rate}"])
    return results


def models_by_rate(results: dict) -> dict:
    """Per rate: bandwidth (mean over host counts) and a = a0 + 2(p-1) alpha through the measured host counts."""
    out = {}
    for rate in {r["rate"] for r in results.values()}:
        fits = sorted((r["hosts"], r) for r in results.values() if r["rate"] == rate)
        steps = [2 * (p - 1) for p, _ in fits]
        if len(fits) > 1 and steps[-1] != steps[0]:
            alpha = (fits[-1][1]["a_s"] - fits[0][1]["a_s"]) / (steps[-1] - steps[0])
        else:
            alpha = 0.0
        a0 = fits[0][1]["a_s"] - steps[0] * alpha
        resolved = [r["bandwidth_Bps"] for _, r in fits if r["bandwidth_Bps"]]
        out[rate] = {"a0_s": a0, "alpha_s": alpha,
                     "bandwidth_Bps": statistics.fmean(resolved) if resolved else None,
                     "fitted_on_hosts": [p for p, _ in fits]}
    return out


def parameter_bytes(preset: str, vocab_size: int) -> int:
    """fp32 bytes of a preset's parameters (shapes only; nothing is initialised)."""
    from dist_nmt.config import load_config
    from dist_nmt.models import build_model

    cfg = load_config(ROOT / "configs" / "models" / f"{preset}.yaml", ["train.max_updates=1"])
    model = build_model(cfg.model.arch, getattr(cfg.model, cfg.model.arch), vocab_size)
    return 4 * sum(math.prod(p.shape) for p in model.collect_params().values())


def projection(models: dict, workers: int, vocab_size: int) -> dict:
    """Model all-reduce seconds per update at `workers` for base/big, fp32/fp16 gradients, per measured rate."""
    out = {}
    for preset in ("transformer_base", "transformer_big"):
        nbytes = parameter_bytes(preset, vocab_size)
        out[preset] = {"gradient_bytes_fp32": nbytes, **{
            rate: {"fp32_s": update_comm_seconds(m, workers, nbytes), "fp16_s": update_comm_seconds(m, workers,
                                                                                                     nbytes / 2)}
            for rate, m in models.items()}}
    return out


def update_seconds(net, preset: str, run: Path, updates: int) -> tuple[float, int]:
    """Median update time (s) of PRESET trained on every host of `net` (tiny config's data), and its gradient bytes.

    One update is the time between consecutive `train` records (log_every_updates=1); the first two are skipped.
    """
    dump = run / "dump"
    overrides = [f"train.max_updates={updates}", "train.log_every_updates=1", f"train.run_dir={run}",
                 "train.eval_every_updates=100000", "train.save_every_updates=100000", "train.validate_at_end=false",
                 "data.test=", "model.transformer.dropout=0", "model.transformer.attention_dropout=0"]
    if preset != "tiny":
        import yaml

        sizes = yaml.safe_load((ROOT / "configs" / "models" / f"{preset}.yaml").read_text())["model"]["transformer"]
        overrides += [f"model.transformer.{k}={v}" for k, v in sizes.items() if "dropout" not in k]
    cmd = [*net.exec_in(net.hosts[0]), *net.horovodrun(slots=1), sys.executable, "-m", "dist_nmt.train",
           "--config", "configs/tiny.yaml", *overrides]
    env = net.env({"OMP_NUM_THREADS": "1", "HOROVOD_GLOO_TIMEOUT_SECONDS": "300", "DIST_NMT_DUMP_PARAMS": str(dump),
                   "PYTHONPATH": str(ROOT)})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200)
    if proc.returncode:
        raise RuntimeError(f"training {preset} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if r["kind"] == "train"]
    steps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)][1:]
    import mxnet as mx

    grad_bytes = sum(v.size * 4 for v in mx.nd.load(str(dump / "rank0.params")).values())
    return statistics.median(steps), grad_bytes


def check_update(args, cluster_cls, models: dict) -> dict:
    """Measured vs predicted increase of the 4-host update time when the links go from unshaped to --rates[0]."""
    rate = args.check_rate or next(r for r in args.rates if r != "none")
    if rate not in models or "none" not in models:
        raise SystemExit(f"--check-update needs 'none' and {rate!r} among --rates (both are fitted and subtracted)")
    hosts = 4
    # The tiny config's prepared Multi30k (cached: a no-op when data-bin/multi30k-1k exists).
    subprocess.run([sys.executable, "-m", "dist_nmt.cli", "prepare", "--config", "configs/tiny.yaml"], cwd=ROOT,
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    with cluster_cls.create(hosts, Path(tempfile.mkdtemp(prefix="bench-upd-"))) as net:
        base, grad_bytes = update_seconds(net, args.check_update, Path(tempfile.mkdtemp()) / "fast",
                                          args.updates)
        for host in net.hosts:
            net.shape(host, rate=rate)
        shaped, _ = update_seconds(net, args.check_update, Path(tempfile.mkdtemp()) / "shaped", args.updates)
    measured = shaped - base
    predicted = update_comm_seconds(models[rate], hosts, grad_bytes) - update_comm_seconds(models["none"], hosts,
                                                                                          grad_bytes)
    return {"preset": args.check_update, "hosts": hosts, "rate": rate, "gradient_bytes": grad_bytes,
            "update_s_unshaped": base, "update_s_shaped": shaped, "measured_increase_s": measured,
            "predicted_increase_s": predicted, "prediction_error": (predicted - measured) / measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rates", nargs="+", default=["none", "1gbit", "10gbit"],
                        help="tc rates; 'none' = unshaped veth (needed to isolate the link in --check-update)")
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="message sizes in bytes")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cycle-ms", type=float, default=10.0, help="HOROVOD_CYCLE_TIME (the trainer's CPU value)")
    parser.add_argument("--workers", type=int, default=32, help="projection target")
    parser.add_argument("--vocab-size", type=int, default=8000, help="for the projection's gradient bytes")
    parser.add_argument("--check-update", default="", help="preset to train on 4 hosts (tiny, transformer_base)")
    parser.add_argument("--check-rate", default="", help="link rate of the shaped --check-update run (default: the "
                        "first shaped --rates entry); pick one at which the update's all-reduce is well above noise")
    parser.add_argument("--updates", type=int, default=12, help="updates per --check-update run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.sizes, args.repeats)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from integration.cluster import SimCluster, available

    reason = available()
    if reason:
        sys.exit(f"bench_allreduce: {reason}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = sweep(args, SimCluster)
    models = models_by_rate(results)
    report = {"cycle_time_ms": args.cycle_ms, "repeats": args.repeats, "measurements": results,
              "ring_model": models, "projection": {"workers": args.workers,
                                                   **projection(models, args.workers, args.vocab_size)}}
    if args.check_update:
        report["update_check"] = check_update(args, SimCluster, models)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
