//! Measurement helpers shared by the benchmark examples (`overlap`, `async_bench`): peak RSS,
//! medians, the raw-write floor D0, tensor digests, and the sections of `docs/benchmarks.md` and
//! `README.md` that the benchmarks write (markers, commit, date, machine).
#![allow(dead_code)] // each example uses a part

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|x| x.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// Samples RSS on a thread every `every` while alive; reports the peak above the RSS at start.
pub struct RssPeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    base: u64,
    t: Option<std::thread::JoinHandle<()>>,
}

impl RssPeak {
    pub fn start(every: Duration) -> RssPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // One sample before the base is read: the sampler's own stack and allocations are
            // then part of the base, not of what is measured.
            let _ = rss_bytes();
            let _ = ready_tx.send(());
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(every);
            }
        });
        let _ = ready_rx.recv();
        let base = rss_bytes();
        peak.fetch_max(base, Ordering::Relaxed);
        RssPeak {
            stop,
            peak,
            base,
            t: Some(t),
        }
    }

    /// Stops sampling; the peak RSS above the start, in bytes.
    pub fn extra_bytes(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
        self.peak
            .load(Ordering::Relaxed)
            .max(rss_bytes())
            .saturating_sub(self.base)
    }
}

/// The median (the upper one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A page-aligned buffer of about `bytes` (rounded down to whole 4 KiB blocks, as `O_DIRECT`
/// needs), every byte `fill`: the source of [`raw_write`].
pub struct RawSource {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl RawSource {
    pub fn new(bytes: usize, fill: u8) -> RawSource {
        let raw = vec![fill; bytes + 4096];
        let at = raw.as_ptr().align_offset(4096);
        RawSource {
            raw,
            at,
            len: bytes / 4096 * 4096,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.at..self.at + self.len]
    }
}

/// One raw write of `src` to a new file in `dir` in 64 MiB requests, then fsync: buffered (as
/// most programs write), or with `O_DIRECT` (no page cache). Returns seconds; the file is
/// removed afterwards, untimed.
pub fn raw_write(dir: &Path, src: &RawSource, direct: bool) -> f64 {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("raw-write.bin");
    let t = Instant::now();
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let mut f = o.open(&p).expect("create raw file");
    for chunk in src.bytes().chunks(64 << 20) {
        f.write_all(chunk).expect("write raw file");
    }
    f.sync_all().expect("fsync raw file");
    let s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&p);
    s
}

// ----------------------------------------------------------------------------------------------
// Tensor digests, shared with the Python side (`benches/py/torch_load_digests.py`)

