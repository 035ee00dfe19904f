//! AsyncCheckpointIo against the machine's limits, side by side in one run.
//!
//! For each state size, on the same bytes and the same directory:
//! - M0: memcpy of the state's tensors into a warm buffer (the floor for an Eager snapshot);
//! - D0: raw sequential write + fsync of that many bytes to a new file, both buffered and with
//!   `O_DIRECT`, measured before and after the saves; the faster way is the machine's limit;
//! - S0: synchronous `TorchCheckpointIo` save of the live state (written in place + fsync);
//! - Eager / Deferred: the stall of `AsyncCheckpointIo::save` on the training thread, the
//!   background write time, the time to durable, and the peak extra RSS per save (after a
//!   first small save, whose one-time cost beyond its buffer is reported apart), with the part
//!   of it that is the staging the pool added for the state beside the rest (heap and thread
//!   stacks: a few hundred KiB at most, whatever the state's size, with staging in ordinary
//!   memory; libtorch's pinned allocator, used with CUDA, rounds buffers up). Eager runs three
//!   times: with write protection (`write_protect(true)`, where the kernel allows it), copying
//!   on the training thread with the write overlapping the copy (the default), and copying
//!   with the copy first (`WriteStart::AfterSnapshot`);
//! - W0: one in-place pass over the state (`mul_(1)`, as an optimizer step writes it), alone and
//!   started right after a write-protected Eager save returns: the difference is what the
//!   protection moves from the save to the loop's first writes.
//!
//! Saves replace the previous file at the same path. Between two saves the bench idles for one
//! buffered D0, as a training loop computes between checkpoints. S0 and the four ways to save
//! (Eager write-protected, Eager copying, Deferred, Eager copy first) run in rounds, one save of
//! each per round in
//! an order rotated from round to round, and each time to durable is divided by the S0 of its
//! own round: the disk's speed drifts within a run, and a ratio of two medians taken minutes
//! apart measures the drift as much as the save.
//!
//! At the end the run writes `results/async_bench/` (Markdown, JSON) and, unless `--no-docs`,
//! its section of `docs/benchmarks.md` with the command line, the commit, the date and the
//! machine.
//!
//! ```text
//! ./dev.sh cargo run --release --example async_bench -- --sizes-mib 64,1024 --reps 3
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckptio::runtime::{Builder, WriteStart};
use ckptio::{CheckpointIo, Dict, SaveOptions, SnapshotMode, TorchCheckpointIo, Value};
use clap::Parser;
use tch::{Device, Kind, Tensor};

mod common;
use common::{median, raw_write, RawSource, RssPeak};

/// How this benchmark is started from the repository's root.
const COMMAND: &str = "./dev.sh cargo run --release --example async_bench --";

#[derive(Parser)]
#[command(
    about = "AsyncCheckpointIo against the machine's limits (M0 memcpy, D0 write+fsync, S0 sync save)"
)]
struct Args {
    /// State sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    sizes_mib: Vec<usize>,
    /// Repetitions per measurement (median reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Directory to write in (default: target/bench-tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print every save's stall, queue wait, write and time to durable.
    #[arg(long)]
    verbose: bool,
    /// Leave the state's pages as the allocator made them (`Builder::huge_pages(false)`):
    /// for a side-by-side run against the default.
    #[arg(long)]
    no_huge_pages: bool,
    /// Where to write results.json and results.md.
    #[arg(long, default_value = "results/async_bench")]
    out: PathBuf,
    /// Leave `docs/benchmarks.md` alone (results still go to `--out`).
    #[arg(long)]
    no_docs: bool,
}

/// A state dict of float32 tensors (a few large, many small) totalling `bytes`.
fn make_state(bytes: usize) -> Vec<(String, Tensor)> {
    let numel = bytes / 4;
    let mut out = Vec::new();
    let mut left = numel;
    let mut i = 0;
    while left > 0 {
        let n = if i % 4 == 0 {
            (numel / 6).max(1)
        } else {
            (numel / 40).max(1)
        }
        .min(left);
        out.push((
            format!("layer{i}.weight"),
            Tensor::randn([n as i64], (Kind::Float, Device::Cpu)),
        ));
        left -= n;
        i += 1;
    }
    out
}

