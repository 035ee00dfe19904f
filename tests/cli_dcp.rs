//! The `ckptio` command line on sharded checkpoints in PyTorch's Distributed Checkpoint (DCP)
//! format, against real PyTorch: `inspect DIR` shows every key and chunk PyTorch's metadata
//! holds, `convert DIR OUT.pt` writes what `format_utils.dcp_to_torch_save` writes, and
//! `convert IN.pt DIR/` writes a checkpoint `torch.distributed.checkpoint.load` reads at one
//! and at two ranks.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use ckptio::dcp::{committed_save_id, DcpReader};
use ckptio::{HostTensor, LoadOptions, Value};
use common::{canon, first_difference, run_python, run_python_code, script};
use serde_json::Value as Json;

/// Runs `ckptio args...`.
fn ckptio(args: &[&OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ckptio"))
        .args(args)
        .output()
        .expect("run the ckptio binary")
}

/// Runs `ckptio args...`, which must succeed; returns its stdout.
fn ckptio_ok(args: &[&OsStr]) -> String {
    let out = ckptio(args);
    assert!(
        out.status.success(),
        "ckptio {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("ckptio prints UTF-8")
}

/// The JSON document printed on the last line of a helper script's stdout.
fn last_json_line(stdout: &str) -> Json {
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// PyTorch's reading of `dir/.metadata` (`dcp_load.py --metadata-only`).
fn pytorch_metadata(dir: &Path) -> Json {
    last_json_line(&run_python(
        "dcp_load.py",
        &[dir.as_os_str(), "--metadata-only".as_ref()],
    ))
}

/// What `ckptio inspect --json` should list for the metadata PyTorch read: every key in order,
/// each tensor's dtype, global shape and chunks with the item each lies in, and each value's
/// item.
fn expected_entries(md: &Json) -> Vec<Json> {
    let items: Vec<&Json> = md["storage_data"].as_array().unwrap().iter().collect();
    let item_of = |fqn: &str, offsets: &Json| -> Json {
        let s = items
            .iter()
            .find(|s| s["index"]["fqn"] == fqn && s["index"]["offset"] == *offsets)
            .unwrap_or_else(|| panic!("PyTorch's metadata has no item for {fqn} {offsets}"));
        let info = &s["info"];
        serde_json::json!({
            "file": info["relative_path"],
            "offset": info["offset"],
            "length": info["length"],
        })
    };
    md["state_dict_metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(fqn, e)| match e["type"].as_str() {
            Some("TensorStorageMetadata") => {
                let chunks: Vec<Json> = e["chunks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "offsets": c["offsets"],
                            "sizes": c["sizes"],
                            "item": item_of(fqn, &c["offsets"]),
                        })
                    })
                    .collect();
                let dtype = e["properties"]["dtype"].as_str().unwrap();
                serde_json::json!({
                    "key": fqn,
                    "kind": "tensor",
                    "dtype": dtype.trim_start_matches("torch."),
                    "shape": e["size"],
                    "chunks": chunks,
                })
            }
            _ => serde_json::json!({
                "key": fqn,
                "kind": "value",
                "item": item_of(fqn, &Json::Null),
            }),
        })
        .collect()
}

/// `entries` of `ckptio inspect --json` with only the fields PyTorch's metadata also holds.
fn comparable_entries(inspected: &Json) -> Vec<Json> {
    inspected["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let o = e.as_object_mut().unwrap();
            o.remove("bytes");
            o.remove("requires_grad");
            e
        })
        .collect()
}

