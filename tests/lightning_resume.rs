//! A Lightning `Trainer` checkpoint's `state_dict` and `optimizer_states[0]` load into a tch
//! model and ckptio's Adam, and training continues exactly as PyTorch continues it.
#![cfg(feature = "tch")]

mod common;

use ckptio::optim::{Adam, Optimizer};
use ckptio::tch::StateDictRestore;
use ckptio::{CheckpointIo, LoadOptions, TorchCheckpointIo};
use tch::nn::{Module, VarStore};
use tch::{nn, Device, Tensor};

#[test]
fn a_lightning_checkpoint_resumes_training_in_rust() {
    let seed = common::seed("lightning_resume");
    let dir = tempfile::tempdir().unwrap();
    common::run_python(
        "lightning_resume.py",
        &[dir.path().as_os_str(), seed.to_string().as_ref()],
    );

    let mut vs = VarStore::new(Device::Cpu);
    let layer = nn::linear(vs.root() / "layer", 4, 3, Default::default());
    let io = TorchCheckpointIo::new();
    let ckpt = dir.path().join("model.ckpt");
    let mut target = StateDictRestore::new(&mut vs)
        .key("state_dict")
        .strict(true);
    let rest = io
        .load_checkpoint(&ckpt, &LoadOptions::default(), Some(&mut target))
        .unwrap()
        .unwrap();
    // The rest of the Lightning file: optimizer states, loops, callbacks, versions.
    assert!(rest.get("pytorch-lightning_version").is_some());
    let opt_state = rest
        .get("optimizer_states")
        .and_then(|v| v.as_seq())
        .unwrap()[0]
        .clone();

    // PyTorch's parameter order (model.parameters()): weight, then bias.
    let vars = vs.variables();
    let params = [
        vars["layer.weight"].shallow_clone(),
        vars["layer.bias"].shallow_clone(),
    ];
    let mut opt = Adam::adam(params.iter().map(|p| p.shallow_clone()).collect(), 1e-2);
    opt.load_state_dict(&opt_state).unwrap();

    let expected =
        ckptio::torch::load(dir.path().join("expected.pt"), &LoadOptions::default()).unwrap();
    let t = |v: &ckptio::Value| ckptio::tch::to_tch(v.as_tensor().unwrap(), Device::Cpu).unwrap();
    for batch in expected.get("batches").unwrap().as_seq().unwrap() {
        let b = batch.as_seq().unwrap();
        let (x, y) = (t(&b[0]), t(&b[1]));
        opt.zero_grad();
        layer
            .forward(&x)
            .mse_loss(&y, tch::Reduction::Mean)
            .backward();
        opt.step().unwrap();
    }
    let finals: Vec<Tensor> = expected
        .get("final")
        .unwrap()
        .as_seq()
        .unwrap()
        .iter()
        .map(t)
        .collect();
    for (p, f) in params.iter().zip(&finals) {
        let d = (p - f).abs().max().double_value(&[]);
        assert!(
            d < 1e-5,
            "parameters differ from PyTorch's continuation by {d}"
        );
    }
}
