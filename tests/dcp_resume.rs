//! Exact resume of a sharded training run. A model's parameters are split by rows over the ranks
//! (as FSDP splits them; each rank a process of its own), trained with ckptio's AdamW; every
//! rank saves its rows of the parameters and of the optimizer state into one sharded checkpoint
//! at step 5, and the run resumes from it at the same world size and at others. After step 10
//! every parameter is bitwise what an uninterrupted run gives.
//!
//! The loss and the update are elementwise, so an element's history does not depend on which
//! rank holds it: runs at every world size agree bit for bit (checked here too), and any
//! difference after a resume is the checkpoint's.
#![cfg(feature = "tch")]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckptio::dcp::{load_state, DcpReader, Rank, ShardedTensor};
use ckptio::optim::{Adam, Optimizer};
use ckptio::state::{checkpoint, Stateful};
use ckptio::{
    CheckpointIo, DType, DcpCheckpointIo, Dict, HostTensor, Key, Result, SaveOptions, Value,
};
use tch::{Device, Kind, Tensor};

/// The model: each parameter's name and global shape. Dimension 0 is split over the ranks.
const PARAMS: [(&str, &[usize]); 4] = [
    ("w0", &[12, 8]),
    ("b0", &[12]),
    ("w1", &[11, 12]),
    ("b1", &[11]),
];
/// The step after which the checkpoint is saved.
const SAVE_AT: i64 = 5;
/// The last step of every run.
const LAST: i64 = 10;
/// The environment variable that makes the test binary a rank: `mode:rank:world:ckpt:out`.
const CHILD: &str = "CKPTIO_DCP_RESUME";

/// `torch.chunk`'s split of `n` rows over `world` ranks: the rows of rank `rank`.
fn rows_of(n: usize, rank: Rank) -> Range<usize> {
    let size = n.div_ceil(rank.world_size).max(1);
    let start = (size * rank.rank).min(n);
    start..(start + size).min(n)
}

/// Elements in one row of a tensor of `shape`.
fn row_len(shape: &[usize]) -> usize {
    shape[1..].iter().product()
}

/// The initial value of element `i` (flat, global) of parameter `k`.
fn init(k: usize, i: usize) -> f32 {
    ((i * 37 + k * 11) % 23) as f32 / 16.0 - 0.5
}

/// What element `i` of parameter `k` is pulled towards at `step`.
fn target(step: i64, k: usize, i: usize) -> f32 {
    ((i * 13 + k * 5 + step as usize * 7) % 17) as f32 / 8.0 - 1.0
}

/// The weight of element `i` of parameter `k` in the loss.
fn weight(k: usize, i: usize) -> f32 {
    0.5 + ((i + k) % 5) as f32 * 0.25
}

/// A state that does not fit (what `load_state_dict` reports).
fn state_error(reason: impl Into<String>) -> ckptio::Error {
    ckptio::Error::State {
        key: String::new(),
        reason: reason.into(),
    }
}

/// One rank's rows of every parameter, as local tch tensors that require grad.
struct Model {
    rank: Rank,
    params: Vec<Tensor>,
}

impl Model {
    fn new(rank: Rank) -> Model {
        let params = (0..PARAMS.len())
            .map(|k| Model::local(rank, k, |i| init(k, i)).set_requires_grad(true))
            .collect();
        Model { rank, params }
    }

    /// This rank's rows of parameter `k`.
    fn rows(rank: Rank, k: usize) -> Range<usize> {
        rows_of(PARAMS[k].1[0], rank)
    }

    /// Where this rank's rows of parameter `k` start in the global tensor.
    fn offsets(rank: Rank, k: usize) -> Vec<usize> {
        let mut o = vec![0; PARAMS[k].1.len()];
        o[0] = Model::rows(rank, k).start;
        o
    }

