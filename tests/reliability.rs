//! The bad day: a writer killed with SIGKILL at random moments, a file-size limit that makes
//! writes fail, and a soak of thousands of saves and removes.
//!
//! The killed writer is this test binary run again as a child process (`CKPTIO_CHILD=...`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Child: saves and removes forever, printing each operation once its handle resolved.
fn crash_child(dir: &Path, seed: u64, base: i64) {
    ckptio::clean_temp_files(dir).unwrap();
    let io = Builder::default()
        .capacity(2)
        .build(TorchCheckpointIo::new());
    let mut next = rng(seed);
    let out = std::io::stdout();
    let mut pending: Vec<(String, ckptio::SaveHandle, &'static str, i64)> = Vec::new();
    for step in base.. {
        let name = format!("ck{}.pt", next() % 3);
        let path = dir.join(&name);
        {
            // Announce the operation before it can take effect.
            let mut o = out.lock();
            writeln!(o, "submit {name} {step}").unwrap();
            o.flush().unwrap();
        }
        if next() % 6 == 0 {
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
            let mut o = out.lock();
            writeln!(o, "{what} {name} {s}").unwrap();
            o.flush().unwrap();
        }
    }
}

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
    let budget = Duration::from_secs(60);
    let start = Instant::now();
    let mut next = rng(0x5eed);
    let mut kills = 0;
    let mut reported_total = 0;
    while kills < 300 && start.elapsed() < budget {
        let seed = next();
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "sigkill_at_random_moments_never_tears_or_loses_a_durable_checkpoint",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "CKPTIO_CHILD",
                format!(
                    "crash:{seed}:{}:{}",
                    (kills + 1) * 1_000_000,
                    dir.path().display()
                ),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(20 + next() % 300));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let lines = reader.join().unwrap();
        // Per path: the last step reported durable, and the last step submitted at all.
        let mut durable: HashMap<String, i64> = HashMap::new();
        let mut submitted: HashMap<String, i64> = HashMap::new();
        for l in &lines {
            let mut it = l.split_whitespace();
            let (Some(what), Some(name), Some(step)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let Ok(step) = step.parse::<i64>() else {
                continue;
            };
            match what {
                "submit" => {
                    submitted.insert(name.to_owned(), step);
                }
                "durable" => {
                    durable.insert(name.to_owned(), step);
                    reported_total += 1;
                }
                "removed" => {
                    durable.remove(name);
                    reported_total += 1;
                }
                _ => {} // the test harness's own output
            }
        }
        // Every final path is absent or one whole checkpoint. One reported durable is there,
        // unless a later operation on it was submitted (which may or may not have landed).
        for i in 0..3 {
            let name = format!("ck{i}.pt");
            let path = dir.path().join(&name);
            let found = if path.exists() {
                Some(
                    check_whole(&path)
                        .unwrap_or_else(|e| panic!("kill {kills} (seed {seed}): torn file: {e}")),
                )
            } else {
                None
            };
            if let Some(&s) = durable.get(&name) {
                if submitted.get(&name) == Some(&s) {
                    assert_eq!(found, Some(s), "kill {kills} (seed {seed}): {name} step {s} was durable and nothing came after");
                } else if let Some(got) = found {
                    assert!(got >= s, "kill {kills} (seed {seed}): {name} holds step {got}, older than durable step {s}");
                }
            }
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
    eprintln!(
        "survived {kills} SIGKILLs in {:?}; {reported_total} durable/removed reports checked",
        start.elapsed()
    );
    assert!(kills >= 100, "only {kills} kills fit in the time budget");
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
        while n < 3000 && start.elapsed() < Duration::from_secs(40) {
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
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
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
        eprintln!("SKIPPED: needs root to drop privileges in a child");
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
