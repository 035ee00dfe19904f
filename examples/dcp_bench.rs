//! Sharded checkpoints in PyTorch's DCP format: ckptio against `torch.distributed.checkpoint`,
//! side by side in one run.
//!
//! The state: `--tensors` float32 tensors `layer{t}.weight` of shape `[rows, --cols]`
//! (`--size-mib` in all; element `[r, c]` of tensor `t` is `t * 1e6 + r`), each sharded along
//! dim 0 over the ranks as `torch.chunk` splits it. Every rank is its own process: for ckptio,
//! child processes of this binary with `RANK` and `WORLD_SIZE`; for PyTorch, gloo ranks forked
//! by `torch.multiprocessing` (`benches/py/dcp_bench.py`), the same state as DTensors
//! `Shard(0)`. For each world size of `--worlds`, `--rounds` rounds (medians reported; the
//! order of the ckptio modes reversed every other round), after one untimed save of each kind:
//!
//! - **D0**: every rank writes its share of the bytes to its own file (`write` in 64 MiB
//!   requests, then `fsync`), all at once, once through the page cache and once with
//!   `O_DIRECT`; the faster (by median) is D0, the disk's aggregate limit.
//! - **ckptio sync**: `DcpCheckpointIo::save_checkpoint` of host tensors on every rank, timed
//!   until every rank has returned (rank 0 returns once `.metadata` is committed); aggregate
//!   GB/s = state bytes / that time.
//! - **ckptio async**: `AsyncCheckpointIo::new(DcpCheckpointIo)`, Eager snapshots of live
//!   tensors (a `TensorSource` over the rank's memory): the stall is each rank's `save` call,
//!   beside a plain memcpy of the rank's share into a warm buffer taken by every rank at once,
//!   as the snapshots are; the save is timed until every rank's handle has resolved and the
//!   checkpoint is committed. The staging is reserved before the rounds.
//! - **torch**: `dcp.save` and `dcp.async_save` (defaults: thread executor, default stager) of
//!   the same state, timed from the first rank's start to the last rank's return (or future);
//!   the stall of `async_save` is its call on each rank.
//!
//! Then re-sharding loads (`--loads`, `SAVED:LOADED`): each side loads its own checkpoint saved
//! at one world size into the rows each rank owns at another. ckptio: one process per rank, in
//! parallel, `DcpReader::open` and `read_chunk` of the rank's rows of every tensor (CRC-32s
//! checked where a saved chunk is read whole, unless `--no-crc`); PyTorch: `dcp.load` into DTensor `Shard(0)`
//! templates at the new world size. Both are timed from the start of the first rank to the end
//! of the last, after emptying the page cache (`echo 3 > /proc/sys/vm/drop_caches`; `--warm`
//! keeps it), after one untimed load. Bytes read over bytes needed: ckptio's
//! `DcpReader::bytes_read`; PyTorch's from `.metadata` (every saved chunk that meets a rank's
//! rows, whole, as its reader loads them); and for both, the `rchar` of `/proc/self/io`
//! (bytes the ranks' read system calls returned). Every load is checked value for value.
//!
//! ```text
//! ./dev.sh dcpbench --quick                        # under a minute
//! ./dev.sh dcpbench --size-mib 1024 --rounds 3
//! ```

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use ckptio::dcp::{Chunk, DcpReader, Rank};
use ckptio::{
    AsyncCheckpointIo, CheckpointIo, DType, DcpCheckpointIo, Dict, HostTensor, LiveTensor,
    SaveOptions, ShardedTensor, TensorSource, Value,
};
use clap::Parser;
use serde_json::{json, Value as Json};

mod common;
use common::{median, python, repo_root};

