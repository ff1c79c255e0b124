#!/usr/bin/env bash
# Issue 8 (a)-(c) at full Stable Diffusion v1.5 size in bf16 on one GPU, in under 8 minutes.
#
#   bench/gpu.sh              measure on the GPU; writes the step-gpu and memory-gpu sections of BENCHMARKS.md
#   bench/gpu.sh --out FILE   write the sections into FILE instead
#   bench/gpu.sh --dry-run    the same scripts on CPU at toy widths (seconds); writes to a temporary file only
#   bench/gpu.sh --help
#
# Models: the SD v1.5 UNet, VAE and CLIP text encoder built from their published configs with random weights
# (bench/sd15.py; nothing is downloaded), a text-encoder LoRA, the test suite's stand-in face / attribute /
# feature nets. (a)+(c): bench/bench_step.py, N=4 images, T=20 DDIM steps, guidance 7.5, 3 interleaved rounds
# of {no-grad generation, reference step, fused step, fused step with selective checkpointing keeping up to
# 60 GiB of eps-call activations}. (b): bench/bench_sampler_memory.py, 512 px (64x64
# latents), T in {10, 20, 40}, checkpointed vs not (an uncheckpointed run that does not fit says so).
# Needs the project's Python environment with a CUDA build of torch (PY=/path/to/python to choose one).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --out) [ $# -ge 2 ] || { echo "bench/gpu.sh: --out needs a file name" >&2; exit 2; }; OUT="$2"; shift ;;
    *) echo "bench/gpu.sh: unknown argument '$1' (see bench/gpu.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "$DRY" = 1 ]; then
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  OUT="${OUT:-$TMP/BENCHMARKS.md}"
  export DS_ACCELERATOR=cpu
  # the GPU run's options at toy sizes, so a change to the scripts' arguments breaks this too (tests/test_bench.py)
  "$PY" bench/bench_step.py --models sd15 --sd15-size dry --device cpu --dtype bfloat16 --images 2 --steps 3 \
    --repeats 1 --keep-mb 61440 --section step-gpu --out "$OUT"
  "$PY" bench/bench_sampler_memory.py --models sd15 --sd15-size dry --device cpu --dtype bfloat16 --latent 8 \
    --steps 2 4 --rounds 1 --sd15-rounds 1 --sd15-max-uncheckpointed 4 --section memory-gpu --out "$OUT"
  echo "dry run OK (wrote $OUT)"
  exit 0
fi

OUT="${OUT:-BENCHMARKS.md}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False); use --dry-run on CPU" >&2
  exit 2
fi
export DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
# (a) + (c): ~1 min on an H100/H200 (model build ~15 s, warm-up, 3 rounds of ~10 s)
timeout 270 "$PY" bench/bench_step.py --models sd15 --device cuda --dtype bfloat16 --images 4 --steps 20 \
  --repeats 3 --keep-mb 61440 --section step-gpu --out "$OUT"
# (b): ~1-2 min; uncheckpointed T=40 at 512 px may not fit and is then reported as "failed"
timeout 180 "$PY" bench/bench_sampler_memory.py --models sd15 --device cuda --dtype bfloat16 --latent 64 \
  --steps 10 20 40 --rounds 3 --sd15-rounds 3 --sd15-max-uncheckpointed 40 --section memory-gpu --out "$OUT"
echo "bench/gpu.sh: done in $(( $(date +%s) - start )) s; sections step-gpu and memory-gpu of $OUT"
