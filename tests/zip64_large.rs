//! A checkpoint past 4 GiB uses zip64 records, and PyTorch reads it.
//!
//! Writes a 4.1 GiB file: reported as a skip of kind `disk` ([`common::skip`]) when the temp
//! directory has under 10 GiB free.

use std::path::Path;
use std::process::Command;

use ckptio::{DType, Dict, HostTensor, LoadOptions, Value};

mod common;

fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn a_file_past_4_gib_is_zip64_and_loads_in_pytorch() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    if free_bytes(dir.path()) < 10 << 30 {
        common::skip(
            "a_file_past_4_gib_is_zip64_and_loads_in_pytorch",
            common::SkipKind::Disk,
            &format!("less than 10 GiB free in {}", dir.path().display()),
        );
        return;
    }
    let n: usize = (4 << 30) + (100 << 20);
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let big = HostTensor::from_bytes(DType::UInt8, &[n], data).unwrap();
    let small = HostTensor::from_slice(&[1.5f32, 2.5], &[2]).unwrap();
    let mut d = Dict::new();
    d.insert("big", big);
    d.insert("after", small); // its data and header lie past 4 GiB
    let path = dir.path().join("big.pt");
    ckptio::torch::save(&Value::Dict(d), &path).unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() > 4 << 30);

    let back = ckptio::torch::load(&path, &LoadOptions::default().mmap(true)).unwrap();
    let b = back.get("big").unwrap().as_tensor().unwrap();
    assert_eq!(b.shape(), &[n]);
    let bytes = b.contiguous_bytes();
    for i in (0..n).step_by(1 << 20).chain([n - 1]) {
        assert_eq!(bytes[i], (i % 251) as u8, "byte {i}");
    }
    assert_eq!(
        back.get("after")
            .unwrap()
            .as_tensor()
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        vec![1.5, 2.5]
    );

    let script = r#"
import sys, zipfile, torch
p = sys.argv[1]
z = zipfile.ZipFile(p)
sizes = {i.filename.split('/', 1)[1]: (i.file_size, i.header_offset) for i in z.infolist()}
assert sizes['data/0'][0] > 2**32, sizes
assert sizes['data/1'][1] > 2**32, sizes
d = torch.load(p, mmap=True, weights_only=True)
b = d['big']
n = b.numel()
idx = torch.arange(0, n, 1 << 20, dtype=torch.int64)
assert torch.equal(b[idx], (idx % 251).to(torch.uint8))
assert int(b[-1]) == (n - 1) % 251
assert d['after'].tolist() == [1.5, 2.5]
print("ok", n)
"#;
    let out = common::run_python_code(script, &[path.as_os_str()]);
    assert!(out.starts_with("ok "), "python said: {out}");
}
