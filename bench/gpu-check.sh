#!/usr/bin/env bash
# The webgpu backend on a machine with a real GPU, in well under ten minutes, installing and
# downloading nothing (after the usual `npm install`): the adapter, the goldens on webgpu, and
# SD1.5-shaped TI/LoRA at 512 px and SDXL-shaped LoRA at 1024 px on webgpu beside cpu-native.
# One JSON line per row on stdout (bench/gpu-check.ts says what each row holds).
#   bench/gpu-check.sh [--budget SECONDS]      (default 540)
# Linux needs the Vulkan loader (libvulkan1) and the GPU vendor's Vulkan driver, as any Vulkan app.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f node_modules/webgpu/package.json ] || [ ! -f node_modules/@tensorflow/tfjs-backend-webgpu/package.json ]; then
  echo "gpu-check: the optional packages webgpu and @tensorflow/tfjs-backend-webgpu are not installed (npm install)" >&2
  exit 1
fi
exec node --import tsx --expose-gc bench/gpu-check.ts "$@"
