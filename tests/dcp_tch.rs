//! Boxes of a sharded checkpoint read straight into live tch tensors.

use ckptio::dcp::{Chunk, DcpReader, Rank};
use ckptio::{
    CheckpointIo, DType, DcpCheckpointIo, Dict, HostTensor, SaveOptions, ShardedTensor, Value,
};
use tch::{Device, Kind, Tensor};

#[test]
fn boxes_read_into_tch_tensors_in_place_or_through_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    // A [6, 4] tensor saved as two chunks of three rows.
    let rows = |from: usize| {
        let v: Vec<f32> = (from * 4..from * 4 + 12).map(|i| i as f32).collect();
        HostTensor::from_slice(&v, &[3, 4]).unwrap()
    };
    let w = ShardedTensor::new(vec![6, 4], DType::Float32)
        .with_shard(vec![0, 0], rows(0))
        .unwrap()
        .with_shard(vec![3, 0], rows(3))
        .unwrap();
    let mut state = Dict::new();
    state.insert("w", w);
    DcpCheckpointIo::new(Rank::single())
        .save_checkpoint(&Value::Dict(state), &ck, &SaveOptions::default())
        .unwrap();
    let reader = DcpReader::open(&ck).unwrap();
    let want = Chunk::new(vec![2, 1], vec![3, 2]); // rows 2..5, columns 1..3
    let expected = Tensor::from_slice(&[9f32, 10., 13., 14., 17., 18.]).reshape([3, 2]);
    // A contiguous CPU tensor of the box's shape: filled in place.
    let mut dst = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let ptr = dst.data_ptr();
    ckptio::tch::read_chunk_into(&reader, "w", &want, &mut dst).unwrap();
    assert_eq!(dst.data_ptr(), ptr);
    assert!(dst.detach().equal(&expected));
    // A strided view: through a host copy, into the view.
    let base = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    let mut view = base.tr();
    ckptio::tch::read_chunk_into(&reader, "w", &want, &mut view).unwrap();
    assert!(base.tr().equal(&expected));
    // A box of another shape than the tensor is refused.
    let mut small = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
    assert!(ckptio::tch::read_chunk_into(&reader, "w", &want, &mut small).is_err());
}
