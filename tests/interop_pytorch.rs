//! Interop with PyTorch 2.13 itself (and Lightning 2.6), through the Python in `$CKPTIO_PYTHON`
//! (`./dev.sh` sets it; `.venv/bin/python` otherwise). Never skipped: without that Python these
//! tests fail and say why.
//!
//! 1. `python_writes_rust_reads`: `tests/python/corpus.py` writes a random corpus (every dtype,
//!    views, shared storages, nested containers, Parameters, a model + AdamW state, pickle
//!    protocols 4 and 5, a buffer-written archive, Lightning checkpoints) with a manifest of what
//!    `torch.load` returns; ckptio must load the same trees (plain and memory-mapped), with the
//!    same storage sharing and flags, and refuse under `weights_only` exactly what torch refuses.
//! 2. `rust_writes_python_reads`: ckptio writes random trees; `torch.load(weights_only=True)`
//!    (plain and `mmap=True`) must return the same trees, sharing and flags.
//! 3. `convert_round_trip`: the `ckptio convert` binary rewrites the Python corpus; torch must
//!    load the rewritten files as the originals.
//!
//! A run prints its seed; `CKPTIO_TEST_SEED=N` replays it.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use ckptio::{DType, Dict, Error, HostTensor, Key, LoadOptions, Storage, Value};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value as Json;

use common::{first_difference, flags, kinds, pick, sharing_groups};

/// One file of the Python corpus, as `manifest.json` describes it.
struct Entry {
    file: String,
    weights_only: bool,
    torch_weights_only_ok: bool,
    torch_weights_only_error: String,
    subtrees: Option<Vec<String>>,
    json: Json,
    groups: Json,
    flags: Json,
    kinds: Json,
}

fn parse_manifest(dir: &Path) -> Vec<Entry> {
    let m = common::read_json(&dir.join("manifest.json"));
    let files = m["files"].as_array().expect("manifest.files is a list");
    files
        .iter()
        .map(|e| Entry {
            file: e["file"].as_str().expect("file").to_owned(),
            weights_only: e["weights_only"].as_bool().expect("weights_only"),
            torch_weights_only_ok: e["torch_weights_only_ok"].as_bool().expect("flag"),
            torch_weights_only_error: e["torch_weights_only_error"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            subtrees: e["subtrees"].as_array().map(|a| {
                a.iter()
                    .map(|k| k.as_str().expect("subtree key").to_owned())
                    .collect()
            }),
            json: e["json"].clone(),
            groups: e["groups"].clone(),
            flags: e["flags"].clone(),
            kinds: e["kinds"].clone(),
        })
        .collect()
}

/// Runs `corpus.py` into `dir` and returns its manifest.
fn make_corpus(dir: &Path, seed: u64) -> Vec<Entry> {
    common::run_python(
        "corpus.py",
        &[dir.as_os_str(), OsStr::new(&seed.to_string())],
    );
    let entries = parse_manifest(dir);
    // the corpus must really hold what these tests are about
    for must in [
        "dtypes.pt",
        "views.pt",
        "shared.pt",
        "nested.pt",
        "parameters.pt",
        "optimizer_state_dict.pt",
        "protocol4.pt",
        "protocol5.pt",
        "from_buffer.pt",
        "noextension",
    ] {
        assert!(
            entries.iter().any(|e| e.file == must),
            "corpus has no {must}"
        );
    }
    let ckpts: Vec<_> = entries
        .iter()
        .filter(|e| e.file.starts_with("lightning"))
        .collect();
    assert_eq!(ckpts.len(), 2, "expected two Lightning checkpoints");
    assert!(
        ckpts.iter().any(|e| e.subtrees.is_some()) && ckpts.iter().any(|e| e.subtrees.is_none()),
        "one Lightning checkpoint should load with weights_only=True and one should not"
    );
    entries
}

/// Compares what ckptio made of a file with what torch made of it; pushes differences.
/// What a load should give: canonical JSON, sharing groups, flags, container kinds.
struct Expected<'a> {
    json: &'a Json,
    groups: &'a Json,
    flags: &'a Json,
    kinds: &'a Json,
}

