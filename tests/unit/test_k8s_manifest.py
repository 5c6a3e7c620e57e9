"""cluster/k8s: rendered MPIJobs pass the CRD schema (unknown fields rejected) and the operator's rules, and the
validator catches each kind of broken manifest."""
import copy
import importlib.util
import subprocess
import sys

import pytest
import yaml

from support import ROOT

K8S = ROOT / "cluster" / "k8s"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"k8s_{name}", K8S / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render, validate = _load("render"), _load("validate")
SCHEMA = validate.load_schema()


def rendered(*argv: str) -> dict:
    """Render with the CLI's own parser and read the YAML back, as kubectl would."""
    args = render._args(["--image", "registry.example.com/dist-nmt:0.1", *argv])
    return yaml.safe_load(render.to_yaml(render.manifest(args)))


def launcher_container(job: dict) -> dict:
    return job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]


def worker_pod(job: dict) -> dict:
    return job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_rendered_manifest_is_valid_and_consistent(workers: int, slots: int) -> None:
    job = rendered("--workers", str(workers), "--slots-per-worker", str(slots), "--cpus-per-slot", "3",
                   "--config", "configs/multi30k.yaml", "train.max_updates=100")
    assert validate.validate(job, SCHEMA) == []
    assert job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == workers
    assert job["spec"]["slotsPerWorker"] == slots
    assert validate.launcher_np(launcher_container(job)) == [workers * slots]
    # Every pod mounts the same claim at the same path, and the run directory lives on it.
    for rtype in ("Launcher", "Worker"):
        pod = job["spec"]["mpiReplicaSpecs"][rtype]["template"]["spec"]
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "dist-nmt-shared"}} in pod["volumes"]
        assert {"name": "shared", "mountPath": "/shared"} in pod["containers"][0]["volumeMounts"]
    assert "train.run_dir=/shared/runs/dist-nmt" in launcher_container(job)["args"]
    assert "train.max_updates=100" in launcher_container(job)["args"]
    env = {e["name"]: e["value"] for e in launcher_container(job)["env"]}
    assert env["OMP_NUM_THREADS"] == "3"
    assert worker_pod(job)["containers"][0]["resources"]["limits"]["cpu"] == str(3 * slots)


