//! Format benchmark: ckptio's `torch.save` writer/reader against PyTorch's own, side by side.
//!
//! ```text
//! ./dev.sh cargo run --release --example format_bench -- --size-mib 1024 --reps 3
//! ```
//!
//! One run measures, on the same state-dict layout (names, shapes, dtypes) and in the same
//! directory, alternating the contenders in every repetition (the order rotates per rep):
//!
//! - saves: ckptio durable (temp file + fsync + rename + dir fsync), ckptio non-durable,
//!   `torch.save(sd, path)`, and `torch.save` followed by `os.fsync` of the file and directory;
//! - loads (warm page cache on both sides): ckptio read + CRC, ckptio read without CRC, ckptio
//!   mmap, `torch.load(weights_only=True)`, `torch.load(mmap=True, weights_only=True)`, each
//!   timed to "open" and to "touched" (one byte read per 4 KiB page of every storage);
//! - file sizes, and cross-loading correctness (ckptio reads torch's file, torch reads ckptio's,
//!   every tensor compared by SHA-256 of its bytes).
//!
//! The PyTorch side runs in `benches/py/format_peer.py` (`$CKPTIO_PYTHON`, else `python3`),
//! which builds the same tensors with its own random content and times only the torch calls.
//! Results are printed as Markdown and written to `results/format_bench/` (JSON + Markdown)
//! and, unless `--no-docs` or a check failed, to its section of `docs/benchmarks.md` with the
//! command line, the commit, the date and the machine.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use ckptio::{
    CheckpointIo, DType, Dict, HostTensor, LoadOptions, SaveOptions, TorchCheckpointIo, Value,
};
use clap::Parser;
use serde_json::{json, Value as Json};

mod common;
use common::tensor_digest;

/// How this benchmark is started from the repository's root.
const COMMAND: &str = "./dev.sh cargo run --release --example format_bench --";

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const PAGE: usize = 4096;

#[derive(Parser, Debug)]
#[command(about = "ckptio vs torch.save / torch.load on the same state dict")]
struct Args {
    /// Total tensor bytes of the state dict, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Repetitions of every contender (median and min are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Untimed rounds of every contender before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Directory for the checkpoint files (default: a fresh one under ./target/bench-tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where the JSON and Markdown results go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results/format_bench"))]
    out: PathBuf,
    /// Python with torch (default: $CKPTIO_PYTHON, else python3).
    #[arg(long)]
    python: Option<String>,
    /// Seed for the tensors' content.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the checkpoint files afterwards.
    #[arg(long)]
    keep: bool,
    /// Leave `docs/benchmarks.md` alone (results still go to `--out`).
    #[arg(long)]
    no_docs: bool,
}

// ---------------------------------------------------------------------------------------------
// The state dict: a small transformer's worth of tensors, sized to the request.

#[derive(Clone, Debug)]
struct Spec {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
}

