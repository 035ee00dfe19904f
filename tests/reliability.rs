//! The bad day: a writer killed with SIGKILL at random moments, a file-size limit that makes
//! writes fail, and a soak of thousands of saves and removes.
//!
//! The killed writer is this test binary run again as a child process (`CKPTIO_CHILD=...`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

mod common;
use common::{skip, SkipKind};

use ckptio::runtime::Builder;
use ckptio::{
    AsyncCheckpointIo, Backpressure, CheckpointIo, Dict, HostTensor, LoadOptions,
    TorchCheckpointIo, Value,
};

/// A checkpoint whose every element says which step wrote it, so a torn or mixed file shows.
fn ckpt(step: i64, elems: usize) -> Value {
    let mut d = Dict::new();
    d.insert("step", step);
    d.insert(
        "w",
        HostTensor::from_slice(&vec![step as f32; elems], &[elems]).unwrap(),
    );
    d.insert("id", HostTensor::from_slice(&[step; 7], &[7]).unwrap());
    Value::Dict(d)
}

/// Loads `path` and checks it is one whole checkpoint; returns its step.
fn check_whole(path: &Path) -> Result<i64, String> {
    let v = ckptio::torch::load(path, &LoadOptions::default()).map_err(|e| e.to_string())?;
    let step = v.get("step").and_then(Value::as_int).ok_or("no step")?;
    let w = v
        .get("w")
        .and_then(Value::as_tensor)
        .ok_or("no w")?
        .to_vec::<f32>()
        .map_err(|e| e.to_string())?;
    let id = v
        .get("id")
        .and_then(Value::as_tensor)
        .ok_or("no id")?
        .to_vec::<i64>()
        .map_err(|e| e.to_string())?;
    if w.iter().any(|&x| x != step as f32) || id.iter().any(|&x| x != step) {
        return Err(format!(
            "{}: mixed contents for step {step}",
            path.display()
        ));
    }
    Ok(step)
}

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Child: saves and removes forever. Prints `submit save|remove NAME STEP` before handing each
/// operation to the runtime, and `durable NAME STEP` / `removed NAME STEP` for each once it
/// resolved, in submission order.
fn crash_child(dir: &Path, seed: u64, base: i64) {
    ckptio::clean_temp_files(dir).unwrap();
    let io = Builder::default()
        .capacity(2)
        .build(TorchCheckpointIo::new());
    let mut next = rng(seed);
    let out = std::io::stdout();
    let say = |line: String| {
        // One write per line (a pipe write this short is atomic): a kill never splits a line.
        let mut o = out.lock();
        o.write_all(line.as_bytes()).unwrap();
        o.flush().unwrap();
    };
    // Ends the line libtest started with the test's name.
    say("\n".to_owned());
    let mut pending: Vec<(String, ckptio::SaveHandle, &'static str, i64)> = Vec::new();
    for step in base.. {
        let name = format!("ck{}.pt", next() % 3);
        let path = dir.join(&name);
        let remove = next() % 6 == 0;
        // Announce the operation before it can take effect.
        let kind = if remove { "remove" } else { "save" };
        say(format!("submit {kind} {name} {step}\n"));
        if remove {
            let h = io.remove(&path).unwrap();
            pending.push((name, h, "removed", step));
        } else {
            let elems = 1000 + (next() % 200_000) as usize;
            let h = io.save(&ckpt(step, elems), &path).unwrap();
            pending.push((name, h, "durable", step));
        }
        // Report, in order, everything that has resolved.
        while let Some((_, h, _, _)) = pending.first() {
            if !h.is_finished() {
                break;
            }
            let (name, h, what, s) = pending.remove(0);
            h.wait().unwrap();
            say(format!("{what} {name} {s}\n"));
        }
    }
}

/// One operation a crash child submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// A save of the checkpoint of this step.
    Save(i64),
    /// A removal, submitted as this step.
    Remove(i64),
}