/// SHA-256 of a tensor's elements, row-major, little-endian, in hex: what
/// `benches/py/torch_load_digests.py` computes from `torch.load`'s tensors.
pub fn tensor_digest(t: &ckptio::HostTensor) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(t.contiguous_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The Python with PyTorch the benchmarks' peers run in: `$CKPTIO_PYTHON` (set by `./dev.sh`),
/// else the project's `.venv`.
pub fn python() -> PathBuf {
    std::env::var_os("CKPTIO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

// ----------------------------------------------------------------------------------------------
// Generated sections of the documents

/// The repository's root (where `README.md` and `docs/` are).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `docs/benchmarks.md`, where each benchmark command writes its own section.
pub fn benchmarks_md() -> PathBuf {
    repo_root().join("docs/benchmarks.md")
}

/// Replaces the text between `<!-- BEGIN name -->` and `<!-- END name -->` in `doc` with
/// `body`; appends the section, markers included, when the markers are missing.
pub fn splice_section(doc: &str, name: &str, body: &str) -> String {
    let begin = format!("<!-- BEGIN {name} -->");
    let end = format!("<!-- END {name} -->");
    let body = body.trim_end_matches('\n');
    if let Some(b) = doc.find(&begin) {
        if let Some(e) = doc[b..].find(&end) {
            let e = b + e;
            return format!("{}{begin}\n{body}\n{}", &doc[..b], &doc[e..]);
        }
    }
    let mut out = doc.trim_end_matches('\n').to_string();
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    out.push_str(&format!("{begin}\n{body}\n{end}\n"));
    out
}

/// Rewrites the section `name` of the Markdown file `path` (created if missing) with `body`.
pub fn write_section(path: &Path, name: &str, body: &str) -> std::io::Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, splice_section(&doc, name, body))
}

fn run_text(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The commit the benchmark was built from (`git rev-parse --short HEAD`), with `-dirty` when
/// a tracked file other than the documents the benchmarks write (Markdown files, `docs/`)
/// differs from it.
pub fn commit() -> String {
    let Some(head) = run_text("git", &["rev-parse", "--short", "HEAD"]) else {
        return "unknown commit".into();
    };
    let changed =
        run_text("git", &["status", "--porcelain", "--untracked-files=no"]).unwrap_or_default();
    let dirty = changed
        .lines()
        .filter_map(|l| l.get(3..))
        .any(|p| !p.ends_with(".md") && !p.starts_with("docs/"));
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

/// The current date and time in UTC, `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// The machine's limits as a benchmark sees them: CPU, memory, kernel, GPU, torch, and the
/// file system the checkpoints go to.
pub fn machine(dir: &Path) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / (1u64 << 20) as f64);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".to_string(), |s| s.trim().to_string());
    let gpu = run_text("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader"])
        .filter(|s| !s.is_empty())
        .map_or("no GPU".to_string(), |s| {
            s.lines().collect::<Vec<_>>().join(", ")
        });
    let py = python();
    let torch = run_text(
        &py.to_string_lossy(),
        &["-c", "import torch; print(torch.__version__)"],
    )
    .map_or("torch not found".to_string(), |v| format!("torch {v}"));
    let fs = run_text("stat", &["-f", "-c", "%T", &dir.to_string_lossy()])
        .map_or(String::new(), |t| format!("; checkpoints on {t}"));
    format!(
        "{cpu}, {cpus} CPUs available to the process, {mem_gib:.1} GiB memory, Linux {kernel}, \
         {gpu}, {torch}{fs}"
    )
}

/// The command line that reproduces this run: `prefix` (how the benchmark is started from the
/// repository's root) and this process's arguments.
pub fn command_line(prefix: &str) -> String {
    let mut s = prefix.to_string();
    for a in std::env::args().skip(1) {
        s.push(' ');
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,=:".contains(c))
        {
            s.push_str(&a);
        } else {
            s.push_str(&format!("'{}'", a.replace('\'', r"'\''")));
        }
    }
    s
}

/// The first lines of a generated section: what wrote it, with which command, at which commit,
/// when, and on what machine; `limits` adds what the run measured of the machine (M0, D0).
pub fn section_header(command: &str, commit: &str, machine: &str, limits: &str) -> String {
    let mut s = format!(
        "<!-- Written by `{command}`; edit the benchmark, not this section. -->\n\
         Command: `{command}` · commit `{commit}` · {}\n\n\
         Machine: {machine}.",
        utc_now()
    );
    if !limits.is_empty() {
        s.push_str(&format!(" Measured in this run: {limits}."));
    }
    s.push_str("\n\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_replaced_between_its_markers_and_appended_when_missing() {
        let doc = "intro\n<!-- BEGIN a -->\nold\n<!-- END a -->\ntail\n";
        assert_eq!(
            splice_section(doc, "a", "new\n"),
            "intro\n<!-- BEGIN a -->\nnew\n<!-- END a -->\ntail\n"
        );
        assert_eq!(
            splice_section(doc, "b", "x"),
            format!(
                "{}\n\n<!-- BEGIN b -->\nx\n<!-- END b -->\n",
                doc.trim_end()
            )
        );
        assert_eq!(
            splice_section("", "c", "y"),
            "<!-- BEGIN c -->\ny\n<!-- END c -->\n"
        );
    }
}