    /// A tensor of this rank's rows of parameter `k`'s shape, element `i` (global) being
    /// `f(i)`.
    fn local(rank: Rank, k: usize, f: impl Fn(usize) -> f32) -> Tensor {
        let shape = PARAMS[k].1;
        let (rows, len) = (Model::rows(rank, k), row_len(shape));
        let v: Vec<f32> = (rows.start * len..rows.end * len).map(f).collect();
        let mut local: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        local[0] = rows.len() as i64;
        Tensor::from_slice(&v).reshape(&local)
    }

    /// `local` of parameter `k`, a host tensor, as this rank's part of a sharded tensor.
    fn shard(rank: Rank, k: usize, local: impl Into<Value>) -> Result<ShardedTensor> {
        ShardedTensor::new(PARAMS[k].1.to_vec(), DType::Float32)
            .with_shard(Model::offsets(rank, k), local)
    }

    /// This rank's chunk of a sharded tensor `v` loaded for parameter `k`.
    fn unshard(rank: Rank, k: usize, v: &Value) -> Result<HostTensor> {
        let bad = |why: &str| state_error(format!("{}: {why}", PARAMS[k].0));
        let Value::Sharded(s) = v else {
            return Err(bad(&format!("a {}, not a sharded tensor", v.type_name())));
        };
        match s.shards() {
            [one] if one.chunk.offsets == Model::offsets(rank, k) => one
                .tensor
                .as_tensor()
                .cloned()
                .ok_or_else(|| bad("no tensor")),
            _ => Err(bad("not this rank's rows")),
        }
    }

    /// One training step's loss: sum of `weight * (p - target)^2` over this rank's elements.
    fn loss(&self, step: i64) -> Tensor {
        let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for (k, p) in self.params.iter().enumerate() {
            let d = p - Model::local(self.rank, k, |i| target(step, k, i));
            let w = Model::local(self.rank, k, |i| weight(k, i));
            loss += (w * &d * &d).sum(Kind::Float);
        }
        loss
    }

    /// The rows of every parameter, in order, as little-endian f32 bytes.
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.params {
            let v: Vec<f32> = p.flatten(0, -1).try_into().unwrap();
            out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
        out
    }
}

/// The model's state: `{name: ShardedTensor}` over live tensors (copied when saved).
impl Stateful for Model {
    fn state_dict(&self) -> Result<Value> {
        let mut d = Dict::new();
        for (k, p) in self.params.iter().enumerate() {
            let t = Model::shard(self.rank, k, ckptio::tch::live(p)?)?;
            d.insert(PARAMS[k].0, t.with_requires_grad(true));
        }
        Ok(Value::Dict(d))
    }

    fn load_state_dict(&mut self, state: &Value) -> Result<()> {
        for (k, p) in self.params.iter_mut().enumerate() {
            let v = state
                .get(PARAMS[k].0)
                .ok_or_else(|| state_error(format!("no {}", PARAMS[k].0)))?;
            let t = ckptio::tch::to_tch(&Model::unshard(self.rank, k, v)?, Device::Cpu)?;
            tch::no_grad(|| p.copy_(&t));
        }
        Ok(())
    }
}

/// The per-parameter state tensors of Adam, which are split as their parameter is.
const PER_PARAM: [&str; 3] = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"];

/// AdamW over one rank's rows, whose state is saved sharded: each per-parameter tensor becomes
/// this rank's rows of a tensor of the parameter's global shape; the steps and the param group
/// are the same on every rank.
struct Optim {
    rank: Rank,
    adam: Adam,
}

impl Optim {
    fn new(model: &Model) -> Optim {
        let params = model.params.iter().map(Tensor::shallow_clone).collect();
        Optim {
            rank: model.rank,
            adam: Adam::adamw(params, 0.05, 0.1),
        }
    }

    /// The state of parameter `k` before its first step (`step` 0, zero averages): what a
    /// fresh Adam does on its first step, given as a tree so that a fresh optimizer's state
    /// dict names every box a load must fill (as PyTorch's `_init_optim_state` does).
    fn initial_state(&self, k: usize) -> Result<Value> {
        let zeros = Model::local(self.rank, k, |_| 0.0);
        let mut s = Dict::new();
        s.insert("step", HostTensor::scalar(0f32));
        s.insert("exp_avg", ckptio::tch::to_host(&zeros)?);
        s.insert("exp_avg_sq", ckptio::tch::to_host(&zeros)?);
        Ok(Value::Dict(s))
    }

