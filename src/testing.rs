//! Helpers for the unit tests.

use std::io::Write;

/// Records that `test` could not run its check, and why: on stderr, and as a
/// `test<TAB>kind<TAB>reason` line in `$CKPTIO_SKIP_LOG`, which `./dev.sh test` lists at its
/// end (and fails on, for any kind but `cuda`). The integration tests' twin is
/// `tests/common::skip`.
pub(crate) fn skip(test: &str, kind: &str, reason: &str) {
    let reason = reason.replace(['\t', '\n'], " ");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test} ({kind}): {reason}");
    let Some(log) = std::env::var_os("CKPTIO_SKIP_LOG").filter(|p| !p.is_empty()) else {
        return;
    };
    let line = format!("{test}\t{kind}\t{reason}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        panic!("{test}: cannot record a skip in CKPTIO_SKIP_LOG: {e}");
    }
}
