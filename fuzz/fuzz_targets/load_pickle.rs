//! Any bytes as `data.pkl` inside a valid archive that also holds two storages, so the pickle
//! reader (and tensor rebuilding) is reached on every input.
#![no_main]
use ckptio::{Dict, HostTensor, LoadOptions, Object, ObjectKind, Value};
use libfuzzer_sys::fuzz_target;

/// A torch.save archive written by ckptio that carries `pkl` as a bytes value.
fn archive_with_pickle(pkl: &[u8]) -> Vec<u8> {
    // Two real storages (data/0, data/1) for the fuzzed pickle to point at, plus the input as
    // an inert object's bytes argument (which must round-trip).
    let mut d = Dict::new();
    d.insert(
        "a",
        HostTensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]).unwrap(),
    );
    d.insert("b", HostTensor::from_slice(&[7i64; 3], &[3]).unwrap());
    d.insert(
        "raw",
        Value::Object(Box::new(Object {
            module: "fuzz".into(),
            name: "Raw".into(),
            kind: ObjectKind::Reduce,
            args: vec![Value::Bytes(bytes::Bytes::copy_from_slice(pkl))],
            state: None,
            list_items: vec![],
            dict_items: vec![],
        })),
    );
    ckptio::torch::save_to_writer(&Value::Dict(d), "archive", Vec::new()).unwrap()
}

fuzz_target!(|data: &[u8]| {
    // 1. The input as a pickle stream in place of data.pkl (the archive's CRC is not checked).
    let base = archive_with_pickle(b"");
    if let Some(z) = ckptio_fuzz_replace_pickle(&base, data) {
        for wo in [true, false] {
            let opts = LoadOptions::default().weights_only(wo).verify_crc(false);
            let _ = ckptio::torch::load_from_bytes(bytes::Bytes::from(z.clone()), "fuzz.pt", &opts);
        }
    }
    // 2. The input carried as bytes inside a valid pickle: must round-trip.
    let z = archive_with_pickle(data);
    let v = ckptio::torch::load_from_bytes(
        bytes::Bytes::from(z),
        "ok.pt",
        &LoadOptions::default().weights_only(false),
    )
    .expect("a file ckptio wrote must load");
    assert!(v.get("raw").is_some());
});

/// Splices `pkl` in as the `data.pkl` record of `archive` by rewriting the zip directory.
fn ckptio_fuzz_replace_pickle(archive: &[u8], pkl: &[u8]) -> Option<Vec<u8>> {
    // Entries are stored; rebuild with a tiny writer: local headers + central directory.
    let entries = list_entries(archive)?;
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let data: &[u8] = if name.ends_with("/data.pkl") {
            pkl
        } else {
            &archive[data.0..data.1]
        };
        let off = out.len() as u32;
        let crc = crc32(data);
        out.extend_from_slice(&0x04034b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&0x02014b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 12]);
        central.extend_from_slice(&off.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_off = out.len() as u32;
    let n = central.len();
    let count = count_entries(&central) as u16;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x06054b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    Some(out)
}

fn count_entries(central: &[u8]) -> usize {
    central
        .windows(4)
        .filter(|w| *w == 0x02014b50u32.to_le_bytes())
        .count()
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// (name, (data start, data end)) of each entry of an archive ckptio wrote.
fn list_entries(z: &[u8]) -> Option<Vec<(String, (usize, usize))>> {
    let rd = |at: usize, n: usize| -> Option<u64> {
        let b = z.get(at..at + n)?;
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    };
    let eocd = z.len().checked_sub(22)?;
    let count = rd(eocd + 10, 2)? as usize;
    let mut p = rd(eocd + 16, 4)? as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        let size = rd(p + 24, 4)? as usize;
        let nlen = rd(p + 28, 2)? as usize;
        let elen = rd(p + 30, 2)? as usize;
        let clen = rd(p + 32, 2)? as usize;
        let local = rd(p + 42, 4)? as usize;
        let name = String::from_utf8(z.get(p + 46..p + 46 + nlen)?.to_vec()).ok()?;
        let start = local + 30 + rd(local + 26, 2)? as usize + rd(local + 28, 2)? as usize;
        out.push((name, (start, start + size)));
        p += 46 + nlen + elen + clen;
    }
    Some(out)
}
