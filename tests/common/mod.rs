//! Helpers shared by the integration tests: the Python interpreter with torch, running the
//! helper scripts in `tests/python/`, storage-sharing groups and tensor flags in the same shape
//! the scripts print them, and [`skip`], the one way a test says it could not run its check.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use ckptio::{DictKind, HostTensor, Key, Storage, Value};
use serde_json::{json, Value as Json};

/// What a machine lacked when a test could not run (all or part of) its check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipKind {
    /// No CUDA device.
    Cuda,
    /// Not running as root (mounting a file system, dropping privileges).
    Root,
    /// `userfaultfd` write protection refused by the kernel or the process's privileges.
    Userfaultfd,
    /// Too little free disk.
    Disk,
    /// Too little free memory.
    Memory,
}

impl SkipKind {
    /// The name written in the skip log: `cuda`, `root`, `userfaultfd`, `disk`, `memory`.
    pub fn name(self) -> &'static str {
        match self {
            SkipKind::Cuda => "cuda",
            SkipKind::Root => "root",
            SkipKind::Userfaultfd => "userfaultfd",
            SkipKind::Disk => "disk",
            SkipKind::Memory => "memory",
        }
    }
}

/// The name of the running test: libtest names each test's thread after it.
pub fn this_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test thread>")
        .to_owned()
}

/// Says that `test` did not run (all or part of) its check here because the machine lacks
/// `kind`: written to the process's stderr (past libtest's capture, so the run shows it) and,
/// when `$CKPTIO_SKIP_LOG` names a file, appended to it as one line
/// `test<TAB>kind<TAB>reason`, in one write so that parallel tests never interleave.
/// `./dev.sh test` lists that file at the end and fails on any kind but `cuda`.
pub fn skip(test: &str, kind: SkipKind, reason: &str) {
    let reason = reason.replace(['\t', '\n'], " ");
    let line = format!("{test}\t{}\t{reason}\n", kind.name());
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("SKIPPED {test} ({}): {reason}\n", kind.name()).as_bytes());
    let Some(log) = std::env::var_os("CKPTIO_SKIP_LOG").filter(|p| !p.is_empty()) else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        panic!(
            "{test}: cannot record a skip in CKPTIO_SKIP_LOG={}: {e}",
            Path::new(&log).display()
        );
    }
}

/// The Python with torch 2.13 (and Lightning): `$CKPTIO_PYTHON`, else the project's
/// `.venv/bin/python`. Panics (never skips) when there is none.
pub fn python() -> PathBuf {
    let (py, from) = match std::env::var_os("CKPTIO_PYTHON") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), "$CKPTIO_PYTHON"),
        _ => (
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
            "the default <crate>/.venv/bin/python",
        ),
    };
    assert!(
        py.exists(),
        "the PyTorch interop tests need a Python with torch 2.13 and lightning: {} ({from}) does \
         not exist. Run them through `./dev.sh cargo test` (which creates .venv and sets \
         CKPTIO_PYTHON), or set CKPTIO_PYTHON to such an interpreter.",
        py.display()
    );
    py
}

/// Path of a helper script in `tests/python/`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs `tests/python/<name> args...`; returns its stdout, panics with its output on failure.
pub fn run_python(name: &str, args: &[&std::ffi::OsStr]) -> String {
    let mut cmd = Command::new(python());
    cmd.arg(script(name)).args(args);
    output_of(cmd, name, args)
}

/// Runs `python -c CODE args...` (`sys.argv[1:]` are `args`); returns its stdout, panics with
/// its output on failure.
pub fn run_python_code(code: &str, args: &[&std::ffi::OsStr]) -> String {
    let mut cmd = Command::new(python());
    cmd.arg("-c").arg(code).args(args);
    output_of(cmd, "-c", args)
}

