#!/usr/bin/env bash
# One node's share of a distllm job: start the launcher that runs NPROC_PER_NODE training
# processes on this node, joined to the other nodes by a rendezvous on MASTER_ADDR:MASTER_PORT.
#
#   node.sh train CONFIG [--section.key=value ...]     (arguments of `python -m distllm`)
#
# train.sbatch runs it once per node (srun --ntasks-per-node=1), possibly inside a container.
# Everything comes from the environment:
#   SLURM_NODEID (or SLURM_PROCID)  this node's rank, 0 .. SLURM_NNODES-1 (set by srun)
#   SLURM_NNODES                    number of nodes (set by Slurm; default 1)
#   MASTER_ADDR, MASTER_PORT        rendezvous: the first node of the allocation (set by train.sbatch)
#   NPROC_PER_NODE                  training processes per node (default: the node's GPUs, else 1)
#   LAUNCHER                        torchrun (default, DDP) or accelerate (any launch/accelerate/*.yaml)
#   ACCELERATE_CONFIG               config file for LAUNCHER=accelerate
#   PYTHON                          interpreter with distllm installed (default: python3 on PATH)
#   SIGNAL_MARKER                   file touched when SIGUSR1 arrives (see forward_signals.sh)
# The launcher runs under forward_signals.sh, so SIGUSR1 reaches every training process.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
nnodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-${SLURM_PROCID:-0}}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
launcher=${LAUNCHER:-torchrun}

if [ "$#" -eq 0 ]; then
    echo "usage: $0 train CONFIG [--section.key=value ...]" >&2
    exit 2
fi

case "$launcher" in
    torchrun)
        cmd=("$python" -m torch.distributed.run
             --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc"
             --master_addr "$master_addr" --master_port "$master_port")
        ;;
    accelerate)
        if [ -z "${ACCELERATE_CONFIG:-}" ]; then
            echo "node.sh: LAUNCHER=accelerate needs ACCELERATE_CONFIG=launch/accelerate/<name>.yaml" >&2
            exit 2
        fi
        cmd=("$python" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG"
             --num_machines "$nnodes" --machine_rank "$node_rank" --num_processes "$((nnodes * nproc))"
             --main_process_ip "$master_addr" --main_process_port "$master_port")
        ;;
    *)
        echo "node.sh: LAUNCHER must be torchrun or accelerate, got '$launcher'" >&2
        exit 2
        ;;
esac

echo "node.sh: $(hostname -s) node ${node_rank}/${nnodes}, ${nproc} process(es), rendezvous ${master_addr}:${master_port}, ${launcher}" >&2
exec "$here/../forward_signals.sh" "${cmd[@]}" -m distllm "$@"
