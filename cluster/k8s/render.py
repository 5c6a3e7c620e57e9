"""Render a Kubeflow MPIJob (kubeflow.org/v2beta1) that trains dist_nmt with Horovod; YAML on stdout.

    python cluster/k8s/render.py --workers 4 --slots-per-worker 2 --image registry.example.com/dist-nmt:0.1 \\
        --config configs/multi30k.yaml --pvc nmt-shared train.max_updates=20000 > job.yaml
    python cluster/k8s/validate.py job.yaml && kubectl apply -f job.yaml
    kubectl logs -f job/dist-nmt-launcher          # the launcher's log is the training log

What it builds (mpi-operator v0.8 semantics):
- Worker pods (`--workers`, each with `--slots-per-worker` Horovod processes) run only sshd; the operator writes the
  hostfile and SSH keys. Each worker asks for slots x `--cpus-per-slot` CPUs (and `--gpus-per-slot` GPUs), and every
  process gets OMP_NUM_THREADS = `--cpus-per-slot` (inside a container the trainer cannot see its CPU quota).
- The launcher pod first runs `dist-nmt prepare` in an init container (a no-op when the data is up to date), then
  `mpirun -np <workers x slots>`, which starts `python -m dist_nmt.train` on the workers over SSH. Environment
  reaches the workers only through `mpirun -x NAME`, so it is set on the launcher and forwarded.
- One PersistentVolumeClaim (`--pvc`, ReadWriteMany for more than one node) is mounted at `--mount-path` in every
  pod: raw data (`--data-root`), prepared data, and the run directory with checkpoints. A relaunch with the same
  run directory resumes from its newest checkpoint, so restartPolicy OnFailure + `--backoff-limit` retries resume.
- Deleting the job or evicting the launcher sends SIGTERM to mpirun, which forwards it to every rank; rank 0 then
  checkpoints (odls_base_sigkill_timeout and terminationGracePeriodSeconds leave it `--stop-grace-seconds`).
Extra positional arguments are dotted trainer overrides, passed to both prepare and train.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import PurePosixPath

import yaml

APP_DIR = "/opt/dist_nmt"          # where the Dockerfile installs the checkout
PYTHON = "/opt/venv/bin/python"    # absolute: processes started over SSH do not get the image's PATH
SSH_PORT = 22


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="dist-nmt", help="MPIJob name; pods are <name>-launcher, <name>-worker-<i>")
    p.add_argument("--namespace", help="namespace (default: kubectl's current one)")
    p.add_argument("--workers", type=int, default=2, help="worker pods (default 2)")
    p.add_argument("--slots-per-worker", type=int, default=1, help="Horovod processes per worker pod (default 1)")
    p.add_argument("--image", required=True, help="image built from cluster/k8s/Dockerfile")
    p.add_argument("--image-pull-policy", default="IfNotPresent", choices=["Always", "IfNotPresent", "Never"])
    p.add_argument("--config", default="configs/multi30k.yaml", help="config path inside the image")
    p.add_argument("--pvc", default="dist-nmt-shared", help="PersistentVolumeClaim for data and runs")
    p.add_argument("--mount-path", default="/shared", help="where the PVC is mounted in every pod")
    p.add_argument("--data-root", help="raw corpus on the volume (default <mount>/data/multi30k)")
    p.add_argument("--prepared-dir", help="prepared data on the volume (default <mount>/data-bin/<config name>)")
    p.add_argument("--run-dir", help="run directory on the volume (default <mount>/runs/<name>)")
    p.add_argument("--cpus-per-slot", type=int, default=4, help="CPU cores per Horovod process (default 4)")
    p.add_argument("--memory-per-worker", default="16Gi", help="memory request and limit per worker pod")
    p.add_argument("--gpus-per-slot", type=int, default=0, help="nvidia.com/gpu per Horovod process (default 0)")
    p.add_argument("--launcher-cpu", default="2", help="launcher CPU (it also runs dist-nmt prepare)")
    p.add_argument("--launcher-memory", default="4Gi", help="launcher memory")
    p.add_argument("--network-interface", default="eth0", help="pod NIC for MPI traffic (default eth0)")
    p.add_argument("--restart-policy", default="OnFailure", choices=["OnFailure", "Never"],
                   help="launcher and worker restartPolicy (default OnFailure: relaunch and resume)")
    p.add_argument("--backoff-limit", type=int, default=3, help="launcher restarts before the job fails")
    p.add_argument("--stop-grace-seconds", type=int, default=120,
                   help="time ranks get to checkpoint after SIGTERM before they are killed (default 120)")
    p.add_argument("--stall-check-seconds", type=int, default=60, help="HOROVOD_STALL_CHECK_TIME_SECONDS")
    p.add_argument("--stall-shutdown-seconds", type=int, default=120, help="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")
    p.add_argument("--no-prepare", action="store_true", help="skip the dist-nmt prepare init container")
    p.add_argument("overrides", nargs="*", help="dotted trainer overrides, e.g. train.max_updates=20000")
    args = p.parse_args(argv)
    for flag in ("workers", "slots_per_worker", "cpus_per_slot"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.gpus_per_slot < 0 or args.backoff_limit < 0 or args.stop_grace_seconds < 1:
        p.error("--gpus-per-slot and --backoff-limit must be >= 0, --stop-grace-seconds >= 1")
    return args


def _overrides(args: argparse.Namespace) -> list[str]:
    mount = PurePosixPath(args.mount_path)
    stem = PurePosixPath(args.config).stem
    return [f"data.root={args.data_root or mount / 'data' / 'multi30k'}",
            f"data.prepared_dir={args.prepared_dir or mount / 'data-bin' / stem}",
            f"train.run_dir={args.run_dir or mount / 'runs' / args.name}",
            *args.overrides]


def _env(args: argparse.Namespace) -> list[dict]:
    values = {"OMP_NUM_THREADS": args.cpus_per_slot, "MXNET_CPU_WORKER_NTHREADS": 1,
              "HOROVOD_STALL_CHECK_TIME_SECONDS": args.stall_check_seconds,
              "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": args.stall_shutdown_seconds,
              "HOROVOD_GLOO_TIMEOUT_SECONDS": 300, "PYTHONUNBUFFERED": 1,
              "NCCL_SOCKET_IFNAME": args.network_interface}  # NCCL's bootstrap/socket transport: the MPI NIC
    return [{"name": k, "value": str(v)} for k, v in values.items()]


def mpirun_command(args: argparse.Namespace) -> list[str]:
    """mpirun over the operator's hostfile: -np = workers x slots, env forwarded, ranks given time to checkpoint."""
    nic = args.network_interface
    cmd = ["mpirun", "--allow-run-as-root", "-np", str(args.workers * args.slots_per_worker),
           "-bind-to", "none", "-map-by", "slot", "-wdir", APP_DIR,
           "-mca", "pml", "ob1", "-mca", "btl", "^openib",
           "-mca", "btl_tcp_if_include", nic, "-mca", "oob_tcp_if_include", nic,
           # mpirun forwards SIGTERM to the ranks, then SIGKILLs them after this many seconds (default 1).
           "-mca", "odls_base_sigkill_timeout", str(args.stop_grace_seconds)]
    for env in _env(args):
        cmd += ["-x", env["name"]]
    return [*cmd, PYTHON, "-m", "dist_nmt.train", "--config", args.config, *_overrides(args)]


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict:
    amounts = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _volumes(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "shared", "persistentVolumeClaim": {"claimName": args.pvc}},
               # Open MPI's shared-memory transport needs more than the container default of 64 MiB.
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "shared", "mountPath": args.mount_path}, {"name": "dshm", "mountPath": "/dev/shm"}]
    return volumes, mounts


