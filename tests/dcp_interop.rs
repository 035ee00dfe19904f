//! Sharded checkpoints in PyTorch's Distributed Checkpoint format, with real PyTorch on both
//! sides: PyTorch (gloo ranks, DTensors) writes and ckptio reads at every world size; ckptio
//! ranks (separate processes) write and PyTorch's `dcp.load` (in one process and in a job of
//! another size) and `dcp_to_torch_save` read.

mod common;

use std::path::Path;
use std::process::Command;

use ckptio::dcp::{Chunk, DcpReader, Rank, ShardedTensor};
use ckptio::{CheckpointIo, DcpCheckpointIo, Dict, HostTensor, LoadOptions, SaveOptions, Value};
use common::{canon, first_difference, run_python, run_python_code, script};

/// `torch.chunk`'s split of `n` into `world` parts: (start, len) of part `rank`.
fn torch_chunk(n: usize, world: usize, rank: usize) -> (usize, usize) {
    let size = n.div_ceil(world).max(1);
    let start = (size * rank).min(n);
    (start, size.min(n - start))
}

/// The dimension `tests/python/dcp_state.py` shards a tensor along (by its key path), or
/// `None` for replicated tensors.
fn shard_dim(path: &str) -> Option<usize> {
    match path {
        "model.w0" | "model.emb" | "model.blocks.1" => Some(0),
        "model.w1" | "model.blocks.0" => Some(1),
        _ => None,
    }
}

/// The box rank `rank` of `world` holds of a tensor of `shape` split along `dim`.
fn box_of(shape: &[usize], dim: usize, world: usize, rank: usize) -> Chunk {
    let (start, len) = torch_chunk(shape[dim], world, rank);
    let mut c = Chunk::whole(shape);
    c.offsets[dim] = start;
    c.sizes[dim] = len;
    c
}

/// `t` narrowed to box `c`, contiguous.
fn narrow(t: &HostTensor, c: &Chunk) -> HostTensor {
    let mut v = t.clone();
    for d in 0..c.sizes.len() {
        v = v.narrow(d, c.offsets[d], c.sizes[d]).unwrap();
    }
    v.to_contiguous()
}

/// The full state of `dcp_state.full_state(seed)`, as PyTorch writes it to `path`.
fn expected_state(path: &Path, seed: u64) -> Value {
    run_python_code(
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import dcp_state; \
         torch.save(dcp_state.full_state(int(sys.argv[2])), sys.argv[3])",
        &[
            script("").as_os_str(),
            seed.to_string().as_ref(),
            path.as_os_str(),
        ],
    );
    ckptio::torch::load(path, &LoadOptions::default()).unwrap()
}

/// The part of `full` rank `rank` of `world` holds: the sharded tensors split as
/// `dcp_state.shard_plan` splits them, the rest whole.
fn rank_state(full: &Value, rank: Rank) -> Value {
    fn walk(v: &Value, path: &str, rank: Rank) -> Value {
        match v {
            Value::Dict(d) => {
                let mut out = Dict::new();
                for (k, x) in d.iter() {
                    let p = if path.is_empty() {
                        k.to_string()
                    } else {
                        format!("{path}.{k}")
                    };
                    out.insert(k.clone(), walk(x, &p, rank));
                }
                Value::Dict(out)
            }
            Value::List(items) => Value::List(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| walk(x, &format!("{path}.{i}"), rank))
                    .collect(),
            ),
            Value::Tensor(t) => match shard_dim(path) {
                Some(dim) => {
                    let c = box_of(t.shape(), dim, rank.world_size, rank.rank);
                    Value::Sharded(
                        ShardedTensor::new(t.shape().to_vec(), t.dtype())
                            .with_shard(c.offsets.clone(), narrow(t, &c))
                            .unwrap(),
                    )
                }
                None => v.clone(),
            },
            other => other.clone(),
        }
    }
    walk(full, "", rank)
}

/// Checks that a reader at world size `world` gets every rank's rows (dim 0 split as
/// `torch.chunk` does) of every tensor, and every value, equal to `full`.
fn check_loads_at(reader: &DcpReader, full: &Value, world: usize) {
    for r in 0..world {
        let rank = Rank::new(r, world).unwrap();
        // The template: each tensor as the rows this rank would own.
        let template = rank_template(full, rank);
        let got = reader.read_into(&template).unwrap();
        for (path, t) in full.named_tensors() {
            let got_t = lookup(&got, &path);
            match got_t {
                Value::Sharded(s) if t.shape().is_empty() => panic!("{path}: 0-dim sharded {s:?}"),
                Value::Sharded(s) => {
                    let c = box_of(t.shape(), 0, world, r);
                    let local = s.shards()[0].tensor.clone();
                    assert_eq!(
                        local,
                        Value::Tensor(narrow(t, &c)),
                        "{path} rank {r}/{world}"
                    );
                }
                Value::Tensor(g) => assert_eq!(g, t, "{path}"),
                other => panic!("{path}: got {other:?}"),
            }
        }
        for key in ["epoch", "optim"] {
            assert_eq!(
                first_difference(
                    &canon(full.get(key).unwrap()),
                    &canon(got.get(key).unwrap())
                ),
                None,
                "{key}"
            );
        }
    }
}

