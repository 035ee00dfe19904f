//! Sharded checkpoints written by several ckptio processes through the async runtime and the
//! checkpoint manager: live chunks are snapshotted at `save`, the checkpoint is committed once
//! every rank's part is durable, and a rank killed mid-save (SIGKILL, at random moments) leaves
//! the newest committed checkpoint loadable and the interrupted one incomplete and refused.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckptio::dcp::{Chunk, DcpReader, Rank, ShardedTensor};
use ckptio::manager::{CheckpointManager, ManagerConfig, Monitor};
use ckptio::{
    AsyncCheckpointIo, CheckpointIo, DType, DcpCheckpointIo, Error, LiveTensor, TensorSource, Value,
};

/// Rows of the sharded tensor each rank holds.
const ROWS: usize = 64;
/// Columns: 64 rows x 4096 columns of f32 are 1 MiB per rank.
const COLS: usize = 4096;

/// A rank's rows, written by the training loop between saves.
#[derive(Clone)]
struct Rows(Arc<Mutex<Vec<f32>>>);

impl TensorSource for Rows {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![ROWS, COLS]
    }
    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        let v = self.0.lock().unwrap();
        for (d, x) in dst.chunks_exact_mut(4).zip(v.iter()) {
            d.copy_from_slice(&x.to_le_bytes());
        }
        Ok(())
    }
}

/// The value of element `i` of rank `rank`'s rows at `step`.
fn value(step: u64, rank: usize, i: usize) -> f32 {
    (step * 1_000_000 + rank as u64 * 100_000 + (i % 1000) as u64) as f32
}

fn fill(rows: &Rows, step: u64, rank: usize) {
    let mut v = rows.0.lock().unwrap();
    for (i, x) in v.iter_mut().enumerate() {
        *x = value(step, rank, i);
    }
}

/// The state a rank saves: its live rows of `w` (sharded), and the step (a plain value).
fn state_of(rows: &Rows, rank: Rank) -> Value {
    let w = ShardedTensor::new(vec![ROWS * rank.world_size, COLS], DType::Float32)
        .with_shard(vec![rank.rank * ROWS, 0], LiveTensor::new(rows.clone()))
        .unwrap();
    let mut d = ckptio::Dict::new();
    d.insert("w", w);
    Value::Dict(d)
}

/// A child rank: trains from step `first` on, saving every step through the manager, and
/// overwriting its rows right after each save returns. Prints `saved STEP` after each save.
fn child(spec: &str) {
    let mut it = spec.split(':');
    let mut next = || it.next().unwrap();
    let (rank, world, first, last, dir) = (
        next().parse().unwrap(),
        next().parse().unwrap(),
        next().parse::<u64>().unwrap(),
        next().parse::<u64>().unwrap(),
        PathBuf::from(next()),
    );
    let rank = Rank::new(rank, world).unwrap();
    let backend = DcpCheckpointIo::new(rank)
        .run_id(format!("run-{first}"))
        .commit_timeout(Duration::from_secs(60));
    let io = AsyncCheckpointIo::new(backend);
    let cfg = ManagerConfig::new(&dir)
        .every_n_steps(1)
        .top_k(2, Monitor::Min)
        .filename("step={step}");
    let mut mgr = CheckpointManager::new(io, cfg);
    let rows = Rows(Arc::new(Mutex::new(vec![0f32; ROWS * COLS])));
    for step in first..=last {
        fill(&rows, step, rank.rank);
        let state = state_of(&rows, rank);
        let loss = 1.0 / step as f64;
        mgr.step(step, 0, Some(loss), &[("model", &state)]).unwrap();
        // The snapshot was taken: the next step's values must not reach this checkpoint.
        fill(&rows, step + 1_000, rank.rank);
        if step == first {
            // Rank 0's save resolves once committed: one checkpoint is committed from here on.
            mgr.io().flush().unwrap();
            println!("committed {step}");
        }
        println!("saved {step}");
    }
    mgr.finish().unwrap();
    println!("done");
}

