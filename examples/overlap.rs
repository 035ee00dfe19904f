//! The main job: how much slower does training get when it checkpoints this often?
//!
//! A real training loop (an MLP trained with AdamW in tch, on CPU) checkpoints its model and
//! optimizer state every K steps. The same loop runs, from the same seed, with: no checkpoint;
//! a synchronous `TorchCheckpointIo`; `AsyncCheckpointIo` Eager (copying on the training
//! thread, the default), and Eager with `write_protect(true)` (write-protected where the kernel
//! allows it); `AsyncCheckpointIo` Deferred (the copy overlaps forward/backward, the loop waits
//! on `staged()` just before the optimizer step). Then the same loop in Python from the
//! project's `.venv`: `torch.save` in the loop, Lightning's `AsyncCheckpointIO`, and
//! `torch.distributed.checkpoint.async_save`. Last, the Python section
//! (`benches/py/lightning_bench.py`): a Lightning `Trainer` with the same model size and K, with
//! no checkpoint, Lightning's `TorchCheckpointIO` and `AsyncCheckpointIO`, and ckptio's
//! `AsyncCheckpointIO` and `TorchCheckpointIO` plugins.
//!
//! Every ckptio checkpoint of the last round is reloaded with ckptio and compared bit for bit
//! with the parameters at the step it claims (from a deterministic re-run), and the last
//! checkpoint of each mode is loaded with the venv's `torch.load(weights_only=True)` and
//! compared digest by digest; every checkpoint of the Trainer section is loaded with
//! `torch.load(weights_only=True)` and compared with digests taken before its save. The run
//! exits non-zero if any check fails.
//!
//! At the end the run writes `results/overlap/` (Markdown, JSON, plots) and, unless `--no-docs`,
//! its sections of `docs/benchmarks.md` (`overlap` and `python`), the headline table of
//! `README.md` and the plots in `docs/`, each with the command line, the commit, the date and
//! the machine.
//!
//! ```text
//! ./dev.sh main                       # 240 MiB checkpoints, about 16 to 20 minutes on 2 cores
//! ./dev.sh main --quick               # a few minutes
//! ./dev.sh main --size-mib 1024       # bigger
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckptio::runtime::Builder;
use ckptio::{
    CheckpointIo, Dict, HostTensor, LoadOptions, SaveHandle, SaveOptions, SnapshotMode,
    TorchCheckpointIo, Value,
};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tch::nn::{Module, VarStore};
use tch::{nn, Device, Kind, Tensor};

mod common;
use common::{median, python, raw_write, tensor_digest, RawSource, RssPeak};

#[derive(Parser, Clone)]
#[command(about = "Overlap of compute and checkpoint writes, side by side with peers")]
struct Args {
    /// Checkpoint size to aim for (model + AdamW state), MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: usize,
    /// Width of each layer.
    #[arg(long)]
    hidden: Option<i64>,
    /// Batch size (sets the compute per step).
    #[arg(long, default_value_t = 256)]
    batch: i64,
    /// Training steps per mode.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Checkpoint every K steps.
    #[arg(long, default_value_t = 4)]
    every: usize,
    /// Threads for compute (the other core is left to the writer, for every contender).
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// Small and fast: a smoke test in well under a minute.
    #[arg(long)]
    quick: bool,
    /// Skip the Python peers.
    #[arg(long)]
    no_peers: bool,
    /// Skip the Python section: a Lightning `Trainer` with each CheckpointIO plugin.
    #[arg(long)]
    no_lightning: bool,
    /// Where checkpoints are written (default target/overlap-tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where results (JSON, Markdown, PNG) go.
    #[arg(long, default_value = "results/overlap")]
    out: PathBuf,
    /// Rounds of all modes, interleaved (figures aggregate over rounds); every other round runs
    /// the modes in reverse, so an even number balances their order.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seed for model and data.
    #[arg(long, default_value_t = 7)]
    seed: i64,
    /// Do not reserve the async modes' staging before the loop (`AsyncCheckpointIo::reserve`):
    /// their first save then allocates it and maps its pages, on the training thread unless
    /// the save is write-protected.
    #[arg(long)]
    no_reserve: bool,
    /// Leave `docs/` and `README.md` alone (results still go to `--out`).
    #[arg(long)]
    no_docs: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Baseline,
    Sync,
    /// Eager, the default: the copy on the training thread.
    Eager,
    /// Eager with `write_protect(true)`: large CPU tensors write-protected, copied behind.
    EagerProtected,
    Deferred,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "ckptio: no checkpoint (baseline)",
            Mode::Sync => "ckptio: TorchCheckpointIo (sync)",
            Mode::Eager => "ckptio: AsyncCheckpointIo Eager",
            Mode::EagerProtected => "ckptio: AsyncCheckpointIo Eager, write_protect(true)",
            Mode::Deferred => "ckptio: AsyncCheckpointIo Deferred",
        }
    }
    fn dir(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Sync => "sync",
            Mode::Eager => "eager",
            Mode::EagerProtected => "eager-protected",
            Mode::Deferred => "deferred",
        }
    }
}

/// One mode's measurements, ckptio's or a peer's.
#[derive(Clone, Debug, Default)]
struct Run {
    name: String,
    group: String,
    durability: String,
    wall_s: f64,
    step_ms: Vec<f64>,
    stall_ms: Vec<f64>,
    /// Per step: a write was in flight at its end.
    in_flight: Vec<bool>,
    /// ckptio modes, per step: the stall inside it (ms), and whether a write ran during its
    /// forward/backward/optimizer compute (in flight when the step began, or, in Deferred mode,
    /// started at its beginning). Empty for the peers.
    step_stall_ms: Vec<f64>,
    overlap: Vec<bool>,
    save_steps: Vec<usize>,
    durable_s: Vec<f64>,
    /// Python modes that never fsync: seconds from the save call until the file was complete
    /// in the page cache.
    complete_s: Vec<f64>,
    /// ckptio async modes, per round: the time `reserve` took before the loop.
    reserve_ms: Vec<f64>,
    bytes: u64,
    peak_rss_extra_mib: f64,
    verified: Option<bool>,
    verify_note: String,
    /// The mode's last checkpoint loaded with PyTorch's `torch.load(weights_only=True)` and
    /// every tensor equal to the re-run's (ckptio modes).
    torch_load: Option<bool>,
    torch_load_note: String,
    /// Bytes the mode's Eager saves write-protected instead of copying (`Status::write_protected`).
    write_protected: u64,
    error: Option<String>,
}

// ----------------------------------------------------------------------------------------------
// The model and its optimizer (AdamW with visible state, as torch.optim.AdamW computes it)

struct Trainer {
    _vs: VarStore,
    layers: Vec<nn::Linear>,
    names: Vec<String>,
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: i64,
    hidden: i64,
    batch: i64,
    seed: i64,
}

const LR: f64 = 1e-3;
const BETAS: (f64, f64) = (0.9, 0.999);
const EPS: f64 = 1e-8;
const WD: f64 = 0.01;

impl Trainer {
    fn new(layers: usize, hidden: i64, batch: i64, seed: i64) -> Trainer {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let mut ls = Vec::new();
        for i in 0..layers {
            ls.push(nn::linear(
                vs.root() / format!("{i}"),
                hidden,
                hidden,
                Default::default(),
            ));
        }
        let (names, params): (Vec<String>, Vec<Tensor>) =
            ckptio::tch::named_variables(&vs).into_iter().unzip();
        let exp_avg = params.iter().map(Tensor::zeros_like).collect();
        let exp_avg_sq = params.iter().map(Tensor::zeros_like).collect();
        Trainer {
            _vs: vs,
            layers: ls,
            names,
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
            hidden,
            batch,
            seed,
        }
    }

