#!/usr/bin/env bash
# The one release build of the workspace's binaries, statically linked (as a
# FROM-scratch image needs), into target/x86_64-unknown-linux-gnu/release.
# scripts/test.sh, scripts/bench.sh and scripts/docker.sh all build through
# it, so each reuses the others' artifacts instead of building again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUSTFLAGS="-C target-feature=+crt-static --cfg tokio_unstable" \
  cargo build --release --locked --target x86_64-unknown-linux-gnu --workspace --bins