fn spawn(test: &str, spec: String) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("CKPTIO_DCP_RANK", spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Checks the committed checkpoint in `dir` holds step `step` of every rank, whole.
fn check_step(dir: &Path, step: u64, world: usize) {
    let r = DcpReader::open(dir).unwrap();
    let model = r.read_all().unwrap();
    let w = model
        .get("model")
        .and_then(|m| m.get("w"))
        .and_then(Value::as_tensor)
        .unwrap();
    assert_eq!(w.shape(), [ROWS * world, COLS]);
    let v = w.to_vec::<f32>().unwrap();
    for rank in 0..world {
        for i in [0, 1, ROWS * COLS / 2, ROWS * COLS - 1] {
            assert_eq!(
                v[rank * ROWS * COLS + i],
                value(step, rank, i),
                "{}: rank {rank} element {i}",
                dir.display()
            );
        }
    }
    assert_eq!(
        r.read_value("ckptio_step").unwrap().as_int(),
        Some(step as i64)
    );
}

#[test]
fn async_sharded_saves_through_the_manager_commit_every_step() {
    const TEST: &str = "async_sharded_saves_through_the_manager_commit_every_step";
    if let Ok(spec) = std::env::var("CKPTIO_DCP_RANK") {
        child(&spec);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let world = 2;
    let children: Vec<Child> = (0..world)
        .map(|r| spawn(TEST, format!("{r}:{world}:1:5:{}", dir.path().display())))
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (r, out) in outs.iter().enumerate() {
        assert!(
            out.status.success(),
            "rank {r} failed; every rank's stderr:\n{}",
            outs.iter()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }
    // top_k(2) by loss 1/step keeps the two newest; `last` names step 5.
    let resume = CheckpointManager::<DcpCheckpointIo>::resume_path(dir.path())
        .unwrap()
        .unwrap();
    assert_eq!(resume.file_name().unwrap(), "step=5");
    let mut kept: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step="))
        .collect();
    kept.sort();
    assert_eq!(kept, ["step=4", "step=5"]);
    for step in [4, 5] {
        check_step(&dir.path().join(format!("step={step}")), step, world);
    }
    // Any world size reads a box: rows 32..96 straddle both ranks' parts.
    let r = DcpReader::open(dir.path().join("step=5")).unwrap();
    let part = r
        .read_chunk("model.w", &Chunk::new(vec![32, 8], vec![64, 16]))
        .unwrap();
    let v = part.to_vec::<f32>().unwrap();
    assert_eq!(v[0], value(5, 0, 32 * COLS + 8));
    assert_eq!(v[32 * 16], value(5, 1, 8));
}

#[test]
fn a_rank_killed_mid_save_leaves_the_last_committed_checkpoint() {
    const TEST: &str = "a_rank_killed_mid_save_leaves_the_last_committed_checkpoint";
    if let Ok(spec) = std::env::var("CKPTIO_DCP_RANK") {
        child(&spec);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let world = 2;
    let mut seed = common::seed(TEST);
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let kills = 30;
    let mut first = 1u64;
    let mut incomplete_seen = 0;
    let start = Instant::now();
    for kill in 0..kills {
        let last = first + 1000;
        let mut children: Vec<Child> = (0..world)
            .map(|r| {
                spawn(
                    TEST,
                    format!("{r}:{world}:{first}:{last}:{}", dir.path().display()),
                )
            })
            .collect();
        // Wait until rank 0 has committed this attempt's first checkpoint, then kill rank 1
        // at a random moment.
        let out = children[0].stdout.take().unwrap();
        let committed = BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("committed "));
        if !committed {
            for c in &mut children {
                let _ = c.kill();
            }
            let mut err = String::new();
            let mut stderr = children[0].stderr.take().unwrap();
            std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
            panic!("kill {kill}: rank 0 ended before its first commit:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(rand() % 60));
        children[1].kill().unwrap();
        let status = children[1].wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "kill {kill}: rank 1 ended itself"
        );
        // Rank 0 is left waiting for rank 1's part: kill it too (a job dies as a whole).
        children[0].kill().unwrap();
        children[0].wait().unwrap();
        // The newest committed checkpoint loads whole; incomplete ones are refused.
        let resume = CheckpointManager::<DcpCheckpointIo>::resume_path(dir.path())
            .unwrap()
            .expect("a committed checkpoint");
        let step: u64 = resume.file_name().unwrap().to_string_lossy()["step=".len()..]
            .parse()
            .unwrap();
        check_step(&resume, step, world);
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.join(ckptio::dcp::METADATA).exists() {
                incomplete_seen += 1;
                assert!(matches!(DcpReader::open(&p), Err(Error::Incomplete { .. })));
            }
        }
        // The next attempt starts past every step an earlier attempt may have begun, as a
        // restarted job gets a run id of its own (no part of this attempt is taken for one of
        // the next).
        first += 2000;
    }
    // The next run resumes from the newest committed checkpoint and cleans the incomplete
    // directories up when it finishes.
    let io = AsyncCheckpointIo::new(DcpCheckpointIo::new(Rank::single()).run_id("cleanup"));
    let cfg = ManagerConfig::new(dir.path())
        .every_n_steps(1)
        .filename("step={step}");
    let mut mgr = CheckpointManager::new(io, cfg);
    let rows = Rows(Arc::new(Mutex::new(vec![0f32; ROWS * COLS])));
    fill(&rows, first, 0);
    let state = state_of(&rows, Rank::single());
    mgr.step(first, 0, None, &[("model", &state)]).unwrap();
    mgr.finish().unwrap();
    drop(mgr);
    check_step(&dir.path().join(format!("step={first}")), first, 1);
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        assert!(
            !p.is_dir() || p.join(ckptio::dcp::METADATA).exists(),
            "{} left incomplete",
            p.display()
        );
    }
    println!(
        "{kills} kills in {:?}; {incomplete_seen} incomplete checkpoints refused",
        start.elapsed()
    );
    assert!(incomplete_seen > 0, "no kill landed during a save");
}

/// A process group's gather and barrier, for ranks that are threads of one process: what a
/// program with its own collectives hands [`DcpCheckpointIo::with_collective`].
#[derive(Debug, Default)]
struct ThreadGroup {
    state: Mutex<GroupState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    records: std::collections::BTreeMap<usize, Vec<u8>>,
    arrived: usize,
    generation: u64,
}

#[derive(Debug, Clone)]
struct Member(Arc<ThreadGroup>);

impl ckptio::dcp::Collective for Member {
    fn gather(
        &self,
        _dir: &Path,
        _save_id: &str,
        rank: Rank,
        record: Vec<u8>,
    ) -> ckptio::Result<Option<Vec<Vec<u8>>>> {
        let mut s = self.0.state.lock().unwrap();
        s.records.insert(rank.rank, record);
        self.0.changed.notify_all();
        if rank.rank != 0 {
            return Ok(None);
        }
        while s.records.len() < rank.world_size {
            s = self.0.changed.wait(s).unwrap();
        }
        Ok(Some(std::mem::take(&mut s.records).into_values().collect()))
    }

    fn barrier(&self, _dir: &Path, _save_id: &str, rank: Rank) -> ckptio::Result<()> {
        let mut s = self.0.state.lock().unwrap();
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == rank.world_size {
            s.arrived = 0;
            s.generation += 1;
            self.0.changed.notify_all();
            return Ok(());
        }
        while s.generation == generation {
            s = self.0.changed.wait(s).unwrap();
        }
        Ok(())
    }
}

#[test]
fn a_supplied_collective_commits_and_every_rank_returns_committed() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let group = Member(Arc::new(ThreadGroup::default()));
    let world = 3;
    std::thread::scope(|s| {
        for r in 0..world {
            let (group, ck) = (group.clone(), ck.clone());
            s.spawn(move || {
                let rank = Rank::new(r, world).unwrap();
                let io = DcpCheckpointIo::new(rank).with_collective(group);
                let rows = Rows(Arc::new(Mutex::new(vec![0f32; ROWS * COLS])));
                fill(&rows, 7, r);
                let mut state = match state_of(&rows, rank) {
                    Value::Dict(d) => d,
                    _ => unreachable!(),
                };
                state.insert("ckptio_step", 7i64);
                io.save_checkpoint(&Value::Dict(state), &ck, &ckptio::SaveOptions::default())
                    .unwrap();
                // The barrier came after the commit: every rank sees it committed.
                assert!(ck.join(ckptio::dcp::METADATA).exists(), "rank {r}");
            });
        }
    });
    // No record was left in the directory: the collective carried them.
    for e in std::fs::read_dir(&ck).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(n == ".metadata" || n.ends_with(".distcp"), "{n}");
    }
    let r = DcpReader::open(&ck).unwrap();
    let w = r.read_all().unwrap();
    let w = w.get("w").and_then(Value::as_tensor).unwrap();
    assert_eq!(w.shape(), [ROWS * world, COLS]);
    let v = w.to_vec::<f32>().unwrap();
    for rank in 0..world {
        assert_eq!(v[rank * ROWS * COLS + 5], value(7, rank, 5));
    }
}