fn compare(
    what: &str,
    got: &Value,
    subtrees: Option<&[String]>,
    want: Expected<'_>,
    failures: &mut Vec<String>,
) {
    let Expected {
        json,
        groups,
        flags: flag_list,
        kinds: kind_list,
    } = want;
    let tree = pick(got, subtrees);
    if let Some(d) = first_difference(&common::canon(&tree), json) {
        failures.push(format!("{what}: JSON differs (ckptio vs torch) {d}"));
    }
    if let Some(d) = first_difference(&sharing_groups(&tree), groups) {
        failures.push(format!(
            "{what}: storage sharing differs (ckptio vs torch) {d}"
        ));
    }
    if let Some(d) = first_difference(&flags(&tree), flag_list) {
        failures.push(format!(
            "{what}: Parameter / requires_grad flags differ (ckptio vs torch) {d}"
        ));
    }
    if let Some(d) = first_difference(&kinds(&tree), kind_list) {
        failures.push(format!(
            "{what}: container types (dict/OrderedDict/list/tuple) differ (ckptio vs torch) {d}"
        ));
    }
}

fn fail_if_any(test: &str, seed: u64, failures: &[String]) {
    if !failures.is_empty() {
        panic!(
            "{test} (seed {seed}, replay with CKPTIO_TEST_SEED={seed}): {} failure(s):\n- {}",
            failures.len(),
            failures.join("\n- ")
        );
    }
}

#[test]
fn python_writes_rust_reads() {
    let seed = common::seed("python_writes_rust_reads");
    let dir = tempfile::tempdir().unwrap();
    let entries = make_corpus(dir.path(), seed);
    let mut failures = Vec::new();
    for e in &entries {
        let path = dir.path().join(&e.file);
        // weights_only=true: accepted exactly when torch accepts it
        match ckptio::torch::load(&path, &LoadOptions::default().weights_only(true)) {
            Ok(_) if !e.torch_weights_only_ok => failures.push(format!(
                "{}: ckptio loads it with weights_only=true, torch refuses it: {}",
                e.file, e.torch_weights_only_error
            )),
            Err(err) if e.torch_weights_only_ok => failures.push(format!(
                "{}: torch loads it with weights_only=True, ckptio fails: {err}",
                e.file
            )),
            Err(err) if !matches!(err, Error::Unsafe { .. }) => failures.push(format!(
                "{}: torch refuses it as unsafe under weights_only; ckptio fails, but not with \
                 Error::Unsafe: {err}",
                e.file
            )),
            _ => {}
        }
        for mmap in [false, true] {
            let opts = LoadOptions::default()
                .weights_only(e.weights_only)
                .mmap(mmap);
            let what = format!("{} (weights_only={}, mmap={mmap})", e.file, e.weights_only);
            match ckptio::torch::load(&path, &opts) {
                Ok(v) => compare(
                    &what,
                    &v,
                    e.subtrees.as_deref(),
                    Expected {
                        json: &e.json,
                        groups: &e.groups,
                        flags: &e.flags,
                        kinds: &e.kinds,
                    },
                    &mut failures,
                ),
                Err(err) => failures.push(format!("{what}: ckptio cannot load it: {err}")),
            }
        }
    }
    println!("checked {} files written by torch", entries.len());
    fail_if_any("python_writes_rust_reads", seed, &failures);
}

// ---- trees written by ckptio ---------------------------------------------------------------

fn random_bytes(rng: &mut StdRng, dtype: DType, numel: usize) -> Vec<u8> {
    let mut b = vec![0u8; numel * dtype.size()];
    rng.fill(&mut b[..]);
    if dtype == DType::Bool {
        b.iter_mut().for_each(|x| *x &= 1);
    }
    b
}