/// How this benchmark is started from the repository's root.
const COMMAND: &str = "./dev.sh dcpbench";
/// Set in the environment of the rank processes this binary starts.
const CHILD_ENV: &str = "CKPTIO_DCP_BENCH_CHILD";
const MIB: usize = 1 << 20;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser, Clone)]
#[command(about = "Sharded DCP checkpoints: ckptio against torch.distributed.checkpoint")]
struct Args {
    /// State size, MiB (float32).
    #[arg(long, default_value_t = 1024)]
    size_mib: usize,
    /// Tensors in the state, each sharded along dim 0.
    #[arg(long, default_value_t = 8)]
    tensors: usize,
    /// Columns of every tensor.
    #[arg(long, default_value_t = 1024)]
    cols: usize,
    /// Rounds of every measurement (medians reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// World sizes the saves are measured at.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    worlds: Vec<usize>,
    /// Re-sharding loads, SAVED:LOADED world sizes.
    #[arg(long, value_delimiter = ',', default_value = "4:2,4:3,3:4")]
    loads: Vec<String>,
    /// Smoke test: 64 MiB, 1 round (under a minute).
    #[arg(long)]
    quick: bool,
    /// Loads with the page cache as the saves left it (default: emptied before each load).
    #[arg(long)]
    warm: bool,
    /// ckptio loads without checking CRC-32s (as `dcp.load`, which checks none).
    #[arg(long)]
    no_crc: bool,
    /// Where the Markdown table goes.
    #[arg(long, default_value = "results/dcp_bench.md")]
    out: PathBuf,
}

impl Args {
    fn resolved(mut self) -> Args {
        if self.quick {
            self.size_mib = 64;
            self.rounds = 1;
        }
        self.rounds = self.rounds.max(1);
        self
    }

    fn load_pairs(&self) -> Res<Vec<(usize, usize)>> {
        self.loads
            .iter()
            .map(|s| {
                let (a, b) = s
                    .split_once(':')
                    .ok_or(format!("--loads {s:?}: not SAVED:LOADED"))?;
                Ok((a.trim().parse()?, b.trim().parse()?))
            })
            .collect()
    }

    /// The arguments `benches/py/dcp_bench.py` takes for the state.
    fn py_state(&self) -> Vec<String> {
        [
            ("--size-mib", self.size_mib),
            ("--tensors", self.tensors),
            ("--cols", self.cols),
        ]
        .iter()
        .flat_map(|(k, v)| [k.to_string(), v.to_string()])
        .collect()
    }
}

/// The state's shape: `tensors` tensors of `[rows, cols]` float32.
#[derive(Clone, Copy)]
struct Geometry {
    tensors: usize,
    rows: usize,
    cols: usize,
}

impl Geometry {
    fn of(a: &Args) -> Res<Geometry> {
        let elems = a.size_mib * MIB / 4;
        let per_tensor = elems / a.tensors.max(1);
        let rows = per_tensor / a.cols.max(1);
        if a.tensors == 0 || per_tensor * a.tensors != elems || rows * a.cols != per_tensor {
            return Err(format!(
                "{} MiB does not split into {} tensors of [rows, {}] float32",
                a.size_mib, a.tensors, a.cols
            )
            .into());
        }
        Ok(Geometry {
            tensors: a.tensors,
            rows,
            cols: a.cols,
        })
    }

    fn bytes(&self) -> u64 {
        (self.tensors * self.rows * self.cols * 4) as u64
    }

    /// The box of tensor rows `rank` owns: `torch.chunk`'s split of dim 0.
    fn share(&self, rank: Rank) -> Chunk {
        let size = self.rows.div_ceil(rank.world_size).max(1);
        let start = (size * rank.rank).min(self.rows);
        Chunk::new(vec![start, 0], vec![size.min(self.rows - start), self.cols])
    }
}

/// Element `[r, c]` of tensor `t`, the same on both sides (exact in float32).
fn value(t: usize, row: usize) -> f32 {
    (t * 1_000_000 + row) as f32
}

fn fqn(t: usize) -> String {
    format!("layer{t}.weight")
}

// ----------------------------------------------------------------------------------------------
// A rank (child process): commands on stdin, one JSON line per command on stdout

/// A live tensor over a rank's host memory: Eager snapshots copy it with `copy_to`.
struct Share(HostTensor);

impl TensorSource for Share {
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    fn shape(&self) -> Vec<usize> {
        self.0.shape().to_vec()
    }
    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        dst.copy_from_slice(&self.0.contiguous_bytes());
        Ok(())
    }
}

/// What a rank holds once it has saved: its share, the two backends and a warm memcpy target.
struct Saver {
    host: Vec<HostTensor>,
    sync_tree: Value,
    live_tree: Value,
    sync_io: DcpCheckpointIo,
    async_io: AsyncCheckpointIo<DcpCheckpointIo>,
    target: Vec<u8>,
}

