#!/usr/bin/env bash
# Every GPU check in one run, about 9 minutes on one H100 or H200 (GPU_BUDGET, default 540 s):
#   1. bf16 forward/backward, sampling and the host syncs of a training step of every model
#      (check_device.py);
#   2. the benchmark (bench.py) alone on the GPU, issue 7's target rows first, the least needed
#      ones cut when its share of the time is spent;
#   3. 20 bf16 steps of train.py for every model (each unCLIP part too), sample.py (plain and
#      --compile) on ddpm, ddpm's training and sampling with --channels-last; with UNCLIP_FULL=1,
#      the unCLIP stack with its default steps in bf16 in the background beside them (CLIP took
#      58 s, the prior 11 s and the decoder 84 ms a step on an H200 before the host-sync fixes of
#      2026-11-27);
#   4. --eval-captions (EVAL_N, default 200 after a full run, else 25) and one prompt on the unCLIP
#      run, in bf16.
# Run from the repository root. Results go to $OUT (default /tmp/gpu_out): check.txt, bench.txt,
# bench.json, profiles.txt, smoke.txt, unclip.log and unclip_prompt.png; a summary is printed last.
# diffusers is optional: if .whl/ holds its wheel (see the device tool's notes), it is installed to
# /tmp/site first. It runs on the GPU machine's own torch and Python.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
R=${GPU_RUNS:-/tmp/gpu_runs}; mkdir -p "$R"
BUDGET=${GPU_BUDGET:-540}
BENCH_UNTIL=${BENCH_UNTIL:-200}   # no benchmark case starts after this many seconds of the script
DEV=${GPU_DEVICE:-cuda}
T0=$(date +%s)
since() { echo $(( $(date +%s) - T0 )); }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v "as the 'root' user"
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
status=0

echo "== 1. check_device ($(since) s)"
timeout 120 python3 bench/check_device.py --device "$DEV" ${CHECK_ARGS:-} > "$OUT/check.txt" 2>&1 || status=1
tail -1 "$OUT/check.txt"

echo "== 2. benchmark ($(since) s)"
LEFT=$(( BENCH_UNTIL - $(since) )); [ $LEFT -lt 30 ] && LEFT=30
timeout $(( LEFT + 250 )) python3 bench/bench.py --device "$DEV" --channels-last --budget $LEFT \
  --case-timeout 240 --profile-dir "$OUT" --json "$OUT/bench.json" ${BENCH_ARGS:-} > "$OUT/bench.txt" 2>&1 || status=1
tail -3 "$OUT/bench.txt"

echo "== 3. smoke runs ($(since) s)"
UNCLIP=""
if [ "${UNCLIP_FULL:-0}" = 1 ]; then
  UNCLIP_LEFT=$(( BUDGET - $(since) - 45 )); [ $UNCLIP_LEFT -lt 30 ] && UNCLIP_LEFT=30
  ( timeout $UNCLIP_LEFT python3 train.py unclip --device "$DEV" --precision bf16 \
      --out "$R/unclip" ${UNCLIP_ARGS:-} > "$OUT/unclip.log" 2>&1
    echo "train.py unclip exit $? at $(since) s of the script (limit ${UNCLIP_LEFT} s)" >> "$OUT/unclip.log" ) &
  UNCLIP=$!
  MODELS=$(python3 -c "import train; print(' '.join(m for m in train.MODELS if m != 'unclip'))")
else
  MODELS=$(python3 -c "import train; print(' '.join(train.MODELS))")
fi
export R DEV
echo "$MODELS" | tr ' ' '\n' | xargs -P 3 -I{} sh -c '
  if timeout 150 python3 train.py {} --device "$DEV" --precision bf16 --steps ${SMOKE_STEPS:-20} \
       --log-every 10 --workers 0 --out "$R/{}" --sample-n 8 > "$R/{}.log" 2>&1; then
    echo "{}: train.py ok ($(grep -c "finished" "$R/{}.log") phases)"
  else echo "{}: train.py FAILED: $(tail -1 "$R/{}.log")"; fi' > "$OUT/smoke.txt" 2>&1
for c in "" "--compile"; do
  timeout 90 python3 sample.py "$R/ddpm" --device "$DEV" --precision bf16 -n 64 --steps 25 --eta 0 \
    $c --out "$R/ddpm_ddim25$c.png" >> "$OUT/smoke.txt" 2>&1 || echo "ddpm: sample.py $c FAILED" >> "$OUT/smoke.txt"
done
timeout 90 python3 train.py ddpm --device "$DEV" --precision bf16 --steps ${SMOKE_STEPS:-20} --channels-last \
  --log-every 10 --workers 0 --out "$R/ddpm_cl" --sample-n 8 > "$R/ddpm_cl.log" 2>&1 \
  && timeout 60 python3 sample.py "$R/ddpm_cl" --device "$DEV" --precision bf16 -n 64 --steps 25 --eta 0 \
    --channels-last --out "$R/ddpm_cl_ddim25.png" >> "$OUT/smoke.txt" 2>&1 \
  && echo "ddpm: train.py and sample.py --channels-last ok" >> "$OUT/smoke.txt" \
  || echo "ddpm: --channels-last FAILED: $(tail -1 "$R/ddpm_cl.log")" >> "$OUT/smoke.txt"
grep -q FAILED "$OUT/smoke.txt" && status=1
echo "smoke runs done at $(since) s"
if [ -n "$UNCLIP" ]; then wait $UNCLIP; else
  cp "$R/unclip.log" "$OUT/unclip.log"
  grep -q "unclip: train.py ok" "$OUT/smoke.txt" && echo "train.py unclip exit 0 (20 steps per part)" >> "$OUT/unclip.log"
fi

echo "== 4. unCLIP evaluation ($(since) s)"
if grep -q "exit 0" "$OUT/unclip.log"; then
  timeout 90 python3 sample.py "$R/unclip" --device "$DEV" --precision bf16 --eval-captions ${EVAL_N:-$([ -n "$UNCLIP" ] && echo 200 || echo 25)} \
    --out "$R/unclip_eval.png" >> "$OUT/unclip.log" 2>&1 || status=1
  timeout 45 python3 sample.py "$R/unclip" --device "$DEV" --precision bf16 -n 4 \
    --prompt "a large red circle at the top left" --out "$OUT/unclip_prompt.png" >> "$OUT/unclip.log" 2>&1 || status=1
else
  status=1
fi

echo "== summary ($(since) s)"
echo "-- check_device (bf16 forward/backward, sampling, host syncs per training step)"; cat "$OUT/check.txt"
echo "-- smoke"; cat "$OUT/smoke.txt"
echo "-- unCLIP"; grep -E "finished|done|exit|%|time|wrote|rror|Killed" "$OUT/unclip.log" | tail -25
echo "-- benchmark"; cat "$OUT/bench.txt"
exit $status