fn random_tensor(rng: &mut StdRng, dtype: DType, shape: &[usize]) -> HostTensor {
    let numel = shape.iter().product();
    HostTensor::from_bytes(dtype, shape, random_bytes(rng, dtype, numel)).unwrap()
}

fn random_shape(rng: &mut StdRng) -> Vec<usize> {
    let r: f64 = rng.random();
    if r < 0.15 {
        vec![]
    } else if r < 0.3 {
        [vec![0], vec![3, 0], vec![0, 2, 4], vec![1, 0]][rng.random_range(0..4)].clone()
    } else {
        let dims = rng.random_range(1..=4);
        (0..dims).map(|_| rng.random_range(1..=6)).collect()
    }
}

/// Random `f32` values as a tensor (with the specials floats have).
fn floats(rng: &mut StdRng, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0];
    for (x, s) in v.iter_mut().zip(specials) {
        *x = s;
    }
    HostTensor::from_slice(&v, shape).unwrap()
}

fn dtypes_tree(rng: &mut StdRng) -> Value {
    let mut d = Dict::new();
    for &dt in DType::ALL {
        let mut e = Dict::new();
        e.insert("scalar", random_tensor(rng, dt, &[]));
        e.insert("empty", random_tensor(rng, dt, &[0]));
        e.insert("empty2", random_tensor(rng, dt, &[2, 0, 3]));
        let rand: Vec<Value> = (0..2)
            .map(|_| {
                let s = random_shape(rng);
                Value::from(random_tensor(rng, dt, &s))
            })
            .collect();
        e.insert("rand", rand);
        d.insert(dt.name(), e);
    }
    Value::from(d)
}

/// Per dtype: a base tensor and views of it (transposed, narrowed, strided, 0-dim, empty).
fn views_tree(rng: &mut StdRng) -> Value {
    let mut d = Dict::new();
    for &dt in DType::ALL {
        let base = random_tensor(rng, dt, &[4, 6]);
        let s = base.storage().clone();
        let mut views: Vec<(&str, HostTensor)> = vec![
            ("base", base.clone()),
            ("t", base.transpose(0, 1).unwrap()),
            ("rows", base.narrow(0, 1, 2).unwrap()),
            ("narrow", base.narrow(1, 2, 3).unwrap()),
            (
                "step",
                HostTensor::from_parts(s.clone(), dt, vec![4, 3], vec![6, 2], 0).unwrap(),
            ),
            (
                "elem",
                HostTensor::from_parts(s.clone(), dt, vec![], vec![], 15).unwrap(),
            ),
            (
                "tail_t",
                HostTensor::from_parts(s.clone(), dt, vec![3, 2], vec![1, 6], 13).unwrap(),
            ),
            ("empty", base.narrow(0, 2, 0).unwrap()),
            (
                "empty_at_end",
                HostTensor::from_parts(s.clone(), dt, vec![0], vec![1], 24).unwrap(),
            ),
            (
                "expand",
                HostTensor::from_parts(s, dt, vec![3, 4], vec![1, 0], 5).unwrap(),
            ),
        ];
        views.shuffle(rng);
        let mut v = Dict::ordered();
        for (k, t) in views {
            v.insert(k, t);
        }
        d.insert(dt.name(), v);
    }
    // a slice alone: the whole storage is written
    let big = random_tensor(rng, DType::Int64, &[100]);
    d.insert("slice_only", big.narrow(0, 10, 10).unwrap());
    Value::from(d)
}