def test_cli_render_pipes_into_validate() -> None:
    rendered_yaml = subprocess.run(
        [sys.executable, str(K8S / "render.py"), "--workers", "4", "--slots-per-worker", "2", "--image", "img:1",
         "--config", "configs/multi30k.yaml", "--namespace", "nmt", "--gpus-per-slot", "1"],
        capture_output=True, text=True, check=True).stdout
    check = subprocess.run([sys.executable, str(K8S / "validate.py"), "-"], input=rendered_yaml,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "nvidia.com/gpu: '2'" in rendered_yaml


def test_cli_validate_exits_1_and_names_the_problem(tmp_path) -> None:
    job = rendered("--workers", "2")
    job["spec"]["slotsPerWorker"] = 2
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    check = subprocess.run([sys.executable, str(K8S / "validate.py"), str(path)], capture_output=True, text=True)
    assert check.returncode == 1
    assert "launcher runs -np 2 but Worker replicas x slotsPerWorker = 2 x 2 = 4" in check.stdout


def test_hand_written_minimal_mpijob_is_valid() -> None:
    """The validator is not tailored to render.py: the operator's pi example shape passes too."""
    job = yaml.safe_load("""
apiVersion: kubeflow.org/v2beta1
kind: MPIJob
metadata: {name: pi}
spec:
  slotsPerWorker: 1
  runPolicy: {cleanPodPolicy: Running, ttlSecondsAfterFinished: 60}
  sshAuthMountPath: /home/mpiuser/.ssh
  mpiReplicaSpecs:
    Launcher:
      replicas: 1
      template:
        spec:
          containers:
          - {name: mpi-launcher, image: mpioperator/mpi-pi:openmpi, command: [mpirun],
             args: [-n, "2", /home/mpiuser/pi], resources: {limits: {cpu: 1, memory: 1Gi}}}
    Worker:
      replicas: 2
      template:
        spec:
          containers:
          - {name: mpi-worker, image: mpioperator/mpi-pi:openmpi, command: [/usr/sbin/sshd], args: [-De]}
""")
    assert validate.validate(job, SCHEMA) == []


def _set(path: str, value):
    """A mutation that sets a dotted path (list indices as numbers) to value; value DELETE removes the key."""
    def mutate(job: dict) -> None:
        *parents, last = path.split(".")
        node = job
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return mutate


DELETE = object()
LAUNCHER = "spec.mpiReplicaSpecs.Launcher"
WORKER = "spec.mpiReplicaSpecs.Worker"
L_CONTAINER = f"{LAUNCHER}.template.spec.containers.0"
W_CONTAINER = f"{WORKER}.template.spec.containers.0"

BROKEN = {
    # unknown fields: the API server would prune these silently
    "unknown container field": (_set(f"{W_CONTAINER}.resourcez", {}), "unknown field; did you mean 'resources'?"),
    "unknown spec field": (_set("spec.slotsPerWorkers", 2), "spec.slotsPerWorkers: unknown field"),
    "unknown metadata field": (_set("metadata.labelz", {}), "metadata.labelz: unknown field"),
    "unknown replica type": (_set("spec.mpiReplicaSpecs.Workers", {"replicas": 1}), "unknown replica type"),
    # -np consistency
    "-np mismatch": (_set(f"{L_CONTAINER}.args.2", "3"), "launcher runs -np 3 but"),
    "slots changed, -np not": (_set("spec.slotsPerWorker", 4), "= 2 x 4 = 8"),
    "workers changed, -np not": (_set(f"{WORKER}.replicas", 3), "= 3 x 1 = 3"),
    "no -np": (_set(f"{L_CONTAINER}.args", ["python", "x.py"]), "no `mpirun -np N`"),
    # launchers
    "two launcher replicas": (_set(f"{LAUNCHER}.replicas", 2), "Launcher.replicas: must be exactly 1, got 2"),
    "no launcher": (_set(LAUNCHER, DELETE), "Launcher: required"),
    # names
    "uppercase name": (_set("metadata.name", "Dist_NMT"), "not a valid DNS-1035 label"),
    "name starts with a digit": (_set("metadata.name", "1nmt"), "not a valid DNS-1035 label"),
    "worker hostname too long": (lambda job: [_set("metadata.name", "n" * 54)(job), _set(f"{WORKER}.replicas", 11)(job),
                                              _set(f"{L_CONTAINER}.args.2", "11")(job)],
                                 "-worker-10', which is not a valid DNS-1035"),  # <name>-launcher still fits
    "bad container name": (_set(f"{W_CONTAINER}.name", "Worker_0"), "not a valid DNS-1123 label"),
    "bad claim name": (_set(f"{WORKER}.template.spec.volumes.0.persistentVolumeClaim.claimName", "My_PVC"),
                       "not a valid DNS-1123 subdomain"),
    # required fields
    "container without name": (_set(f"{W_CONTAINER}.name", DELETE), "containers[0].name: required field is missing"),
    "template without containers": (_set(f"{WORKER}.template.spec.containers", DELETE),
                                    "spec.containers: required field is missing"),
    "volume without claimName": (_set(f"{WORKER}.template.spec.volumes.0.persistentVolumeClaim.claimName", DELETE),
                                 "claimName: required field is missing"),
    "replicas missing": (_set(f"{WORKER}.replicas", DELETE), "Worker.replicas: required field is missing"),
    # types, enums, formats, references
    "replicas as a string": (_set(f"{WORKER}.replicas", "2"), "expected integer, got str"),
    "bad quantity": (_set(f"{W_CONTAINER}.resources.limits.memory", "lots"), "does not match"),
    "bad mpiImplementation": (_set("spec.mpiImplementation", "MVAPICH"), "is not one of"),
    "restartPolicy Always": (_set(f"{WORKER}.restartPolicy", "Always"), "restartPolicy: 'Always' is not one of"),
    "mount of a missing volume": (_set(f"{W_CONTAINER}.volumeMounts.0.name", "data"), "no volume named 'data'"),
    "duplicate container names": (lambda job: job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"][
        "containers"].append(copy.deepcopy(job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"][
            "containers"][0])), "duplicate name"),
    "int32 overflow": (_set("spec.slotsPerWorker", 2**31), "out of int32 range"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validator_reports_broken_manifest(case: str) -> None:
    job = rendered("--workers", "2", "--slots-per-worker", "1")
    mutate, expected = BROKEN[case]
    mutate(job)
    errors = validate.validate(job, SCHEMA)
    assert any(expected in e for e in errors), f"{case}: expected {expected!r} in {errors}"


def test_duplicate_launcher_key_in_yaml_is_rejected() -> None:
    """Two `Launcher:` blocks in one file: plain YAML keeps the second silently; the validator refuses."""
    text = render.to_yaml(rendered("--workers", "2"))
    launcher_block = "    Launcher:\n      replicas: 1\n      template: {spec: {containers: [{name: x, image: y}]}}\n"
    broken = text.replace("  mpiReplicaSpecs:\n", "  mpiReplicaSpecs:\n" + launcher_block, 1)
    errors = validate.validate_text(broken, SCHEMA)
    assert len(errors) == 1 and "duplicate key 'Launcher'" in errors[0]


def test_render_rejects_nonsense_sizes() -> None:
    with pytest.raises(SystemExit):
        render._args(["--image", "x", "--workers", "0"])