fn live_tree(state: &[(String, Tensor)], step: i64) -> Value {
    let mut sd = Dict::ordered();
    for (k, t) in state {
        sd.insert(
            k.as_str(),
            ckptio::tch::live(t).expect("float32 tensors are savable"),
        );
    }
    let mut d = Dict::new();
    d.insert("state_dict", sd);
    d.insert("step", step);
    Value::Dict(d)
}

/// M0: one copy of the state's own bytes (the same tensors' memory) into a warm buffer, the
/// floor for an Eager snapshot.
fn m0(state: &[(String, Tensor)], bytes: usize, reps: usize) -> f64 {
    let mut dst = vec![1u8; bytes];
    let copy = |dst: &mut [u8]| {
        let mut at = 0;
        for (_, t) in state {
            let n = t.numel() * 4;
            t.f_copy_data_u8(&mut dst[at..at + n], t.numel())
                .expect("float32 tensors copy");
            at += n;
        }
    };
    copy(&mut dst);
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                copy(&mut dst);
                std::hint::black_box(&dst);
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// D0 samples: `reps` raw buffered and `reps` raw direct writes of `bytes`, alternating, from a
/// page-aligned buffer of the state's size (not a small hot buffer).
fn d0(dir: &Path, bytes: usize, reps: usize) -> (Vec<f64>, Vec<f64>) {
    let src = RawSource::new(bytes, 7);
    let (mut b, mut d) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        b.push(raw_write(dir, &src, false));
        d.push(raw_write(dir, &src, true));
    }
    (b, d)
}

#[derive(Default, Clone)]
struct Row {
    m0: f64,
    d0: f64,
    d0_buffered: f64,
    d0_direct: f64,
    s0: f64,
    eager_stall: f64,
    deferred_stall: f64,
    eager_write: f64,
    eager_durable: f64,
    deferred_durable: f64,
    peak_extra_rss: f64,
    /// Of that, the staging the pool added for this state, per byte of the state.
    staging_rss: f64,
    /// Resident bytes a first small save left beyond its staging buffer: code, thread stacks and
    /// buffers that later saves reuse.
    one_time_rss: f64,
    /// Eager with write protection off: the copy on the training thread.
    copy_stall: f64,
    copy_durable: f64,
    /// The same with the copy first and then the write (`WriteStart::AfterSnapshot`).
    copy_first_stall: f64,
    copy_first_durable: f64,
    copy_first_durable_ratio: f64,
    /// Medians of the per-round ratios time to durable / S0 (protected, copying, Deferred).
    eager_durable_ratio: f64,
    copy_durable_ratio: f64,
    deferred_durable_ratio: f64,
    /// W0: one in-place pass over the state (`mul_(1)`), with no save in flight.
    w0: f64,
    /// The same pass started right after an Eager save returned (write protection on), and
    /// the writes that had to wait for a copy.
    pass_after_save: f64,
    /// The same pass right after an Eager save that copied (the write in the background only).
    pass_after_copy: f64,
    waits: u64,
    write_protected: bool,
}

/// One in-place pass over every tensor: what an optimizer step does to the parameters.
fn pass(state: &[(String, Tensor)]) -> f64 {
    let t = Instant::now();
    for (_, x) in state {
        let mut x = x.shallow_clone();
        let _ = x.g_mul_scalar_(1.0);
    }
    t.elapsed().as_secs_f64()
}

/// The index of S0 among the saves of a round, after the four ways to save.
const S0: usize = 4;

