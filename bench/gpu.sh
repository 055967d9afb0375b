#!/usr/bin/env bash
# Every GPU check in one run (< 8 minutes on one H100): bf16 forward/backward of every model,
# a few bf16 training steps and sampling through train.py / sample.py, then the benchmark.
# Run from the repository root. diffusers is optional: if .whl/ holds its wheels (see the
# device tool's notes), they are installed to /tmp/site first.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
status=0
echo "== 1. bf16 forward/backward and sampling of every model"
timeout 120 python3 bench/check_device.py --device cuda 2>&1 | tee "$OUT/check.txt" || status=1
echo "== 2. train.py: 30 bf16 steps per phase, then sample.py"
for m in $(python3 -c "import train; print(' '.join(train.MODELS))"); do
  timeout 60 python3 train.py "$m" --device cuda --precision bf16 --steps 30 --log-every 10 \
    --out "/tmp/gpu_runs/$m" --sample-n 8 2>&1 | tail -2 || { echo "$m: train FAILED"; status=1; }
done
timeout 60 python3 sample.py /tmp/gpu_runs/ddpm --device cuda --precision bf16 -n 16 --steps 25 --eta 0 \
  --out "$OUT/ddpm_ddim25.png" || status=1
echo "== 3. benchmark"
timeout 300 python3 bench/bench.py --device cuda --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1
exit $status