    fn forward_backward(&mut self) {
        // Data depends only on the seed and the step, so every mode sees the same batches.
        tch::manual_seed(self.seed * 100_003 + self.step + 1);
        let x = Tensor::randn([self.batch, self.hidden], (Kind::Float, Device::Cpu));
        let y = Tensor::randn([self.batch, self.hidden], (Kind::Float, Device::Cpu));
        let mut h = x;
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h);
            if i + 1 < n {
                h = h.relu();
            }
        }
        let loss = h.mse_loss(&y, tch::Reduction::Mean);
        for p in &mut self.params {
            p.zero_grad();
        }
        loss.backward();
    }

    fn optimizer_step(&mut self) {
        self.step += 1;
        let t = self.step as f64;
        let bc1 = 1.0 - BETAS.0.powf(t);
        let bc2 = 1.0 - BETAS.1.powf(t);
        tch::no_grad(|| {
            for i in 0..self.params.len() {
                let g = self.params[i].grad();
                let p = &mut self.params[i];
                let _ = p.g_mul_scalar_(1.0 - LR * WD);
                let m = &mut self.exp_avg[i];
                let _ = m.g_mul_scalar_(BETAS.0);
                let _ = m.g_add_(&(&g * (1.0 - BETAS.0)));
                let v = &mut self.exp_avg_sq[i];
                let _ = v.g_mul_scalar_(BETAS.1);
                let _ = v.g_add_(&(&g * &g * (1.0 - BETAS.1)));
                let denom = (&*v / bc2).sqrt() + EPS;
                let upd = (&*m / &denom) * (LR / bc1);
                let _ = self.params[i].g_sub_(&upd);
            }
        });
    }

    /// The checkpoint in PyTorch's layout, tensors live (copied by the save).
    fn checkpoint(&self) -> Value {
        let mut model = Dict::ordered();
        for (n, p) in self.names.iter().zip(&self.params) {
            model.insert(n.as_str(), ckptio::tch::live(p).expect("float32"));
        }
        let mut state = Dict::new();
        for i in 0..self.params.len() {
            let mut s = Dict::new();
            s.insert("step", HostTensor::scalar(self.step as f32));
            s.insert(
                "exp_avg",
                ckptio::tch::live(&self.exp_avg[i]).expect("float32"),
            );
            s.insert(
                "exp_avg_sq",
                ckptio::tch::live(&self.exp_avg_sq[i]).expect("float32"),
            );
            state.insert(i as i64, s);
        }
        let mut group = Dict::new();
        group.insert("lr", LR);
        group.insert("betas", Value::Tuple(vec![BETAS.0.into(), BETAS.1.into()]));
        group.insert("eps", EPS);
        group.insert("weight_decay", WD);
        group.insert("amsgrad", false);
        group.insert(
            "params",
            Value::List((0..self.params.len() as i64).map(Value::Int).collect()),
        );
        let mut opt = Dict::new();
        opt.insert("state", state);
        opt.insert("param_groups", Value::List(vec![Value::Dict(group)]));
        let mut ck = Dict::new();
        ck.insert("model", model);
        ck.insert("optimizer", opt);
        ck.insert("step", self.step);
        Value::Dict(ck)
    }

    /// Digest of every saved tensor, keyed like the checkpoint.
    fn digests(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            let d = |t: &Tensor| tensor_digest(&ckptio::tch::to_host(t).expect("host"));
            out.insert(format!("model.{n}"), d(&self.params[i]));
            out.insert(format!("optimizer.state.{i}.exp_avg"), d(&self.exp_avg[i]));
            out.insert(
                format!("optimizer.state.{i}.exp_avg_sq"),
                d(&self.exp_avg_sq[i]),
            );
        }
        out
    }

    fn nbytes(&self) -> usize {
        self.params.iter().map(|p| p.numel() * 4 * 3).sum()
    }
}

// ----------------------------------------------------------------------------------------------
// Measurement helpers

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((s.len() - 1) as f64 * p).round() as usize;
    s[i]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

// ----------------------------------------------------------------------------------------------
// One ckptio mode