impl Saver {
    fn new(geo: Geometry, rank: Rank) -> Res<Saver> {
        let share = geo.share(rank);
        let (start, len) = (share.offsets[0], share.sizes[0]);
        let host = (0..geo.tensors)
            .map(|t| {
                let mut v = Vec::with_capacity(len * geo.cols);
                for r in start..start + len {
                    v.extend(std::iter::repeat_n(value(t, r), geo.cols));
                }
                HostTensor::from_slice(&v, &[len, geo.cols])
            })
            .collect::<ckptio::Result<Vec<_>>>()?;
        let tree = |live: bool| -> Res<Value> {
            let mut d = Dict::new();
            for (t, h) in host.iter().enumerate() {
                let local: Value = if live {
                    LiveTensor::new(Share(h.clone())).into()
                } else {
                    h.clone().into()
                };
                let s = ShardedTensor::new(vec![geo.rows, geo.cols], DType::Float32)
                    .with_shard(share.offsets.clone(), local)?;
                d.insert(fqn(t), s);
            }
            Ok(Value::Dict(d))
        };
        let (sync_tree, live_tree) = (tree(false)?, tree(true)?);
        let backend = || DcpCheckpointIo::new(rank).commit_timeout(Duration::from_secs(120));
        let async_io = AsyncCheckpointIo::new(backend());
        async_io.reserve(&live_tree, 1)?;
        let mut saver = Saver {
            target: vec![0u8; host.iter().map(|h| h.nbytes()).sum()],
            host,
            sync_tree,
            live_tree,
            sync_io: backend(),
            async_io,
        };
        saver.memcpy(); // maps the target's pages
        Ok(saver)
    }

    /// One memcpy of the share into the warm target; seconds.
    fn memcpy(&mut self) -> f64 {
        let t = Instant::now();
        let mut at = 0;
        for h in &self.host {
            let b = h.contiguous_bytes();
            self.target[at..at + b.len()].copy_from_slice(&b);
            at += b.len();
        }
        std::hint::black_box(&self.target);
        t.elapsed().as_secs_f64()
    }

    /// D0: the share's bytes written to one new file in 64 MiB requests, then fsync; with
    /// `O_DIRECT` when `direct`, straight from the tensors' memory (`None` when a tensor's bytes
    /// are not whole 4 KiB blocks on a 4 KiB boundary, as `O_DIRECT` needs).
    fn raw_write(&self, path: &Path, direct: bool) -> Res<Option<f64>> {
        use std::os::unix::fs::OpenOptionsExt;
        let shares: Vec<_> = self.host.iter().map(|h| h.contiguous_bytes()).collect();
        let blocks = |b: &[u8]| b.as_ptr() as usize % 4096 == 0 && b.len() % 4096 == 0;
        if direct && !shares.iter().all(|b| blocks(b)) {
            return Ok(None);
        }
        let t = Instant::now();
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let mut f = o.open(path)?;
        for piece in shares.iter().flat_map(|b| b.chunks(64 << 20)) {
            f.write_all(piece)?;
        }
        f.sync_all()?;
        Ok(Some(t.elapsed().as_secs_f64()))
    }

    fn sync_save(&self, dir: &Path) -> Res<Json> {
        let t = Instant::now();
        self.sync_io
            .save_checkpoint(&self.sync_tree, dir, &SaveOptions::default())?;
        self.sync_io.wait_committed(dir)?;
        Ok(json!({ "secs": t.elapsed().as_secs_f64() }))
    }

    fn async_save(&self, dir: &Path) -> Res<Json> {
        let t = Instant::now();
        let handle = self.async_io.save(&self.live_tree, dir)?;
        let stall = t.elapsed().as_secs_f64();
        handle.wait()?;
        self.async_io.inner().wait_committed(dir)?;
        Ok(json!({ "stall": stall, "secs": t.elapsed().as_secs_f64() }))
    }
}

/// `(rchar, read_bytes)` of this process: bytes its reads returned, and fetched from the disk.
fn proc_io() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("rchar:"), field("read_bytes:"))
}

