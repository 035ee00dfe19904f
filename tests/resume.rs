//! Exact resume: train N steps, or train k, save, drop everything, load, train to N: the
//! parameters and optimizer state are bit-identical, for every optimizer and every way of saving.
#![cfg(feature = "tch")]

use ckptio::optim::{Adam, Optimizer, Sgd};
use ckptio::runtime::Builder;
use ckptio::state::{load, save, Stateful};
use ckptio::{CheckpointIo, SnapshotMode, TorchCheckpointIo};
use tch::nn::{Module, VarStore};
use tch::{nn, Device, Kind, Tensor};

/// libtorch's RNG is global: the tests of this file take turns with it.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

const N: i64 = 12;
const K: i64 = 5;

struct Run {
    vs: VarStore,
    net: nn::Sequential,
    opt: Box<dyn OptState>,
    step: i64,
}

/// An optimizer that is also Stateful (what resume needs).
trait OptState: Optimizer + Stateful {}
impl<T: Optimizer + Stateful> OptState for T {}

fn new_run(which: &str, init_seed: i64) -> Run {
    tch::manual_seed(init_seed);
    let vs = VarStore::new(Device::Cpu);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "l1", 6, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "l2", 16, 3, Default::default()));
    let params: Vec<Tensor> = ckptio::tch::named_variables(&vs)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let opt: Box<dyn OptState> = match which {
        "sgd" => Box::new(
            Sgd::new(params, 0.05)
                .momentum(0.9, true)
                .weight_decay(1e-3),
        ),
        "adam" => Box::new(Adam::adam(params, 1e-2).amsgrad(true)),
        _ => Box::new(Adam::adamw(params, 1e-2, 0.05)),
    };
    Run {
        vs,
        net,
        opt,
        step: 0,
    }
}

fn train_to(r: &mut Run, n: i64) {
    while r.step < n {
        r.step += 1;
        tch::manual_seed(1000 + r.step);
        let x = Tensor::randn([8, 6], (Kind::Float, Device::Cpu));
        let y = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
        r.opt.zero_grad();
        let loss = r.net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        loss.backward();
        r.opt.step().unwrap();
    }
}

fn same(a: &Run, b: &Run, what: &str) {
    let (va, vb) = (a.vs.variables(), b.vs.variables());
    for (k, t) in &va {
        assert!(t.equal(&vb[k]), "{what}: parameter {k} differs");
    }
    let (sa, sb) = (
        Stateful::state_dict(&*a.opt).unwrap(),
        Stateful::state_dict(&*b.opt).unwrap(),
    );
    assert_eq!(
        ckptio::json::to_json(&sa),
        ckptio::json::to_json(&sb),
        "{what}: optimizer state differs"
    );
    assert_eq!(a.step, b.step);
}

#[test]
fn resume_is_bit_identical_for_every_optimizer_and_save_path() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    for which in ["sgd", "adam", "adamw"] {
        let mut straight = new_run(which, 1);
        train_to(&mut straight, N);
        let ios: Vec<(&str, Box<dyn CheckpointIo>)> = vec![
            ("sync", Box::new(TorchCheckpointIo::new())),
            (
                "eager",
                Box::new(
                    Builder::default()
                        .snapshot_mode(SnapshotMode::Eager)
                        .build(TorchCheckpointIo::new()),
                ),
            ),
            (
                "deferred",
                Box::new(
                    Builder::default()
                        .snapshot_mode(SnapshotMode::Deferred)
                        .build(TorchCheckpointIo::new()),
                ),
            ),
        ];
        for (how, io) in ios {
            let path = dir.path().join(format!("{which}-{how}.pt"));
            {
                let mut first = new_run(which, 1);
                train_to(&mut first, K);
                save(
                    &*io,
                    &path,
                    &[
                        ("model", &first.vs),
                        ("optimizer", &*first.opt),
                        ("step", &first.step),
                    ],
                )
                .unwrap();
                // An async save returns after the snapshot: training on must not leak into it.
                train_to(&mut first, K + 3);
            }
            io.teardown().unwrap();
            // A fresh process: other initial weights, nothing shared.
            let mut resumed = new_run(which, 99);
            let rest = load(
                &*io,
                &path,
                &mut [
                    ("model", &mut resumed.vs),
                    ("optimizer", &mut *resumed.opt),
                    ("step", &mut resumed.step),
                ],
                true,
            )
            .unwrap();
            assert!(
                rest.is_none(),
                "{which}/{how}: unexpected leftovers {rest:?}"
            );
            assert_eq!(resumed.step, K);
            train_to(&mut resumed, N);
            same(&straight, &resumed, &format!("{which}/{how}"));
        }
    }
}

#[test]
fn strict_load_reports_missing_names_and_restores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let io = TorchCheckpointIo::new();
    let path = dir.path().join("s.pt");
    let step = 7i64;
    save(&io, &path, &[("step", &step)]).unwrap();
    let mut step2 = 0i64;
    let mut epoch = 0i64;
    let err = load(
        &io,
        &path,
        &mut [("step", &mut step2), ("epoch", &mut epoch)],
        true,
    )
    .unwrap_err();
    assert!(
        matches!(err, ckptio::Error::KeyMismatch { ref missing, .. } if missing == &vec!["epoch".to_string()]),
        "{err}"
    );
    assert_eq!(step2, 0);
    let rest = load(&io, &path, &mut [("epoch", &mut epoch)], false).unwrap();
    assert_eq!(
        rest.unwrap().get("step").and_then(ckptio::Value::as_int),
        Some(7)
    );
}

#[test]
fn serde_metadata_and_the_rng_seed_round_trip() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    use ckptio::state::RngSeed;
    let dir = tempfile::tempdir().unwrap();
    let io = TorchCheckpointIo::new();
    let path = dir.path().join("meta.pt");
    let meta =
        serde_json::json!({"run": "a", "lr": 0.001, "layers": [64, 32], "tags": {"x": true}});
    let mut seed = RngSeed(0);
    seed.reseed(1234);
    let after_seed = Tensor::randn([4], (Kind::Float, Device::Cpu));
    save(&io, &path, &[("meta", &meta), ("rng", &seed)]).unwrap();
    let mut meta2 = serde_json::Value::Null;
    let mut seed2 = RngSeed(0);
    tch::manual_seed(999);
    load(
        &io,
        &path,
        &mut [("meta", &mut meta2), ("rng", &mut seed2)],
        true,
    )
    .unwrap();
    assert_eq!(meta2, meta);
    assert_eq!(seed2, RngSeed(1234));
    assert!(
        Tensor::randn([4], (Kind::Float, Device::Cpu)).equal(&after_seed),
        "re-seeded on load"
    );
}
