#!/usr/bin/env bash
# ckptio's one entry point for people and CI. Sets everything up on first use, quick afterwards.
#
#   ./dev.sh main     the main job: the demo / benchmark (see README)
#   ./dev.sh test     every test: Rust unit, integration, doc tests, PyTorch interop, clippy, fmt,
#                     the core built without default features, the Python package (built into
#                     .venv) and its pytest suite, and a short fuzz run. Ends with
#                     the checks that were skipped and why (from target/skips.log, which tests
#                     append to through $CKPTIO_SKIP_LOG); fails when any skip is of a kind other
#                     than `cuda` (this project's machine and CI run as root without a GPU).
#                     CKPTIO_ALLOW_SKIPS=1 lets other skips pass, for a developer's machine
#                     without root or userfaultfd.
#   ./dev.sh env      print the exports that let plain `cargo` commands build against the venv
#   ./dev.sh cargo …  run any cargo command with the environment set
#   ./dev.sh python   build the Python package (python/) and install it into .venv
#   ./dev.sh pytest … build the Python package, then run pytest on python/tests with arguments
#   ./dev.sh pybench …  build it, then benches/py/python_io_bench.py (ckptio.save/load vs torch's)
#   ./dev.sh dcpbench …  sharded checkpoints: ckptio ranks vs torch.distributed.checkpoint (examples/dcp_bench.rs)
#   ./dev.sh device-build [V] / device-run   CUDA tests on a GPU machine with PyTorch V (.ci/device-cuda.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY_REQS=(torch==2.13.0 lightning==2.6.6 numpy maturin==1.16.0 pytest==9.2.0)
STAMP="$VENV/.ckptio-setup-v2"

log() { printf '\033[1m[ckptio]\033[0m %s\n' "$*" >&2; }

setup_venv() {
  if [[ -f "$STAMP" ]]; then return; fi
  log "first run: creating $VENV with ${PY_REQS[*]} (about 5 GB, a few minutes)"
  local py=${PYTHON:-python3}
  [[ -x "$VENV/bin/python" ]] || "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_REQS[@]}"
  "$VENV/bin/python" -c 'import torch, lightning; assert torch.__version__.startswith("2.13.0"), torch.__version__'
  touch "$STAMP"
}

export_env() {
  local site
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  export LIBTORCH="$site/torch"
  export LIBTORCH_BYPASS_VERSION_CHECK=1
  # Python used by the interop tests and the benchmark's peers.
  export CKPTIO_PYTHON="$VENV/bin/python"
  # The Python package's crate (python/) builds against the venv's CPython.
  export PYO3_PYTHON="$VENV/bin/python"
  export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-auto}
}

# Prints the skip log (`test<TAB>kind<TAB>reason` lines, each once).
list_skips() {
  local f=$1
  if [[ ! -s "$f" ]]; then
    log "skipped checks: none"
    return
  fi
  log "skipped checks:"
  sort -u "$f" | while IFS=$'\t' read -r test kind reason; do
    printf '  %-12s %s: %s\n' "$kind" "$test" "$reason" >&2
  done
}

# Lists the skips, then fails when one is of a kind other than `cuda`, unless
# CKPTIO_ALLOW_SKIPS=1.
check_skips() {
  local f=$1 others
  trap - EXIT
  list_skips "$f"
  others=$(cut -f2 "$f" | { grep -vx cuda || true; } | sort -u | paste -sd, -)
  [[ -z "$others" ]] && return
  if [[ "${CKPTIO_ALLOW_SKIPS:-0}" == 1 ]]; then
    log "skips of kind $others allowed by CKPTIO_ALLOW_SKIPS=1"
    return
  fi
  log "FAILED: checks of kind $others were skipped; only CUDA tests may skip here"
  log "(on a machine without root or userfaultfd, CKPTIO_ALLOW_SKIPS=1 lets them pass)"
  exit 1
}

# Builds the Python package (python/: the PyO3 crate and the pure-Python layer) in release mode
# and installs it into the venv, editable: Python files take effect without a rebuild.
build_python() {
  log "Python package: maturin develop --release (python/)"
  # pip's "Requirement already satisfied" lines (torch, already in the venv) are left out.
  VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" develop --release --quiet \
    -m "$ROOT/python/Cargo.toml" 2>&1 | { grep -v '^Requirement already satisfied' || true; }
}

cmd=${1:-help}
shift || true
case "$cmd" in
  main)
    setup_venv; export_env
    cargo build --release --examples --bins
    build_python
    exec cargo run --release --example overlap -- "$@"
    ;;
  test)
    setup_venv; export_env
    SKIP_LOG="${CARGO_TARGET_DIR:-$ROOT/target}/skips.log"
    mkdir -p "$(dirname "$SKIP_LOG")"
    : >"$SKIP_LOG"
    export CKPTIO_SKIP_LOG="$SKIP_LOG"
    trap 'list_skips "$SKIP_LOG"' EXIT
    log "format and lints"
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings
    cargo clippy --no-default-features --lib --bins -- -D warnings
    cargo clippy -p ckptio-python -- -D warnings
    log "core without libtorch"
    cargo build --no-default-features
    cargo test --no-default-features --lib
    log "all tests (with tch and PyTorch interop)"
    cargo test --all-targets "$@"
    cargo test --doc
    build_python
    log "Python package tests (pytest python/tests)"
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/python/tests"
    log "fuzz smoke run (coverage-guided, libFuzzer on stable; fuzz/run.sh SECONDS for longer)"
    fuzz/run.sh "${CKPTIO_FUZZ_SECONDS:-15}"
    check_skips "$SKIP_LOG"
    ;;
  env)
    setup_venv; export_env
    printf 'export LIBTORCH=%q\nexport LIBTORCH_BYPASS_VERSION_CHECK=1\nexport CKPTIO_PYTHON=%q\n' "$LIBTORCH" "$CKPTIO_PYTHON"
    ;;
  cargo)
    setup_venv; export_env
    exec cargo "$@"
    ;;
  python)
    setup_venv; export_env
    build_python
    ;;
  pytest)
    setup_venv; export_env
    build_python
    exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$ROOT/python/tests" "$@"
    ;;
  pybench)
    setup_venv; export_env
    build_python
    exec "$VENV/bin/python" "$ROOT/benches/py/python_io_bench.py" "$@"
    ;;
  dcpbench)
    setup_venv; export_env
    exec cargo run --release --example dcp_bench -- "$@"
    ;;
  device-build)
    setup_venv
    exec "$ROOT/.ci/device-cuda.sh" build "$@"
    ;;
  device-run)
    exec "$ROOT/.ci/device-cuda.sh" run
    ;;
  *)
    sed -n '2,18p' "$0"; exit 2;;
esac