impl Spec {
    fn new(name: impl Into<String>, dtype: DType, shape: &[usize]) -> Spec {
        Spec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }
    fn nbytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// About 65 float32 tensors (5 transformer blocks, token embedding, final norm), a bfloat16
/// output head and two small bfloat16 buffers, and int64 buffers (position ids, step counters,
/// one of them 0-dim). The token embedding's row count absorbs the rest of `total` bytes.
fn make_spec(total: u64) -> Vec<Spec> {
    const LAYERS: usize = 5;
    let f32s = DType::Float32;
    // 12 d^2 float32 weights per block take about three quarters of the bytes.
    let d = ((((total as f64) * 0.75 / (4.0 * 12.0 * LAYERS as f64)).sqrt() as usize) / 64 * 64)
        .max(64);
    let mut spec = Vec::new();
    spec.push(Spec::new("embed.position_ids", DType::Int64, &[1, 2048]));
    for l in 0..LAYERS {
        let p = format!("blocks.{l}");
        spec.push(Spec::new(format!("{p}.ln1.weight"), f32s, &[d]));
        spec.push(Spec::new(format!("{p}.ln1.bias"), f32s, &[d]));
        spec.push(Spec::new(format!("{p}.attn.qkv.weight"), f32s, &[3 * d, d]));
        spec.push(Spec::new(format!("{p}.attn.qkv.bias"), f32s, &[3 * d]));
        spec.push(Spec::new(format!("{p}.attn.out.weight"), f32s, &[d, d]));
        spec.push(Spec::new(format!("{p}.attn.out.bias"), f32s, &[d]));
        spec.push(Spec::new(format!("{p}.ln2.weight"), f32s, &[d]));
        spec.push(Spec::new(format!("{p}.ln2.bias"), f32s, &[d]));
        spec.push(Spec::new(format!("{p}.mlp.up.weight"), f32s, &[4 * d, d]));
        spec.push(Spec::new(format!("{p}.mlp.up.bias"), f32s, &[4 * d]));
        spec.push(Spec::new(format!("{p}.mlp.down.weight"), f32s, &[d, 4 * d]));
        spec.push(Spec::new(format!("{p}.mlp.down.bias"), f32s, &[d]));
    }
    spec.push(Spec::new("rotary.inv_freq", DType::BFloat16, &[d / 2]));
    spec.push(Spec::new("norm.weight", f32s, &[d]));
    spec.push(Spec::new("norm.bias", f32s, &[d]));
    spec.push(Spec::new("norm.num_batches_tracked", DType::Int64, &[]));
    spec.push(Spec::new("train.step", DType::Int64, &[1]));
    spec.push(Spec::new("head.logit_scale", DType::BFloat16, &[16]));
    let head_rows = ((total as f64 * 0.10) / (2.0 * d as f64)) as usize;
    spec.push(Spec::new(
        "head.weight",
        DType::BFloat16,
        &[head_rows.max(1), d],
    ));
    let used: u64 = spec.iter().map(Spec::nbytes).sum();
    let rows = (total.saturating_sub(used) / (4 * d as u64)).max(1) as usize;
    spec.insert(1, Spec::new("embed.tokens.weight", f32s, &[rows, d]));
    spec
}

/// splitmix64: deterministic, fast enough to fill a GiB in well under a second.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A uniform float in [-0.05, 0.05) from 24 random bits.
fn small_float(bits: u64) -> f32 {
    ((bits & 0xff_ffff) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1
}

fn fill(spec: &Spec, seed: u64) -> Vec<u8> {
    let n = spec.nbytes() as usize;
    let mut out = vec![0u8; n];
    let mut rng = Rng(seed);
    match spec.dtype {
        DType::Float32 => {
            for c in out.chunks_exact_mut(8) {
                let r = rng.next();
                c[..4].copy_from_slice(&small_float(r).to_le_bytes());
                c[4..].copy_from_slice(&small_float(r >> 32).to_le_bytes());
            }
            if n % 8 != 0 {
                out[n - 4..].copy_from_slice(&small_float(rng.next()).to_le_bytes());
            }
        }
        DType::BFloat16 => {
            for c in out.chunks_exact_mut(2) {
                let hi = (small_float(rng.next()).to_bits() >> 16) as u16;
                c.copy_from_slice(&hi.to_le_bytes());
            }
        }
        DType::Int64 => {
            for (i, c) in out.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&(i as i64).to_le_bytes());
            }
        }
        other => unreachable!("no generator for {other}"),
    }
    out
}

fn build_state_dict(spec: &[Spec], seed: u64) -> BoxResult<Value> {
    let mut sd = Dict::ordered();
    for (i, s) in spec.iter().enumerate() {
        let bytes = fill(s, seed ^ ((i as u64 + 1) << 32));
        sd.insert(
            s.name.as_str(),
            HostTensor::from_bytes(s.dtype, &s.shape, bytes)?,
        );
    }
    Ok(Value::from(sd))
}

// ---------------------------------------------------------------------------------------------
// The PyTorch peer: one long-lived process, one JSON command per line.

struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn spawn(python: &str, spec_path: &Path, seed: u64) -> BoxResult<Peer> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/py/format_peer.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg("serve")
            .arg("--spec")
            .arg(spec_path)
            .arg("--seed")
            .arg(seed.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {python} {script}: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        Ok(Peer {
            child,
            stdin,
            stdout,
        })
    }

    fn read(&mut self) -> BoxResult<Json> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err("the Python peer exited (see its stderr above)".into());
        }
        let v: Json = serde_json::from_str(&line)?;
        if let Some(e) = v.get("error") {
            return Err(format!("Python peer: {e}").into());
        }
        Ok(v)
    }

    fn call(&mut self, cmd: Json) -> BoxResult<Json> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        self.read()
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

