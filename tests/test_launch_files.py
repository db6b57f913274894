"""The three launch files (cluster.yaml for `ray up`, cluster-slurm.sbatch, cluster-kuberay.yaml): cluster.yaml
against the autoscaler JSON schema shipped inside the installed ray package; the Slurm script's and the RayJob's
commands against the real command-line interfaces (Ray's, and the study's in a dry run)."""

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def schema():
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid(schema, config):
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert types[config["head_node_type"]]["resources"].get("train_driver", 0) >= 1
    text = (ROOT / "cluster.yaml").read_text()
    assert "AKIA" not in text and "aws_secret_access_key" not in text.lower()  # no committed credentials


@pytest.mark.parametrize("breakage", ["fractional_gpu", "unknown_top_level_key", "missing_node_config"])
def test_schema_rejects_broken_variants(schema, config, breakage):
    broken = copy.deepcopy(config)
    if breakage == "fractional_gpu":
        broken["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5
    elif breakage == "unknown_top_level_key":
        broken["min_workers"] = 1
    else:
        del broken["available_node_types"]["gpu_1x"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def dry_run(command: str, tmp_path: Path, values: dict) -> subprocess.CompletedProcess:
    """The study command of a launch file with its shell variables set to ``values`` and --dry-run added: every
    flag must parse and the plan must resolve (a dry run connects to no cluster and writes nothing)."""
    for name, value in values.items():
        command = re.sub(r"\$\{" + name + r"(:-[^}]*)?\}|\$" + name + r"\b", value, command)
    args = shlex.split(command)
    args = args[args.index("tune/run_ablation.py"):]
    assert "$" not in " ".join(args), args
    args = [a if a != "synthetic" else "smoke" for a in args]  # the same flags on the small profile
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:], "--dry-run"], cwd=tmp_path, capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


def test_the_slurm_script_uses_flags_that_ray_and_the_study_accept(tmp_path):
    text = (ROOT / "cluster-slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "cluster-slurm.sbatch")]).returncode == 0
    assert re.search(r"^#SBATCH --nodes=\d+$", text, re.M) and "srun" in text
    joined = text.replace("\\\n", " ")
    symmetric = re.search(r"ray symmetric-run (.*?) -- ", joined).group(1)
    helps = subprocess.run([str(Path(sys.executable).parent / "ray"), "symmetric-run", "--help"], capture_output=True, text=True).stdout
    helps += subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--help"], capture_output=True, text=True).stdout
    for flag in re.findall(r"(--[a-z-]+)", symmetric):
        assert flag in helps, flag
    study = joined[joined.index("python -u tune/run_ablation.py"):].splitlines()[0]
    proc = dry_run(study, tmp_path, {"PROFILE": "smoke", "STORAGE": str(tmp_path / "storage"), "head_ip": "127.0.0.1",
                                     "SLURM_JOB_ID": "1"})
    assert proc.returncode == 0 and "nothing was run" in proc.stdout, proc.stderr[-2000:]
    assert str(tmp_path / "storage" / "cache") in proc.stdout  # the stages are planned under the storage root


def test_the_kuberay_job_is_a_rayjob_whose_study_command_parses(tmp_path):
    job = yaml.safe_load((ROOT / "cluster-kuberay.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay passes them to `ray start` as text
    assert head["rayStartParams"]["num-cpus"] == "0" and "train_driver" in head["rayStartParams"]["resources"]
    for group in [head, *cluster["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": "segsde-storage"}} in container["envFrom"]  # credentials from a Secret, never the file
    gpus = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert isinstance(gpus, int) and gpus >= 1
    command = job["spec"]["entrypoint"].split("&&", 1)[1]
    proc = dry_run(command, tmp_path, {"SEGSDE_STORAGE": str(tmp_path / "storage"), "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"})
    assert proc.returncode == 0 and "nothing was run" in proc.stdout, proc.stderr[-2000:]


def test_every_launch_file_starts_mlflow_with_a_login_and_ray_with_a_token(config):
    """On a shared cluster every user reaches every node's ports: MLflow runs mlflow/serve.sh's basic-auth app and
    every `ray start` has token authentication, the secrets from the environment or a Secret, never the files.
    The head, where the driver and Ray's GCS run, is never spot; the workers may be."""
    slurm = (ROOT / "cluster-slurm.sbatch").read_text()
    assert "MLFLOW_AUTH=1" in slurm and "mlflow/serve.sh" in slurm and "mlflow server" not in slurm
    assert re.search(r"^export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=\"\$\(head -c 32 /dev/urandom", slurm, re.M)
    assert slurm.index("RAY_AUTH_MODE=token") < slurm.index("  ray symmetric-run")  # exported before srun, which hands it on

    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("export RAY_AUTH_MODE=token" in c and "cluster.env" in c for c in starts)
    mlflow = [c for c in config["head_start_ray_commands"] if "serve.sh" in c]
    assert len(mlflow) == 1 and "MLFLOW_AUTH=1" in mlflow[0]
    types = config["available_node_types"]
    assert "InstanceMarketOptions" not in types[config["head_node_type"]]["node_config"]
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in types.values())

    job = yaml.safe_load((ROOT / "cluster-kuberay.yaml").read_text())["spec"]["rayClusterSpec"]
    head = job["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"eks.amazonaws.com/capacityType": "ON_DEMAND"}
    for group in [job["headGroupSpec"], *job["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
        assert {"secretRef": {"name": "segsde-auth"}} in container["envFrom"]
    for text in (slurm, (ROOT / "cluster.yaml").read_text(), (ROOT / "cluster-kuberay.yaml").read_text()):
        assert not re.search(r"(PASSWORD|TOKEN)=[A-Za-z0-9]{8,}", text)  # no secret written into a launch file