def launcher(args: argparse.Namespace) -> dict:
    volumes, mounts = _volumes(args)
    command = mpirun_command(args)
    pod: dict = {"terminationGracePeriodSeconds": args.stop_grace_seconds + 30}
    if not args.no_prepare:
        pod["initContainers"] = [{
            "name": "prepare", "image": args.image, "imagePullPolicy": args.image_pull_policy, "workingDir": APP_DIR,
            "command": [PYTHON, "-m", "dist_nmt.cli", "prepare", "--config", args.config, *_overrides(args)],
            "resources": _resources(args.launcher_cpu, args.launcher_memory), "volumeMounts": mounts}]
    pod.update({
        "containers": [{
            "name": "launcher", "image": args.image, "imagePullPolicy": args.image_pull_policy,
            "workingDir": APP_DIR, "command": command[:1], "args": command[1:], "env": _env(args),
            "resources": _resources(args.launcher_cpu, args.launcher_memory), "volumeMounts": mounts}],
        "volumes": volumes})
    return {"replicas": 1, "restartPolicy": args.restart_policy,
            "template": {"metadata": {"labels": {"app.kubernetes.io/name": "dist-nmt", "role": "launcher"}},
                         "spec": pod}}


def worker(args: argparse.Namespace) -> dict:
    volumes, mounts = _volumes(args)
    slots = args.slots_per_worker
    container = {
        "name": "worker", "image": args.image, "imagePullPolicy": args.image_pull_policy,
        "command": ["/usr/sbin/sshd"], "args": ["-De"],  # foreground; mpirun reaches the pod over SSH
        "ports": [{"name": "ssh", "containerPort": SSH_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": SSH_PORT}, "initialDelaySeconds": 2, "periodSeconds": 5},
        "resources": _resources(str(slots * args.cpus_per_slot), args.memory_per_worker, slots * args.gpus_per_slot),
        "volumeMounts": mounts}
    return {"replicas": args.workers, "restartPolicy": args.restart_policy,
            "template": {"metadata": {"labels": {"app.kubernetes.io/name": "dist-nmt", "role": "worker"}},
                         "spec": {"terminationGracePeriodSeconds": args.stop_grace_seconds + 30,
                                  "containers": [container], "volumes": volumes}}}


def manifest(args: argparse.Namespace) -> dict:
    """The MPIJob as a plain dict."""
    metadata = {"name": args.name, **({"namespace": args.namespace} if args.namespace else {}),
                "labels": {"app.kubernetes.io/name": "dist-nmt"}}
    return {
        "apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": metadata,
        "spec": {
            "slotsPerWorker": args.slots_per_worker,
            "mpiImplementation": "OpenMPI",
            "sshAuthMountPath": "/root/.ssh",
            # Start mpirun only once every worker's sshd answers (the readiness probe).
            "launcherCreationPolicy": "WaitForWorkersReady",
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": args.backoff_limit},
            "mpiReplicaSpecs": {"Launcher": launcher(args), "Worker": worker(args)}}}


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-objects out in full instead of as YAML anchors/aliases (&id001 / *id001)."""

    def ignore_aliases(self, data) -> bool:
        return True


def to_yaml(job: dict) -> str:
    """The manifest as block-style YAML, keys in build order."""
    return yaml.dump(job, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=120)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    sys.stdout.write(f"# rendered by: python cluster/k8s/render.py {shown}\n{to_yaml(manifest(args))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