impl Op {
    /// What the path holds once this operation took effect: a step, or nothing.
    fn outcome(self) -> Option<i64> {
        match self {
            Op::Save(s) => Some(s),
            Op::Remove(_) => None,
        }
    }
}

/// What a crash child printed before it was killed: per path, the operations in submission
/// order and how many of them (always the first ones: reports come in submission order) it
/// reported resolved.
#[derive(Default)]
struct ChildLog {
    ops: HashMap<String, Vec<Op>>,
    resolved: HashMap<String, usize>,
}

impl ChildLog {
    fn parse(lines: &[String]) -> ChildLog {
        let mut log = ChildLog::default();
        for l in lines {
            let words: Vec<&str> = l.split_whitespace().collect();
            let (op, name) = match words[..] {
                ["submit", "save", name, step] => (step.parse().map(Op::Save), name),
                ["submit", "remove", name, step] => (step.parse().map(Op::Remove), name),
                ["durable", name, step] => (step.parse().map(Op::Save), name),
                ["removed", name, step] => (step.parse().map(Op::Remove), name),
                ["submit" | "durable" | "removed", ..] => panic!("malformed line {l:?}"),
                _ => continue, // the test harness's own output
            };
            let op = op.unwrap_or_else(|e| panic!("bad step in {l:?}: {e}"));
            let ops = log.ops.entry(name.to_owned()).or_default();
            if words[0] == "submit" {
                ops.push(op);
                continue;
            }
            let done = log.resolved.entry(name.to_owned()).or_default();
            assert_eq!(
                ops.get(*done),
                Some(&op),
                "{l:?} is not the next operation submitted on {name}: {ops:?}"
            );
            *done += 1;
        }
        log
    }

    /// Reports of resolved operations.
    fn reported(&self) -> usize {
        self.resolved.values().sum()
    }

    /// Whether a save was in progress: submitted and not reported resolved.
    fn saving(&self) -> bool {
        self.ops.iter().any(|(name, ops)| {
            ops[self.resolved.get(name).copied().unwrap_or(0)..]
                .iter()
                .any(|op| matches!(op, Op::Save(_)))
        })
    }

    /// What `name` may hold after the kill, given what it held when the child started.
    ///
    /// Operations on one path take effect in submission order, each whole (a save by an atomic
    /// rename, made durable before it is reported). So the path holds the outcome of the last
    /// operation reported resolved (that checkpoint, or nothing after a removal), or of any
    /// operation submitted after it, which may have taken effect without being reported; when
    /// none was reported, what it held at the start, or the outcome of any submitted operation.
    /// A checkpoint reported durable may thus be missing only when a removal was submitted
    /// after it, and replaced only by a later save of the same path.
    fn allowed(&self, name: &str, at_start: Option<i64>) -> Vec<Option<i64>> {
        let ops = self.ops.get(name).map(Vec::as_slice).unwrap_or_default();
        let done = self.resolved.get(name).copied().unwrap_or(0);
        let last = match done {
            0 => at_start,
            n => ops[n - 1].outcome(),
        };
        std::iter::once(last)
            .chain(ops[done..].iter().map(|op| op.outcome()))
            .collect()
    }
}

/// Children started and killed, one kill each.
const KILLS: usize = 100;
/// Fewest kills that must land while a save is in progress (nearly all do: the child always
/// has saves queued once it has submitted its first).
const KILLS_DURING_SAVES: usize = 75;

