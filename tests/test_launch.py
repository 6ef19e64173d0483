"""launch/: every script is shellcheck-clean, validates its arguments and, with
--dry-run, prints exactly the commands it would run (and runs nothing: no gcloud,
srun or GPU exists here, so a script that ran anything would fail)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_the_three_scripts_exist():
    assert SCRIPTS == ["gpu_node.sh", "slurm.sbatch", "tpu_pod.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, 'shellcheck is missing: pip install -c constraints.txt -e ".[test]"'
    done = subprocess.run([shellcheck, "--shell=bash", str(LAUNCH / script)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_tpu_pod_dry_run_prints_every_step():
    archive = pathlib.Path("/tmp/atm_jax-atm-v4.tar.gz")
    archive.unlink(missing_ok=True)
    done = launch("launch/tpu_pod.sh", "--name", "atm-v4", "--zone", "us-central2-b",
                  "--accelerator-type", "v4-32", "--workdir", "gs://bucket/atm/vit",
                  "--mesh-task", "2", "--dry-run", "--", "--config.seed=1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["TPU VM atm-v4 (v4-32) in zone us-central2-b; workers: all hosts of the "
                         "slice", "mesh: task=2, data=-1 (the remaining devices: every chip of the "
                         "slice)"]
    commands = [line for line in lines if line.startswith("+ ")]
    assert commands == [
        "+ gcloud compute tpus tpu-vm describe atm-v4 --zone us-central2-b",
        "+ gcloud compute tpus tpu-vm create atm-v4 --zone us-central2-b --accelerator-type v4-32 "
        "--version tpu-ubuntu2204-base",
        "+ git archive --format=tar.gz -o /tmp/atm_jax-atm-v4.tar.gz HEAD",
        "+ gcloud compute tpus tpu-vm scp /tmp/atm_jax-atm-v4.tar.gz atm-v4:~/atm_jax.tar.gz "
        "--zone us-central2-b --worker=all",
        "+ gcloud compute tpus tpu-vm ssh atm-v4 --zone us-central2-b --worker=all --command "
        "'mkdir -p ~/atm_jax && tar -xzf ~/atm_jax.tar.gz -C ~/atm_jax && cd ~/atm_jax && pip "
        "install -q -c constraints.txt -e \".[experiments]\" \"jax[tpu]==0.10.2\"'",
        "+ gcloud compute tpus tpu-vm ssh atm-v4 --zone us-central2-b --worker=all --command "
        "'cd ~/atm_jax && python -m atm_jax.main --config=configs/vit.py "
        "--workdir=gs://bucket/atm/vit --distributed --config.mesh.task=2 --config.mesh.data=-1 "
        "--config.seed=1'",
    ]
    assert not archive.exists(), "--dry-run ran git archive"
    assert done.stderr == ""


def test_gpu_node_dry_run():
    done = launch("launch/gpu_node.sh", "--workdir", "/data/atm", "--gpus", "8", "--mesh-task",
                  "2", "--install", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "one host, GPUs 0,1,2,3,4,5,6,7 (8), one JAX process",
        "mesh: task=2, data=-1 (the remaining GPUs)",
        "+ pip install -q -c constraints.txt -e '.[experiments]' 'jax[cuda12]==0.10.2'",
        "+ env CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 python -m atm_jax.main --config=configs/vit.py "
        "--workdir=/data/atm --config.mesh.task=2 --config.mesh.data=-1",
    ]


def test_slurm_dry_run():
    done = launch("launch/slurm.sbatch", "--dry-run", "--workdir", "/shared/atm", "--config",
                  "configs/roberta.py", "--", "--config.seed=3",
                  env={"SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_PER_NODE": "8"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "SLURM: 4 node(s) x 8 GPU(s), one JAX process per node (--distributed)",
        "mesh: task=1, data=-1 (the remaining GPUs of all nodes)",
        "+ srun --ntasks-per-node=1 python -m atm_jax.main --config=configs/roberta.py "
        "--workdir=/shared/atm --distributed --config.mesh.task=1 --config.mesh.data=-1 "
        "--config.seed=3",
    ]
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text


@pytest.mark.parametrize("args,message", [
    (["launch/tpu_pod.sh", "--zone", "z", "--accelerator-type", "v4-32", "--workdir", "gs://b"],
     "--name is required"),
    (["launch/tpu_pod.sh", "--name", "a", "--zone", "z", "--accelerator-type", "v4",
      "--workdir", "gs://b"], "--accelerator-type 'v4' must look like v4-32"),
    (["launch/tpu_pod.sh", "--name", "a", "--zone", "z", "--accelerator-type", "v4-8",
      "--workdir", "/local"], "--workdir '/local' must be a gs:// bucket path"),
    (["launch/tpu_pod.sh", "--bogus"], "unknown argument '--bogus'"),
    (["launch/gpu_node.sh", "--workdir", "w", "--gpus", "6", "--mesh-task", "4"],
     "--mesh-task 4 must divide --gpus 6"),
    (["launch/gpu_node.sh", "--gpus", "2"], "--workdir is required"),
    (["launch/gpu_node.sh", "--workdir", "w", "--config", "nope.py"], "'nope.py' is not a file"),
    (["launch/slurm.sbatch", "--workdir", "w"], "not inside a SLURM job"),
    (["launch/slurm.sbatch", "--workdir", "w", "--mesh-task", "0", "--dry-run"],
     "--mesh-task '0' must be a positive integer"),
])
def test_bad_arguments_are_refused_with_the_fix(args, message):
    done = launch(*args, env={"SLURM_JOB_ID": ""})
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""