fn run_mode(mode: Mode, a: &Args, layers: usize, hidden: i64, dir: &Path, pb: &ProgressBar) -> Run {
    let mdir = dir.join(mode.dir());
    let _ = std::fs::remove_dir_all(&mdir);
    std::fs::create_dir_all(&mdir).expect("create mode dir");
    let mut tr = Trainer::new(layers, hidden, a.batch, a.seed);
    let sync_io = TorchCheckpointIo::new();
    let aio = match mode {
        Mode::Eager | Mode::EagerProtected => Some(
            Builder::default()
                .snapshot_mode(SnapshotMode::Eager)
                .write_protect(mode == Mode::EagerProtected)
                .build(TorchCheckpointIo::new()),
        ),
        Mode::Deferred => Some(
            Builder::default()
                .snapshot_mode(SnapshotMode::Deferred)
                .build(TorchCheckpointIo::new()),
        ),
        _ => None,
    };
    let mut run = Run {
        name: mode.name().into(),
        group: "ckptio".into(),
        durability: match mode {
            Mode::Baseline => "-".into(),
            _ => "fsync file + rename + fsync dir (atomic, durable)".into(),
        },
        ..Run::default()
    };
    let rss = RssPeak::start(Duration::from_millis(2));
    // Before the loop, as a user would: the staging buffer is allocated and mapped now (and
    // counted in the peak RSS), not by the first save.
    if let (Some(aio), false) = (&aio, a.no_reserve) {
        let t = Instant::now();
        aio.reserve(&tr.checkpoint(), 1).expect("reserve staging");
        run.reserve_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut handles: Vec<(usize, Instant, SaveHandle)> = Vec::new();
    let mut pending_deferred: Option<SaveHandle> = None;
    let t0 = Instant::now();
    for s in 1..=a.steps {
        let st = Instant::now();
        let mut stall = Duration::ZERO;
        let writing_at_start = handles.iter().any(|(_, _, h)| !h.is_finished());
        // Deferred: the save of the previous step's state starts now and overlaps fwd/bwd.
        if mode == Mode::Deferred && s > 1 && (s - 1) % a.every == 0 {
            let ss = Instant::now();
            let h = aio
                .as_ref()
                .expect("async")
                .save(&tr.checkpoint(), mdir.join(format!("step-{}.pt", s - 1)))
                .expect("save");
            stall += ss.elapsed();
            pending_deferred = Some(h);
        }
        tr.forward_backward();
        if let Some(h) = pending_deferred.take() {
            let ss = Instant::now();
            h.wait_staged().expect("staged");
            stall += ss.elapsed();
            handles.push((s - 1, Instant::now(), h));
        }
        tr.optimizer_step();
        if s % a.every == 0 && mode != Mode::Baseline && mode != Mode::Deferred {
            let path = mdir.join(format!("step-{s}.pt"));
            let ss = Instant::now();
            match mode {
                Mode::Sync => {
                    sync_io
                        .save_checkpoint(&tr.checkpoint(), &path, &SaveOptions::default())
                        .expect("save");
                    run.durable_s.push(ss.elapsed().as_secs_f64());
                }
                _ => {
                    let h = aio
                        .as_ref()
                        .expect("async")
                        .save(&tr.checkpoint(), &path)
                        .expect("save");
                    handles.push((s, ss, h));
                }
            }
            stall += ss.elapsed();
        }
        if (mode == Mode::Deferred && s > 1 && (s - 1) % a.every == 0)
            || (mode != Mode::Deferred && mode != Mode::Baseline && s % a.every == 0)
        {
            run.stall_ms.push(stall.as_secs_f64() * 1e3);
            run.save_steps.push(s);
        }
        run.step_ms.push(st.elapsed().as_secs_f64() * 1e3);
        run.in_flight
            .push(writing_at_start || handles.iter().any(|(_, _, h)| !h.is_finished()));
        run.step_stall_ms.push(stall.as_secs_f64() * 1e3);
        run.overlap.push(
            mode != Mode::Sync
                && (writing_at_start
                    || (mode == Mode::Deferred && s > 1 && (s - 1) % a.every == 0)),
        );
        pb.inc(1);
    }
    // The last checkpoint of Deferred mode starts after the loop.
    if mode == Mode::Deferred && a.steps % a.every == 0 {
        let ss = Instant::now();
        let h = aio
            .as_ref()
            .expect("async")
            .save(&tr.checkpoint(), mdir.join(format!("step-{}.pt", a.steps)))
            .expect("save");
        h.wait_staged().expect("staged");
        run.stall_ms.push(ss.elapsed().as_secs_f64() * 1e3);
        run.save_steps.push(a.steps);
        handles.push((a.steps, ss, h));
    }
    for (_, _, h) in &handles {
        let r = h.wait().expect("write");
        run.durable_s
            .push((r.stage + r.queue_wait + r.write).as_secs_f64());
        run.bytes = r.bytes;
    }
    if let Some(aio) = &aio {
        aio.teardown().expect("teardown");
        run.write_protected = aio.status().write_protected;
    }
    run.wall_s = t0.elapsed().as_secs_f64();
    run.peak_rss_extra_mib = rss.extra_bytes() as f64 / (1 << 20) as f64;
    if mode == Mode::Sync {
        run.bytes = tr.nbytes() as u64;
    }
    run
}

/// Adds another round of the same mode: wall times add up, per-step series are appended
/// (save steps shifted by `offset`), the verification of the last round is kept.
fn merge(acc: &mut Run, r: Run, offset: usize) {
    acc.wall_s += r.wall_s;
    acc.step_ms.extend(r.step_ms);
    acc.stall_ms.extend(r.stall_ms);
    acc.in_flight.extend(r.in_flight);
    acc.step_stall_ms.extend(r.step_stall_ms);
    acc.overlap.extend(r.overlap);
    acc.save_steps
        .extend(r.save_steps.into_iter().map(|s| s + offset));
    acc.durable_s.extend(r.durable_s);
    acc.reserve_ms.extend(r.reserve_ms);
    acc.peak_rss_extra_mib = acc.peak_rss_extra_mib.max(r.peak_rss_extra_mib);
    acc.verified = r.verified;
    acc.verify_note = r.verify_note;
    acc.torch_load = r.torch_load;
    acc.torch_load_note = r.torch_load_note;
    acc.write_protected += r.write_protected;
}

/// Re-runs training from the seed and checks each mode's files bit for bit.
fn verify(runs: &mut [Run], modes: &[Mode], a: &Args, layers: usize, hidden: i64, dir: &Path) {
    let mut tr = Trainer::new(layers, hidden, a.batch, a.seed);
    let mut expected: HashMap<usize, HashMap<String, String>> = HashMap::new();
    for s in 1..=a.steps {
        tr.forward_backward();
        tr.optimizer_step();
        if s % a.every == 0 {
            expected.insert(s, tr.digests());
        }
    }
    for (run, mode) in runs.iter_mut().zip(modes) {
        if *mode == Mode::Baseline {
            continue;
        }
        let mut bad = Vec::new();
        let mut checked = 0;
        for (&s, want) in &expected {
            let path = dir.join(mode.dir()).join(format!("step-{s}.pt"));
            match ckptio::torch::load(&path, &LoadOptions::default()) {
                Err(e) => bad.push(format!("step {s}: {e}")),
                Ok(v) => {
                    if v.get("step").and_then(Value::as_int) != Some(s as i64) {
                        bad.push(format!("step {s}: file claims step {:?}", v.get("step")));
                    }
                    let got: HashMap<String, String> = v
                        .named_tensors()
                        .into_iter()
                        .filter(|(k, _)| want.contains_key(k))
                        .map(|(k, t)| (k, tensor_digest(t)))
                        .collect();
                    for (k, d) in want {
                        checked += 1;
                        if got.get(k) != Some(d) {
                            bad.push(format!("step {s}: {k} differs (torn or late snapshot)"));
                        }
                    }
                }
            }
        }
        run.verified = Some(bad.is_empty());
        run.verify_note = if bad.is_empty() {
            format!(
                "{} checkpoints, {checked} tensors bit-exact",
                expected.len()
            )
        } else {
            format!(
                "{} MISMATCHES: {}",
                bad.len(),
                bad.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
            )
        };
    }
    if let Some(&last) = expected.keys().max() {
        verify_with_torch(runs, modes, last, &expected[&last], dir);
    }
}

/// Loads each mode's last checkpoint with the venv's `torch.load(weights_only=True)` (one
/// Python process for all of them) and compares its step and every tensor with the re-run's.
fn verify_with_torch(
    runs: &mut [Run],
    modes: &[Mode],
    step: usize,
    want: &HashMap<String, String>,
    dir: &Path,
) {
    let files: Vec<(usize, PathBuf)> = modes
        .iter()
        .enumerate()
        .filter(|(_, m)| **m != Mode::Baseline)
        .map(|(i, m)| (i, dir.join(m.dir()).join(format!("step-{step}.pt"))))
        .collect();
    let report = torch_load_digests(files.iter().map(|(_, p)| p.as_path()), dir);
    for (i, path) in &files {
        let (ok, note) = match &report {
            Ok(r) => compare_with_torch(r, path, step, want),
            Err(e) => (false, e.clone()),
        };
        runs[*i].torch_load = Some(ok);
        runs[*i].torch_load_note = note;
    }
}

/// Runs `benches/py/torch_load_digests.py` on `files`; its JSON report.
fn torch_load_digests<'a>(
    files: impl Iterator<Item = &'a Path>,
    dir: &Path,
) -> Result<serde_json::Value, String> {
    let out = dir.join("torch-load.json");
    let script = common::repo_root().join("benches/py/torch_load_digests.py");
    let status = std::process::Command::new(python())
        .arg(&script)
        .arg(&out)
        .args(files)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", python().display()))?;
    if !status.success() {
        return Err(format!("torch_load_digests.py exited with {status}"));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("no torch.load report: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("bad torch.load report: {e}"))
}

/// Whether PyTorch read `path` as the checkpoint of `step` with every tensor in `want`.
fn compare_with_torch(
    report: &serde_json::Value,
    path: &Path,
    step: usize,
    want: &HashMap<String, String>,
) -> (bool, String) {
    let torch = report["torch"].as_str().unwrap_or("?");
    let r = &report["files"][path.to_string_lossy().as_ref()];
    if r["ok"].as_bool() != Some(true) {
        let e = r["error"].as_str().unwrap_or("no result");
        return (
            false,
            format!("torch {torch}: {}", e.lines().next().unwrap_or(e)),
        );
    }
    if r["step"].as_u64() != Some(step as u64) {
        return (false, format!("torch {torch} read step {}", r["step"]));
    }
    let differ: Vec<&String> = want
        .iter()
        .filter(|(k, d)| r["tensors"][k.as_str()].as_str() != Some(d.as_str()))
        .map(|(k, _)| k)
        .collect();
    match differ.first() {
        None => (
            true,
            format!("torch {torch}, step {step}, {} tensors equal", want.len()),
        ),
        Some(k) => (
            false,
            format!("torch {torch}: {} tensors differ, e.g. {k}", differ.len()),
        ),
    }
}

// ----------------------------------------------------------------------------------------------
// Peers (Python)

fn run_peers(a: &Args, layers: usize, hidden: i64, dir: &Path) -> Vec<Run> {
    let out = dir.join("peers.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/py/overlap_peer.py");
    let status = std::process::Command::new(python())
        .arg(&script)
        .args([
            "--layers",
            &layers.to_string(),
            "--hidden",
            &hidden.to_string(),
        ])
        .args([
            "--batch",
            &a.batch.to_string(),
            "--steps",
            &a.steps.to_string(),
        ])
        .args([
            "--every",
            &a.every.to_string(),
            "--seed",
            &a.seed.to_string(),
        ])
        .args(["--threads", &a.threads.to_string()])
        .arg("--dir")
        .arg(dir.join("peers"))
        .arg("--out")
        .arg(&out)
        .status();
    let fail = |msg: String| {
        vec![Run {
            name: "python peers".into(),
            group: "peer".into(),
            error: Some(msg),
            ..Run::default()
        }]
    };
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => return fail(format!("peer script exited with {s}")),
        Err(e) => return fail(format!("cannot run {}: {e}", python().display())),
    }
    let text = match std::fs::read_to_string(&out) {
        Ok(t) => t,
        Err(e) => return fail(format!("no peer results: {e}")),
    };
    let doc: serde_json::Value = match serde_json::from_str(&text) {
        Ok(d) => d,
        Err(e) => return fail(format!("bad peer JSON: {e}")),
    };
    doc["modes"]
        .as_array()
        .map(|modes| {
            modes
                .iter()
                .map(|m| {
                    let name = format!("python: {}", m["name"].as_str().unwrap_or("?"));
                    python_run(m, name, "peer")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The numbers of a JSON array (nulls left out).
fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default()
}

/// One mode of a Python script's JSON report (`overlap_peer.py`, `lightning_bench.py`).
fn python_run(m: &serde_json::Value, name: String, group: &str) -> Run {
    if let Some(e) = m["error"].as_str() {
        return Run {
            name,
            group: group.into(),
            error: Some(e.into()),
            ..Run::default()
        };
    }
    Run {
        name,
        group: group.into(),
        durability: m["durability"].as_str().unwrap_or("").into(),
        wall_s: m["wall_s"].as_f64().unwrap_or(f64::NAN),
        step_ms: f64s(&m["step_ms"]),
        stall_ms: f64s(&m["stalls_ms"]),
        in_flight: m["in_flight"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_bool().unwrap_or(false)).collect())
            .unwrap_or_default(),
        save_steps: m["save_steps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|u| u as usize))
                    .collect()
            })
            .unwrap_or_default(),
        durable_s: f64s(&m["durable_s"]),
        complete_s: f64s(&m["complete_s"]),
        bytes: m["bytes"].as_u64().unwrap_or(0),
        peak_rss_extra_mib: m["peak_rss_extra_mib"].as_f64().unwrap_or(f64::NAN),
        verified: m["verified"].as_bool(),
        verify_note: m["verify_note"].as_str().unwrap_or("").into(),
        error: None,
        ..Run::default()
    }
}

// ----------------------------------------------------------------------------------------------
// The Python section: a Lightning `Trainer` with each CheckpointIO plugin

/// The Trainer's modes: their key in `lightning_bench.py`'s report and their name in the table.
const TRAINER_MODES: [(&str, &str); 6] = [
    ("none", "Trainer: no checkpoint (baseline)"),
    (
        "lightning_torch",
        "Trainer: Lightning TorchCheckpointIO (the default; torch.save, sync)",
    ),
    ("lightning_async", "Trainer: Lightning AsyncCheckpointIO"),
    ("ckptio_async", "Trainer: ckptio.AsyncCheckpointIO"),
    (
        "ckptio_async_wp",
        "Trainer: ckptio.AsyncCheckpointIO(write_protect=True)",
    ),
    ("ckptio_torch", "Trainer: ckptio.TorchCheckpointIO (sync)"),
];

/// The table's name of a Trainer mode.
fn trainer_name(key: &str) -> String {
    TRAINER_MODES
        .iter()
        .find(|(k, _)| *k == key)
        .map_or_else(|| format!("Trainer: {key}"), |(_, n)| (*n).to_string())
}

/// What `benches/py/lightning_bench.py` measured.
struct TrainerSection {
    runs: Vec<Run>,
    /// M0 in the Trainer's process: the checkpoint's tensors copied into warm tensors.
    m0_s: f64,
    /// The same tensors cloned into fresh memory.
    clone_s: f64,
    /// Bytes of tensor data in one checkpoint.
    state_bytes: u64,
    rounds: usize,
    /// The ckptio package's version and source commit; torch, Lightning and Python versions.
    versions: String,
    /// The script's whole report.
    report: serde_json::Value,
}

impl TrainerSection {
    fn failed(rounds: usize, msg: String) -> TrainerSection {
        TrainerSection {
            runs: vec![Run {
                name: "Trainer (lightning_bench.py)".into(),
                group: "lightning".into(),
                error: Some(msg),
                ..Run::default()
            }],
            m0_s: f64::NAN,
            clone_s: f64::NAN,
            state_bytes: 0,
            rounds,
            versions: String::new(),
            report: serde_json::Value::Null,
        }
    }

    fn run(&self, key: &str) -> Option<&Run> {
        let name = trainer_name(key);
        self.runs
            .iter()
            .find(|r| r.name == name && r.error.is_none())
    }

    fn baseline(&self) -> Option<&Run> {
        self.run("none")
    }
}

/// Runs `benches/py/lightning_bench.py` with the Rust section's model, data size and K.
fn run_lightning(a: &Args, layers: usize, hidden: i64, dir: &Path) -> TrainerSection {
    // A smoke run needs one round only.
    let rounds = if a.quick { 1 } else { a.rounds.max(1) };
    let out = dir.join("lightning.json");
    let script = common::repo_root().join("benches/py/lightning_bench.py");
    let status = std::process::Command::new(python())
        .arg(&script)
        .args(["--layers", &layers.to_string()])
        .args(["--hidden", &hidden.to_string()])
        .args(["--batch", &a.batch.to_string()])
        .args(["--steps", &a.steps.to_string()])
        .args(["--every", &a.every.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .args(["--threads", &a.threads.to_string()])
        .args(["--rounds", &rounds.to_string()])
        .arg("--dir")
        .arg(dir.join("lightning"))
        .arg("--out")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            return TrainerSection::failed(rounds, format!("lightning_bench.py exited with {s}"))
        }
        Err(e) => {
            return TrainerSection::failed(
                rounds,
                format!("cannot run {}: {e}", python().display()),
            )
        }
    }
    let doc: serde_json::Value = match std::fs::read_to_string(&out)
        .map_err(|e| format!("no lightning_bench.py results: {e}"))
        .and_then(|t| {
            serde_json::from_str(&t).map_err(|e| format!("bad lightning_bench.py JSON: {e}"))
        }) {
        Ok(d) => d,
        Err(e) => return TrainerSection::failed(rounds, e),
    };
    let runs = doc["modes"]
        .as_array()
        .map(|modes| {
            modes
                .iter()
                .map(|m| {
                    python_run(
                        m,
                        trainer_name(m["name"].as_str().unwrap_or("?")),
                        "lightning",
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let state_bytes = doc["modes"]
        .as_array()
        .and_then(|ms| ms.iter().find_map(|m| m["state_bytes"].as_u64()))
        .unwrap_or(0);
    TrainerSection {
        runs,
        m0_s: doc["m0_s"].as_f64().unwrap_or(f64::NAN),
        clone_s: doc["clone_s"].as_f64().unwrap_or(f64::NAN),
        state_bytes,
        rounds,
        versions: format!(
            "ckptio Python package {} (its source at commit {}), torch {}, Lightning {}, Python {}",
            doc["ckptio_package"]["version"].as_str().unwrap_or("?"),
            doc["ckptio_package"]["commit"]
                .as_str()
                .unwrap_or("unknown"),
            doc["torch_version"].as_str().unwrap_or("?"),
            doc["lightning_version"].as_str().unwrap_or("?"),
            doc["python_version"].as_str().unwrap_or("?")
        ),
        report: doc,
    }
}

/// A time-to-durable cell: the mean time to durable, or, for a plugin that never fsyncs, when
/// its files were complete in the page cache.
fn durable_cell(r: &Run, d: &Derived) -> String {
    if d.durable_mean_s.is_finite() {
        fmt(d.durable_mean_s, 2)
    } else if !r.complete_s.is_empty() {
        format!(
            "never fsynced (complete after {} s)",
            fmt(mean(&r.complete_s), 2)
        )
    } else {
        "n/a".into()
    }
}

/// The Python section's table, with the goals of issue #21 below it.
fn trainer_markdown(t: &TrainerSection, a: &Args, layers: usize, hidden: i64, d0: f64) -> String {
    let gb = t.state_bytes as f64 / 1e9;
    let mut md = format!(
        "A Lightning `Trainer` (CPU, one device) trains the Rust section's model on the same shapes: \
         {layers} x Linear({hidden},{hidden}) + AdamW state = {:.0} MiB of tensors in Lightning's checkpoint dict, \
         `ModelCheckpoint(every_n_train_steps={}, save_top_k=-1)`, {} steps per Trainer, batch {}, {} compute thread(s); \
         {} round(s) of every mode, interleaved, every other round in reverse order (wall times summed over rounds). {}.\n\
         M0 in the Trainer's process (the checkpoint's tensors copied into warm tensors): {} ms ({} GB/s); \
         cloning them, as Lightning's `AsyncCheckpointIO` does: {} ms. D0 as measured by the Rust section: {:.0} ms.\n\n\
         | mode | wall s | overhead % | step median / p99 ms | stall median / max ms (median / M0) | interference | time to durable s | write GB/s (/D0) | peak extra RSS MiB | torch.load(weights_only=True): bit-exact | durability |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        t.state_bytes as f64 / (1 << 20) as f64,
        a.every,
        a.steps,
        a.batch,
        a.threads,
        t.rounds,
        t.versions,
        fmt(t.m0_s * 1e3, 1),
        fmt(gb / t.m0_s, 2),
        fmt(t.clone_s * 1e3, 1),
        d0 * 1e3,
    );
    for r in &t.runs {
        if let Some(e) = &r.error {
            md.push_str(&format!(
                "| {} | failed: {} | | | | | | | | | |\n",
                r.name,
                e.replace('|', "/")
            ));
            continue;
        }
        let d = derive(r, t.baseline());
        let disk_gb = r.bytes as f64 / 1e9;
        md.push_str(&format!(
            "| {} | {} | {} | {} / {} | {} / {} ({}) | {} | {} | {} ({}) | {} | {} | {} |\n",
            r.name,
            fmt(r.wall_s, 2),
            fmt(d.overhead_pct, 1),
            fmt(d.median_ms, 0),
            fmt(d.p99_ms, 0),
            fmt(d.stall_median_ms, 1),
            fmt(d.stall_max_ms, 1),
            fmt(d.stall_median_ms / 1e3 / t.m0_s, 2),
            fmt(d.interference, 3),
            durable_cell(r, &d),
            fmt(d.write_gbps, 2),
            fmt(d.write_gbps / (disk_gb / d0), 2),
            fmt(r.peak_rss_extra_mib, 0),
            check_cell(r, r.verified, &r.verify_note),
            r.durability
        ));
    }
    md.push('\n');
    md.push_str(&goals_markdown(&trainer_goals(t)));
    md
}

/// Whether a run met a goal.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Met {
    Yes,
    No,
    /// The run cannot tell: a mode failed, or the goal's condition does not hold.
    NotApplicable,
    /// A figure shown beside the goals, with no threshold.
    Information,
}

impl Met {
    fn of(ok: Option<bool>) -> Met {
        match ok {
            Some(true) => Met::Yes,
            Some(false) => Met::No,
            None => Met::NotApplicable,
        }
    }
}

/// One goal of issue #21 for `ckptio.AsyncCheckpointIO`, checked against this run.
struct Goal {
    what: String,
    measured: String,
    met: Met,
}

fn goals_markdown(goals: &[Goal]) -> String {
    let mut s = String::from(
        "| goal of issue #21 for `ckptio.AsyncCheckpointIO` | measured in this run | met |\n|---|---|---|\n",
    );
    for g in goals {
        let met = match g.met {
            Met::Yes => "yes",
            Met::No => "**no**",
            Met::NotApplicable => "n/a",
            Met::Information => "-",
        };
        s.push_str(&format!("| {} | {} | {met} |\n", g.what, g.measured));
    }
    s
}

/// The ckptio plugins the goals are checked for: their key and how the goals name them.
const GOAL_MODES: [(&str, &str); 2] = [
    ("ckptio_async", "default (copy)"),
    ("ckptio_async_wp", "`write_protect=True`"),
];

/// The goals, computed from the section's runs, for each ckptio plugin that ran.
fn trainer_goals(t: &TrainerSection) -> Vec<Goal> {
    let mut goals = Vec::new();
    for (key, label) in GOAL_MODES {
        if key != GOAL_MODES[0].0 && t.run(key).is_none() {
            continue;
        }
        goals.push(goal_stall_m0(t, key, label));
        goals.push(goal_stall_lightning(t, key, label));
        goals.push(goal_overhead(t, key, label));
    }
    goals.push(goal_memory(t));
    goals
}

/// A goal the run cannot check because a mode it needs did not run.
fn goal_not_run(what: String, met: Met) -> Goal {
    Goal {
        what,
        measured: "a mode it needs did not run".into(),
        met,
    }
}

fn goal_stall_m0(t: &TrainerSection, key: &str, label: &str) -> Goal {
    let what = format!("{label}: stall per checkpoint <= 1.2 x M0");
    let Some(r) = t.run(key) else {
        return goal_not_run(what, Met::NotApplicable);
    };
    let stall = derive(r, None).stall_median_ms;
    let ratio = stall / 1e3 / t.m0_s;
    Goal {
        what,
        measured: format!(
            "median stall {} ms = {} x M0 ({} ms)",
            fmt(stall, 1),
            fmt(ratio, 2),
            fmt(t.m0_s * 1e3, 1)
        ),
        met: Met::of(ratio.is_finite().then_some(ratio <= 1.2)),
    }
}

fn goal_stall_lightning(t: &TrainerSection, key: &str, label: &str) -> Goal {
    let what =
        format!("{label}: stall at least 10 x below that of Lightning's `AsyncCheckpointIO`");
    let (Some(ours), Some(theirs)) = (t.run(key), t.run("lightning_async")) else {
        return goal_not_run(what, Met::NotApplicable);
    };
    let (s, l) = (
        derive(ours, None).stall_median_ms,
        derive(theirs, None).stall_median_ms,
    );
    Goal {
        what,
        measured: format!(
            "Lightning {} ms / ckptio {} ms = {}",
            fmt(l, 1),
            fmt(s, 1),
            times(l / s)
        ),
        met: Met::of((l / s).is_finite().then_some(l / s >= 10.0)),
    }
}

fn goal_overhead(t: &TrainerSection, key: &str, label: &str) -> Goal {
    let what = format!(
        "{label}: training overhead <= 3 % where `torch.save` (Lightning's default plugin) costs >= 30 %"
    );
    let (Some(ours), Some(torch_save)) = (t.run(key), t.run("lightning_torch")) else {
        return goal_not_run(what, Met::NotApplicable);
    };
    let o = derive(ours, t.baseline()).overhead_pct;
    let ts = derive(torch_save, t.baseline()).overhead_pct;
    let applies = ts >= 30.0;
    Goal {
        what,
        measured: format!(
            "ckptio {} %; Lightning's `TorchCheckpointIO` {} %{}",
            fmt(o, 1),
            fmt(ts, 1),
            if applies || !ts.is_finite() {
                ""
            } else {
                " (under 30 %: the goal does not apply to this run)"
            }
        ),
        met: Met::of((applies && o.is_finite()).then_some(o <= 3.0)),
    }
}

fn goal_memory(t: &TrainerSection) -> Goal {
    let what =
        "default (copy): peak extra host memory: one staging copy per save in flight".to_owned();
    let (Some(r), Some(b)) = (t.run("ckptio_async"), t.baseline()) else {
        return goal_not_run(what, Met::Information);
    };
    let extra = r.peak_rss_extra_mib - b.peak_rss_extra_mib;
    let state = t.state_bytes as f64 / (1 << 20) as f64;
    Goal {
        what,
        measured: format!(
            "peak RSS above the no-checkpoint Trainer's: {} MiB = {} x one copy of the state ({} MiB)",
            fmt(extra, 0),
            fmt(extra / state, 2),
            fmt(state, 0)
        ),
        met: Met::Information,
    }
}

// ----------------------------------------------------------------------------------------------
// Machine limits

/// M0: a memcpy of the checkpoint's size into a warm buffer; D0: a raw sequential write of it
/// to a new file plus fsync, the faster of buffered and `O_DIRECT` writes. Medians of 3.
fn limits(bytes: usize, dir: &Path) -> (f64, f64) {
    let src = RawSource::new(bytes, 3);
    let src_bytes = src.bytes();
    let mut dst = vec![1u8; src_bytes.len()];
    dst.copy_from_slice(src_bytes);
    let m0 = median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                dst.copy_from_slice(src_bytes);
                std::hint::black_box(&dst);
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    drop(dst);
    let buffered = median((0..3).map(|_| raw_write(dir, &src, false)).collect());
    let direct = median((0..3).map(|_| raw_write(dir, &src, true)).collect());
    (m0, buffered.min(direct))
}

// ----------------------------------------------------------------------------------------------
// Report

struct Derived {
    overhead_pct: f64,
    median_ms: f64,
    p99_ms: f64,
    stall_mean_ms: f64,
    stall_median_ms: f64,
    stall_max_ms: f64,
    interference: f64,
    durable_mean_s: f64,
    write_gbps: f64,
}

fn derive(r: &Run, baseline: Option<&Run>) -> Derived {
    // Interference: compute time of steps during which a write ran / of the other steps.
    let mut busy = Vec::new();
    let mut idle = Vec::new();
    if r.overlap.len() == r.step_ms.len() && r.step_stall_ms.len() == r.step_ms.len() {
        // ckptio: every step, its stall taken out (a Deferred write runs during its save step).
        for ((&ms, &stall), &over) in r.step_ms.iter().zip(&r.step_stall_ms).zip(&r.overlap) {
            if over {
                busy.push(ms - stall);
            } else {
                idle.push(ms - stall);
            }
        }
    } else {
        // Peers: steps that took a save carry its stall and are left out.
        for (i, &ms) in r.step_ms.iter().enumerate() {
            if r.save_steps.contains(&(i + 1)) {
                continue;
            }
            if r.in_flight.get(i).copied().unwrap_or(false) {
                busy.push(ms);
            } else {
                idle.push(ms);
            }
        }
    }
    let interference = if busy.is_empty() || idle.is_empty() {
        f64::NAN
    } else {
        percentile(&busy, 0.5) / percentile(&idle, 0.5)
    };
    let durable_mean_s = mean(&r.durable_s);
    Derived {
        overhead_pct: baseline.map_or(f64::NAN, |b| (r.wall_s / b.wall_s - 1.0) * 100.0),
        median_ms: percentile(&r.step_ms, 0.5),
        p99_ms: percentile(&r.step_ms, 0.99),
        stall_mean_ms: mean(&r.stall_ms),
        stall_median_ms: percentile(&r.stall_ms, 0.5),
        stall_max_ms: r.stall_ms.iter().copied().fold(f64::NAN, f64::max),
        interference,
        durable_mean_s,
        write_gbps: if durable_mean_s > 0.0 {
            r.bytes as f64 / 1e9 / durable_mean_s
        } else {
            f64::NAN
        },
    }
}

fn fmt(x: f64, prec: usize) -> String {
    if x.is_finite() {
        format!("{x:.prec$}")
    } else {
        "n/a".into()
    }
}

/// Registers DejaVu Sans as the plots' "sans-serif" font, once per process.
fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let font = [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
            ]
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or("no DejaVuSans.ttf font found for plot labels")?;
            let font: &'static [u8] = Box::leak(font.into_boxed_slice());
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, font)
                .map_err(|_| "bad font".to_string())
        })
        .clone()
}

/// Draws the step time of every step of `runs` into `path` (a circle where a checkpoint was
/// taken), titled `title`, with `caption` at its foot.
fn plot_step_times(runs: &[&Run], path: &Path, title: &str, caption: &str) -> Result<(), String> {
    use plotters::prelude::*;
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let steps = runs.iter().map(|r| r.step_ms.len()).max().unwrap_or(1);
    let ymax = runs
        .iter()
        .flat_map(|r| r.step_ms.iter().copied())
        .fold(1.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .margin_bottom(45)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(1f64..steps as f64, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("step time (ms)")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, r) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = r
            .step_ms
            .iter()
            .enumerate()
            .map(|(j, &m)| ((j + 1) as f64, m))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(r.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(
                r.save_steps
                    .iter()
                    .filter_map(|&s| pts.get(s - 1))
                    .map(|&p| Circle::new(p, 5, color.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())?;
    let foot = root.dim_in_pixel().1 as i32 - 22;
    root.draw(&Text::new(caption, (15, foot), ("sans-serif", 15)))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;

    Ok(())
}

/// Draws `step_times.png` and `overhead.png` into `out`, each with `caption` (the command and
/// the commit that produced it) at its foot.
fn plot(
    runs: &[Run],
    baselines: &HashMap<String, Run>,
    out: &Path,
    caption: &str,
) -> Result<(), String> {
    use plotters::prelude::*;
    register_font()?;
    let ok: Vec<&Run> = runs
        .iter()
        .filter(|r| r.error.is_none() && !r.step_ms.is_empty())
        .collect();
    plot_step_times(
        &ok,
        &out.join("step_times.png"),
        "Step time per step (circles: a checkpoint was taken in that step)",
        caption,
    )?;

    let path = out.join("overhead.png");
    let root = BitMapBackend::new(&path, (1400, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let bars: Vec<(String, f64)> = ok
        .iter()
        .filter(|r| !r.name.contains("baseline"))
        .map(|r| {
            (
                r.name.clone(),
                derive(r, baselines.get(&r.group)).overhead_pct,
            )
        })
        .collect();
    let top = bars.iter().map(|b| b.1).fold(5.0, f64::max) * 1.15;
    let bottom = bars.iter().map(|b| b.1).fold(0.0, f64::min).min(0.0) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Training slowdown vs. its own no-checkpoint baseline (%)",
            ("sans-serif", 24),
        )
        .margin(15)
        .margin_bottom(45)
        .x_label_area_size(40)
        .y_label_area_size(420)
        .build_cartesian_2d(bottom..top, 0f64..bars.len() as f64)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("overhead %")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (name, v)) in bars.iter().enumerate() {
        let y0 = i as f64 + 0.15;
        let y1 = i as f64 + 0.85;
        let color = if name.starts_with("ckptio") {
            BLUE.mix(0.7)
        } else {
            RED.mix(0.6)
        };
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y0), (*v, y1)],
                color.filled(),
            )))
            .map_err(|e| e.to_string())?;
        root.draw(&Text::new(
            format!("{name}: {v:.1}%"),
            (10, chart.backend_coord(&(bottom, i as f64 + 0.5)).1 - 8),
            ("sans-serif", 16),
        ))
        .map_err(|e| e.to_string())?;
    }
    let foot = root.dim_in_pixel().1 as i32 - 22;
    root.draw(&Text::new(caption, (15, foot), ("sans-serif", 15)))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

fn main() {
    let mut a = Args::parse();
    if a.quick {
        a.size_mib = a.size_mib.min(48);
        a.steps = a.steps.min(16);
        a.every = a.every.min(4);
        a.batch = a.batch.min(128);
    }
    tch::set_num_threads(a.threads);
    tch::set_num_interop_threads(1);
    let hidden = a
        .hidden
        .unwrap_or(if a.size_mib <= 64 { 1024 } else { 2048 });
    let per_layer = 12 * (hidden * hidden + hidden) as usize;
    let layers = ((a.size_mib << 20) / per_layer).max(1);
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/overlap-tmp"));
    std::fs::create_dir_all(&dir).expect("create checkpoint dir");
    std::fs::create_dir_all(&a.out).expect("create results dir");
    let ckpt_bytes = layers * per_layer;
    eprintln!(
        "model: {layers} x Linear({hidden}, {hidden}) + AdamW = {:.0} MiB checkpoint, batch {}, {} steps, checkpoint every {}, {} compute thread(s)",
        ckpt_bytes as f64 / (1 << 20) as f64,
        a.batch,
        a.steps,
        a.every,
        a.threads
    );
    let (m0, d0) = limits(ckpt_bytes, &dir);

    // Rounds of every mode, interleaved, so slow drift of a shared machine spreads evenly over
    // the modes instead of favouring whichever ran in a quiet moment. Every other round runs
    // them in reverse, so no mode always runs first (cold) or last: over two rounds each mode's
    // mean place in the order is the same.
    let modes = [
        Mode::Baseline,
        Mode::Sync,
        Mode::Eager,
        Mode::EagerProtected,
        Mode::Deferred,
    ];
    let rounds = a.rounds.max(1);
    let pb = ProgressBar::new((a.steps * modes.len() * rounds) as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>38} [{bar:40}] {pos}/{len} steps {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut runs: Vec<Run> = Vec::new();
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..modes.len()).collect()
        } else {
            (0..modes.len()).rev().collect()
        };
        let mut slots: Vec<Option<Run>> = (0..modes.len()).map(|_| None).collect();
        for i in order {
            let m = modes[i];
            pb.set_prefix(format!("round {}/{rounds}: {}", round + 1, m.name()));
            slots[i] = Some(run_mode(m, &a, layers, hidden, &dir, &pb));
        }
        let mut this_round: Vec<Run> = slots.into_iter().flatten().collect();
        if round + 1 == rounds {
            // The files of the last round are checked against a deterministic re-run.
            pb.set_prefix("verifying checkpoints");
            verify(&mut this_round, &modes, &a, layers, hidden, &dir);
        }
        if runs.is_empty() {
            runs = this_round;
        } else {
            for (acc, r) in runs.iter_mut().zip(this_round) {
                merge(acc, r, round * a.steps);
            }
        }
    }
    pb.finish_and_clear();
    if !a.no_peers {
        eprintln!("running the Python peers (torch.save, Lightning AsyncCheckpointIO, DCP async_save) ...");
        runs.extend(run_peers(&a, layers, hidden, &dir));
    }
    let trainer = (!a.no_lightning).then(|| {
        eprintln!(
            "running the Python section: a Lightning Trainer with each CheckpointIO plugin ..."
        );
        run_lightning(&a, layers, hidden, &dir)
    });

    let mut baselines: HashMap<String, Run> = HashMap::new();
    for r in &runs {
        if r.name.contains("baseline") && r.error.is_none() {
            baselines.insert(r.group.clone(), r.clone());
        }
    }
    let command = common::command_line("./dev.sh main");
    let commit = common::commit();
    let gb = ckpt_bytes as f64 / 1e9;
    let mut md = format!(
        "Checkpoint {:.0} MiB ({layers} x Linear({hidden},{hidden}) + AdamW state), every {} steps, {} steps, batch {}, {} compute thread(s).\n\
         {} interleaved rounds of the ckptio modes (wall times summed over rounds); peers run once.\n\
         Machine limits in this run: memcpy M0 = {:.1} ms ({:.2} GB/s), write+fsync D0 = {:.0} ms ({:.2} GB/s; the faster of buffered and direct).\n\n\
         | mode | wall s | overhead % | step median / p99 ms | stall median / max ms (median / M0) | interference | time to durable s | write GB/s (/D0) | peak extra RSS MiB | ckptio reader: bit-exact | torch.load | durability |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        ckpt_bytes as f64 / (1 << 20) as f64, a.every, a.steps, a.batch, a.threads, rounds, m0 * 1e3, gb / m0, d0 * 1e3, gb / d0
    );
    let mut json_modes = Vec::new();
    for r in &runs {
        if let Some(e) = &r.error {
            md.push_str(&format!(
                "| {} | failed: {} | | | | | | | | | | |\n",
                r.name,
                e.replace('|', "/")
            ));
            json_modes.push(json!({"name": r.name, "error": e}));
            continue;
        }
        let d = derive(r, baselines.get(&r.group));
        md.push_str(&format!(
            "| {} | {} | {} | {} / {} | {} / {} ({}) | {} | {} | {} ({}) | {} | {} | {} | {} |\n",
            mode_label(r),
            fmt(r.wall_s, 2),
            fmt(d.overhead_pct, 1),
            fmt(d.median_ms, 0),
            fmt(d.p99_ms, 0),
            fmt(d.stall_median_ms, 1),
            fmt(d.stall_max_ms, 1),
            fmt(d.stall_median_ms / 1e3 / m0, 2),
            fmt(d.interference, 3),
            fmt(d.durable_mean_s, 2),
            fmt(d.write_gbps, 2),
            fmt(d.write_gbps / (gb / d0), 2),
            fmt(r.peak_rss_extra_mib, 0),
            check_cell(r, r.verified, &r.verify_note),
            check_cell(r, r.torch_load, &r.torch_load_note),
            r.durability
        ));
        json_modes.push(json!({
            "name": r.name, "group": r.group, "durability": r.durability, "wall_s": r.wall_s,
            "overhead_pct": d.overhead_pct, "step_median_ms": d.median_ms, "step_p99_ms": d.p99_ms,
            "stall_mean_ms": d.stall_mean_ms, "stall_median_ms": d.stall_median_ms,
            "stall_max_ms": d.stall_max_ms, "interference": d.interference,
            "durable_mean_s": d.durable_mean_s, "write_gbps": d.write_gbps, "peak_rss_extra_mib": r.peak_rss_extra_mib,
            "verified": r.verified, "verify_note": r.verify_note,
            "torch_load": r.torch_load, "torch_load_note": r.torch_load_note,
            "write_protected_bytes": r.write_protected,
            "step_ms": r.step_ms, "stall_ms": r.stall_ms,
            "save_steps": r.save_steps, "in_flight": r.in_flight,
            "step_stall_ms": r.step_stall_ms, "overlap": r.overlap, "durable_s": r.durable_s, "bytes": r.bytes,
            "reserve_ms": r.reserve_ms,
        }));
    }
    let reserved: Vec<String> = runs
        .iter()
        .filter(|r| !r.reserve_ms.is_empty())
        .map(|r| {
            let per: Vec<String> = r.reserve_ms.iter().map(|x| format!("{x:.0}")).collect();
            format!("{} {} ms", r.name, per.join(" / "))
        })
        .collect();
    if reserved.is_empty() {
        md.push_str("\nStaging not reserved (`--no-reserve`): each round's first async save allocates it.\n");
    } else {
        md.push_str(&format!(
            "\nBefore each round's loop the async modes reserve their staging (`AsyncCheckpointIo::reserve`, not in the wall time; per round): {}.\n",
            reserved.join("; ")
        ));
    }
    println!("{md}");
    let trainer_md = trainer
        .as_ref()
        .map(|t| trainer_markdown(t, &a, layers, hidden, d0));
    if let Some(t) = &trainer_md {
        println!("Python (Lightning Trainer):\n\n{t}");
    }
    let doc = json!({
        "command": command, "commit": commit,
        "config": {"size_mib": a.size_mib, "checkpoint_bytes": ckpt_bytes, "layers": layers, "hidden": hidden,
                   "batch": a.batch, "steps": a.steps, "every": a.every, "threads": a.threads, "seed": a.seed},
        "limits": {"m0_s": m0, "d0_s": d0},
        "modes": json_modes,
        "trainer": trainer.as_ref().map(|t| &t.report),
    });
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    )
    .expect("write results.json");
    let mut results_md = md.clone();
    if let Some(t) = &trainer_md {
        results_md.push_str(&format!("\n## Python (Lightning Trainer)\n\n{t}"));
    }
    std::fs::write(a.out.join("results.md"), &results_md).expect("write results.md");
    let caption = format!("{command} at commit {commit}, {}", common::utc_now());
    let plotted = match plot(&runs, &baselines, &a.out, &caption) {
        Ok(()) => {
            eprintln!(
                "wrote {}/{{results.md,results.json,step_times.png,overhead.png}}",
                a.out.display()
            );
            true
        }
        Err(e) => {
            eprintln!(
                "wrote {}/results.{{md,json}}; plot skipped: {e}",
                a.out.display()
            );
            false
        }
    };
    let trainer_plotted = trainer.as_ref().is_some_and(|t| {
        let ok: Vec<&Run> = t
            .runs
            .iter()
            .filter(|r| r.error.is_none() && !r.step_ms.is_empty())
            .collect();
        match plot_step_times(
            &ok,
            &a.out.join(TRAINER_PLOT),
            "Lightning Trainer: step time per step (circles: a checkpoint was taken in that step)",
            &caption,
        ) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("Trainer plot skipped: {e}");
                false
            }
        }
    });
    let mut failed = failed_checks(&runs);
    if let Some(t) = &trainer {
        failed.extend(failed_checks(&t.runs));
    }
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("FAILED: {f}");
        }
        eprintln!(
            "docs/ and README.md left as they were: a run whose checks fail is not published"
        );
        std::process::exit(1);
    }
    if !a.no_docs {
        let doc = Published {
            command: &command,
            commit: &commit,
            machine: common::machine(&dir),
            limits: format!(
                "M0 = {:.1} ms ({:.2} GB/s), D0 = {:.0} ms ({:.2} GB/s)",
                m0 * 1e3,
                gb / m0,
                d0 * 1e3,
                gb / d0
            ),
        };
        match publish(
            &doc,
            &md,
            &runs,
            m0,
            ckpt_bytes,
            plotted.then_some(a.out.as_path()),
        ) {
            Ok(()) => eprintln!("wrote its section of docs/benchmarks.md and README.md's headline"),
            Err(e) => {
                eprintln!("FAILED to write docs/benchmarks.md or README.md: {e}");
                std::process::exit(1);
            }
        }
        if let (Some(t), Some(t_md)) = (&trainer, &trainer_md) {
            let plot = trainer_plotted.then_some(a.out.as_path());
            match publish_trainer(&doc, t, t_md, d0, plot) {
                Ok(()) => eprintln!("wrote the python section of docs/benchmarks.md"),
                Err(e) => {
                    eprintln!("FAILED to write docs/benchmarks.md's python section: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A mode's name in the tables, with a note when `write_protect(true)` protected nothing here.
fn mode_label(r: &Run) -> String {
    if r.name == Mode::EagerProtected.name() && r.write_protected == 0 {
        format!(
            "{} (nothing was write-protected: userfaultfd unavailable here)",
            r.name
        )
    } else {
        r.name.clone()
    }
}

/// A check's cell: yes (what was checked), FAILED (why), or "-" where nothing was checked.
fn check_cell(r: &Run, ok: Option<bool>, note: &str) -> String {
    match ok {
        Some(true) => format!("yes ({note})"),
        Some(false) => format!("**FAILED: {}**", note.replace('|', "/")),
        None if r.group == "ckptio" && !r.name.contains("baseline") => "not checked".into(),
        None => "-".into(),
    }
}

/// Every check that failed: of a ckptio mode, the ckptio reader's bit-exact comparison or
/// PyTorch's `torch.load`; of any mode of the Lightning Trainer, its error or its
/// `torch.load` comparison.
fn failed_checks(runs: &[Run]) -> Vec<String> {
    let mut out = Vec::new();
    for r in runs
        .iter()
        .filter(|r| r.group == "ckptio" || r.group == "lightning")
    {
        if let Some(e) = &r.error {
            out.push(format!("{}: {e}", r.name));
        }
        if r.verified == Some(false) {
            let reader = if r.group == "lightning" {
                "torch.load"
            } else {
                "ckptio reader"
            };
            out.push(format!("{}: {reader}: {}", r.name, r.verify_note));
        }
        if r.torch_load == Some(false) {
            out.push(format!("{}: torch.load: {}", r.name, r.torch_load_note));
        }
    }
    out
}

/// What a generated section says about the run that wrote it.
struct Published<'a> {
    command: &'a str,
    commit: &'a str,
    machine: String,
    limits: String,
}

/// Writes this run's section of `docs/benchmarks.md`, the README's headline table, and the
/// plots in `docs/` (copied from `plots`, where `plot` wrote them).
fn publish(
    doc: &Published<'_>,
    md: &str,
    runs: &[Run],
    m0: f64,
    ckpt_bytes: usize,
    plots: Option<&Path>,
) -> std::io::Result<()> {
    let header = common::section_header(doc.command, doc.commit, &doc.machine, &doc.limits);
    let mut body = format!("{header}{md}");
    if let Some(from) = plots {
        let docs = common::repo_root().join("docs");
        for (file, alt) in [
            ("step_times.png", "Step time per step"),
            ("overhead.png", "Training slowdown per mode"),
        ] {
            std::fs::copy(from.join(file), docs.join(file))?;
            body.push_str(&format!("\n![{alt}]({file})\n"));
        }
    }
    common::write_section(&common::benchmarks_md(), "overlap", &body)?;
    let headline = headline(doc, runs, m0, ckpt_bytes);
    common::write_section(
        &common::repo_root().join("README.md"),
        "headline",
        &headline,
    )
}

/// The step-time plot of the Python section, in `--out` and in `docs/`.
const TRAINER_PLOT: &str = "python_step_times.png";

/// Writes the `python` section of `docs/benchmarks.md`: the Lightning Trainer's table and goals,
/// and its plot (copied from `plots`, where `plot_step_times` wrote it).
fn publish_trainer(
    doc: &Published<'_>,
    t: &TrainerSection,
    md: &str,
    d0: f64,
    plots: Option<&Path>,
) -> std::io::Result<()> {
    let limits = format!(
        "M0 = {} ms in the Trainer's process ({} GB/s), D0 = {:.0} ms",
        fmt(t.m0_s * 1e3, 1),
        fmt(t.state_bytes as f64 / 1e9 / t.m0_s, 2),
        d0 * 1e3
    );
    let header = common::section_header(doc.command, doc.commit, &doc.machine, &limits);
    let mut body = format!("{header}{md}");
    if let Some(from) = plots {
        std::fs::copy(
            from.join(TRAINER_PLOT),
            common::repo_root().join("docs").join(TRAINER_PLOT),
        )?;
        body.push_str(&format!(
            "\n![Lightning Trainer: step time per step]({TRAINER_PLOT})\n"
        ));
    }
    common::write_section(&common::benchmarks_md(), "python", &body)
}

/// A ratio as "N x": one decimal below 10, none above.
fn times(r: f64) -> String {
    match r {
        r if !r.is_finite() => "n/a".into(),
        r if r < 10.0 => format!("{r:.1}x"),
        r => format!("{r:.0}x"),
    }
}

/// The README's table: what one checkpoint costs the training loop with each contender.
fn headline(doc: &Published<'_>, runs: &[Run], m0: f64, ckpt_bytes: usize) -> String {
    let rows = [
        (
            Mode::Eager.name(),
            "ckptio `AsyncCheckpointIo`, Eager (default)",
        ),
        (
            Mode::EagerProtected.name(),
            "ckptio Eager, `write_protect(true)`",
        ),
        (Mode::Deferred.name(), "ckptio Deferred"),
        (
            Mode::Sync.name(),
            "ckptio `TorchCheckpointIo` (synchronous)",
        ),
        ("python: torch_save", "PyTorch `torch.save` + fsync"),
        ("python: lightning_async", "Lightning `AsyncCheckpointIO`"),
        ("python: dcp_async", "PyTorch DCP `async_save`"),
    ];
    let stall = |name: &str| {
        runs.iter()
            .find(|r| r.name == name && r.error.is_none())
            .map(|r| derive(r, None).stall_median_ms)
    };
    let torch_save = stall("python: torch_save");
    let mut s = format!(
        "<!-- Written by `{}`; edit examples/overlap.rs, not this table. -->\n\
         | {:.0} MiB checkpoint, CPU training loop | training stalled per checkpoint (median) | stall / one memcpy of the state | `torch.save`'s stall / this | time to durable |\n\
         |---|---|---|---|---|\n",
        doc.command,
        ckpt_bytes as f64 / (1 << 20) as f64
    );
    for (name, label) in rows {
        let Some(r) = runs.iter().find(|r| r.name == name) else {
            continue;
        };
        if r.error.is_some() {
            s.push_str(&format!("| {label} | failed | | | |\n"));
            continue;
        }
        let d = derive(r, None);
        let label = if name == Mode::EagerProtected.name() && r.write_protected == 0 {
            format!("{label} (not protected on this machine)")
        } else {
            label.to_string()
        };
        let durable = if d.durable_mean_s.is_finite() {
            format!("{:.2} s", d.durable_mean_s)
        } else {
            "never fsynced".into()
        };
        s.push_str(&format!(
            "| {label} | {} ms | {} | {} | {durable} |\n",
            fmt(d.stall_median_ms, 1),
            fmt(d.stall_median_ms / 1e3 / m0, 2),
            torch_save.map_or("n/a".into(), |t| times(t / d.stall_median_ms)),
        ));
    }
    s.push_str(&format!(
        "\n`{}` at commit `{}`, {}; {}. Every figure, with how it is measured: \
         [docs/benchmarks.md](docs/benchmarks.md).\n",
        doc.command,
        doc.commit,
        common::utc_now(),
        doc.machine
    ));
    s
}
