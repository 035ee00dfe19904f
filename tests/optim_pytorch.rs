//! ckptio's optimizers compute what `torch.optim` computes, step for step, and their state dicts
//! cross between Python and Rust both ways (`tests/python/optim_ref.py` is the reference).
#![cfg(feature = "tch")]

mod common;

use ckptio::optim::{Adam, Optimizer, Sgd};
use ckptio::{Dict, LoadOptions, Value};
use tch::{Device, Tensor};

const MID: usize = 50;

fn tensors(v: &Value) -> Vec<Tensor> {
    v.as_seq()
        .unwrap()
        .iter()
        .map(|t| ckptio::tch::to_tch(t.as_tensor().unwrap(), Device::Cpu).unwrap())
        .collect()
}

fn make(name: &str, params: Vec<Tensor>) -> Box<dyn Optimizer> {
    match name {
        "sgd" => Box::new(Sgd::new(params, 0.05)),
        "sgd_momentum" => Box::new(Sgd::new(params, 0.05).momentum(0.9, false)),
        "sgd_nesterov" => Box::new(
            Sgd::new(params, 0.05)
                .momentum(0.9, true)
                .weight_decay(1e-3),
        ),
        "sgd_dampening" => Box::new(
            Sgd::new(params, 0.05)
                .momentum(0.9, false)
                .dampening(0.1)
                .weight_decay(1e-2),
        ),
        "adam" => Box::new(Adam::adam(params, 1e-2)),
        "adam_wd" => Box::new(
            Adam::adam(params, 1e-2)
                .weight_decay(1e-2)
                .betas(0.8, 0.99)
                .eps(1e-6),
        ),
        "adam_amsgrad" => Box::new(Adam::adam(params, 1e-2).amsgrad(true)),
        "adamw" => Box::new(Adam::adamw(params, 1e-2, 0.05)),
        "adamw_amsgrad" => Box::new(Adam::adamw(params, 1e-2, 0.05).amsgrad(true)),
        other => panic!("unknown config {other}"),
    }
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

/// Every tensor in the two state dicts, by key path, within `tol`; other values equal.
fn assert_state_close(name: &str, got: &Value, want: &Value, tol: f64) {
    let g: std::collections::HashMap<_, _> = got
        .get("state")
        .unwrap()
        .named_tensors()
        .into_iter()
        .collect();
    let w: std::collections::HashMap<_, _> = want
        .get("state")
        .unwrap()
        .named_tensors()
        .into_iter()
        .collect();
    let mut gk: Vec<_> = g.keys().collect();
    let mut wk: Vec<_> = w.keys().collect();
    gk.sort();
    wk.sort();
    assert_eq!(gk, wk, "{name}: state keys");
    for (k, wt) in &w {
        let a = ckptio::tch::to_tch(g[k], Device::Cpu)
            .unwrap()
            .to_kind(tch::Kind::Double);
        let b = ckptio::tch::to_tch(wt, Device::Cpu)
            .unwrap()
            .to_kind(tch::Kind::Double);
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d <= tol, "{name}: state {k} differs by {d}");
    }
    let group = |v: &Value, k: &str| {
        v.get("param_groups").unwrap().as_seq().unwrap()[0]
            .get(k)
            .cloned()
    };
    for k in [
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "momentum",
        "dampening",
        "nesterov",
        "params",
    ] {
        let (a, b) = (group(got, k), group(want, k));
        let num = |v: &Option<Value>| v.as_ref().and_then(Value::as_float);
        if num(&a).is_some() && num(&b).is_some() {
            assert_eq!(num(&a), num(&b), "{name}: param group {k}");
        } else {
            assert_eq!(a, b, "{name}: param group {k}");
        }
    }
}

#[test]
fn optimizers_match_torch_optim_and_state_dicts_cross_both_ways() {
    let seed = common::seed("optim");
    let dir = tempfile::tempdir().unwrap();
    let ref_path = dir.path().join("ref.pt");
    common::run_python(
        "optim_ref.py",
        &[ref_path.as_os_str(), seed.to_string().as_ref()],
    );
    let reference = ckptio::torch::load(&ref_path, &LoadOptions::default()).unwrap();
    let mut rust_mid = Dict::new();
    let tol = 1e-5;
    for (name, entry) in reference.as_dict().unwrap().iter() {
        let name = name.as_str().unwrap();
        let grads: Vec<Vec<Tensor>> = entry
            .get("grads")
            .unwrap()
            .as_seq()
            .unwrap()
            .iter()
            .map(tensors)
            .collect();
        let final_params = tensors(entry.get("final").unwrap());

        // 1. Same start, same gradients, 100 steps: same parameters and state as torch.optim.
        let params: Vec<Tensor> = tensors(entry.get("init").unwrap());
        let mut opt = make(name, params.iter().map(|p| p.shallow_clone()).collect());
        for (s, g) in grads.iter().enumerate() {
            opt.step_with(
                &g.iter()
                    .map(|t| Some(t.shallow_clone()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            if s + 1 == MID {
                let mut m = Dict::new();
                m.insert(
                    "params",
                    Value::List(
                        params
                            .iter()
                            .map(|p| Value::Tensor(ckptio::tch::to_host(p).unwrap()))
                            .collect(),
                    ),
                );
                m.insert("state", opt.state_dict().unwrap());
                rust_mid.insert(name, m);
            }
        }
        let d = max_diff(&params, &final_params);
        assert!(
            d <= tol,
            "{name}: parameters differ from torch.optim by {d} after 100 steps"
        );
        assert_state_close(
            name,
            &opt.state_dict().unwrap(),
            entry.get("final_state").unwrap(),
            tol,
        );

        // 2. Python -> Rust: torch's state after 50 steps loads here and training continues.
        let params2 = tensors(entry.get("mid_params").unwrap());
        let mut opt2 = make(name, params2.iter().map(|p| p.shallow_clone()).collect());
        opt2.load_state_dict(entry.get("mid_state").unwrap())
            .unwrap();
        for g in &grads[MID..] {
            opt2.step_with(
                &g.iter()
                    .map(|t| Some(t.shallow_clone()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        }
        let d = max_diff(&params2, &final_params);
        assert!(
            d <= tol,
            "{name}: resumed from torch's state, differs by {d}"
        );
    }

    // 3. Rust -> Python: ckptio's state after 50 steps loads into torch.optim, which continues.
    let rust_path = dir.path().join("rust_mid.pt");
    ckptio::torch::save(&Value::Dict(rust_mid), &rust_path).unwrap();
    let out = dir.path().join("diffs.json");
    common::run_python(
        "optim_ref.py",
        &[
            "--continue".as_ref(),
            ref_path.as_os_str(),
            rust_path.as_os_str(),
            out.as_os_str(),
        ],
    );
    let diffs = common::read_json(&out);
    for (name, d) in diffs.as_object().unwrap() {
        let d = d.as_f64().unwrap();
        assert!(
            d <= tol,
            "{name}: torch.optim resumed from ckptio's state differs by {d}"
        );
    }
    assert_eq!(diffs.as_object().unwrap().len(), 9);
}