#[test]
fn the_harness_accepts_a_missing_durable_checkpoint_only_after_a_later_removal() {
    let lines = |l: &[&str]| ChildLog::parse(&l.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    // Reported durable, nothing after it: only that checkpoint.
    let log = lines(&["submit save a 1", "durable a 1"]);
    assert_eq!(log.allowed("a", None), [Some(1)]);
    assert!(!log.saving());
    // A later save submitted: that checkpoint or the later one, never nothing.
    let log = lines(&["submit save a 1", "durable a 1", "submit save a 2"]);
    assert_eq!(log.allowed("a", None), [Some(1), Some(2)]);
    assert!(log.saving());
    // A later removal submitted: nothing is allowed too.
    let log = lines(&[
        "submit save a 1",
        "durable a 1",
        "submit remove a 2",
        "submit save a 3",
    ]);
    assert_eq!(log.allowed("a", None), [Some(1), None, Some(3)]);
    // Nothing reported: what the path held at the start, or any submitted outcome.
    let log = lines(&["submit save a 4", "submit save b 5"]);
    assert_eq!(log.allowed("a", Some(2)), [Some(2), Some(4)]);
    assert_eq!(log.allowed("c", Some(2)), [Some(2)]);
    // A reported removal: nothing, or what came after it.
    let log = lines(&["submit remove a 6", "removed a 6"]);
    assert_eq!(log.allowed("a", Some(2)), [None]);
    assert!(!log.saving());
}

#[test]
fn the_harness_fails_when_a_child_ends_before_it_is_killed() {
    let exe = std::env::current_exe().unwrap();
    // A child that cannot parse its seed panics at once.
    let spec = "crash:not-a-seed:1:/nonexistent";
    let r = std::panic::catch_unwind(|| run_and_kill(&exe, spec, 0));
    let message = r.expect_err("the harness accepted a child that ended by itself");
    let message = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains("ended by itself"), "{message}");
    assert!(
        message.contains("ParseIntError"),
        "with the child's stderr: {message}"
    );
}

/// Runs a crash child until its first submission, then kills it (SIGKILL) after a random pause
/// of up to 250 ms; returns the lines it printed. Fails when the child ended by itself.
fn run_and_kill(exe: &Path, spec: &str, pause_ms: u64) -> Vec<String> {
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "sigkill_at_random_moments_never_tears_or_loses_a_durable_checkpoint",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CKPTIO_CHILD", spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        // Whole lines only: a line cut short by the kill says nothing.
        while matches!(stdout.read_line(&mut line), Ok(n) if n > 0) && line.ends_with('\n') {
            if tx.send(line.trim_end().to_owned()).is_err() {
                break;
            }
            line.clear();
        }
    });
    // The gate: the kill's random moment counts from the first submission, not from a start
    // whose length depends on the machine's load.
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) => {
                let first = l.starts_with("submit ");
                lines.push(l);
                if first {
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break, // it ended: told below
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("{spec}: the child submitted nothing in 120 s");
            }
        }
    }
    std::thread::sleep(Duration::from_millis(pause_ms));
    let _ = child.kill(); // SIGKILL
    let status = child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let stderr = errors.join().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{spec}: the child ended by itself ({status}) before it was killed:\n{stderr}"
    );
    lines
}

