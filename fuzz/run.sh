#!/usr/bin/env bash
# Coverage-guided fuzzing of ckptio's loader on the stable toolchain: libFuzzer (libfuzzer-sys)
# with LLVM's SanitizerCoverage enabled through stable `-C` codegen flags (no nightly, no -Z).
#
#   fuzz/run.sh SECONDS [TARGET...]   (targets: load_archive load_pickle load_dcp_metadata;
#                                      default all three)
#
# Seeds: files written by the venv's real torch.save (tests/python/corpus.py) and their data.pkl
# records; for load_dcp_metadata, the .metadata of sharded checkpoints written by PyTorch
# (tests/python/dcp_save.py, 2 and 3 ranks) and by ckptio. Crashes land in
# fuzz/artifacts/TARGET/; turn each into a test in tests/bad_files.rs (tests/dcp_hostile.rs for
# load_dcp_metadata).
#
# Fails when a target finds something, exits non-zero, does not start, or runs fewer inputs than
# CKPTIO_FUZZ_MIN_EXECS (default 2000); prints each target's number of executions.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}; shift || true
targets=("$@"); [[ ${#targets[@]} -gt 0 ]] || targets=(load_archive load_pickle load_dcp_metadata)
PY=${CKPTIO_PYTHON:-../.venv/bin/python}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --quiet --release --target "$TRIPLE" --target-dir ../target/fuzz
if [[ ! -d corpus/load_archive ]]; then
  mkdir -p corpus/load_archive corpus/load_pickle seeds
  "$PY" ../tests/python/corpus.py seeds 1 >/dev/null
  "$PY" - <<'PY'
import os, zipfile, hashlib
for root, _, files in os.walk("seeds"):
    for f in files:
        p = os.path.join(root, f)
        if os.path.getsize(p) > 256 * 1024 or not zipfile.is_zipfile(p):
            continue
        data = open(p, "rb").read()
        open(os.path.join("corpus/load_archive", hashlib.sha1(data).hexdigest()), "wb").write(data)
        z = zipfile.ZipFile(p)
        for n in z.namelist():
            if n.endswith("/data.pkl"):
                pk = z.read(n)
                open(os.path.join("corpus/load_pickle", hashlib.sha1(pk).hexdigest()), "wb").write(pk)
PY
  rm -rf seeds
fi
if [[ ! -d corpus/load_dcp_metadata ]]; then
  # Built in a scratch folder and renamed into place, so a failed run leaves no partial corpus.
  rm -rf seeds corpus/load_dcp_metadata.new
  mkdir -p seeds corpus/load_dcp_metadata.new
  for world in 2 3; do
    "$PY" ../tests/python/dcp_save.py "seeds/torch$world" --world "$world" >/dev/null
    cp "seeds/torch$world/.metadata" "seeds/torch$world.metadata"
  done
  CKPTIO_FUZZ_WRITE_SEEDS=seeds "../target/fuzz/$TRIPLE/release/load_dcp_metadata" >/dev/null
  for f in seeds/*.metadata; do
    cp "$f" "corpus/load_dcp_metadata.new/$(sha1sum <"$f" | cut -c1-40)"
  done
  mv corpus/load_dcp_metadata.new corpus/load_dcp_metadata
  rm -rf seeds
fi
# Each target must start, exit 0 and run at least this many inputs: a fuzzer that crashed, never
# started or barely ran fails the run instead of passing quietly.
min_execs=${CKPTIO_FUZZ_MIN_EXECS:-2000}
[[ "$min_execs" =~ ^[0-9]+$ ]] || { echo "CKPTIO_FUZZ_MIN_EXECS=$min_execs is not a number" >&2; exit 2; }
logs=../target/fuzz/logs
mkdir -p "$logs"
failures=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "artifacts/$t"
  log="$logs/$t.log"
  echo "fuzzing $t for ${secs}s (full output: target/fuzz/logs/$t.log)" >&2
  rc=0
  "../target/fuzz/$TRIPLE/release/$t" "corpus/$t" -max_total_time="$secs" \
    -max_len=65536 -rss_limit_mb=2048 -timeout=10 -artifact_prefix="artifacts/$t/" \
    -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E "^(#[0-9]+.*(DONE|pulse)|stat::|INFO: (Loaded|seed)|==[0-9]+==|SUMMARY|artifact)" "$log" >&2 || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
  summary+=("$t: ${execs:-no} executions in ${secs}s (floor $min_execs), exit status $rc")
  if [[ $rc -ne 0 ]]; then
    tail -n 20 "$log" >&2
    failures+=("$t exited with status $rc")
  elif [[ -z "$execs" ]]; then
    tail -n 20 "$log" >&2
    failures+=("$t printed no stat::number_of_executed_units: it did not run")
  elif (( execs < min_execs )); then
    failures+=("$t ran $execs executions, fewer than the floor of $min_execs (CKPTIO_FUZZ_MIN_EXECS)")
  fi
  if compgen -G "artifacts/$t/crash-*" >/dev/null || compgen -G "artifacts/$t/oom-*" >/dev/null || compgen -G "artifacts/$t/timeout-*" >/dev/null; then
    failures+=("FUZZ FINDING in $t: $(ls "artifacts/$t")")
  fi
done
printf '%s\n' "${summary[@]}" >&2
if [[ ${#failures[@]} -gt 0 ]]; then
  printf 'FUZZ FAILED: %s\n' "${failures[@]}" >&2
  exit 1
fi