fn run(args: &Args, dir: &Path, mib: usize) -> Row {
    let bytes = mib << 20;
    let reps = args.reps;
    let state = make_state(bytes);
    let io = TorchCheckpointIo::new();
    let path = dir.join("ckpt.pt");

    let m0 = m0(&state, bytes, reps);
    let (mut d0_buffered, mut d0_direct) = d0(dir, bytes, reps);
    // Between two saves the bench idles as long as one raw write, as a training loop computes
    // between checkpoints: the previous file's release (see `TorchCheckpointIo`) is then over.
    let gap = Duration::from_secs_f64(median(d0_buffered.clone()));

    let mut res = Row {
        m0,
        ..Row::default()
    };
    res.w0 = median((0..reps).map(|_| pass(&state)).collect());
    // The ways to save, side by side: Eager write-protected (`write_protect(true)`), Eager
    // copying (the default: the write overlapping the copy), Deferred, and Eager copying with
    // the copy first (`WriteStart::AfterSnapshot`).
    let variants = [
        (SnapshotMode::Eager, true, None),
        (SnapshotMode::Eager, false, None),
        (SnapshotMode::Deferred, false, None),
        (SnapshotMode::Eager, false, Some(WriteStart::AfterSnapshot)),
    ];
    let aios: Vec<_> = variants
        .iter()
        .map(|&(mode, protect, overlap)| {
            let b = Builder::default()
                .snapshot_mode(mode)
                .write_protect(protect)
                .huge_pages(!args.no_huge_pages);
            match overlap {
                Some(when) => b.write_start(when),
                None => b,
            }
            .build(TorchCheckpointIo::new())
        })
        .collect();
    let names = [
        "Eager, write-protected",
        "Eager, copying",
        "Deferred",
        "Eager, copying, copy first",
    ];
    let save = |k: usize, step: i64| {
        let aio = &aios[k];
        let tree = live_tree(&state, step);
        let t = Instant::now();
        let h = aio.save(&tree, &path).expect("save");
        let stall = t.elapsed().as_secs_f64();
        h.wait_staged().expect("staged");
        let staged = t.elapsed().as_secs_f64();
        let rep = h.wait().expect("write");
        let d = t.elapsed().as_secs_f64();
        if args.verbose {
            eprintln!(
                "  {} save: stall {:.1} ms, staged {:.1} ms (copied {:.1} ms), queue wait {:.1} ms, write {:.1} ms (fsync {:.1} ms), durable {:.1} ms",
                names[k],
                stall * 1e3,
                staged * 1e3,
                rep.copied.as_secs_f64() * 1e3,
                rep.queue_wait.as_secs_f64() * 1e3,
                rep.write.as_secs_f64() * 1e3,
                rep.fsync.unwrap_or_default().as_secs_f64() * 1e3,
                d * 1e3
            );
        }
        (stall, rep.write.as_secs_f64(), d)
    };
    // The write-protected mode's one-time cost: a first, small save (one 12 MiB tensor, so that it is
    // protected, hashed on a second thread and written piece by piece like the large ones)
    // brings in the code, thread stacks and buffers every later save reuses. What it left
    // resident beyond its staging buffer is reported apart.
    let small = [(
        "warm_up".to_string(),
        Tensor::randn([3 << 20], (Kind::Float, Device::Cpu)),
    )];
    let before = common::rss_bytes();
    aios[0]
        .save(&live_tree(&small, -1), &path)
        .expect("save")
        .wait()
        .expect("write");
    let pool = aios[0].status().pool;
    res.one_time_rss = (common::rss_bytes().saturating_sub(before) as f64
        - (pool.in_use + pool.free) as f64)
        .max(0.0);
    drop(small);
    // Peak RSS per save: from before the pool's allocation for this state (the warm-up save)
    // through one more save.
    let pool_bytes = |p: ckptio::runtime::PoolStats| (p.in_use + p.free) as f64;
    let pool_before = pool_bytes(aios[0].status().pool);
    let peak = RssPeak::start(Duration::from_millis(1));
    save(0, -1);
    save(0, -1);
    res.peak_extra_rss = peak.extra_bytes() as f64 / bytes as f64;
    res.staging_rss = (pool_bytes(aios[0].status().pool) - pool_before) / bytes as f64;
    std::thread::sleep(gap);
    for k in 1..aios.len() {
        // Warm-up: the pool allocates its buffer once.
        save(k, -1);
        std::thread::sleep(gap);
    }
    // Rounds of one synchronous save (S0) and one save of each mode, in an order rotated from
    // round to round, each followed by the gap. The disk's speed drifts within a run, so each
    // mode's time to durable is compared with the S0 of its own round: the ratios reported are
    // the medians of those per-round ratios.
    let (mut s0, mut stalls, mut writes, mut durable, mut ratio) = (
        Vec::new(),
        [vec![], vec![], vec![], vec![]],
        [vec![], vec![], vec![], vec![]],
        [vec![], vec![], vec![], vec![]],
        [vec![], vec![], vec![], vec![]],
    );
    for round in 0..reps {
        let mut order = [0, 1, 2, 3, S0];
        order.rotate_left(round % (S0 + 1));
        let (mut s0_round, mut durable_round) = (0.0, [0.0; S0]);
        for k in order {
            if k == S0 {
                let t = Instant::now();
                io.save_checkpoint(
                    &live_tree(&state, round as i64),
                    &path,
                    &SaveOptions::default(),
                )
                .expect("sync save");
                s0_round = t.elapsed().as_secs_f64();
                if args.verbose {
                    eprintln!("  S0 (sync save): {:.1} ms", s0_round * 1e3);
                }
            } else {
                let (stall, write, d) = save(k, round as i64);
                stalls[k].push(stall);
                writes[k].push(write);
                durable[k].push(d);
                durable_round[k] = d;
            }
            std::thread::sleep(gap);
        }
        s0.push(s0_round);
        for k in 0..S0 {
            ratio[k].push(durable_round[k] / s0_round);
        }
    }
    res.s0 = median(s0);
    let [s_p, s_c, s_d, s_f] = stalls;
    let [d_p, d_c, d_d, d_f] = durable;
    let [r_p, r_c, r_d, r_f] = ratio;
    res.copy_first_stall = median(s_f);
    res.copy_first_durable = median(d_f);
    res.copy_first_durable_ratio = median(r_f);
    res.eager_stall = median(s_p);
    res.copy_stall = median(s_c);
    res.deferred_stall = median(s_d);
    res.eager_write = median(writes[0].clone());
    res.eager_durable = median(d_p);
    res.copy_durable = median(d_c);
    res.deferred_durable = median(d_d);
    res.eager_durable_ratio = median(r_p);
    res.copy_durable_ratio = median(r_c);
    res.deferred_durable_ratio = median(r_d);
    if args.verbose {
        let st = aios[0].status();
        eprintln!(
            "  write-protected saves' tensors: {} blocks of 2 MiB moved into huge pages, {} requests refused",
            st.huge_page_blocks, st.huge_page_refusals
        );
    }
    // The loop writing every tensor at once after `save` returns: with protection, the writes
    // that reach a part not yet copied wait for it; both ways, the background work competes
    // for the cores.
    for (k, aio) in aios.iter().enumerate().take(2) {
        let waits0 = aio.status().write_protect_waits;
        let mut passes = Vec::new();
        for i in 0..reps {
            let h = aio.save(&live_tree(&state, i as i64), &path).expect("save");
            passes.push(pass(&state));
            h.wait().expect("write");
            std::thread::sleep(gap);
        }
        if k == 0 {
            res.pass_after_save = median(passes);
            res.waits = (aio.status().write_protect_waits - waits0) / reps as u64;
            res.write_protected = aio.status().write_protected > 0;
        } else {
            res.pass_after_copy = median(passes);
        }
    }
    for aio in aios {
        aio.teardown().expect("teardown");
    }
    // D0 again after the saves, so that both see the machine in the same state; the better of
    // the two ways to write is the machine's limit.
    let (b, d) = d0(dir, bytes, reps);
    d0_buffered.extend(b);
    d0_direct.extend(d);
    res.d0_buffered = median(d0_buffered);
    res.d0_direct = median(d0_direct);
    res.d0 = res.d0_buffered.min(res.d0_direct);
    let _ = std::fs::remove_file(&path);
    res
}

