//! Measurement helpers shared by the benchmark examples (`overlap`, `async_bench`): peak RSS,
//! medians, and the raw-write floor D0.

use std::io::Write;
use std::path::Path;
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