    /// The per-parameter state dict `state` (keyed by parameter index) with each of its
    /// per-parameter tensors turned by `f(index, tensor)`, keyed by ints again.
    fn map_state(state: &Dict, mut f: impl FnMut(usize, &Value) -> Result<Value>) -> Result<Dict> {
        let mut out = Dict::new();
        for (key, s) in state.iter() {
            // DCP's flattening turns keys into strings: state `0` comes back as `"0"`.
            let k = match key {
                Key::Int(i) => usize::try_from(*i).ok(),
                Key::Str(s) => s.parse().ok(),
                _ => None,
            }
            .filter(|&k| k < PARAMS.len())
            .ok_or_else(|| state_error(format!("state of unknown parameter {key}")))?;
            let s = s
                .as_dict()
                .ok_or_else(|| state_error(format!("state {k} is not a dict")))?;
            let mut d = Dict::new();
            for (name, v) in s.iter() {
                let v = match name.as_str() {
                    Some(n) if PER_PARAM.contains(&n) => f(k, v)?,
                    _ => v.clone(),
                };
                d.insert(name.clone(), v);
            }
            out.insert(Key::Int(k as i64), d);
        }
        Ok(out)
    }

    /// `sd` with its `"state"` replaced by `state`.
    fn with_state(sd: &Value, state: Dict) -> Result<Value> {
        let mut sd = sd
            .as_dict()
            .cloned()
            .ok_or_else(|| state_error("optimizer state dict is not a dict"))?;
        sd.insert("state", state);
        Ok(Value::Dict(sd))
    }
}

impl Stateful for Optim {
    fn state_dict(&self) -> Result<Value> {
        let sd = Optimizer::state_dict(&self.adam)?;
        let mut state = sd
            .get("state")
            .and_then(Value::as_dict)
            .cloned()
            .unwrap_or_default();
        for k in 0..PARAMS.len() {
            if state.get(&Key::Int(k as i64)).is_none() {
                state.insert(k as i64, self.initial_state(k)?);
            }
        }
        let rank = self.rank;
        let sharded = Optim::map_state(&state, |k, v| {
            Ok(Value::Sharded(Model::shard(rank, k, v.clone())?))
        })?;
        Optim::with_state(&sd, sharded)
    }

    fn load_state_dict(&mut self, sd: &Value) -> Result<()> {
        let state = sd
            .get("state")
            .and_then(Value::as_dict)
            .ok_or_else(|| state_error("no \"state\" dict"))?;
        let rank = self.rank;
        let local = Optim::map_state(state, |k, v| Ok(Value::Tensor(Model::unshard(rank, k, v)?)))?;
        Optimizer::load_state_dict(&mut self.adam, &Optim::with_state(sd, local)?)
    }
}

/// One rank of a run: its rows of the model, its optimizer, and the last step taken.
struct Run {
    model: Model,
    optim: Optim,
    step: i64,
}

impl Run {
    fn new(rank: Rank) -> Run {
        let model = Model::new(rank);
        let optim = Optim::new(&model);
        Run {
            model,
            optim,
            step: 0,
        }
    }

    /// A fresh run that takes up the checkpoint in `dir` (saved at any world size), reading
    /// only this rank's rows; `with_optimizer: false` leaves the optimizer fresh.
    fn resume(rank: Rank, dir: &Path, with_optimizer: bool) -> Run {
        let mut run = Run::new(rank);
        let mut state: Vec<(&str, &mut dyn Stateful)> =
            vec![("model", &mut run.model), ("step", &mut run.step)];
        if with_optimizer {
            state.push(("optim", &mut run.optim));
        }
        load_state(dir, &mut state, true).unwrap();
        run
    }