fn shared_tree(rng: &mut StdRng) -> Value {
    let base = random_tensor(rng, DType::Float16, &[16]);
    let s = base.storage().clone();
    // equal bytes, different storage: must not be merged
    let twin = HostTensor::from_parts(
        Storage::new(s.bytes().to_vec()),
        DType::Float16,
        vec![16],
        vec![1],
        0,
    )
    .unwrap();
    let mut deep = Dict::new();
    deep.insert(
        "x",
        Value::List(vec![Value::Tuple(vec![base
            .narrow(0, 4, 4)
            .unwrap()
            .into()])]),
    );
    let mut d = Dict::new();
    d.insert("deep", deep);
    d.insert("again", base.clone());
    d.insert("twin", twin);
    d.insert(
        "last",
        HostTensor::from_parts(s.clone(), DType::Float16, vec![4, 4], vec![1, 4], 0).unwrap(),
    );
    // one storage viewed by several v3 tensors of the same dtype
    let u = random_tensor(rng, DType::UInt32, &[3, 5]);
    d.insert(
        "u32",
        Value::List(vec![
            u.transpose(0, 1).unwrap().into(),
            u.narrow(0, 1, 2).unwrap().into(),
            u.clone().into(),
        ]),
    );
    // empty tensors on one empty storage never count as shared
    let e = random_tensor(rng, DType::Float32, &[0, 3]);
    d.insert(
        "empties",
        Value::List(vec![e.clone().into(), e.transpose(0, 1).unwrap().into()]),
    );
    Value::from(d)
}

fn nested_tree(rng: &mut StdRng) -> Value {
    let mut d = Dict::new();
    d.insert("none", Value::None);
    d.insert("bools", Value::List(vec![true.into(), false.into()]));
    let ints = [
        0,
        1,
        -1,
        255,
        256,
        65535,
        65536,
        i32::MAX as i64,
        i32::MIN as i64,
        i32::MAX as i64 + 1,
        i32::MIN as i64 - 1,
        i64::MAX,
        i64::MIN,
        rng.random(),
    ];
    d.insert(
        "ints",
        ints.iter().map(|&i| Value::Int(i)).collect::<Vec<_>>(),
    );
    let fl = [
        0.0,
        -0.0,
        1.5,
        1e-300,
        -3.25e100,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::MIN_POSITIVE,
        5e-324,
        0.1,
        rng.random(),
    ];
    d.insert(
        "floats",
        fl.iter().map(|&f| Value::Float(f)).collect::<Vec<_>>(),
    );
    d.insert(
        "str",
        [
            "",
            "plain",
            "ünïcödé ✓ 🚀",
            "with\nnewline",
            &"x".repeat(300),
        ]
        .iter()
        .map(|&s| Value::from(s))
        .collect::<Vec<_>>(),
    );
    let all: Vec<u8> = (0..=255).collect();
    d.insert(
        "bytes",
        Value::List(vec![
            Value::Bytes(Vec::<u8>::new().into()),
            Value::Bytes(vec![0u8, 1, 0xff].into()),
            Value::Bytes(all.into()),
        ]),
    );
    let mut empty = Dict::new();
    empty.insert("dict", Dict::new());
    empty.insert("ordered", Dict::ordered());
    empty.insert("list", Value::List(vec![]));
    empty.insert("tuple", Value::Tuple(vec![]));
    d.insert("empty", empty);
    d.insert(
        "tuples",
        Value::List(
            (1..=5)
                .map(|n| Value::Tuple((0..n).map(Value::Int).collect()))
                .collect(),
        ),
    );
    let mut mixed = Dict::new();
    mixed.insert("s", 1i64);
    mixed.insert(2i64, "two");
    mixed.insert(Key::None, "none");
    mixed.insert(Key::Bool(true), "true");
    mixed.insert(Key::Tuple(vec![Key::Int(1), Key::Str("a".into())]), "tuple");
    mixed.insert(Key::Float(ckptio::FloatKey(1.5)), "float");
    mixed.insert(Key::Bytes(b"k".to_vec()), "bytes");
    mixed.insert(-3i64, floats(rng, &[2]));
    d.insert("mixed_keys", mixed);
    d.insert("many", (0..2500).map(Value::Int).collect::<Vec<_>>());
    let big: Dict = (0..1200)
        .map(|i| (format!("k{i}"), Value::Int(i)))
        .collect();
    d.insert("big_dict", big);
    let mut deep = Value::Int(0);
    for i in 0..60 {
        let mut level = Dict::new();
        level.insert("level", i as i64);
        deep = Value::List(vec![deep, level.into()]);
    }
    d.insert("deep", deep);
    d.insert(
        "nested",
        Value::List(vec![Value::List(vec![Value::Tuple(vec![{
            let mut x = Dict::new();
            x.insert("t", random_tensor(rng, DType::Int32, &[2, 2]));
            x.into()
        }])])]),
    );
    Value::from(d)
}

