#!/usr/bin/env bash
# Runs atm_jax on one host with all (or the first N) of its GPUs: one JAX process
# sees every GPU; the config's mesh spreads each batch over them (data axis) and,
# with --mesh-task T > 1, finetunes T tasks at once on disjoint GPU groups.
#
#   launch/gpu_node.sh --workdir DIR [--config configs/vit.py] [--gpus N]
#       [--mesh-task 1] [--install] [--dry-run] [-- MAIN FLAGS]
#
# --gpus N sets CUDA_VISIBLE_DEVICES=0..N-1 (default: every visible GPU);
# --install first pip-installs this checkout with jax[cuda12].
# --dry-run prints the commands and runs none of them.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_node.sh: $*" >&2; echo "run launch/gpu_node.sh --help for the usage" >&2; exit 2; }

workdir="" config="configs/vit.py" gpus="" mesh_task=1 install=0 dry_run=0 extra=()
while (($#)); do
  case "$1" in
    --workdir) workdir=${2:-}; shift 2 ;;
    --config) config=${2:-}; shift 2 ;;
    --gpus) gpus=${2:-}; shift 2 ;;
    --mesh-task) mesh_task=${2:-}; shift 2 ;;
    --install) install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ -n $workdir ]] || die "--workdir is required (a folder or a gs:// path)"
[[ -f ${config%%:*} ]] || die "--config '$config' is not a file in this checkout"
[[ $mesh_task =~ ^[1-9][0-9]*$ ]] || die "--mesh-task '$mesh_task' must be a positive integer"
if [[ -n $gpus ]]; then
  [[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus '$gpus' must be a positive integer"
  ((gpus % mesh_task == 0)) || die "--mesh-task $mesh_task must divide --gpus $gpus"
fi

say() {
  local out="+" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then out+=" $arg"
    else out+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
}
run() { say "$@"; ((dry_run)) || "$@"; }

command=(python -m atm_jax.main "--config=$config" "--workdir=$workdir"
         "--config.mesh.task=$mesh_task" --config.mesh.data=-1 "${extra[@]+"${extra[@]}"}")
if [[ -n $gpus ]]; then
  visible=$(seq -s, 0 $((gpus - 1)))
  command=(env "CUDA_VISIBLE_DEVICES=$visible" "${command[@]}")
  echo "one host, GPUs $visible ($gpus), one JAX process"
else
  echo "one host, every visible GPU, one JAX process"
fi
echo "mesh: task=$mesh_task, data=-1 (the remaining GPUs)"
if ((install)); then
  run pip install -q -c constraints.txt -e ".[experiments]" "jax[cuda12]==0.10.2"
fi
run "${command[@]}"