fn secs(v: &Json, key: &str) -> BoxResult<f64> {
    v.get(key)
        .and_then(Json::as_f64)
        .ok_or_else(|| format!("peer reply without {key}: {v}").into())
}

// ---------------------------------------------------------------------------------------------
// Measurements.

#[derive(Debug)]
struct Series {
    op: &'static str,
    contender: &'static str,
    /// Bytes the GB/s figure is computed over (the file's size).
    bytes: u64,
    secs: Vec<f64>,
}

impl Series {
    fn new(op: &'static str, contender: &'static str) -> Series {
        Series {
            op,
            contender,
            bytes: 0,
            secs: Vec::new(),
        }
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.secs.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    fn gbps(&self, s: f64) -> f64 {
        self.bytes as f64 / s / 1e9
    }
}

/// Flushes everything the kernel still holds dirty, so that no contender pays for another's
/// write-back. Untimed. (`sync` is coreutils; a failure only makes the run noisier.)
fn settle(written: Option<&Path>) {
    if let Some(p) = written {
        if let Ok(f) = File::open(p) {
            let _ = f.sync_all();
        }
    }
    let _ = Command::new("sync").status();
}

/// Reads the whole file once (untimed) so that its pages are in the page cache.
fn warm(path: &Path) -> BoxResult<u64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}

/// Reads one byte per 4 KiB page of every distinct storage; returns their sum.
fn touch(v: &Value) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut sum = 0u64;
    for t in v.tensors() {
        let s = t.storage();
        if !seen.insert(s.id()) {
            continue;
        }
        let b: &[u8] = s.bytes();
        for i in (0..b.len()).step_by(PAGE) {
            sum = sum.wrapping_add(b[i] as u64);
        }
    }
    std::hint::black_box(sum)
}

/// (label, (median ratio, best ratio), goal, met: None when informational).
type RatioRow = (String, (f64, f64), String, Option<bool>);

type Digests = BTreeMap<String, (String, Vec<usize>, String)>;

fn rust_digests(v: &Value) -> BoxResult<Digests> {
    let d = v.as_dict().ok_or("top level is not a dict")?;
    let mut out = Digests::new();
    for (k, v) in d.iter() {
        let t = v
            .as_tensor()
            .ok_or_else(|| format!("{k} is not a tensor"))?;
        out.insert(
            k.to_string(),
            (
                t.dtype().name().to_owned(),
                t.shape().to_vec(),
                tensor_digest(t),
            ),
        );
    }
    Ok(out)
}

fn peer_digests(v: &Json) -> BoxResult<Digests> {
    let map = v
        .get("tensors")
        .and_then(Json::as_object)
        .ok_or("reply without tensors")?;
    let mut out = Digests::new();
    for (k, t) in map {
        let dtype = t["dtype"].as_str().unwrap_or_default().to_owned();
        let shape = t["shape"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Json::as_u64)
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default();
        let sha = t["sha256"].as_str().unwrap_or_default().to_owned();
        out.insert(k.clone(), (dtype, shape, sha));
    }
    Ok(out)
}

/// "OK (n tensors)" or a description of the first mismatches.
fn compare(what: &str, expected: &Digests, got: &Digests) -> (bool, String) {
    let mut bad = Vec::new();
    for (k, e) in expected {
        match got.get(k) {
            None => bad.push(format!("{k}: missing")),
            Some(g) if g != e => bad.push(format!("{k}: {g:?} != {e:?}")),
            _ => {}
        }
    }
    for k in got.keys().filter(|k| !expected.contains_key(*k)) {
        bad.push(format!("{k}: unexpected"));
    }
    if bad.is_empty() {
        (
            true,
            format!("{what}: OK ({} tensors identical)", expected.len()),
        )
    } else {
        let n = bad.len();
        bad.truncate(3);
        (
            false,
            format!("{what}: MISMATCH ({n} tensors): {}", bad.join("; ")),
        )
    }
}

#[derive(Clone, Copy)]
enum Save {
    CkptioDurable,
    CkptioFast,
    TorchFast,
    TorchDurable,
}

