//! Criterion micro-benchmarks of the `torch.save` format code, without any file system:
//! writing a 64 MiB state dict (pickle + zip, CRC-32 included) into `std::io::sink()`, and
//! reading the same archive back from memory with and without CRC checks.
//!
//! ```text
//! ./dev.sh cargo bench --bench format
//! ```
//!
//! The end-to-end comparison with PyTorch (files, fsync, mmap) is `examples/format_bench.rs`.

use std::time::Duration;

use bytes::Bytes;
use ckptio::torch::{load_from_bytes, save_to_writer};
use ckptio::{DType, Dict, HostTensor, LoadOptions, Value};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const MIB: usize = 1 << 20;

/// 64 MiB: 30 float32 tensors of 2 MiB (a few shapes), a 2 MiB bfloat16 one and small int64
/// buffers. Deterministic content.
fn state_dict() -> (Value, u64) {
    let mut sd = Dict::ordered();
    let mut total = 0u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut bytes = |n: usize| -> Vec<u8> {
        let mut v = vec![0u8; n];
        for c in v.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Two floats in [-0.5, 0.5): bounded exponents, no NaN/inf.
            let a = ((state & 0xff_ffff) as f32 / (1u32 << 24) as f32) - 0.5;
            let b = (((state >> 32) & 0xff_ffff) as f32 / (1u32 << 24) as f32) - 0.5;
            c[..4].copy_from_slice(&a.to_le_bytes());
            c[4..].copy_from_slice(&b.to_le_bytes());
        }
        v
    };
    let shapes: [&[usize]; 3] = [&[512, 1024], &[1024, 512], &[256, 2048]];
    for i in 0..31 {
        let shape = shapes[i % shapes.len()];
        let t = HostTensor::from_bytes(DType::Float32, shape, bytes(2 * MIB)).unwrap();
        sd.insert(format!("layers.{i}.weight"), t);
        total += 2 * MIB as u64;
    }
    let t = HostTensor::from_bytes(DType::BFloat16, &[1024, 1024], bytes(2 * MIB)).unwrap();
    sd.insert("head.weight", t);
    total += 2 * MIB as u64;
    let ids: Vec<i64> = (0..2048).collect();
    sd.insert(
        "position_ids",
        HostTensor::from_slice(&ids, &[1, 2048]).unwrap(),
    );
    sd.insert("num_batches_tracked", HostTensor::scalar(1000i64));
    total += 2048 * 8 + 8;
    (Value::from(sd), total)
}

fn format(c: &mut Criterion) {
    let (sd, total) = state_dict();
    let archive = Bytes::from(save_to_writer(&sd, "archive", Vec::new()).unwrap());

    let mut g = c.benchmark_group("format_64MiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(total));
    g.bench_function("save_to_writer(sink)", |b| {
        b.iter(|| save_to_writer(&sd, "archive", std::io::sink()).unwrap())
    });
    g.bench_function("load_from_bytes (CRC)", |b| {
        b.iter(|| load_from_bytes(archive.clone(), "bench.pt", &LoadOptions::default()).unwrap())
    });
    let no_crc = LoadOptions::default().verify_crc(false);
    g.bench_function("load_from_bytes (no CRC)", |b| {
        b.iter(|| load_from_bytes(archive.clone(), "bench.pt", &no_crc).unwrap())
    });
    g.finish();
}

criterion_group!(benches, format);
criterion_main!(benches);