/// This rank's rows of every tensor from the checkpoint in `dir`, checked value for value
/// after the clock stops.
fn load_share(geo: Geometry, rank: Rank, dir: &Path, crc: bool) -> Res<Json> {
    let want = geo.share(rank);
    let io0 = proc_io();
    let t = Instant::now();
    let reader = DcpReader::open(dir)?.verify_crc(crc);
    let parts = (0..geo.tensors)
        .map(|t| reader.read_chunk(&fqn(t), &want))
        .collect::<ckptio::Result<Vec<_>>>()?;
    let secs = t.elapsed().as_secs_f64();
    let io1 = proc_io();
    for (t, part) in parts.iter().enumerate() {
        let bytes = part.contiguous_bytes();
        let rows = bytes.chunks_exact(4 * geo.cols);
        for (i, row) in rows.enumerate() {
            let expect = value(t, want.offsets[0] + i).to_le_bytes();
            if row.chunks_exact(4).any(|x| x != expect) {
                return Err(format!("{}: row {} differs from the saved one", fqn(t), i).into());
            }
        }
    }
    Ok(json!({
        "secs": secs,
        "bytes_read": reader.bytes_read(),
        "needed": want.numel().unwrap_or(0) * 4 * geo.tensors,
        "rchar": io1.0 - io0.0,
        "disk_read": io1.1 - io0.1,
    }))
}

