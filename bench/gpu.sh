#!/usr/bin/env bash
# The GPU check, one prepared script (about 3-5 minutes on one GPU): the default run with the sites and the server
# on CUDA, four simulated sites sharing each GPU, then the DP-SGD step benchmark on the GPU.
#
#     bash bench/gpu.sh            (from a clone, after `make .venv/.fedclinic-installed`)
#
# Prints the run's final table and wall time, then dp_overhead's ratios; exits non-zero if either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch: this script is for a GPU machine"
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF
out=$(mktemp -d)
start=$(date +%s)
"$PY" -m fedclinic.cli simulate --out "$out" --name gpu --quiet \
    --set training.device=cuda --set federation.client-gpus=0.25
echo "default run on CUDA (client-gpus 0.25): $(( $(date +%s) - start )) s wall, run directory $out/gpu"
"$PY" bench/dp_overhead.py --device cuda --repeats 5