/// Saves `step`'s rows from every rank of `world` (threads, meeting through the file system)
/// into `dir`; `skip` ranks make no save (as if killed before it).
fn save_by_threads(
    dir: &Path,
    ios: &[DcpCheckpointIo],
    step: u64,
    skip: &[usize],
) -> Vec<ckptio::Result<()>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ios
            .iter()
            .enumerate()
            .filter(|(r, _)| !skip.contains(r))
            .map(|(r, io)| {
                s.spawn(move || {
                    let rows = Rows(Arc::new(Mutex::new(vec![0f32; ROWS * COLS])));
                    fill(&rows, step, r);
                    let mut state = ckptio::Dict::new();
                    state.insert("model", state_of(&rows, io.rank()));
                    state.insert("ckptio_step", step as i64);
                    io.save_checkpoint(&Value::Dict(state), dir, &ckptio::SaveOptions::default())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn saving_again_into_a_committed_directory_replaces_it_only_at_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("last");
    let world = 2;
    let ios: Vec<DcpCheckpointIo> = (0..world)
        .map(|r| {
            DcpCheckpointIo::new(Rank::new(r, world).unwrap())
                .run_id("again")
                .commit_timeout(Duration::from_millis(500))
        })
        .collect();
    for step in [1, 2] {
        for r in save_by_threads(&ck, &ios, step, &[]) {
            r.unwrap();
        }
        check_step(&ck, step, world);
    }
    // Only the newest checkpoint's files are left.
    let mut names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    // A save that rank 1 never makes: rank 0's part is written, the commit times out, and the
    // directory still holds step 2 whole.
    let r = save_by_threads(&ck, &ios[..1], 3, &[]);
    assert!(
        matches!(&r[0], Err(Error::CommitTimeout { missing, .. }) if missing == &[1]),
        "{r:?}"
    );
    check_step(&ck, 2, world);
}
