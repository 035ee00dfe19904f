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

/// Two ranks (threads) step AdamW over their rows of one parameter and save the optimizer
/// sharded; one process loads it over all the rows: each moment is the two ranks' rows.
#[test]
fn a_sharded_optimizer_saved_by_two_ranks_loads_into_one() {
    use ckptio::optim::{Adam, Optimizer, ParamPart, ShardedOptimizer};
    use ckptio::state::Stateful;
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let full: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
    let moments: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2usize)
            .map(|r| {
                let (full, ck) = (&full, &ck);
                s.spawn(move || {
                    let p = Tensor::from_slice(&full[r * 6..r * 6 + 6])
                        .reshape([2, 3])
                        .set_requires_grad(true);
                    let adam = Adam::adamw(vec![p.shallow_clone()], 0.1, 0.01);
                    let part = ParamPart {
                        shape: vec![4, 3],
                        offsets: vec![r * 2, 0],
                    };
                    let mut opt = ShardedOptimizer::new(adam, vec![part]).unwrap();
                    for _ in 0..2 {
                        opt.inner_mut().zero_grad();
                        (&p * &p).sum(Kind::Float).backward();
                        opt.inner_mut().step().unwrap();
                    }
                    let io = DcpCheckpointIo::new(Rank::new(r, 2).unwrap()).run_id("opt");
                    ckptio::state::save(&io, ck, &[("optim", &opt)]).unwrap();
                    io.wait_committed(ck).unwrap();
                    let sd = Optimizer::state_dict(opt.inner()).unwrap();
                    let s = &sd.get("state").and_then(Value::as_dict).unwrap();
                    let s = s.iter().next().unwrap().1;
                    let v = |k: &str| {
                        s.get(k)
                            .and_then(Value::as_tensor)
                            .unwrap()
                            .to_vec::<f32>()
                            .unwrap()
                    };
                    (v("exp_avg"), v("exp_avg_sq"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // One process, all four rows, a fresh optimizer: its state names every part to load.
    let p = Tensor::from_slice(&full)
        .reshape([4, 3])
        .set_requires_grad(true);
    let adam = Adam::adamw(vec![p], 0.1, 0.01);
    let part = ParamPart {
        shape: vec![4, 3],
        offsets: vec![0, 0],
    };
    let mut opt = ShardedOptimizer::new(adam, vec![part]).unwrap();
    assert!(
        opt.state_dict()
            .unwrap()
            .get("state")
            .and_then(Value::as_dict)
            .unwrap()
            .len()
            == 1
    );
    ckptio::dcp::load_state(&ck, &mut [("optim", &mut opt)], true).unwrap();
    let sd = Optimizer::state_dict(opt.inner()).unwrap();
    let s = sd
        .get("state")
        .and_then(Value::as_dict)
        .unwrap()
        .iter()
        .next()
        .unwrap()
        .1
        .clone();
    let v = |k: &str| {
        s.get(k)
            .and_then(Value::as_tensor)
            .unwrap()
            .to_vec::<f32>()
            .unwrap()
    };
    let avg: Vec<f32> = moments.iter().flat_map(|m| m.0.clone()).collect();
    let avg_sq: Vec<f32> = moments.iter().flat_map(|m| m.1.clone()).collect();
    assert_eq!(v("exp_avg"), avg);
    assert_eq!(v("exp_avg_sq"), avg_sq);
    assert_eq!(v("step"), vec![2.0]);
    // A part that does not fit its global shape is refused.
    let q = Tensor::zeros([3, 3], (Kind::Float, Device::Cpu));
    let bad = ParamPart {
        shape: vec![4, 3],
        offsets: vec![2, 0],
    };
    assert!(ShardedOptimizer::new(Adam::adamw(vec![q], 0.1, 0.0), vec![bad]).is_err());
}
