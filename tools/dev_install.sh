#!/usr/bin/env bash
# Rebuild and install pykernels into the current Python, serialised so parallel callers don't clash
# on the shared build folder. For development only; users follow README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/pykernels-build.lock python -m pip install --no-build-isolation --no-deps -q "$@" .