fn parameters_tree(rng: &mut StdRng) -> Value {
    let p = floats(rng, &[3, 4])
        .with_parameter(true)
        .with_requires_grad(true);
    let mut d = Dict::new();
    d.insert("p", p.clone());
    d.insert(
        "p_view",
        p.transpose(0, 1)
            .unwrap()
            .with_parameter(false)
            .with_requires_grad(false),
    );
    d.insert(
        "frozen",
        random_tensor(rng, DType::BFloat16, &[2]).with_parameter(true),
    );
    d.insert(
        "int_param",
        random_tensor(rng, DType::Int64, &[5]).with_parameter(true),
    );
    d.insert(
        "v3_param",
        random_tensor(rng, DType::UInt16, &[2, 3]).with_parameter(true),
    );
    d.insert(
        "scalar_param",
        HostTensor::scalar(2.5f64)
            .with_parameter(true)
            .with_requires_grad(true),
    );
    d.insert("grad_tensor", floats(rng, &[2, 3]).with_requires_grad(true));
    d.insert(
        "list",
        Value::List(vec![
            p.into(),
            floats(rng, &[0])
                .with_parameter(true)
                .with_requires_grad(true)
                .into(),
        ]),
    );
    Value::from(d)
}

/// A model state dict and an AdamW-like optimizer state dict (int-keyed state).
fn training_tree(rng: &mut StdRng) -> Value {
    let shapes: [&[usize]; 4] = [&[8, 4], &[8], &[2, 8], &[2]];
    let mut model = Dict::ordered();
    let names = ["0.weight", "0.bias", "2.weight", "2.bias"];
    for (n, s) in names.iter().zip(shapes) {
        model.insert(*n, floats(rng, s));
    }
    model.insert("counter", HostTensor::scalar(7i64));
    let mut state = Dict::new();
    for (i, s) in shapes.iter().enumerate() {
        let mut st = Dict::new();
        st.insert("step", HostTensor::scalar(3.0f32));
        st.insert("exp_avg", floats(rng, s));
        st.insert("exp_avg_sq", floats(rng, s));
        state.insert(i as i64, st);
    }
    let mut group = Dict::new();
    group.insert("lr", 1e-3);
    group.insert("betas", Value::Tuple(vec![0.9.into(), 0.999.into()]));
    group.insert("eps", 1e-8);
    group.insert("weight_decay", 0.01);
    group.insert("amsgrad", false);
    group.insert("foreach", Value::None);
    group.insert("params", (0..4).map(Value::Int).collect::<Vec<_>>());
    let mut opt = Dict::new();
    opt.insert("state", state);
    opt.insert("param_groups", Value::List(vec![group.into()]));
    let mut ckpt = Dict::new();
    ckpt.insert("state_dict", model);
    ckpt.insert("optimizer_states", Value::List(vec![opt.into()]));
    ckpt.insert("global_step", 3i64);
    Value::from(ckpt)
}