fn output_of(mut cmd: Command, what: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = cmd
        .env("OMP_NUM_THREADS", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {what} {:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        python().display(),
        args,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Has `tests/python/load_check.py` load every file of `jobs` (`{"file", "weights_only",
/// "subtrees"}`) with `torch.load` in one process; returns its results, one per job.
pub fn load_check(dir: &Path, jobs: Vec<Json>) -> Vec<Json> {
    let jobs_path = dir.join("jobs.json");
    std::fs::write(&jobs_path, Json::Array(jobs).to_string()).unwrap();
    let out = dir.join("load_check.json");
    run_python(
        "load_check.py",
        &[
            std::ffi::OsStr::new("--jobs"),
            jobs_path.as_os_str(),
            std::ffi::OsStr::new("--out"),
            out.as_os_str(),
        ],
    );
    read_json(&out)["results"]
        .as_array()
        .expect("load_check.py results")
        .clone()
}

pub fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The seed for this run: `$CKPTIO_TEST_SEED` to replay one, else a fresh random one. Printed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("CKPTIO_TEST_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("CKPTIO_TEST_SEED={s:?} is not a number")),
        Err(_) => rand::random::<u32>() as u64,
    };
    println!("{test}: seed {seed} (replay with CKPTIO_TEST_SEED={seed})");
    seed
}

/// `ckptio::json::to_json`, normalised the way a JSON document read back from text is (so that
/// it compares equal to Python's output number for number: both print floats as their shortest
/// round-trip form, and both are then parsed by the same parser).
pub fn canon(v: &Value) -> Json {
    let j = ckptio::json::to_json(v);
    serde_json::from_str(&j.to_string()).expect("to_json output parses")
}

/// `[[key path, group], ...]`: tensors whose storages are the same ([`Storage::ptr_eq`]) share a
/// group id, ids in first-seen order; empty storages never share (as in `canon.py`).
pub fn sharing_groups(v: &Value) -> Json {
    // keyed by Storage::id (its identity while alive, as ptr_eq compares); the tree keeps every
    // storage alive meanwhile
    let mut seen: HashMap<usize, (Storage, usize)> = HashMap::new();
    let mut next = 0usize;
    let mut out = Vec::new();
    for (path, t) in v.named_tensors() {
        let s = t.storage();
        let id = match seen.get(&s.id()) {
            Some((x, id)) if !s.is_empty() => {
                assert!(x.ptr_eq(s), "Storage::id and Storage::ptr_eq disagree");
                *id
            }
            _ => {
                let id = next;
                next += 1;
                if !s.is_empty() {
                    seen.insert(s.id(), (s.clone(), id));
                }
                id
            }
        };
        out.push(json!([path, id]));
    }
    Json::Array(out)
}

/// `[[key path, is_parameter, requires_grad], ...]`.
pub fn flags(v: &Value) -> Json {
    Json::Array(
        v.named_tensors()
            .into_iter()
            .map(|(p, t): (String, &HostTensor)| json!([p, t.is_parameter(), t.requires_grad()]))
            .collect(),
    )
}

/// `[[key path, kind], ...]` for every container, parents first: `"dict"`, `"OrderedDict"`,
/// `"list"` or `"tuple"` (what the JSON does not tell apart). Containers under float or bytes keys
/// are left out, as in `canon.py`.
pub fn kinds(v: &Value) -> Json {
    fn join(p: &str, name: &dyn std::fmt::Display) -> String {
        if p.is_empty() {
            name.to_string()
        } else {
            format!("{p}.{name}")
        }
    }
    fn walk(v: &Value, p: &str, out: &mut Vec<Json>) {
        match v {
            Value::Dict(d) => {
                let kind = match d.kind() {
                    DictKind::Plain => "dict",
                    DictKind::Ordered => "OrderedDict",
                };
                out.push(json!([p, kind]));
                for (k, x) in d.iter() {
                    if !matches!(k, Key::Float(_) | Key::Bytes(_)) {
                        walk(x, &join(p, k), out);
                    }
                }
            }
            Value::List(items) | Value::Tuple(items) => {
                let kind = if matches!(v, Value::List(_)) {
                    "list"
                } else {
                    "tuple"
                };
                out.push(json!([p, kind]));
                for (i, x) in items.iter().enumerate() {
                    walk(x, &join(p, &i), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, "", &mut out);
    Json::Array(out)
}

/// A dict of just the named top-level entries of `v` (`None`: all of `v`).
pub fn pick(v: &Value, subtrees: Option<&[String]>) -> Value {
    let Some(keys) = subtrees else {
        return v.clone();
    };
    let mut d = ckptio::Dict::new();
    for k in keys {
        let x = v
            .get(k)
            .unwrap_or_else(|| panic!("the tree has no top-level entry {k:?}"));
        d.insert(k.as_str(), x.clone());
    }
    Value::from(d)
}

/// The first place two JSON documents differ, for messages (`None` when equal).
pub fn first_difference(a: &Json, b: &Json) -> Option<String> {
    fn walk(a: &Json, b: &Json, path: &mut String) -> Option<String> {
        match (a, b) {
            (Json::Object(x), Json::Object(y)) => {
                let kx: Vec<_> = x.keys().collect();
                let ky: Vec<_> = y.keys().collect();
                if kx != ky {
                    return Some(format!("at {path:?}: keys {kx:?} vs {ky:?}"));
                }
                for (k, v) in x {
                    let len = path.len();
                    path.push('/');
                    path.push_str(k);
                    if let Some(d) = walk(v, &y[k], path) {
                        return Some(d);
                    }
                    path.truncate(len);
                }
                None
            }
            (Json::Array(x), Json::Array(y)) => {
                if x.len() != y.len() {
                    return Some(format!(
                        "at {path:?}: {} items vs {}: {} vs {}",
                        x.len(),
                        y.len(),
                        short(a),
                        short(b)
                    ));
                }
                for (i, (v, w)) in x.iter().zip(y).enumerate() {
                    let len = path.len();
                    path.push_str(&format!("/{i}"));
                    if let Some(d) = walk(v, w, path) {
                        return Some(d);
                    }
                    path.truncate(len);
                }
                None
            }
            _ if a == b => None,
            _ => Some(format!("at {path:?}: {} vs {}", short(a), short(b))),
        }
    }
    walk(a, b, &mut String::new())
}

fn short(j: &Json) -> String {
    let s = j.to_string();
    if s.len() > 300 {
        format!("{}...", &s[..300])
    } else {
        s
    }
}