/// The SIGKILL harness: a child saving and removing three paths is killed at random moments,
/// [`KILLS`] times in a row over one directory. After each kill every path must hold what
/// [`ChildLog::allowed`] allows (each checkpoint whole), and temporary files must be
/// recognised and cleaned. At least [`KILLS_DURING_SAVES`] kills must land while a save is in
/// progress.
#[test]
fn sigkill_at_random_moments_never_tears_or_loses_a_durable_checkpoint() {
    if let Ok(spec) = std::env::var("CKPTIO_CHILD") {
        if let Some(rest) = spec.strip_prefix("crash:") {
            let mut it = rest.splitn(3, ':');
            let (seed, base, dir) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
            crash_child(Path::new(dir), seed.parse().unwrap(), base.parse().unwrap());
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut next = rng(0x5eed);
    let mut during_saves = 0;
    let mut reported_total = 0;
    // What each path held after the previous kill.
    let mut held: HashMap<String, Option<i64>> = HashMap::new();
    for kill in 1..=KILLS {
        let seed = next();
        let spec = format!("crash:{seed}:{}:{}", kill * 1_000_000, dir.path().display());
        let lines = run_and_kill(&exe, &spec, next() % 250);
        let log = ChildLog::parse(&lines);
        reported_total += log.reported();
        if log.saving() {
            during_saves += 1;
        }
        for i in 0..3 {
            let name = format!("ck{i}.pt");
            let path = dir.path().join(&name);
            let found = path.exists().then(|| {
                check_whole(&path)
                    .unwrap_or_else(|e| panic!("kill {kill} (seed {seed}): torn file: {e}"))
            });
            let at_start = held.get(&name).copied().flatten();
            let allowed = log.allowed(&name, at_start);
            assert!(
                allowed.contains(&found),
                "kill {kill} (seed {seed}): {name} holds {found:?}, not one of {allowed:?} \
                 (operations {:?}, {} reported resolved)",
                log.ops.get(&name),
                log.resolved.get(&name).copied().unwrap_or(0)
            );
            held.insert(name, found);
        }
        // The next start recognises and cleans temporary files left by the kill.
        ckptio::clean_temp_files(dir.path()).unwrap();
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                n.starts_with("ck") && n.ends_with(".pt"),
                "stray file {n} after cleaning"
            );
        }
    }
    println!(
        "survived {KILLS} SIGKILLs in {:?}, {during_saves} of them during a save; \
         {reported_total} durable/removed reports checked",
        start.elapsed()
    );
    assert!(
        during_saves >= KILLS_DURING_SAVES,
        "only {during_saves} of {KILLS} kills landed while a save was in progress (floor \
         {KILLS_DURING_SAVES}): the harness is not exercising interrupted saves"
    );
    assert!(
        reported_total > 0,
        "the child never reported anything: the harness is not exercising saves"
    );
}