/// Storages of 1 MiB and more, at every kind of memory offset (64-byte aligned or not) and
/// with ragged sizes: durable saves place them for direct I/O, with padding up to 4 KiB.
fn large_tree(rng: &mut StdRng) -> Value {
    let mut raw = vec![0u8; 24 << 20];
    rng.fill(&mut raw[..]);
    let raw = bytes::Bytes::from(raw);
    let mut d = Dict::ordered();
    let mut at = 0usize;
    for (i, (shift, numel)) in [
        (0usize, 262_144usize),
        (64, 300_001),
        (4032, 1_048_576),
        (3, 400_000),
        (128, 262_145),
        (0, 1_000_003),
    ]
    .into_iter()
    .enumerate()
    {
        at += shift;
        let storage = ckptio::Storage::new(raw.slice(at..at + numel * 4));
        at += numel * 4;
        let t = HostTensor::from_parts(storage, DType::Float32, vec![numel], vec![1], 0).unwrap();
        d.insert(format!("big{i}").as_str(), t);
    }
    // A view into the middle of a large shared storage, and the whole of it.
    let whole = floats(rng, &[700, 1024]);
    d.insert("shared.whole", whole.clone());
    d.insert("shared.rows", whole.narrow(0, 100, 300).unwrap());
    d.insert("small", floats(rng, &[3, 3]));
    Value::from(d)
}

fn rust_trees(rng: &mut StdRng) -> Vec<(&'static str, Value)> {
    let simple = {
        let mut d = Dict::new();
        d.insert("w", floats(rng, &[3, 2]).transpose(0, 1).unwrap());
        d.insert("u", random_tensor(rng, DType::UInt64, &[2]));
        Value::from(d)
    };
    vec![
        ("dtypes.pt", dtypes_tree(rng)),
        ("views.pt", views_tree(rng)),
        ("shared.pt", shared_tree(rng)),
        ("nested.pt", nested_tree(rng)),
        ("parameters.pt", parameters_tree(rng)),
        ("training.ckpt", training_tree(rng)),
        ("large.pt", large_tree(rng)),
        (
            "root_tensor.pt",
            Value::from(floats(rng, &[3, 5]).transpose(0, 1).unwrap()),
        ),
        ("noextension", simple.clone()),
        ("many.dots.pth", simple.clone()),
        ("buffer.pt", simple),
    ]
}

fn results_of(out: &Path) -> Vec<Json> {
    common::read_json(out)["results"]
        .as_array()
        .expect("results")
        .clone()
}