    fn train_to(&mut self, last: i64) {
        while self.step < last {
            self.step += 1;
            self.optim.adam.zero_grad();
            self.model.loss(self.step).backward();
            self.optim.adam.step().unwrap();
        }
    }

    fn state(&self) -> Value {
        checkpoint(&[
            ("model", &self.model),
            ("optim", &self.optim),
            ("step", &self.step),
        ])
        .unwrap()
    }
}

/// Every parameter whole, as the bits of its f32 elements.
type Full = Vec<Vec<u32>>;

/// The parameters of the ranks of a job, from each rank's `bytes`, in rank order.
fn assemble(world: usize, bytes: &[Vec<u8>]) -> Full {
    let mut full: Full = vec![Vec::new(); PARAMS.len()];
    for (r, b) in bytes.iter().enumerate() {
        let rank = Rank::new(r, world).unwrap();
        let mut words = b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()));
        for (k, (_, shape)) in PARAMS.iter().enumerate() {
            let n = Model::rows(rank, k).len() * row_len(shape);
            full[k].extend(words.by_ref().take(n));
        }
        assert!(words.next().is_none(), "rank {r} wrote too many elements");
    }
    full
}

/// The elements of `t` (f32) as bits.
fn bits(t: &HostTensor) -> Vec<u32> {
    t.to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// Requires `got` to be bitwise `want`, naming the first element that differs.
fn assert_same(got: &Full, want: &Full, what: &str) {
    for (k, (name, _)) in PARAMS.iter().enumerate() {
        assert_eq!(
            got[k].len(),
            want[k].len(),
            "{what}: {name} has another size"
        );
        if let Some(i) = (0..want[k].len()).find(|&i| got[k][i] != want[k][i]) {
            panic!(
                "{what}: {name}[{i}] is {} where the uninterrupted run has {}",
                f32::from_bits(got[k][i]),
                f32::from_bits(want[k][i])
            );
        }
    }
}

/// Runs one job of `world` ranks in one process, one rank after the other (no rank needs
/// another while training).
fn in_process(world: usize, last: i64) -> Full {
    let bytes: Vec<Vec<u8>> = (0..world)
        .map(|r| {
            let mut run = Run::new(Rank::new(r, world).unwrap());
            run.train_to(last);
            run.model.bytes()
        })
        .collect();
    assemble(world, &bytes)
}

/// A rank as a child process: `train` runs to step 10 saving at step 5 into `ckpt`; `resume`
/// takes up `ckpt` and runs to step 10. Either writes its final rows to `out/{rank}.bin`.
fn child(spec: &str) {
    let parts: Vec<&str> = spec.splitn(5, ':').collect();
    let [mode, rank, world, ckpt, out] = parts[..] else {
        panic!("bad {CHILD} {spec:?}")
    };
    let rank = Rank::new(rank.parse().unwrap(), world.parse().unwrap()).unwrap();
    let ckpt = Path::new(ckpt);
    tch::set_num_threads(1);
    let mut run = match mode {
        "train" => {
            let mut run = Run::new(rank);
            run.train_to(SAVE_AT);
            let io = DcpCheckpointIo::new(rank)
                .run_id("resume")
                .commit_timeout(Duration::from_secs(60));
            io.save_checkpoint(&run.state(), ckpt, &SaveOptions::default())
                .unwrap();
            io.wait_committed(ckpt).unwrap();
            run
        }
        "resume" => {
            let run = Run::resume(rank, ckpt, true);
            assert_eq!(run.step, SAVE_AT);
            run
        }
        other => panic!("unknown mode {other}"),
    };
    run.train_to(LAST);
    std::fs::write(
        Path::new(out).join(format!("{}.bin", rank.rank)),
        run.model.bytes(),
    )
    .unwrap();
}

/// Runs the ranks of one job of `world` processes in `mode` and returns their final
/// parameters, assembled.
fn job(test: &str, mode: &str, world: usize, ckpt: &Path, out: PathBuf) -> Full {
    std::fs::create_dir_all(&out).unwrap();
    let children: Vec<Child> = (0..world)
        .map(|r| {
            let spec = format!("{mode}:{r}:{world}:{}:{}", ckpt.display(), out.display());
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env(CHILD, spec)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "{mode} rank {r} of {world} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let bytes: Vec<Vec<u8>> = (0..world)
        .map(|r| std::fs::read(out.join(format!("{r}.bin"))).unwrap())
        .collect();
    assemble(world, &bytes)
}

/// The bits of the tensor at `path` in `tree` (a whole tensor, or a sharded one's only
/// chunk). A key that is a number matches an int key too: ckptio's optimizers key their state
/// by ints, which DCP's flattening turns into strings.
fn bits_at(tree: &Value, path: &[&str]) -> Vec<u32> {
    let mut v = tree;
    for p in path {
        let d = v
            .as_dict()
            .unwrap_or_else(|| panic!("{path:?}: no dict at {p}"));
        let int = p.parse().ok().and_then(|i| d.get(&Key::Int(i)));
        v = d.get(*p).or(int).unwrap_or_else(|| panic!("no {path:?}"));
    }
    match v {
        Value::Tensor(t) => bits(t),
        Value::Sharded(s) => bits(s.shards()[0].tensor.as_tensor().unwrap()),
        other => panic!("{path:?} is a {}", other.type_name()),
    }
}

/// Requires the checkpoint in `dir` to hold `want` (the state of a world-1 run at the save)
/// whole: every parameter and every optimizer tensor bitwise, and the step.
fn check_checkpoint(dir: &Path, want: &Value) {
    let got = DcpReader::open(dir).unwrap().read_all().unwrap();
    assert_eq!(got.get("step").and_then(Value::as_int), Some(SAVE_AT));
    for (k, (name, _)) in PARAMS.iter().enumerate() {
        let k = k.to_string();
        for path in [
            &["model", name][..],
            &["optim", "state", &k, "step"],
            &["optim", "state", &k, "exp_avg"],
            &["optim", "state", &k, "exp_avg_sq"],
        ] {
            let what = path.join(".");
            assert_eq!(
                bits_at(&got, path),
                bits_at(want, path),
                "checkpoint's {what}"
            );
        }
    }
}

#[test]
fn training_is_bitwise_the_same_whatever_the_split() {
    let want = in_process(1, LAST);
    for world in 2..=4 {
        assert_same(&in_process(world, LAST), &want, &format!("world {world}"));
    }
}

#[test]
fn a_sharded_run_resumes_exactly_at_the_same_and_other_world_sizes() {
    const TEST: &str = "a_sharded_run_resumes_exactly_at_the_same_and_other_world_sizes";
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    let start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join(format!("step={SAVE_AT}"));
    // The reference: one process holding every row, never interrupted.
    let mut reference = Run::new(Rank::single());
    reference.train_to(SAVE_AT);
    // Copied now: the model's state holds live tensors, which go on training.
    let at_save = reference.state().materialize().unwrap().into_owned();
    reference.train_to(LAST);
    let want = assemble(1, &[reference.model.bytes()]);

    // Two ranks train straight through, saving at step 5 on the way.
    let got = job(TEST, "train", 2, &ckpt, tmp.path().join("train"));
    assert_same(&got, &want, "uninterrupted at world 2");
    check_checkpoint(&ckpt, &at_save);

    // At world 5 the last rank holds no rows at all (torch.chunk leaves it none).
    for world in [2, 3, 1, 5] {
        let out = tmp.path().join(format!("resume{world}"));
        let got = job(TEST, "resume", world, &ckpt, out);
        assert_same(&got, &want, &format!("resumed at world {world}"));
    }

    // The comparison tells a resume that drops the optimizer's state from an exact one.
    let mut params_only = Run::resume(Rank::single(), &ckpt, false);
    params_only.train_to(LAST);
    let got = assemble(1, &[params_only.model.bytes()]);
    assert!(got != want, "a fresh optimizer gave the same parameters");
    println!(
        "save at world 2, resumes at worlds 2, 3, 1 and 5: {:?}",
        start.elapsed()
    );
}
