#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and driver: builds lossc, checks every GPU-capable
# stdlib loss on the GPU against the CPU path (loss within 1e-5 relative, gradients
# within 1e-5 of max|g|, two runs bitwise equal), then times forward+backward at 16M
# and 256M elements against a device bandwidth probe measured in the same run.
# Usage: bench/gpu.sh            (from the repository root; prints a markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export LOSSC_REQUIRE_GPU=1

cargo build --release
# Correctness first: a wrong kernel is not worth timing.
cargo test --release --test gpu -- --nocapture
cargo test --release --test gpu -- --ignored --nocapture bench_forward_backward_against_device_bandwidth
