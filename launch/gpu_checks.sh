#!/usr/bin/env bash
# The GPU checks of the fused ReLU + LRN + max-pool kernels and of the model's speed, in one
# run on one GPU (made for a lent H200: PyTorch 2.11, Triton 3.6, no DeepSpeed, no DALI; none
# of this needs either):
#
#   bash launch/gpu_checks.sh OUT_DIR        (through the device tool: bash launch/gpu_checks.sh "$OUT")
#
# 1. the kernels' tests compiled on the GPU (tests/fused_cases.py: values and gradients
#    against float64, no host sync, the model taking the fused step);
# 2. `bench model --ranks 1 --baseline` in bf16 and fp32 at batch 256, 128 and 512, each with
#    its per-layer table, written to OUT_DIR/model-<precision>-<batch>.json;
# 3. a summary of the six runs, and torch.profiler's top kernels of a bf16 step at batch 256.
#
# Everything printed also goes to OUT_DIR/gpu_checks.log (7 files in all). The parts run in
# order of value and each has its own time limit, so a hang or a slow part costs only the
# parts after it; expect 6-8 minutes on an H200 (each bench run compiles the eager LRN of its
# per-layer table's comparison rows with torch.compile).
set -uo pipefail
out=${1:?usage: bash launch/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

checks() {
echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== kernel tests, compiled"
timeout 300 $python -m pytest -q -p no:cacheprovider tests/fused_cases.py

for run in bf16:256 fp32:256 bf16:128 bf16:512 fp32:128 fp32:512; do
  precision=${run%:*} batch=${run#*:}
  echo "== bench model --ranks 1 --baseline, $precision, batch $batch"
  timeout 150 $python -m alexnet_dist.bench model --ranks 1 --baseline --steps 20 --warmup 5 \
    --set train.precision="$precision" --set train.micro_batch_size="$batch" --json "$out/model-$precision-$batch.json"
done

echo "== summary"
$python - "$out" <<'EOF'
import json, sys
from pathlib import Path

print("| precision | batch | ours img/s | torchvision img/s | ratio | of matmul peak | relu_lrn_pool error conv1 / grad "
      "| fused conv1 fwd / bwd GB/s (of copy) |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("model-*.json")):
    r = json.loads(path.read_text())
    n = r["numerics"]
    fused = [row for row in r["layers"] if row["layer"] == "conv1" and row["kernel"] == "fused"] or [{}]
    rates = (f"{fused[0]['gbps_forward']:.0f} / {fused[0]['gbps_backward']:.0f} "
             f"({fused[0]['of_copy_bandwidth_forward']:.0%} / {fused[0]['of_copy_bandwidth_backward']:.0%})"
             if fused[0] else "no fused kernel")
    print(f"| {r['precision']} | {r['global_batch']} | {r['images_per_sec']:.0f} | {r['baseline_images_per_sec']:.0f} "
          f"| {r['images_per_sec'] / r['baseline_images_per_sec']:.2f}x | {r['peak_fraction']:.1%} "
          f"| {n['conv1.relu_lrn_pool_rel_error']:.2g} / {n['conv1.relu_lrn_pool_grad_rel_error']:.2g} | {rates} |")
EOF

echo "== torch.profiler: one bf16 step at batch 256, top kernels and the layers' ranges"
timeout 120 $python - <<'EOF'
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from alexnet_dist.model import AlexNet

model = AlexNet(seed=0).cuda().to(torch.bfloat16)
opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (256,), device="cuda")

def step():
    F.cross_entropy(model(x).float(), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

for _ in range(5):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
EOF
echo "== done"
}

checks 2>&1 | tee "$out/gpu_checks.log"