fn rank_template(full: &Value, rank: Rank) -> Value {
    fn walk(v: &Value, rank: Rank) -> Value {
        match v {
            Value::Dict(d) => {
                Value::Dict(d.iter().map(|(k, x)| (k.clone(), walk(x, rank))).collect())
            }
            Value::List(items) if items.iter().any(|x| matches!(x, Value::Tensor(_))) => {
                Value::List(items.iter().map(|x| walk(x, rank)).collect())
            }
            Value::Tensor(t) if !t.shape().is_empty() => {
                let c = box_of(t.shape(), 0, rank.world_size, rank.rank);
                let zeros = HostTensor::from_bytes(
                    t.dtype(),
                    &c.sizes,
                    vec![0u8; c.numel().unwrap() * t.dtype().size()],
                )
                .unwrap();
                Value::Sharded(
                    ShardedTensor::new(t.shape().to_vec(), t.dtype())
                        .with_shard(c.offsets, zeros)
                        .unwrap(),
                )
            }
            other => other.clone(),
        }
    }
    walk(full, rank)
}

fn lookup<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match v {
        Value::Dict(d) => d.get(k).unwrap_or_else(|| panic!("no {k} in {path}")),
        Value::List(items) => &items[k.parse::<usize>().unwrap()],
        other => panic!("{path}: {other:?}"),
    })
}

#[test]
fn pytorch_sharded_checkpoints_load_at_every_world_size() {
    let dir = tempfile::tempdir().unwrap();
    for saved_by in [2usize, 3] {
        let ck = dir.path().join(format!("torch{saved_by}"));
        let out = run_python(
            "dcp_save.py",
            &[
                ck.as_os_str(),
                "--world".as_ref(),
                saved_by.to_string().as_ref(),
            ],
        );
        assert!(out.contains("\"ok\": true"), "{out}");
        let mut expected_path = ck.clone().into_os_string();
        expected_path.push(".expected.pt");
        let full = ckptio::torch::load(Path::new(&expected_path), &LoadOptions::default()).unwrap();
        let reader = DcpReader::open(&ck).unwrap();
        // One process reads it whole, nested as saved.
        let all = reader.read_all().unwrap();
        assert_eq!(
            first_difference(&canon(&full), &canon(&all)),
            None,
            "saved by {saved_by}, read whole"
        );
        for world in 1..=4 {
            check_loads_at(&reader, &full, world);
        }
    }
}

/// A child rank: saves its part of `dcp_state.full_state` (read from the `.pt` file) into the
/// directory.
fn rank_child(spec: &str) {
    let mut it = spec.splitn(4, ':');
    let (rank, world, expected, dir) = (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap(),
        it.next().unwrap(),
    );
    let rank = Rank::new(rank, world).unwrap();
    let full = ckptio::torch::load(expected, &LoadOptions::default()).unwrap();
    let io = DcpCheckpointIo::new(rank)
        .run_id("interop")
        .commit_timeout(std::time::Duration::from_secs(120));
    let state = rank_state(&full, rank);
    io.save_checkpoint(&state, Path::new(dir), &SaveOptions::default())
        .unwrap();
    io.wait_committed(Path::new(dir)).unwrap();
}

/// Runs `world` ckptio ranks, each a child process of this test binary, saving into `dir`.
fn save_with_ckptio_ranks(world: usize, expected: &Path, dir: &Path) {
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..world)
        .map(|r| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "ckptio_sharded_checkpoints_load_in_pytorch",
                    "--nocapture",
                ])
                .env(
                    "CKPTIO_DCP_CHILD",
                    format!("{r}:{world}:{}:{}", expected.display(), dir.display()),
                )
                .output_async()
        })
        .collect();
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "rank {r} of {world} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

trait SpawnQuiet {
    fn output_async(&mut self) -> std::process::Child;
}

impl SpawnQuiet for Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

#[test]
fn ckptio_sharded_checkpoints_load_in_pytorch() {
    if let Ok(spec) = std::env::var("CKPTIO_DCP_CHILD") {
        rank_child(&spec);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let expected = dir.path().join("expected.pt");
    let full = expected_state(&expected, 11);
    for world in [2usize, 3, 4] {
        let ck = dir.path().join(format!("ckptio{world}"));
        save_with_ckptio_ranks(world, &expected, &ck);
        // ckptio reads its own checkpoint whole.
        let back = DcpCheckpointIo::new(Rank::single())
            .load_checkpoint(&ck, &LoadOptions::default(), None)
            .unwrap()
            .unwrap();
        assert_eq!(
            first_difference(&canon(&full), &canon(&back)),
            None,
            "world {world}"
        );
        // PyTorch reads it in one process (dcp.load and dcp_to_torch_save), and in a job of
        // another size.
        for load_world in [1, if world == 2 { 3 } else { 2 }] {
            let out = run_python(
                "dcp_load.py",
                &[
                    ck.as_os_str(),
                    expected.as_os_str(),
                    "--world".as_ref(),
                    load_world.to_string().as_ref(),
                ],
            );
            assert!(
                out.contains("\"ok\": true"),
                "saved by {world}, loaded by {load_world}: {out}"
            );
        }
    }
}