fn child_main(a: &Args) -> Res<()> {
    let geo = Geometry::of(a)?;
    let rank = Rank::from_env()?;
    let mut saver: Option<Saver> = None;
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let path = Path::new(arg);
        let reply: Res<Json> = (|| {
            if cmd != "load" && saver.is_none() {
                saver = Some(Saver::new(geo, rank)?);
            }
            let s = saver.as_mut();
            Ok(match (cmd, s) {
                ("prepare", _) => json!({}),
                ("memcpy", Some(s)) => {
                    let v = (0..3).map(|_| s.memcpy()).collect();
                    json!({ "secs": median(v) })
                }
                ("d0" | "d0-direct", Some(s)) => {
                    let file = path.join(format!("rank{}.bin", rank.rank));
                    json!({ "secs": s.raw_write(&file, cmd == "d0-direct")? })
                }
                ("sync", Some(s)) => s.sync_save(path)?,
                ("async", Some(s)) => s.async_save(path)?,
                ("load", _) => load_share(geo, rank, path, !a.no_crc)?,
                _ => return Err(format!("unknown command {line:?}").into()),
            })
        })();
        let reply =
            reply.unwrap_or_else(|e| json!({ "error": format!("rank {}: {e}", rank.rank) }));
        let mut out = stdout.lock();
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    if let Some(s) = saver {
        s.async_io.teardown()?;
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// The driver: the ranks of one world size, and PyTorch's side

/// The rank processes of one world size, each waiting for commands.
struct Ranks {
    children: Vec<Child>,
    stdin: Vec<ChildStdin>,
    stdout: Vec<BufReader<ChildStdout>>,
}

impl Ranks {
    fn spawn(world: usize, run_id: &str) -> Res<Ranks> {
        let exe = std::env::current_exe()?;
        let mut r = Ranks {
            children: Vec::new(),
            stdin: Vec::new(),
            stdout: Vec::new(),
        };
        for rank in 0..world {
            let mut c = Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .env(CHILD_ENV, "1")
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("CKPTIO_RUN_ID", run_id)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            r.stdin.push(c.stdin.take().ok_or("no stdin")?);
            r.stdout
                .push(BufReader::new(c.stdout.take().ok_or("no stdout")?));
            r.children.push(c);
        }
        Ok(r)
    }

    /// Sends `cmd` to every rank at once; seconds until the last has answered, and the answers.
    fn all(&mut self, cmd: &str) -> Res<(f64, Vec<Json>)> {
        let t = Instant::now();
        for s in &mut self.stdin {
            writeln!(s, "{cmd}")?;
            s.flush()?;
        }
        let mut replies = Vec::new();
        for out in &mut self.stdout {
            let mut line = String::new();
            if out.read_line(&mut line)? == 0 {
                return Err(format!("a rank exited during {cmd:?}").into());
            }
            replies.push(serde_json::from_str::<Json>(&line)?);
        }
        let secs = t.elapsed().as_secs_f64();
        if let Some(e) = replies.iter().find_map(|r| r.get("error")) {
            return Err(format!("{cmd}: {e}").into());
        }
        Ok((secs, replies))
    }

    fn quit(mut self) -> Res<()> {
        self.stdin.clear(); // end of input: each rank tears down and exits
        for c in &mut self.children {
            if !c.wait()?.success() {
                return Err("a rank exited with an error".into());
            }
        }
        Ok(())
    }
}

/// A progress line on stderr, with the seconds since the run started.
fn progress(what: std::fmt::Arguments<'_>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(Instant::now);
    eprintln!("[{:6.1} s] {what}", start.elapsed().as_secs_f64());
}

fn f64_of(j: &Json, key: &str) -> f64 {
    j.get(key).and_then(Json::as_f64).unwrap_or(f64::NAN)
}

fn f64s(j: &Json, key: &str) -> Vec<f64> {
    j.get(key)
        .and_then(Json::as_array)
        .map(|v| v.iter().filter_map(Json::as_f64).collect())
        .unwrap_or_default()
}

/// `benches/py/dcp_bench.py` with `args`: its JSON line.
fn torch_side(args: &[String]) -> Res<Json> {
    let script = repo_root().join("benches/py/dcp_bench.py");
    let out = Command::new(python()).arg(&script).args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "{} {}: {}\n{}",
            script.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().ok_or("dcp_bench.py printed nothing")?;
    Ok(serde_json::from_str(last)?)
}

fn remove(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
}

/// Empties the page cache (root only); whether it did.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// The saves at one world size, every figure per round.
#[derive(Default)]
struct Saves {
    world: usize,
    d0: Vec<f64>,
    d0_direct: Vec<f64>,
    sync: Vec<f64>,
    async_done: Vec<f64>,
    /// Every rank's stall and memcpy, every round.
    stall: Vec<f64>,
    memcpy: Vec<f64>,
    torch_save: Vec<f64>,
    torch_async: Vec<f64>,
    torch_stall: Vec<f64>,
}

/// The ways the ckptio ranks write, each a command of theirs.
#[derive(Clone, Copy)]
enum Mode {
    D0,
    D0Direct,
    Sync,
    Async,
}

impl Mode {
    fn command(self) -> &'static str {
        match self {
            Mode::D0 => "d0",
            Mode::D0Direct => "d0-direct",
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

impl Saves {
    /// D0: the faster of the buffered and the `O_DIRECT` raw write (medians).
    fn d0(&self) -> f64 {
        med(&self.d0).min(med(&self.d0_direct))
    }

    fn record(&mut self, mode: Mode, secs: f64, replies: &[Json]) {
        match mode {
            Mode::D0 => self.d0.push(secs),
            Mode::D0Direct => {
                // NaN when a rank could not write with O_DIRECT.
                let ok = replies
                    .iter()
                    .all(|j| j.get("secs").is_some_and(Json::is_f64));
                self.d0_direct.push(if ok { secs } else { f64::NAN });
            }
            Mode::Sync => self.sync.push(secs),
            Mode::Async => {
                self.async_done.push(secs);
                self.stall
                    .extend(replies.iter().map(|j| f64_of(j, "stall")));
            }
        }
    }
}

/// The saves at `world`, ckptio's then PyTorch's; the last synchronous checkpoint of each is
/// kept in `keep` and `torch_keep`.
fn measure_saves(
    a: &Args,
    world: usize,
    base: &Path,
    keep: &Path,
    torch_keep: &Path,
) -> Res<Saves> {
    let dir = base.join(format!("w{world}"));
    std::fs::create_dir_all(&dir)?;
    let mut s = Saves {
        world,
        ..Saves::default()
    };
    ckptio_saves(a, &mut s, &dir, keep)?;
    torch_saves(a, &mut s, &dir, torch_keep)?;
    remove(&dir);
    Ok(s)
}

/// Rounds of D0, sync and async saves by `s.world` ckptio ranks, after one untimed save of each
/// kind; the memcpy of each rank's share before each round.
fn ckptio_saves(a: &Args, s: &mut Saves, dir: &Path, keep: &Path) -> Res<()> {
    let world = s.world;
    let run_id = format!("dcp-bench-{}-w{world}", std::process::id());
    let mut ranks = Ranks::spawn(world, &run_id)?;
    ranks.all("prepare")?;
    for warm in [Mode::Sync, Mode::Async] {
        let p = dir.join(format!("warm-{}", warm.command()));
        ranks.all(&format!("{} {}", warm.command(), p.display()))?;
        remove(&p);
    }
    for round in 0..a.rounds {
        progress(format_args!(
            "ckptio, world {world}: round {}/{}",
            round + 1,
            a.rounds
        ));
        let (_, memcpy) = ranks.all("memcpy")?;
        s.memcpy.extend(memcpy.iter().map(|j| f64_of(j, "secs")));
        let mut modes = [Mode::D0, Mode::D0Direct, Mode::Sync, Mode::Async];
        if round % 2 == 1 {
            modes.reverse();
        }
        for mode in modes {
            let p = dir.join(format!("{}-r{round}", mode.command()));
            if let Mode::D0 | Mode::D0Direct = mode {
                std::fs::create_dir_all(&p)?;
            }
            let (secs, replies) = ranks.all(&format!("{} {}", mode.command(), p.display()))?;
            s.record(mode, secs, &replies);
            if matches!(mode, Mode::Sync) && round + 1 == a.rounds {
                remove(keep);
                std::fs::rename(&p, keep)?;
            } else {
                remove(&p);
            }
        }
    }
    ranks.quit()
}

/// `dcp.save` and `dcp.async_save` rounds by `s.world` gloo ranks (`dcp_bench.py save`).
fn torch_saves(a: &Args, s: &mut Saves, dir: &Path, keep: &Path) -> Res<()> {
    progress(format_args!(
        "torch, world {}: {} rounds",
        s.world, a.rounds
    ));
    let mut args = vec!["save".to_string(), format!("--world={}", s.world)];
    args.extend(a.py_state());
    args.extend([
        format!("--rounds={}", a.rounds),
        format!("--dir={}", dir.display()),
        format!("--keep={}", keep.display()),
    ]);
    let t = torch_side(&args)?;
    s.torch_save = f64s(&t, "save");
    s.torch_async = f64s(&t, "async_done");
    s.torch_stall = t
        .get("async_stall")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(Json::as_array)
        .flatten()
        .filter_map(Json::as_f64)
        .collect();
    Ok(())
}

/// One synchronous save at `world` into `keep` on each side, untimed: a checkpoint to load from.
fn prepare_checkpoint(a: &Args, world: usize, keep: &Path, torch_keep: &Path) -> Res<()> {
    progress(format_args!("checkpoints at world {world} to load from"));
    let mut ranks = Ranks::spawn(world, &format!("dcp-bench-{}-p{world}", std::process::id()))?;
    ranks.all(&format!("sync {}", keep.display()))?;
    ranks.quit()?;
    let mut args = vec!["save".to_string(), format!("--world={world}")];
    args.extend(a.py_state());
    let dir = keep.with_extension("tmp");
    args.extend([
        "--rounds=0".to_string(),
        format!("--dir={}", dir.display()),
        format!("--keep={}", torch_keep.display()),
    ]);
    std::fs::create_dir_all(&dir)?;
    torch_side(&args)?;
    remove(&dir);
    Ok(())
}

/// The loads of one checkpoint saved at `saved` into `loaded` ranks, both sides.
#[derive(Default)]
struct Loads {
    saved: usize,
    loaded: usize,
    cold: bool,
    needed: u64,
    secs: Vec<f64>,
    bytes_read: u64,
    rchar: Vec<f64>,
    torch_secs: Vec<f64>,
    torch_plan: u64,
    torch_rchar: Vec<f64>,
}

fn sum_u64(replies: &[Json], key: &str) -> u64 {
    replies
        .iter()
        .filter_map(|j| j.get(key).and_then(Json::as_u64))
        .sum()
}

/// The checkpoints saved at `world` that the loads read: ckptio's and PyTorch's.
fn kept(base: &Path, world: usize) -> (PathBuf, PathBuf) {
    (
        base.join(format!("ckptio-w{world}")),
        base.join(format!("torch-w{world}")),
    )
}

/// Every re-sharding load, ckptio's (one set of rank processes per load) then PyTorch's (one
/// `dcp_bench.py load` for all, so that `import torch` comes before the page cache is emptied).
fn measure_loads(a: &Args, pairs: &[(usize, usize)], base: &Path) -> Res<Vec<Loads>> {
    let mut loads = Vec::new();
    for &(saved, loaded) in pairs {
        loads.push(ckptio_loads(a, saved, loaded, &kept(base, saved).0)?);
    }
    progress(format_args!("torch loads"));
    let mut args = vec!["load".to_string()];
    args.extend(a.py_state());
    args.push(format!("--rounds={}", a.rounds));
    for l in &loads {
        let ckpt = kept(base, l.saved).1;
        args.push(format!("--job={}:{}", l.loaded, ckpt.display()));
    }
    if a.warm {
        args.push("--warm".into());
    }
    let t = torch_side(&args)?;
    let jobs = t.get("jobs").and_then(Json::as_array).ok_or("no jobs")?;
    for (l, j) in loads.iter_mut().zip(jobs) {
        l.cold &= a.warm || j.get("cold").and_then(Json::as_bool) == Some(true);
        l.torch_secs = f64s(j, "secs");
        l.torch_plan = j.get("plan_read").and_then(Json::as_u64).unwrap_or(0);
        l.torch_rchar = f64s(j, "rchar");
    }
    Ok(loads)
}

/// `loaded` ckptio ranks, each reading its rows from `ckpt`: one untimed load, then the rounds.
fn ckptio_loads(a: &Args, saved: usize, loaded: usize, ckpt: &Path) -> Res<Loads> {
    progress(format_args!(
        "ckptio loads: saved at {saved}, loaded at {loaded}"
    ));
    let mut l = Loads {
        saved,
        loaded,
        cold: !a.warm,
        ..Loads::default()
    };
    let mut ranks = Ranks::spawn(loaded, "dcp-bench-load")?;
    let cmd = format!("load {}", ckpt.display());
    ranks.all(&cmd)?;
    for _ in 0..a.rounds {
        if !a.warm {
            l.cold &= drop_caches();
        }
        let (secs, replies) = ranks.all(&cmd)?;
        l.secs.push(secs);
        l.needed = sum_u64(&replies, "needed");
        l.bytes_read = sum_u64(&replies, "bytes_read");
        l.rchar.push(sum_u64(&replies, "rchar") as f64);
    }
    ranks.quit()?;
    Ok(l)
}

// ----------------------------------------------------------------------------------------------
// Tables

fn ms(secs: f64) -> String {
    if secs.is_nan() {
        "n/a".into()
    } else if secs >= 10.0 {
        format!("{secs:.1} s")
    } else if secs >= 1.0 {
        format!("{secs:.2} s")
    } else {
        format!("{:.0} ms", secs * 1e3)
    }
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} to {}", ms(lo), ms(hi))
}

fn med(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        median(v.to_vec())
    }
}

fn saves_table(all: &[Saves], bytes: u64) -> String {
    let gb = bytes as f64 / 1e9;
    let mut t = String::from(
        "| world | save | median | aggregate GB/s | / D0 | rounds |\n|---|---|---|---|---|---|\n",
    );
    for s in all {
        let rows: [(&str, &[f64]); 6] = [
            (
                "D0, buffered: `write` + `fsync` of each rank's share, all ranks at once",
                &s.d0,
            ),
            ("D0, `O_DIRECT`: the same with `O_DIRECT`", &s.d0_direct),
            ("ckptio `DcpCheckpointIo`, until committed", &s.sync),
            (
                "ckptio `AsyncCheckpointIo` Eager, until committed",
                &s.async_done,
            ),
            ("torch `dcp.save`, until every rank returned", &s.torch_save),
            (
                "torch `dcp.async_save`, until every future resolved",
                &s.torch_async,
            ),
        ];
        for (what, v) in rows {
            let m = med(v);
            t += &format!(
                "| {} | {what} | {} | {:.2} | {:.2} | {} |\n",
                s.world,
                ms(m),
                gb / m,
                s.d0() / m,
                range(v)
            );
        }
    }
    t
}

fn stalls_table(all: &[Saves]) -> String {
    let mut t = String::from(
        "| world | stall per rank | median | worst rank, worst round | / memcpy |\n\
         |---|---|---|---|---|\n",
    );
    for s in all {
        let m0 = med(&s.memcpy);
        let rows: [(&str, &[f64]); 3] = [
            (
                "memcpy of the rank's share into a warm buffer, all ranks at once",
                &s.memcpy,
            ),
            ("ckptio `AsyncCheckpointIo::save`, Eager", &s.stall),
            ("torch `dcp.async_save` call", &s.torch_stall),
        ];
        for (what, v) in rows {
            let worst = v.iter().copied().fold(f64::NAN, f64::max);
            t += &format!(
                "| {} | {what} | {} | {} | {:.2} |\n",
                s.world,
                ms(med(v)),
                ms(worst),
                med(v) / m0
            );
        }
    }
    t
}

fn loads_table(all: &[Loads], crc: bool) -> String {
    let ckptio = match crc {
        true => "ckptio `DcpReader::read_chunk`, a process per rank, CRC-32s checked",
        false => "ckptio `DcpReader::read_chunk`, a process per rank, no CRC-32 check",
    };
    let mut t = String::from(
        "| saved at → loaded at | load | median | GB/s needed | bytes read / needed | read \
         syscalls (`rchar`) / needed | rounds |\n|---|---|---|---|---|---|---|\n",
    );
    for l in all {
        let needed = l.needed as f64;
        let rows = [
            (ckptio, &l.secs, l.bytes_read, "`bytes_read`", &l.rchar),
            (
                "torch `dcp.load`, DTensor `Shard(0)` templates",
                &l.torch_secs,
                l.torch_plan,
                "saved chunks met, whole",
                &l.torch_rchar,
            ),
        ];
        for (what, secs, read, how, rchar) in rows {
            t += &format!(
                "| {} → {} | {what} | {} | {:.2} | {:.3} ({how}) | {:.3} | {} |\n",
                l.saved,
                l.loaded,
                ms(med(secs)),
                needed / 1e9 / med(secs),
                read as f64 / needed,
                med(rchar) / needed,
                range(secs)
            );
        }
    }
    t
}

fn goal_row(what: &str, figure: f64, target: &str, met: bool) -> String {
    format!(
        "| {what} | {figure:.2} | {target} | {} |\n",
        if met { "yes" } else { "no" }
    )
}

fn goals_table(saves: &[Saves], loads: &[Loads]) -> String {
    let mut t = String::from("| goal | figure | target | met |\n|---|---|---|---|\n");
    for s in saves {
        let w = s.world;
        let x = s.d0() / med(&s.sync);
        t += &goal_row(
            &format!("world {w}: ckptio aggregate write / D0"),
            x,
            ">= 0.9",
            x >= 0.9,
        );
        let x = med(&s.torch_save) / med(&s.sync);
        let what = format!("world {w}: `dcp.save` time / ckptio time to commit");
        t += &goal_row(&what, x, ">= 2", x >= 2.0);
        let x = med(&s.stall) / med(&s.memcpy);
        let what = format!("world {w}: ckptio stall per rank / memcpy of its share");
        t += &goal_row(&what, x, "<= 1.2", x <= 1.2);
    }
    for l in loads {
        let x = l.bytes_read as f64 / l.needed as f64;
        let what = format!("{} → {}: ckptio bytes read / needed", l.saved, l.loaded);
        t += &goal_row(&what, x, "<= 1.1", x <= 1.1);
    }
    t
}

fn report(a: &Args, geo: Geometry, saves: &[Saves], loads: &[Loads], base: &Path) -> String {
    let command = common::command_line(COMMAND);
    let cache = match loads.iter().all(|l| l.cold) {
        true => "cold (page cache emptied before each load)",
        false => "warm (page cache as the saves left it)",
    };
    format!(
        "{}State: {} tensors of [{}, {}] float32 ({} MiB), each sharded along dim 0 as \
         `torch.chunk` splits it; every figure the median of {} rounds. D0 is the faster of the two \
         raw writes. Loads are {cache}.\n\n\
         {}\n{}\n{}\n{}",
        common::section_header(&command, &common::commit(), &common::machine(base), ""),
        geo.tensors,
        geo.rows,
        geo.cols,
        a.size_mib,
        a.rounds,
        saves_table(saves, geo.bytes()),
        stalls_table(saves),
        loads_table(loads, !a.no_crc),
        goals_table(saves, loads)
    )
}

fn main() -> Res<()> {
    let a = Args::parse().resolved();
    if std::env::var_os(CHILD_ENV).is_some() {
        return child_main(&a);
    }
    progress(format_args!("{} MiB, {} rounds", a.size_mib, a.rounds));
    let geo = Geometry::of(&a)?;
    let pairs = a.load_pairs()?;
    let worlds = a
        .worlds
        .iter()
        .chain(pairs.iter().flat_map(|(s, l)| [s, l]));
    if worlds.copied().any(|w| w == 0) {
        return Err("world sizes must be at least 1".into());
    }
    let tmp = tempfile::Builder::new()
        .prefix("ckptio-dcp-bench-")
        .tempdir_in("/tmp")?;
    let base = tmp.path();
    let mut saves = Vec::new();
    for &w in &a.worlds {
        let (k, tk) = kept(base, w);
        saves.push(measure_saves(&a, w, base, &k, &tk)?);
    }
    for &(s, _) in &pairs {
        let (k, tk) = kept(base, s);
        if !k.exists() {
            prepare_checkpoint(&a, s, &k, &tk)?;
        }
    }
    let loads = measure_loads(&a, &pairs, base)?;
    let md = report(&a, geo, &saves, &loads, base);
    println!("{md}");
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, &md)?;
    progress(format_args!("wrote {}", a.out.display()));
    Ok(())
}
