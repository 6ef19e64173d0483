#!/usr/bin/env bash
# Runs atm_jax on a Cloud TPU pod slice: every host runs the same
# `python -m atm_jax.main ... --distributed` (one JAX process per host; JAX reads the
# pod's topology itself), the workdir lives in a gs:// bucket.
#
#   launch/tpu_pod.sh --name atm-v4 --zone us-central2-b --accelerator-type v4-32 \
#       --workdir gs://my-bucket/atm/vit [--config configs/vit.py] [--mesh-task 1] \
#       [--project my-project] [--version tpu-ubuntu2204-base] [--dry-run] [-- MAIN FLAGS]
#
# Steps: 1. reuse the TPU VM NAME if it exists, else create it; 2. copy this checkout
# (git archive of HEAD) to every worker and pip-install it with jax[tpu]; 3. start the
# run on --worker=all. --dry-run prints the commands and runs none of them.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; echo "run launch/tpu_pod.sh --help for the usage" >&2; exit 2; }

name="" zone="" accelerator="" workdir="" config="configs/vit.py" mesh_task=1
project="" version="tpu-ubuntu2204-base" dry_run=0 extra=()
while (($#)); do
  case "$1" in
    --name) name=${2:-}; shift 2 ;;
    --zone) zone=${2:-}; shift 2 ;;
    --accelerator-type) accelerator=${2:-}; shift 2 ;;
    --workdir) workdir=${2:-}; shift 2 ;;
    --config) config=${2:-}; shift 2 ;;
    --mesh-task) mesh_task=${2:-}; shift 2 ;;
    --project) project=${2:-}; shift 2 ;;
    --version) version=${2:-}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ -n $name ]] || die "--name is required (the TPU VM to create or reuse)"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name' must be lowercase letters, digits and '-'"
[[ -n $zone ]] || die "--zone is required (e.g. us-central2-b)"
[[ $accelerator =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "--accelerator-type '$accelerator' must look like v4-32 or v5litepod-16"
[[ $workdir == gs://* ]] || die "--workdir '$workdir' must be a gs:// bucket path: every host writes checkpoints there"
[[ $mesh_task =~ ^[1-9][0-9]*$ ]] || die "--mesh-task '$mesh_task' must be a positive integer"
[[ -f $config ]] || die "--config '$config' is not a file in this checkout"

gcloud_args=(--zone "$zone")
[[ -n $project ]] && gcloud_args+=(--project "$project")
archive=/tmp/atm_jax-$name.tar.gz
install="mkdir -p ~/atm_jax && tar -xzf ~/atm_jax.tar.gz -C ~/atm_jax && cd ~/atm_jax && pip install -q -c constraints.txt -e \".[experiments]\" \"jax[tpu]==0.10.2\""
printf -v main_flags ' %q' "${extra[@]+"${extra[@]}"}"
[[ ${#extra[@]} -eq 0 ]] && main_flags=""
run_main="cd ~/atm_jax && python -m atm_jax.main --config=$config --workdir=$workdir --distributed --config.mesh.task=$mesh_task --config.mesh.data=-1$main_flags"

# Prints a command as it could be pasted into a shell (single quotes where needed).
say() {
  local out="+" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then out+=" $arg"
    else out+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
}
run() { say "$@"; ((dry_run)) || "$@"; }

echo "TPU VM $name ($accelerator) in zone $zone; workers: all hosts of the slice"
echo "mesh: task=$mesh_task, data=-1 (the remaining devices: every chip of the slice)"
if ((dry_run)); then
  echo "# 1. create the TPU VM unless it exists"
  say gcloud compute tpus tpu-vm describe "$name" "${gcloud_args[@]}"
  say gcloud compute tpus tpu-vm create "$name" "${gcloud_args[@]}" --accelerator-type "$accelerator" --version "$version"
elif gcloud compute tpus tpu-vm describe "$name" "${gcloud_args[@]}" >/dev/null 2>&1; then
  echo "# 1. reusing the existing TPU VM $name"
else
  echo "# 1. creating the TPU VM $name"
  run gcloud compute tpus tpu-vm create "$name" "${gcloud_args[@]}" --accelerator-type "$accelerator" --version "$version"
fi
echo "# 2. copy this checkout to every worker and install it"
run git archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/atm_jax.tar.gz" "${gcloud_args[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command "$install"
echo "# 3. run on every worker (one JAX process per host, --distributed)"
run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command "$run_main"