/// Every key of PyTorch's metadata starts a row of the table, in order, with its dtype and
/// shape, or its item (file, offset, length) for a value; under a tensor's row, a row per chunk
/// with its offsets, sizes and item.
fn check_table_lists(table: &str, entries: &[Json]) {
    let lines: Vec<&str> = table.lines().collect();
    let words = |l: &str| -> Vec<String> { l.split_whitespace().map(str::to_owned).collect() };
    let place = |item: &Json| -> Vec<String> {
        vec![
            item["file"].as_str().unwrap().to_owned(),
            item["offset"].to_string(),
            item["length"].to_string(),
        ]
    };
    let mut at = 0;
    for e in entries {
        let key = e["key"].as_str().unwrap();
        at += lines[at..]
            .iter()
            .position(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no row for {key} after line {at}:\n{table}"));
        let row = lines[at];
        if e["kind"] == "value" {
            let mut want = vec![key.to_owned(), "value".to_owned()];
            want.extend(place(&e["item"]));
            assert_eq!(words(row), want, "row of {key}");
            continue;
        }
        let dtype = e["dtype"].as_str().unwrap();
        let shape = format!("{:?}", dims(&e["shape"]));
        assert!(
            words(row)[1] == dtype && row.contains(&format!(" {shape} ")),
            "row of {key}: {row:?}, expected {dtype} {shape}"
        );
        let chunk_rows: Vec<&str> = lines[at + 1..]
            .iter()
            .take_while(|l| l.starts_with("  "))
            .copied()
            .collect();
        let chunks = e["chunks"].as_array().unwrap();
        assert_eq!(chunk_rows.len(), chunks.len(), "chunks of {key}:\n{table}");
        for c in chunks {
            let start = format!("chunk {:?} ", dims(&c["offsets"]));
            let sizes = format!(" {:?} ", dims(&c["sizes"]));
            let found = chunk_rows.iter().any(|l| {
                let w = words(l);
                l.trim_start().starts_with(&start)
                    && l.contains(&sizes)
                    && w[w.len() - 3..] == place(&c["item"])[..]
            });
            assert!(
                found,
                "no row {start}{sizes}{:?} under {key}:\n{table}",
                place(&c["item"])
            );
        }
    }
}

fn dims(v: &Json) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// `OUT_DIR` written by `dcp_save.py OUT_DIR --world N` (gloo ranks, DTensors).
fn pytorch_checkpoint(dir: &Path, name: &str, world: usize) -> std::path::PathBuf {
    let ck = dir.join(name);
    let out = run_python(
        "dcp_save.py",
        &[
            ck.as_os_str(),
            "--world".as_ref(),
            world.to_string().as_ref(),
        ],
    );
    assert_eq!(last_json_line(&out)["ok"], Json::Bool(true), "{out}");
    ck
}

#[test]
fn inspect_lists_every_key_and_chunk_and_convert_matches_dcp_to_torch_save() {
    let dir = tempfile::tempdir().unwrap();
    let ck = pytorch_checkpoint(dir.path(), "torch2", 2);
    let md = pytorch_metadata(&ck);
    let expected = expected_entries(&md);
    assert!(
        expected
            .iter()
            .any(|e| e["chunks"].as_array().is_some_and(|c| c.len() == 2)),
        "no tensor of the world-2 checkpoint is sharded: {md}"
    );

    // inspect --json: every key in order, with its chunks and where each lies.
    let inspected: Json = serde_json::from_str(&ckptio_ok(&[
        "inspect".as_ref(),
        "--json".as_ref(),
        ck.as_os_str(),
    ]))
    .unwrap();
    assert_eq!(
        first_difference(
            &Json::Array(expected.clone()),
            &Json::Array(comparable_entries(&inspected))
        ),
        None
    );
    assert_eq!(inspected["world_size"], 2);
    assert_eq!(
        inspected["save_id"].as_str(),
        committed_save_id(&ck).unwrap().as_deref()
    );
    assert_eq!(inspected["save_id"], md["storage_meta"]["save_id"]);
    let names: Vec<&str> = inspected["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["__0_0.distcp", "__1_0.distcp"]);
    for f in inspected["files"].as_array().unwrap() {
        let len = std::fs::metadata(ck.join(f["name"].as_str().unwrap()))
            .unwrap()
            .len();
        assert_eq!(f["bytes"], len, "{f}");
    }

    // The table shows the same.
    let table = ckptio_ok(&["inspect".as_ref(), ck.as_os_str()]);
    check_table_lists(&table, &expected);
    assert!(table.contains("world size 2"), "{table}");
    assert!(
        table.contains(md["storage_meta"]["save_id"].as_str().unwrap()),
        "{table}"
    );

    // convert DIR OUT.pt: what dcp_to_torch_save writes, and torch.load(weights_only=True)
    // takes it.
    let pt = dir.path().join("converted.pt");
    ckptio_ok(&["convert".as_ref(), ck.as_os_str(), pt.as_os_str()]);
    let diffs = run_python_code(
        "import json, os, sys, tempfile, torch; sys.path.insert(0, sys.argv[1]); \
         from dcp_state import compare; \
         from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; \
         tmp = tempfile.mkdtemp(); ref = os.path.join(tmp, 'ref.pt'); \
         dcp_to_torch_save(sys.argv[2], ref); \
         print(json.dumps(compare(torch.load(ref, weights_only=False), \
                                  torch.load(sys.argv[3], weights_only=True))))",
        &[script("").as_os_str(), ck.as_os_str(), pt.as_os_str()],
    );
    assert_eq!(last_json_line(&diffs), Json::Array(vec![]), "{diffs}");
}

#[test]
fn torch_save_converts_to_a_checkpoint_pytorch_loads_at_one_and_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let pt = dir.path().join("state.pt");
    run_python_code(
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import dcp_state; \
         torch.save(dcp_state.full_state(7), sys.argv[2])",
        &[script("").as_os_str(), pt.as_os_str()],
    );
    // A new directory, named with a trailing `/`.
    let ck = dir.path().join("dcp");
    let mut ck_arg = ck.clone().into_os_string();
    ck_arg.push("/");
    ckptio_ok(&["convert".as_ref(), pt.as_os_str(), &ck_arg]);
    assert!(committed_save_id(&ck).unwrap().is_some());
    for world in ["1", "2"] {
        let out = run_python(
            "dcp_load.py",
            &[
                ck.as_os_str(),
                pt.as_os_str(),
                "--world".as_ref(),
                world.as_ref(),
            ],
        );
        assert_eq!(last_json_line(&out)["ok"], Json::Bool(true), "{out}");
    }

    // An existing directory, and `--to dcp`, say the same; the tree comes back as it was.
    let full = ckptio::torch::load(&pt, &LoadOptions::default()).unwrap();
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    let named = dir.path().join("named");
    ckptio_ok(&["convert".as_ref(), pt.as_os_str(), existing.as_os_str()]);
    ckptio_ok(&[
        "convert".as_ref(),
        "--to".as_ref(),
        "dcp".as_ref(),
        pt.as_os_str(),
        named.as_os_str(),
    ]);
    for d in [&existing, &named] {
        let back = DcpReader::open(d).unwrap().read_all().unwrap();
        assert_eq!(
            first_difference(&canon(&full), &canon(&back)),
            None,
            "{d:?}"
        );
    }

    // inspect of a checkpoint ckptio wrote: one rank, its save id.
    let inspected: Json = serde_json::from_str(&ckptio_ok(&[
        "inspect".as_ref(),
        "--json".as_ref(),
        named.as_os_str(),
    ]))
    .unwrap();
    assert_eq!(inspected["world_size"], 1);
    assert_eq!(
        inspected["save_id"].as_str(),
        committed_save_id(&named).unwrap().as_deref()
    );
}

#[test]
fn inspect_and_convert_of_an_incomplete_directory_fail() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("incomplete");
    std::fs::create_dir(&ck).unwrap();
    // A rank's data file, but no `.metadata`: the save was never committed.
    std::fs::write(ck.join("__0_0.distcp"), b"partial").unwrap();
    let pt = dir.path().join("out.pt");
    for args in [
        vec!["inspect".as_ref(), ck.as_os_str()],
        vec!["inspect".as_ref(), "--json".as_ref(), ck.as_os_str()],
        vec!["convert".as_ref(), ck.as_os_str(), pt.as_os_str()],
    ] {
        let out = ckptio(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "ckptio {args:?} succeeded");
        assert!(
            stderr.contains("incomplete sharded checkpoint: no .metadata"),
            "ckptio {args:?}: {stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "ckptio {args:?} printed {:?}",
            out.stdout
        );
    }
    assert!(!pt.exists());
}

#[test]
fn a_torch_save_of_no_dict_is_refused_as_a_dcp_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let pt = dir.path().join("tensor.pt");
    let t = HostTensor::from_slice(&[1f32, 2.0, 3.0], &[3]).unwrap();
    ckptio::torch::save(&Value::Tensor(t), &pt).unwrap();
    let ck = dir.path().join("dcp");
    let out = ckptio(&[
        "convert".as_ref(),
        "--to".as_ref(),
        "dcp".as_ref(),
        pt.as_os_str(),
        ck.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("a DCP checkpoint is a state dict"),
        "{stderr}"
    );
    assert!(!ck.join(".metadata").exists());
}
