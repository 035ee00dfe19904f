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

/// DCP turns every dict key into a string (as PyTorch's flattening does): an optimizer's
/// state keyed by parameter index `0` comes back keyed `"0"`, and must still be restored.
#[test]
fn optimizer_state_survives_a_sharded_checkpoint() {
    use ckptio::optim::{Adam, Optimizer};
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let p = Tensor::from_slice(&[1f32, -2., 3.]).set_requires_grad(true);
    let mut adam = Adam::adamw(vec![p.shallow_clone()], 0.1, 0.01);
    for _ in 0..3 {
        adam.zero_grad();
        (&p * &p).sum(Kind::Float).backward();
        adam.step().unwrap();
    }
    let io = DcpCheckpointIo::new(Rank::single());
    ckptio::state::save(&io, &ck, &[("optim", &adam)]).unwrap();
    let q = Tensor::from_slice(&[1f32, -2., 3.]).set_requires_grad(true);
    let mut fresh = Adam::adamw(vec![q], 0.1, 0.01);
    ckptio::state::load(&io, &ck, &mut [("optim", &mut fresh)], true).unwrap();
    let saved = Optimizer::state_dict(&adam).unwrap();
    let restored = Optimizer::state_dict(&fresh).unwrap();
    let state = |v: &Value| v.get("state").and_then(Value::as_dict).unwrap().len();
    assert_eq!(state(&restored), 1, "the optimizer state was dropped");
    let avg = |v: &Value| {
        let s = v.get("state").and_then(Value::as_dict).unwrap();
        let (_, s) = s.iter().next().unwrap();
        s.get("exp_avg").and_then(Value::as_tensor).unwrap().clone()
    };
    assert_eq!(avg(&saved), avg(&restored));
    // A state key that names no parameter is refused, not ignored.
    let mut bad = saved.as_dict().unwrap().clone();
    let mut st = Dict::new();
    st.insert("7", Dict::new());
    bad.insert("state", st);
    assert!(Optimizer::load_state_dict(&mut fresh, &Value::Dict(bad)).is_err());
}
