#!/usr/bin/env bash
# Builds the CUDA kernels and launchers of csrc/cuda for the CPU emulator (emu.hpp) with g++,
# AddressSanitizer and UBSan, and runs test_kernels.cpp. Needs no GPU and no nvcc.
#   csrc/cuda/emu/run_tests.sh [random cases per dtype, default 40] [seed]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
csrc="$(cd "$here/../.." && pwd)"
if [ -n "${PYKERNELS_EMU_BUILD:-}" ]; then
  out="$PYKERNELS_EMU_BUILD"
else  # a scratch folder of its own (41 MB), removed when the run ends
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out"
flags=(-std=c++17 -O1 -g -DPYKERNELS_CUDA_EMU -I"$csrc" -Wall -Wextra -Wno-unknown-pragmas
       -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
objs=()
for src in conv2d relu max_pool2d indexing; do
  g++ "${flags[@]}" -x c++ -c "$csrc/cuda/$src.cu" -o "$out/$src.o" &
  objs+=("$out/$src.o")
done
g++ "${flags[@]}" -c "$here/test_kernels.cpp" -o "$out/test_kernels.o" &
wait
g++ "${flags[@]}" "${objs[@]}" "$out/test_kernels.o" -o "$out/test_kernels"
ASAN_OPTIONS=detect_stack_use_after_return=0:detect_leaks=1 "$out/test_kernels" "$@"