#[test]
fn rust_writes_python_reads() {
    let seed = common::seed("rust_writes_python_reads");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let trees = rust_trees(&mut rng);
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut failures = Vec::new();
    for (name, tree) in &trees {
        let path = dir.path().join(name);
        if *name == "buffer.pt" {
            // like torch.save to a buffer: entries under "archive/"
            let buf = ckptio::torch::save_to_writer(tree, "archive", Vec::new()).unwrap();
            std::fs::write(&path, buf).unwrap();
        } else {
            ckptio::torch::save(tree, &path).unwrap_or_else(|e| panic!("saving {name}: {e}"));
        }
        // ckptio reads its own file back as written
        match ckptio::torch::load(&path, &LoadOptions::default()) {
            Ok(back) => compare(
                &format!("{name} (ckptio reading its own file)"),
                &back,
                None,
                Expected {
                    json: &common::canon(tree),
                    groups: &sharing_groups(tree),
                    flags: &flags(tree),
                    kinds: &kinds(tree),
                },
                &mut failures,
            ),
            Err(e) => failures.push(format!("{name}: ckptio cannot read its own file: {e}")),
        }
        paths.push(path);
    }
    let out = dir.path().join("load_check.json");
    let mut args: Vec<&OsStr> = vec![OsStr::new("--out"), out.as_os_str()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    common::run_python("load_check.py", &args);
    let results = results_of(&out);
    assert_eq!(results.len(), trees.len());
    for ((name, tree), r) in trees.iter().zip(&results) {
        let want_json = common::canon(tree);
        let want_groups = sharing_groups(tree);
        let want_flags = flags(tree);
        if r["ok"] != Json::Bool(true) {
            failures.push(format!(
                "{name}: torch.load(weights_only=True) fails: {}",
                r["error"].as_str().unwrap_or("?")
            ));
            continue;
        }
        let check = |what: &str, got: &Json, want: &Json, failures: &mut Vec<String>| {
            if let Some(d) = first_difference(got, want) {
                failures.push(format!("{name}: {what} differs (torch vs ckptio) {d}"));
            }
        };
        check("JSON", &r["json"], &want_json, &mut failures);
        check("storage sharing", &r["groups"], &want_groups, &mut failures);
        check(
            "Parameter / requires_grad flags",
            &r["flags"],
            &want_flags,
            &mut failures,
        );
        check(
            "container types (dict/OrderedDict/list/tuple)",
            &r["kinds"],
            &kinds(tree),
            &mut failures,
        );
        let m = &r["mmap"];
        if m["ok"] != Json::Bool(true) {
            failures.push(format!(
                "{name}: torch.load(mmap=True, weights_only=True) fails: {}",
                m["error"].as_str().unwrap_or("?")
            ));
        } else {
            check("JSON with mmap=True", &m["json"], &want_json, &mut failures);
            check(
                "storage sharing with mmap=True",
                &m["groups"],
                &want_groups,
                &mut failures,
            );
        }
    }
    println!("checked {} files written by ckptio", trees.len());
    fail_if_any("rust_writes_python_reads", seed, &failures);
}

#[test]
fn convert_round_trip() {
    let seed = common::seed("convert_round_trip");
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let entries = make_corpus(&corpus, seed);
    let converted = dir.path().join("converted");
    let bin = env!("CARGO_BIN_EXE_ckptio");
    let mut failures = Vec::new();
    let mut jobs = Vec::new();
    let mut checked = Vec::new();
    for e in &entries {
        let input = corpus.join(&e.file);
        let output = converted.join(&e.file);
        let mut cmd = Command::new(bin);
        cmd.arg("convert").arg(&input).arg(&output);
        if !e.weights_only {
            cmd.arg("--unsafe-objects");
        }
        let out = cmd.output().expect("run the ckptio binary");
        if !out.status.success() {
            failures.push(format!(
                "ckptio convert {}: {}: {}",
                e.file,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        }
        // ckptio writes protocol 2 with allow-listed globals only: torch.load(weights_only=True)
        // takes the converted file unless it holds objects (the second Lightning checkpoint)
        jobs.push(serde_json::json!({
            "file": output,
            "weights_only": e.subtrees.is_none(),
            "subtrees": e.subtrees,
        }));
        checked.push(e);
    }
    let results = common::load_check(dir.path(), jobs);
    assert_eq!(results.len(), checked.len());
    for (e, r) in checked.iter().zip(&results) {
        if r["ok"] != Json::Bool(true) {
            failures.push(format!(
                "{} converted by ckptio: torch.load(weights_only={}) fails: {}",
                e.file,
                e.subtrees.is_none(),
                r["error"].as_str().unwrap_or("?")
            ));
            continue;
        }
        let pairs = [
            ("JSON", &r["json"], &e.json),
            ("storage sharing", &r["groups"], &e.groups),
            ("Parameter / requires_grad flags", &r["flags"], &e.flags),
            (
                "container types (dict/OrderedDict/list/tuple)",
                &r["kinds"],
                &e.kinds,
            ),
            ("JSON with mmap=True", &r["mmap"]["json"], &e.json),
        ];
        for (what, got, want) in pairs {
            if let Some(d) = first_difference(got, want) {
                failures.push(format!(
                    "{} converted by ckptio: {what} differs (converted vs original) {d}",
                    e.file
                ));
            }
        }
        if e.subtrees.is_some() && r["torch_weights_only_ok"] != Json::Bool(false) {
            failures.push(format!(
                "{}: the converted file lost the objects that made torch refuse it under \
                 weights_only",
                e.file
            ));
        }
    }
    println!("converted {} files written by torch", checked.len());
    fail_if_any("convert_round_trip", seed, &failures);
}