/// Runs this test binary again as a child that runs only `test` with `CKPTIO_CHILD=spec`;
/// returns its standard output once it succeeded.
fn run_child(test: &str, spec: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("CKPTIO_CHILD", spec)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Child: a file-size limit makes the big save fail; prints what happened.
fn fsize_child(dir: &Path) {
    #[allow(unsafe_code)]
    // SAFETY: plain libc calls on this process's own limits and signal disposition.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let lim = libc::rlimit {
            rlim_cur: 2 << 20,
            rlim_max: 2 << 20,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
    let io = AsyncCheckpointIo::new(TorchCheckpointIo::new());
    let path = dir.join("x.pt");
    io.save(&ckpt(1, 1000), &path).unwrap().wait().unwrap();
    let err = io
        .save(&ckpt(2, 1_000_000), &path)
        .unwrap()
        .wait()
        .unwrap_err();
    println!("error: {err}");
    println!(
        "source: {:?}",
        std::error::Error::source(&err).map(|s| s.to_string())
    );
    println!("previous: {}", check_whole(&path).unwrap());
    println!("pool in use: {}", io.status().pool.in_use);
    // Space is back (a smaller checkpoint fits): later saves succeed.
    io.save(&ckpt(3, 2000), &path).unwrap().wait().unwrap();
    println!("after: {}", check_whole(&path).unwrap());
    io.teardown().unwrap();
}

#[test]
fn a_write_past_the_file_size_limit_fails_cleanly_and_keeps_the_previous_checkpoint() {
    if let Ok(spec) = std::env::var("CKPTIO_CHILD") {
        if let Some(dir) = spec.strip_prefix("fsize:") {
            fsize_child(Path::new(dir));
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = run_child(
        "a_write_past_the_file_size_limit_fails_cleanly_and_keeps_the_previous_checkpoint",
        &format!("fsize:{}", dir.path().display()),
    );
    assert!(text.contains("x.pt"), "error names the path: {text}");
    assert!(
        text.contains("File too large"),
        "error carries the OS cause: {text}"
    );
    assert!(
        text.contains("previous: 1"),
        "previous checkpoint intact: {text}"
    );
    assert!(
        text.contains("pool in use: 0"),
        "staging memory returned: {text}"
    );
    assert!(text.contains("after: 3"), "later saves succeed: {text}");
    let names: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        names,
        vec![dir.path().join("x.pt")],
        "the failed save left a temporary file"
    );
}

#[test]
fn soak_thousands_of_saves_and_removes_lose_and_reorder_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for policy in [Backpressure::Block, Backpressure::Skip] {
        let io = Builder::default()
            .backpressure(policy)
            .capacity(2)
            .writers(2)
            .pool_budget(8 << 20)
            .build(TorchCheckpointIo::new());
        let mut next = rng(42);
        let mut ops: Vec<(PathBuf, Option<i64>, Option<ckptio::SaveHandle>)> = Vec::new();
        let start = Instant::now();
        let mut n = 0;
        let mut rss_after_warmup = 0u64;
        while n < 3000 {
            n += 1;
            let path = dir.path().join(format!("s{}.pt", next() % 5));
            if next() % 7 == 0 {
                io.remove_checkpoint(&path).unwrap();
                ops.push((path, None, None));
            } else {
                let elems = 10 + (next() % 5000) as usize;
                let mut d = Dict::new();
                d.insert("step", n as i64);
                d.insert("w", ckptio::LiveTensor::new(Const(n as f32, elems)));
                d.insert("id", HostTensor::from_slice(&[n as i64; 7], &[7]).unwrap());
                let h = io.save(&Value::Dict(d), &path).unwrap();
                ops.push((path, Some(n as i64), Some(h)));
            }
            if n == 1000 {
                // Warm-up done: allocator arenas and the pool have reached their size.
                io.flush().unwrap();
                rss_after_warmup = rss();
            }
        }
        io.flush().unwrap();
        let st = io.status();
        assert_eq!(
            st.pool.in_use, 0,
            "{policy:?}: staging memory not returned: {st:?}"
        );
        assert_eq!(st.bytes_in_flight, 0);
        assert_eq!(st.pending, 0);
        // The synchronous reference: replay in submission order; skipped saves change nothing.
        let mut expect: HashMap<PathBuf, Option<i64>> = HashMap::new();
        let mut skipped = 0;
        for (path, step, h) in ops {
            match h {
                Some(h) if h.wait().unwrap().skipped => skipped += 1,
                _ => {
                    expect.insert(path, step);
                }
            }
        }
        assert_eq!(
            skipped as u64, st.skips,
            "{policy:?}: every skip is counted"
        );
        if policy == Backpressure::Block {
            assert_eq!(skipped, 0);
        }
        for (path, want) in &expect {
            let got = if path.exists() {
                Some(check_whole(path).unwrap())
            } else {
                None
            };
            assert_eq!(
                &got,
                want,
                "{policy:?}: {} after {n} operations",
                path.display()
            );
        }
        let grown = rss().saturating_sub(rss_after_warmup);
        assert!(
            grown < 64 << 20,
            "{policy:?}: RSS grew by {} MiB after warm-up",
            grown >> 20
        );
        io.teardown().unwrap();
        eprintln!(
            "{policy:?}: {n} operations in {:?}, {st:?}",
            start.elapsed()
        );
    }
}

/// A live tensor of `n` copies of one value.
struct Const(f32, usize);
impl ckptio::TensorSource for Const {
    fn dtype(&self) -> ckptio::DType {
        ckptio::DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![self.1]
    }
    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        for c in dst.chunks_exact_mut(4) {
            c.copy_from_slice(&self.0.to_le_bytes());
        }
        Ok(())
    }
}

fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|x| x.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// A small tmpfs mounted for one test and unmounted when dropped.
struct Tmpfs(PathBuf);
impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
    fn remount(&self, opts: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_and_read_only_filesystems_fail_cleanly_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(dir.path(), "4m") else {
        skip(
            "disk_full_and_read_only_filesystems_fail_cleanly_and_recover",
            SkipKind::Root,
            "cannot mount a tmpfs here (needs root)",
        );
        return;
    };
    let io = AsyncCheckpointIo::new(TorchCheckpointIo::new());
    let path = dir.path().join("run/x.pt");
    io.save(&ckpt(1, 10_000), &path).unwrap().wait().unwrap();

    // Disk full: 6 MB does not fit in 4 MiB.
    let err = io
        .save(&ckpt(2, 1_500_000), &path)
        .unwrap()
        .wait()
        .unwrap_err();
    let msg = format!(
        "{err} / {:?}",
        std::error::Error::source(&err).map(ToString::to_string)
    );
    assert!(
        msg.contains("x.pt") && msg.contains("No space left"),
        "{msg}"
    );
    assert_eq!(check_whole(&path).unwrap(), 1, "previous checkpoint intact");
    assert_eq!(io.status().pool.in_use, 0, "staging memory returned");
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names.len(),
        1,
        "the failed save left its temporary file: {names:?}"
    );
    // Space is back (the failed temporary file was removed): a save that fits succeeds.
    io.save(&ckpt(3, 200_000), &path).unwrap().wait().unwrap();
    assert_eq!(check_whole(&path).unwrap(), 3);

    // Read-only: the write fails with the cause; the previous file is intact.
    fs.remount("ro");
    let err = io.save(&ckpt(4, 1000), &path).unwrap().wait().unwrap_err();
    let msg = format!(
        "{err} / {:?}",
        std::error::Error::source(&err).map(ToString::to_string)
    );
    assert!(msg.contains("Read-only file system"), "{msg}");
    fs.remount("rw");
    assert_eq!(check_whole(&path).unwrap(), 3);

    // The directory vanishes between saves: the next save creates it again.
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    io.save(&ckpt(5, 1000), &path).unwrap().wait().unwrap();
    assert_eq!(check_whole(&path).unwrap(), 5);
    io.teardown().unwrap();
}

/// Child: drops root, then saves into a directory only root may write.
fn perm_child(dir: &Path) {
    #[allow(unsafe_code)]
    // SAFETY: plain libc calls changing this (child) process's own credentials.
    unsafe {
        assert_eq!(libc::setgid(65534), 0);
        assert_eq!(libc::setuid(65534), 0);
    }
    let io = AsyncCheckpointIo::new(TorchCheckpointIo::new());
    let path = dir.join("x.pt");
    let err = io.save(&ckpt(2, 1000), &path).unwrap().wait().unwrap_err();
    println!("error: {err}");
    println!(
        "source: {:?}",
        std::error::Error::source(&err).map(|s| s.to_string())
    );
    println!("pool in use: {}", io.status().pool.in_use);
    // The error was taken from the handle: teardown has nothing left to report.
    io.teardown().unwrap();
    println!("teardown ok");
}

#[test]
fn permission_denied_fails_with_the_path_and_keeps_the_previous_checkpoint() {
    if let Ok(spec) = std::env::var("CKPTIO_CHILD") {
        if let Some(dir) = spec.strip_prefix("perm:") {
            perm_child(Path::new(dir));
        }
        return;
    }
    // SAFETY: reads this process's effective user id.
    #[allow(unsafe_code)]
    if unsafe { libc::geteuid() } != 0 {
        skip(
            "permission_denied_fails_with_the_path_and_keeps_the_previous_checkpoint",
            SkipKind::Root,
            "needs root to drop privileges in a child",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.pt");
    ckptio::torch::save(&ckpt(1, 1000), &path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = run_child(
        "permission_denied_fails_with_the_path_and_keeps_the_previous_checkpoint",
        &format!("perm:{}", dir.path().display()),
    );
    assert!(
        text.contains("x.pt") && text.contains("Permission denied"),
        "{text}"
    );
    assert!(
        text.contains("pool in use: 0") && text.contains("teardown ok"),
        "{text}"
    );
    assert_eq!(check_whole(&path).unwrap(), 1, "previous checkpoint intact");
}
