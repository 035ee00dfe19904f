#!/usr/bin/env bash
# Runs ckptio's CUDA tests on a GPU machine whose PyTorch is older than the libtorch tch needs.
#
#   ./dev.sh device-build [TORCH_VERSION]   here (no GPU needed): builds the test binaries
#   ./dev.sh device-run                     on the GPU machine: runs them
#
# tch 0.26 is built for libtorch 2.13; the project's GPU machines have PyTorch 2.11.0+cu130
# (`.library/device/KINDS.md`), and a CUDA libtorch 2.13 is too large to carry there. So
# `device-build` builds the tests against the PyPI wheel of the GPU machine's version (default
# 2.11.0, the cu130 build: the same libraries): it downloads the wheel (about 530 MB, once),
# compiles tch's C++ wrapper against its headers, replacing with a stub that throws each wrapper
# function of an operator that version does not have (none of which ckptio calls), links
# `libtorch_cuda.so` (`CKPTIO_LINK_CUDA=1`) and leaves stripped binaries in
# target/device-cuda/bin (a few MB: carry that path). `device-run` runs them against the GPU
# machine's own PyTorch libraries (found through its `python3`), one test at a time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/target/device-cuda"
log() { printf '\033[1m[ckptio device]\033[0m %s\n' "$*" >&2; }

build() {
  local version=${1:-2.11.0}
  local py="$ROOT/.venv/bin/python"
  local lt="$OUT/libtorch-$version"
  mkdir -p "$OUT/wheel"
  if [[ ! -f "$lt/.done" ]]; then
    log "downloading the torch $version wheel (no dependencies)"
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps \
      --python-version 3.12 --only-binary=:all: -d "$OUT/wheel" "torch==$version"
    local whl
    whl=$(ls "$OUT"/wheel/torch-"$version"-*.whl | head -1)
    rm -rf "$lt"; mkdir -p "$lt"
    "$py" - "$whl" "$lt" <<'EOF'
import sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(whl)
z.extractall(dest, [n for n in z.namelist()
                    if n.startswith(("torch/include/", "torch/lib/", "torch/share/"))])
EOF
    touch "$lt/.done"
  fi
  local libtorch="$lt/torch"

  # tch's C++ wrapper, as cargo fetched it, with the functions this libtorch cannot compile
  # stubbed out.
  local tsver
  tsver=$(sed -n '/^name = "torch-sys"/{n;s/^version = "\(.*\)"/\1/p}' "$ROOT/Cargo.lock")
  (cd "$ROOT" && cargo fetch --quiet)
  local src
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/torch-sys-"$tsver" | head -1)
  local ts="$OUT/torch-sys-$tsver-for-$version"
  if [[ ! -f "$ts/.done" ]]; then
    rm -rf "$ts"; cp -r "$src" "$ts"
  fi

  # A copy of the working tree whose Cargo.toml patches torch-sys to that copy.
  local ws="$OUT/ws"
  rm -rf "$ws"; mkdir -p "$ws"
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - ) | tar -xf - -C "$ws"
  printf '\n[patch.crates-io]\ntorch-sys = { path = "%s" }\n' "$ts" >> "$ws/Cargo.toml"

  export LIBTORCH="$libtorch" LIBTORCH_BYPASS_VERSION_CHECK=1 CKPTIO_LINK_CUDA=1
  export CARGO_TARGET_DIR="$OUT/target"
  local tries=0
  until (cd "$ws" && cargo test --release --lib --test async_tch --no-run 2>"$OUT/build.log" >/dev/null); do
    tries=$((tries + 1))
    if [[ ! -f "$ts/.done" && $tries -le 3 ]] && grep -q 'torch_api_generated.cpp:[0-9]*:[0-9]*: error' "$OUT/build.log"; then
      log "stubbing the wrapper functions libtorch $version lacks (pass $tries)"
      "$ROOT/.venv/bin/python" - "$OUT/build.log" "$ts/libtch/torch_api_generated.cpp" <<'EOF'
import re, sys
log, path = open(sys.argv[1]).read(), sys.argv[2]
bad = sorted({int(n) for n in re.findall(r"torch_api_generated\.cpp:(\d+):\d+: error", log)})
src = open(path).read().split("\n")
done = set()
for n in bad:
    j = n - 1
    while not src[j].startswith("void atg_"):
        j -= 1
    if j in done:
        continue
    done.add(j)
    k = j
    while "PROTECT(" not in src[k]:
        k += 1
    e = k + 1
    while src[e].rstrip() != "  )":
        e += 1
    # Same line count, so the compiler's other line numbers stay right.
    src[k + 1:e] = ['    throw std::invalid_argument("not in this libtorch");'] + [""] * (e - k - 2)
    print("  stubbed", src[j].split("(")[0][5:], file=sys.stderr)
open(path, "w").write("\n".join(src))
EOF
      continue
    fi
    cat "$OUT/build.log" >&2
    log "build failed"
    exit 1
  done
  touch "$ts/.done"
  mkdir -p "$OUT/bin"; rm -f "$OUT"/bin/*
  (cd "$ws" && cargo test --release --lib --test async_tch --no-run --message-format=json 2>/dev/null) \
    | "$ROOT/.venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do strip -o "$OUT/bin/$name" "$exe"; done
  echo "$version" > "$OUT/bin/TORCH_VERSION"
  ls -la "$OUT/bin" >&2
  log "built against torch $version: carry target/device-cuda/bin, then run ./dev.sh device-run there"
}

run() {
  local bin="$OUT/bin"
  [[ -x "$bin/async_tch" ]] || { log "no binaries: run ./dev.sh device-build first (here), and carry target/device-cuda/bin"; exit 2; }
  local py=${PYTHON:-python3}
  local torchlib
  torchlib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  log "torch $("$py" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available())') (built against $(cat "$bin/TORCH_VERSION"))"
  nvidia-smi -L 2>/dev/null || true
  local rc=0
  # The lib's unit tests (the pinned staging test among them), then the runtime's tch tests.
  LD_LIBRARY_PATH="$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin/ckptio" --test-threads=1 || rc=1
  LD_LIBRARY_PATH="$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin/async_tch" --test-threads=1 --nocapture || rc=1
  exit $rc
}

case "${1:-}" in
  build) shift; build "$@" ;;
  run) run ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
