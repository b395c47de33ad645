#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for development:
#   cluster/local_cluster.sh start [WORKER_NODES=2] [CPUS_PER_NODE=2]
#   RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- python jobs/expand_vocab.py
#   cluster/local_cluster.sh stop
# Each node gets at least 2 CPUs: Ray Data pipelines with actor pools can stall on 1-CPU nodes.
set -euo pipefail
cmd=${1:-start}
workers=${2:-2}
cpus=${3:-2}
port=${RAY_PORT:-6379}
case "$cmd" in
  start)
    ray start --head --port="$port" --num-cpus="$cpus" --dashboard-host=127.0.0.1 --dashboard-port=8265
    for _ in $(seq "$workers"); do
      ray start --address="127.0.0.1:$port" --num-cpus="$cpus"
    done
    ray status --address="127.0.0.1:$port"
    ;;
  stop)
    ray stop --force
    ;;
  *)
    echo "usage: $0 start [worker_nodes] [cpus_per_node] | stop" >&2
    exit 2
    ;;
esac
