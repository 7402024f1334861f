"""Train the two-tower AlexNet (Krizhevsky, Sutskever & Hinton 2012).

One machine, no data needed (the embedded demo data set, configs/default.yaml):

    deepspeed --num_gpus 2 train.py                 # one tower per process (two CPU processes without GPUs)
    python train.py                                 # both towers in one process: the single-device reference

A cluster (towers on separate ranks of a node pair, data parallel across pairs):

    deepspeed --hostfile hostfile train.py --config configs/imagenet.yaml --set data.train_dir=/data/train
    mpirun -n 8 python train.py --config configs/imagenet.yaml
    torchrun --nproc-per-node 2 train.py
    sbatch launch/slurm.sbatch --config configs/imagenet.yaml          # requeues itself at the time limit

Nodes that may be lost (the job carries on with the nodes left, then takes them back):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1:4 --nproc-per-node 2 --max-restarts 3 \
        --rdzv-backend c10d --rdzv-endpoint node1:29400 --rdzv-id run1 train.py --set train.global_batch_size=256
    launch/keep_running.sh hostfile -- train.py --set train.global_batch_size=256

Options: --config FILE (YAML), --set key=value (repeatable; e.g. --set train.max_steps=20).
Outputs go to run.dir: metrics.jsonl, config.yaml, checkpoints/. Starting again with the
same run.dir resumes from the newest complete checkpoint, on this layout or any other.
"""

import sys

from alexnet_dist.job import main

if __name__ == "__main__":
    sys.exit(main())