fn main() {
    let args = Args::parse();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench-tmp"));
    std::fs::create_dir_all(&dir).expect("create bench dir");
    std::fs::create_dir_all(&args.out).expect("create results dir");
    tch::set_num_threads(1);
    let mut md = String::from(
        "| state | M0 memcpy | D0 write+fsync (buffered / direct) | S0 sync save | Eager write-protected: stall (/M0) | Deferred stall | S0 / write-protected stall | write-protected: write GB/s (/D0) | durable, write-protected (/S0) | durable, Deferred (/S0) | peak extra RSS / size, write-protected (staging / size, rest; one-time) |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut wp = String::from(
        "| state | M0 memcpy | Eager stall, write-protected (/M0) | Eager stall, copying (/M0) | S0 / stall, protected / copying | durable, copying (/S0) | copying, copy first: stall (/M0), durable (/S0) | W0 in-place pass | same pass right after save: protected (waits) / copying | stall + pass − W0, protected / copying (/M0) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut json = Vec::new();
    for &mib in &args.sizes_mib {
        eprintln!("measuring {mib} MiB ...");
        let r = run(&args, &dir, mib);
        let gb = (mib << 20) as f64 / 1e9;
        let ms = |s: f64| format!("{:.1} ms", s * 1e3);
        md.push_str(&format!(
            "| {} MiB | {} ({:.2} GB/s) | {} ({:.2} GB/s; {:.2} / {:.2}) | {} | {} ({:.2}) | {} | {:.1} | {:.2} ({:.2}) | {} ({:.2}) | {} ({:.2}) | {:.3} ({:.4}, {:+.0} KiB; +{:.1} MiB) |\n",
            mib,
            ms(r.m0), gb / r.m0,
            ms(r.d0), gb / r.d0, gb / r.d0_buffered, gb / r.d0_direct,
            ms(r.s0),
            ms(r.eager_stall), r.eager_stall / r.m0,
            ms(r.deferred_stall),
            r.s0 / r.eager_stall,
            gb / r.eager_write, (gb / r.eager_write) / (gb / r.d0),
            ms(r.eager_durable), r.eager_durable_ratio,
            ms(r.deferred_durable), r.deferred_durable_ratio,
            r.peak_extra_rss,
            r.staging_rss,
            (r.peak_extra_rss - r.staging_rss) * (mib << 20) as f64 / 1024.0,
            r.one_time_rss / (1 << 20) as f64,
        ));
        wp.push_str(&format!(
            "| {} MiB | {} | {} ({:.2}){} | {} ({:.2}) | {:.1} / {:.1} | {} ({:.2}) | {} ({:.2}), {} ({:.2}) | {} | {} ({}) / {} | {} / {} ({:.2} / {:.2}) |\n",
            mib,
            ms(r.m0),
            ms(r.eager_stall), r.eager_stall / r.m0,
            if r.write_protected { "" } else { " not protected here" },
            ms(r.copy_stall), r.copy_stall / r.m0,
            r.s0 / r.eager_stall, r.s0 / r.copy_stall,
            ms(r.copy_durable), r.copy_durable_ratio,
            ms(r.copy_first_stall), r.copy_first_stall / r.m0,
            ms(r.copy_first_durable), r.copy_first_durable_ratio,
            ms(r.w0),
            ms(r.pass_after_save), r.waits, ms(r.pass_after_copy),
            ms(r.eager_stall + r.pass_after_save - r.w0),
            ms(r.copy_stall + r.pass_after_copy - r.w0),
            (r.eager_stall + r.pass_after_save - r.w0) / r.m0,
            (r.copy_stall + r.pass_after_copy - r.w0) / r.m0,
        ));
        json.push(serde_json::json!({
            "size_mib": mib, "m0_s": r.m0, "d0_s": r.d0, "d0_buffered_s": r.d0_buffered,
            "d0_direct_s": r.d0_direct, "s0_s": r.s0,
            "eager_stall_s": r.eager_stall, "deferred_stall_s": r.deferred_stall,
            "eager_write_s": r.eager_write, "eager_durable_s": r.eager_durable,
            "deferred_durable_s": r.deferred_durable, "peak_extra_rss_per_size": r.peak_extra_rss,
            "staging_rss_per_size": r.staging_rss,
            "one_time_rss_bytes": r.one_time_rss,
            "write_protected": r.write_protected, "eager_copy_stall_s": r.copy_stall,
            "eager_copy_durable_s": r.copy_durable, "w0_s": r.w0,
            "eager_copy_first_stall_s": r.copy_first_stall,
            "eager_copy_first_durable_s": r.copy_first_durable,
            "pass_after_save_s": r.pass_after_save, "pass_after_copy_s": r.pass_after_copy, "waits_per_save": r.waits,
            "ratios": {
                "eager_stall_over_m0": r.eager_stall / r.m0,
                "s0_over_eager_stall": r.s0 / r.eager_stall,
                "write_throughput_over_d0": r.d0 / r.eager_write,
                "eager_durable_over_s0": r.eager_durable_ratio,
                "copy_durable_over_s0": r.copy_durable_ratio,
                "copy_first_durable_over_s0": r.copy_first_durable_ratio,
                "deferred_durable_over_s0": r.deferred_durable_ratio,
            }
        }));
    }
    md.push_str("\nEager snapshots with and without write protection:\n\n");
    md.push_str(&wp);
    println!("{md}");
    std::fs::write(args.out.join("results.md"), &md).expect("write results.md");
    if !args.no_docs {
        let command = common::command_line(COMMAND);
        let header = common::section_header(
            &command,
            &common::commit(),
            &common::machine(&dir),
            "M0 and D0 for each state size, in the first table",
        );
        common::write_section(&common::benchmarks_md(), "async_bench", &(header + &md))
            .expect("write docs/benchmarks.md");
        eprintln!("wrote its section of docs/benchmarks.md");
    }
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write results.json");
}
