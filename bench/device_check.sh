#!/usr/bin/env bash
# One device check of igscale's GPU path, in a single call on one H100/H200 (about 8 minutes at most):
#   1. installs the carried wheels (.whl/, staged here by bench/fetch_device_wheels.sh) into /tmp/igsite;
#   2. runs the CUDA-marked tests (fast path vs eager, attention backends, batch invariance, nccl collectives);
#   3. writes a random SiT-XL/2 latent set with the project's shard writer (bench/device_latents.py);
#   4. runs the real `igscale train` (SiT-XL/2+IG, ~50 steps, checkpoint + sample grid) and resumes it once;
#   5. runs `igscale sample` (a few hundred images, published preset, random-weight SD-VAE) from that export;
#   6. runs bench/bench_gpu.py (trainer vs eager reference, MFU, memory, sampling modes);
#   7. writes $OUT/summary.json (every stage's exit code and seconds, losses, resume line) and $OUT/check.log.
# Device call: run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540).
# CPU smoke (in the test suite, so the script cannot rot): DEVICE_CHECK_SMOKE=1 OUT=/tmp/x bash bench/device_check.sh
# Every stage runs under its own time cap inside an overall deadline (DEADLINE_S); a failed stage does not stop
# the later ones; the exit code is non-zero if any stage failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE="${DEVICE_CHECK_SMOKE:-0}"
OUT="${OUT:-$ROOT/device_check_out}"
WORK="${WORK:-$(mktemp -d /tmp/igscale_check.XXXXXX)}"
PY="${PYTHON:-python3}"
DEADLINE_S="${DEADLINE_S:-480}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/check.log"
STAGES="$WORK/stages.tsv"
: >"$LOG"
: >"$STAGES"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "[device_check $(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

# stage NAME CAP_SECONDS CMD...: run under min(CAP, time left), log, record rc and seconds
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE_S - ($(date +%s) - T0)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then
    say "$name: skipped (deadline)"
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >>"$STAGES"
    return 1
  fi
  say "$name: start (limit ${limit}s): $*"
  local s rc
  s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - s))" >>"$STAGES"
  say "$name: rc=$rc in $(($(date +%s) - s))s"
  return $rc
}

if [ "$SMOKE" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  CONFIG=configs/tiny_cpu.yaml
  LAT=(--num 64 --shape 4,8,8 --per-shard 16 --num-classes 10 --mode sample_flip --dtype float32)
  TRAIN=(train.global_batch=8 train.total_steps=6 checkpoint.every_steps=3 sample.every_steps=3 logging.every_steps=1
         model.compile=blocks model.compile_backend=aot_eager data.num_workers=0)
  RESUME_STEPS=8
  VAE_CH="32,32,32,32"
  SAMPLE=(--num-samples 16 --chunk-size 8 --batch-size 8 --num-steps 2)
  BENCH=(--device cpu --tiny --models SiT-XL/2 --batches 2 --skip maxbatch,sampling,vae,scaling)
  CAP_TRAIN=150
  CAP_BENCH=150
else
  if compgen -G ".whl/*.whl" >/dev/null; then
    stage wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/igsite .whl/*.whl
    export PYTHONPATH="$ROOT:/tmp/igsite"
  else
    say "no .whl/ folder: using the packages already installed (run bench/fetch_device_wheels.sh and carry .whl)"
  fi
  CONFIG=configs/sit_xl2_ig.yaml
  LAT=(--num 4096 --shape 4,32,32 --per-shard 1024 --num-classes 1000 --mode mean_std --dtype bfloat16)
  TRAIN=(train.global_batch="${TRAIN_BATCH:-128}" train.total_steps=50 checkpoint.every_steps=50
         sample.every_steps=50 logging.every_steps=5 data.num_workers=2)
  RESUME_STEPS=60
  VAE_CH="128,256,512,512"
  SAMPLE=(--num-samples 256 --chunk-size 128 --batch-size 128 --num-steps 50)
  # the largest-batch search recompiles per size (1-2 min): opt in with BENCH_ARGS=""
  read -r -a BENCH <<<"${BENCH_ARGS---skip maxbatch}"
  CAP_TRAIN=170
  CAP_BENCH=300
fi

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PY" -c 'import torch, sys; print("python", sys.version.split()[0],
  "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if
  torch.cuda.is_available() else None)'; } >>"$LOG" 2>&1

mkdir -p "$WORK/cuda_report"
stage cuda_tests 150 env IGSCALE_CUDA_REPORT="$WORK/cuda_report" "$PY" -m pytest -q -rA -m cuda -p no:cacheprovider \
  tests/test_cuda_train.py tests/test_cuda_eval.py

stage latents 60 "$PY" bench/device_latents.py --out "$WORK/latents" "${LAT[@]}"

COMMON=(--config "$CONFIG" run_dir="$WORK/run" data.manifest_url="$WORK/latents/manifest.json"
        checkpoint.url="$WORK/ckpt" checkpoint.staging_dir="$WORK/staging")
stage train "$CAP_TRAIN" "$PY" -m igscale.cli.main train "${COMMON[@]}" "${TRAIN[@]}" &&
  cp "$WORK/run/train_log.jsonl" "$WORK/train_first.jsonl"
stage resume 120 "$PY" -m igscale.cli.main train "${COMMON[@]}" "${TRAIN[@]}" train.total_steps="$RESUME_STEPS"
cp "$WORK/run/train_log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null

stage vae 60 "$PY" -c "from igscale.storage import open_storage; from igscale.demo.weights import save_random_vae
save_random_vae(open_storage('$WORK/vae'), 'sd-vae', ($VAE_CH))"
stage sample 90 "$PY" -m igscale.cli.main sample --export "$WORK/ckpt/export" --preset sit-xl2-ig-cfg-fid1.46 \
  --vae sd-vae --vae-weights "$WORK/vae" --out "$WORK/samples" "${SAMPLE[@]}"
cp "$WORK/samples/samples.json" "$OUT/samples.json" 2>/dev/null

stage bench "$CAP_BENCH" "$PY" bench/bench_gpu.py --out "$OUT/bench_gpu.json" "${BENCH[@]}"

"$PY" - "$WORK" "$OUT" "$LOG" "$T0" <<'PYEOF'
import glob, json, os, sys, time
work, out, log, t0 = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stages = {}
for line in open(os.path.join(work, "stages.tsv")):
    name, rc, sec = line.rstrip("\n").split("\t")
    stages[name] = {"rc": None if rc == "skipped" else int(rc), "seconds": int(sec)}
def losses(path):
    try:
        return {r["step"]: {k: r[k] for k in ("train/loss", "train/loss_aux", "perf/img_per_s", "perf/mfu") if k in r}
                for r in map(json.loads, open(path))}
    except OSError:
        return None
text = open(log, errors="replace").read()
resumed = [ln for ln in text.splitlines() if "resumed from" in ln]
summary = {"stages": stages, "ok": all(s["rc"] == 0 for s in stages.values()),
           "seconds": int(time.time()) - t0, "train_first": losses(os.path.join(work, "train_first.jsonl")),
           "train_after_resume": losses(os.path.join(out, "train_log.jsonl")), "resume_line": resumed[-1:] or None,
           "cuda_reports": {os.path.basename(p): json.load(open(p))
                            for p in sorted(glob.glob(os.path.join(work, "cuda_report", "*.json")))}}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k in ("stages", "ok", "seconds", "resume_line")}, indent=1))
sys.exit(0 if summary["ok"] else 1)
PYEOF