#[derive(Clone, Copy)]
enum Load {
    CkptioRead,
    CkptioReadNoCrc,
    CkptioMmap,
    TorchRead,
    TorchMmap,
}

fn rotate<T: Copy>(items: &[T], by: usize) -> Vec<T> {
    let n = items.len();
    (0..n).map(|i| items[(i + by) % n]).collect()
}

fn main() -> BoxResult<()> {
    let args = Args::parse();
    let reps = args.reps.max(1);
    let total = args.size_mib << 20;
    let python = args
        .python
        .clone()
        .or_else(|| std::env::var("CKPTIO_PYTHON").ok())
        .unwrap_or_else(|| "python3".to_owned());

    let (dir, made_dir) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/bench-tmp")
                .join(format!("format-{}", std::process::id())),
            true,
        ),
    };
    fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let ck_path = dir.join("ckptio_sd.pt");
    let th_path = dir.join("torch_sd.pt");
    let spec_path = dir.join("spec.json");

    let spec = make_spec(total);
    let spec_json: Vec<Json> = spec
        .iter()
        .map(|s| json!({"name": s.name, "dtype": s.dtype.name(), "shape": s.shape}))
        .collect();
    fs::write(&spec_path, serde_json::to_vec_pretty(&spec_json)?)?;
    let tensor_bytes: u64 = spec.iter().map(Spec::nbytes).sum();
    let count = |d: DType| spec.iter().filter(|s| s.dtype == d).count();
    eprintln!(
        "format_bench: {} tensors ({} float32, {} bfloat16, {} int64), {:.1} MiB, {} reps, in {}",
        spec.len(),
        count(DType::Float32),
        count(DType::BFloat16),
        count(DType::Int64),
        tensor_bytes as f64 / (1u64 << 20) as f64,
        reps,
        dir.display()
    );

    // The peer builds its tensors while we build ours.
    let mut peer = Peer::spawn(&python, &spec_path, args.seed)?;
    let t0 = Instant::now();
    let sd = build_state_dict(&spec, args.seed)?;
    eprintln!(
        "  built the Rust state dict in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let ready = peer.read()?;
    eprintln!("  Python peer ready: {ready}");

    let io = TorchCheckpointIo::new();
    let durable = SaveOptions::default();
    let fast = SaveOptions::default().durable(false);

    // --- saves -------------------------------------------------------------------------------
    let save_names: [(Save, &'static str); 4] = [
        (Save::CkptioDurable, "ckptio save, durable (fsync file+dir)"),
        (Save::TorchDurable, "torch.save + os.fsync (file+dir)"),
        (Save::CkptioFast, "ckptio save, non-durable"),
        (Save::TorchFast, "torch.save (no fsync)"),
    ];
    let mut saves: Vec<Series> = save_names
        .iter()
        .map(|(_, n)| Series::new("save", n))
        .collect();
    let order: Vec<usize> = (0..save_names.len()).collect();
    let bench_start = Instant::now();
    for round in 0..args.warmup + reps {
        let rep = round as isize - args.warmup as isize;
        for i in rotate(&order, round) {
            let (which, name) = save_names[i];
            let (path, is_ckptio) = match which {
                Save::CkptioDurable | Save::CkptioFast => (&ck_path, true),
                Save::TorchFast | Save::TorchDurable => (&th_path, false),
            };
            let _ = fs::remove_file(path);
            settle(None);
            let s = if is_ckptio {
                let opts = if matches!(which, Save::CkptioDurable) {
                    &durable
                } else {
                    &fast
                };
                let t = Instant::now();
                io.save_checkpoint(&sd, path, opts)?;
                t.elapsed().as_secs_f64()
            } else {
                let fsync = matches!(which, Save::TorchDurable);
                let r = peer.call(json!({"op": "save", "path": path, "fsync": fsync}))?;
                secs(&r, "secs")?
            };
            settle(Some(path));
            eprintln!("  rep {rep:>2}: {name:<40} {s:8.3} s");
            if rep >= 0 {
                saves[i].secs.push(s);
            }
        }
    }
    let ck_size = fs::metadata(&ck_path)?.len();
    let th_size = fs::metadata(&th_path)?.len();
    for (s, (which, _)) in saves.iter_mut().zip(save_names.iter()) {
        s.bytes = match which {
            Save::CkptioDurable | Save::CkptioFast => ck_size,
            _ => th_size,
        };
    }

    // --- loads (warm cache) ------------------------------------------------------------------
    warm(&ck_path)?;
    warm(&th_path)?;
    let load_names: [(Load, &'static str); 5] = [
        (Load::CkptioRead, "ckptio load (read + CRC check)"),
        (Load::TorchRead, "torch.load(weights_only=True)"),
        (Load::CkptioReadNoCrc, "ckptio load (read, no CRC)"),
        (Load::CkptioMmap, "ckptio load (mmap)"),
        (Load::TorchMmap, "torch.load(mmap=True, weights_only=True)"),
    ];
    let mut opens: Vec<Series> = load_names
        .iter()
        .map(|(_, n)| Series::new("load (open)", n))
        .collect();
    let mut touched: Vec<Series> = load_names
        .iter()
        .map(|(_, n)| Series::new("load + touch every page", n))
        .collect();
    let order: Vec<usize> = (0..load_names.len()).collect();
    for round in 0..args.warmup + reps {
        let rep = round as isize - args.warmup as isize;
        for i in rotate(&order, round) {
            let (which, name) = load_names[i];
            let (open_s, touched_s) = match which {
                Load::CkptioRead | Load::CkptioReadNoCrc | Load::CkptioMmap => {
                    let opts = match which {
                        Load::CkptioRead => LoadOptions::default(),
                        Load::CkptioReadNoCrc => LoadOptions::default().verify_crc(false),
                        _ => LoadOptions::default().mmap(true),
                    };
                    let t = Instant::now();
                    let v = io.load(&ck_path, &opts)?;
                    let a = t.elapsed().as_secs_f64();
                    touch(&v);
                    let b = t.elapsed().as_secs_f64();
                    drop(v);
                    (a, b)
                }
                Load::TorchRead | Load::TorchMmap => {
                    let mmap = matches!(which, Load::TorchMmap);
                    let r = peer.call(json!({"op": "load", "path": th_path, "mmap": mmap}))?;
                    (secs(&r, "open_secs")?, secs(&r, "touched_secs")?)
                }
            };
            eprintln!("  rep {rep:>2}: {name:<40} open {open_s:8.4} s, touched {touched_s:8.4} s");
            if rep >= 0 {
                opens[i].secs.push(open_s);
                touched[i].secs.push(touched_s);
            }
        }
    }
    for (s, (which, _)) in opens
        .iter_mut()
        .chain(touched.iter_mut())
        .zip(load_names.iter().chain(load_names.iter()))
    {
        s.bytes = match which {
            Load::TorchRead | Load::TorchMmap => th_size,
            _ => ck_size,
        };
    }
    let bench_secs = bench_start.elapsed().as_secs_f64();

    // --- correctness (untimed) ---------------------------------------------------------------
    let rust_src = rust_digests(&sd)?;
    drop(sd);
    let py_src = peer_digests(&peer.call(json!({"op": "digests", "path": null}))?)?;
    let rust_reads_torch = rust_digests(&io.load(&th_path, &LoadOptions::default())?)?;
    let rust_reads_ckptio = rust_digests(&io.load(&ck_path, &LoadOptions::default())?)?;
    let py_reads_ckptio = peer_digests(&peer.call(json!({"op": "digests", "path": ck_path}))?)?;
    peer.quit();
    let checks = [
        compare(
            "ckptio loads the torch.save file (vs the tensors Python saved)",
            &py_src,
            &rust_reads_torch,
        ),
        compare(
            "torch.load reads the ckptio file (vs the tensors Rust saved)",
            &rust_src,
            &py_reads_ckptio,
        ),
        compare(
            "ckptio round trip (ckptio file vs the tensors Rust saved)",
            &rust_src,
            &rust_reads_ckptio,
        ),
    ];
    let all_ok = checks.iter().all(|(ok, _)| *ok);

    // --- report ------------------------------------------------------------------------------
    let find = |list: &[Series], name: &str| -> (f64, f64) {
        let s = list
            .iter()
            .find(|s| s.contender == name)
            .expect("known name");
        (s.median(), s.min())
    };
    let ratio = |num: (f64, f64), den: (f64, f64)| (num.0 / den.0, num.1 / den.1);
    let size_ratio = ck_size as f64 / th_size as f64;
    // (label, (median ratio, best ratio), goal text, met?)
    let mut ratios: Vec<RatioRow> = Vec::new();
    let r = ratio(find(&saves, save_names[3].1), find(&saves, save_names[2].1));
    ratios.push((
        "torch.save / ckptio save (non-durable vs non-durable)".into(),
        r,
        ">= 1.5".into(),
        Some(r.0 >= 1.5),
    ));
    let r = ratio(find(&saves, save_names[1].1), find(&saves, save_names[0].1));
    ratios.push((
        "torch.save+fsync / ckptio save durable (durable vs durable)".into(),
        r,
        ">= 1.5".into(),
        Some(r.0 >= 1.5),
    ));
    let r = ratio(find(&opens, load_names[1].1), find(&opens, load_names[0].1));
    ratios.push((
        "torch.load / ckptio load (read + CRC; torch checks no CRC)".into(),
        r,
        ">= 1.0".into(),
        Some(r.0 >= 1.0),
    ));
    let r = ratio(find(&opens, load_names[1].1), find(&opens, load_names[2].1));
    ratios.push((
        "torch.load / ckptio load (read, no CRC: like for like)".into(),
        r,
        ">= 1.0".into(),
        Some(r.0 >= 1.0),
    ));
    let r = ratio(
        find(&touched, load_names[1].1),
        find(&touched, load_names[0].1),
    );
    ratios.push((
        "torch.load / ckptio load (read + CRC), incl. touch".into(),
        r,
        "(info)".into(),
        None,
    ));
    let r = ratio(find(&opens, load_names[4].1), find(&opens, load_names[3].1));
    ratios.push((
        "torch.load(mmap) / ckptio mmap load, open".into(),
        r,
        "(info)".into(),
        None,
    ));
    let r = ratio(
        find(&touched, load_names[4].1),
        find(&touched, load_names[3].1),
    );
    ratios.push((
        "torch.load(mmap) / ckptio mmap load, touched".into(),
        r,
        ">= 1.0".into(),
        Some(r.0 >= 1.0),
    ));
    ratios.push((
        "file size ckptio / torch.save".into(),
        (size_ratio, size_ratio),
        "within 1%".into(),
        Some((size_ratio - 1.0).abs() <= 0.01),
    ));

    let torch_version = ready["torch"].as_str().unwrap_or("?").to_owned();
    let python_version = ready["python"].as_str().unwrap_or("?").to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;

    let mut md = String::new();
    md.push_str("# ckptio vs torch.save / torch.load\n\n");
    md.push_str(&format!(
        "State dict: {} tensors ({} float32, {} bfloat16, {} int64), {:.1} MiB of tensor data. \
         {} timed reps per contender after {} untimed warm-up round(s), contenders \
         alternated (order rotated every round). \
         torch {torch_version}, Python {python_version}, {cores} CPU cores. Directory: `{}`.\n\n",
        spec.len(),
        count(DType::Float32),
        count(DType::BFloat16),
        count(DType::Int64),
        mib(tensor_bytes),
        reps,
        args.warmup,
        dir.display()
    ));
    md.push_str(
        "| Operation | Contender | Median (ms) | Min (ms) | GB/s (median) | GB/s (best) |\n",
    );
    md.push_str("|---|---|---:|---:|---:|---:|\n");
    for s in saves.iter().chain(opens.iter()).chain(touched.iter()) {
        let (m, b) = (s.median(), s.min());
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            s.op,
            s.contender,
            m * 1e3,
            b * 1e3,
            s.gbps(m),
            s.gbps(b)
        ));
    }
    md.push_str("\n| Ratio (> 1: ckptio faster) | Median | Best | Goal | Met |\n");
    md.push_str("|---|---:|---:|---|---|\n");
    for (label, (m, b), goal, met) in &ratios {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        md.push_str(&format!("| {label} | {m:.3} | {b:.3} | {goal} | {met} |\n"));
    }
    md.push_str(&format!(
        "\n| File | Bytes | MiB |\n|---|---:|---:|\n| ckptio | {ck_size} | {:.2} |\n\
         | torch.save | {th_size} | {:.2} |\n| ratio ckptio / torch | {size_ratio:.6} | |\n\n",
        mib(ck_size),
        mib(th_size)
    ));
    md.push_str("Correctness:\n\n");
    for (_, line) in &checks {
        md.push_str(&format!("- {line}\n"));
    }
    md.push_str(
        "\nNotes:\n\n\
         - GB/s = file bytes / time / 1e9. Ratios divide torch's time by ckptio's (median by \
         median, best by best).\n\
         - Saves: every contender writes a fresh file (the old one is removed first, untimed); \
         after each save the file is fsynced and `sync` runs, untimed, so nobody pays for \
         another's write-back. ckptio durable = temp file + fsync + rename + directory fsync; \
         torch durable = `torch.save(sd, path)` + `os.fsync` of the file and of the directory.\n\
         - Loads are warm-cache (dropping the page cache needs root): both files are read once \
         before timing, and both sides load from the same page cache. \"open\" = the load call; \
         \"touch\" adds reading one byte per 4 KiB page of every storage (what makes mmap loads \
         comparable). ckptio mmap skips CRC checks, as torch does with mmap. `torch.load` does \
         not verify CRC-32s at all (checked: a flipped byte in a storage loads silently), so \
         \"ckptio load (read, no CRC)\" is the like-for-like comparison; \"read + CRC\" is \
         ckptio's safer default.\n\
         - Python times only `torch.save` / `torch.load` (plus fsync / touch where named); \
         the tensors' content differs between the sides (each generates its own), the layout \
         is identical.\n",
    );
    md.push_str(&format!(
        "\nTimed phase took {bench_secs:.1} s. Correctness: {}.\n",
        if all_ok { "all OK" } else { "FAILED" }
    ));

    println!("{md}");

    let series_json = |s: &Series| {
        json!({
            "op": s.op, "contender": s.contender, "bytes": s.bytes, "secs": s.secs,
            "median_s": s.median(), "min_s": s.min(),
            "gbps_median": s.gbps(s.median()), "gbps_best": s.gbps(s.min()),
        })
    };
    let out = json!({
        "config": {
            "size_mib": args.size_mib, "reps": reps, "warmup": args.warmup, "seed": args.seed,
            "dir": dir, "tensor_bytes": tensor_bytes, "tensors": spec_json,
        },
        "environment": {
            "torch": torch_version, "python": python_version, "cores": cores,
            "os": std::env::consts::OS, "arch": std::env::consts::ARCH,
        },
        "saves": saves.iter().map(series_json).collect::<Vec<_>>(),
        "loads_open": opens.iter().map(series_json).collect::<Vec<_>>(),
        "loads_touched": touched.iter().map(series_json).collect::<Vec<_>>(),
        "files": {"ckptio_bytes": ck_size, "torch_bytes": th_size, "ratio": size_ratio},
        "ratios": ratios.iter().map(|(label, (m, b), goal, met)| json!({
            "ratio": label, "median": m, "best": b, "goal": goal, "met": met,
        })).collect::<Vec<_>>(),
        "correctness": {
            "ok": all_ok,
            "checks": checks.iter().map(|(ok, line)| json!({"ok": ok, "detail": line})).collect::<Vec<_>>(),
        },
        "timed_phase_s": bench_secs,
    });
    fs::create_dir_all(&args.out)?;
    fs::write(
        args.out.join("format_bench.json"),
        serde_json::to_string_pretty(&out)? + "\n",
    )?;
    fs::write(args.out.join("format_bench.md"), &md)?;
    if all_ok && !args.no_docs {
        let header = common::section_header(
            &common::command_line(COMMAND),
            &common::commit(),
            &common::machine(&dir),
            "",
        );
        let body = md.replacen("# ckptio vs torch.save / torch.load\n\n", "", 1);
        common::write_section(&common::benchmarks_md(), "format_bench", &(header + &body))?;
        eprintln!("wrote its section of docs/benchmarks.md");
    }
    eprintln!(
        "wrote {} and format_bench.md",
        args.out.join("format_bench.json").display()
    );

    if !args.keep {
        let _ = fs::remove_file(&ck_path);
        let _ = fs::remove_file(&th_path);
        let _ = fs::remove_file(&spec_path);
        if made_dir {
            let _ = fs::remove_dir(&dir);
        }
    }
    if !all_ok {
        return Err("correctness checks failed".into());
    }
    Ok(())
}
