//! A whole training loop: AdamW with visible state, a CheckpointManager saving through
//! AsyncCheckpointIo (Deferred snapshots overlap the next forward/backward), top-2 by loss plus
//! `last.ckpt`, and resume from the directory when the program starts again.
//!
//! ```text
//! ./dev.sh cargo run --release --example train_resume -- --steps 60   # trains, checkpoints
//! ./dev.sh cargo run --release --example train_resume -- --steps 120  # resumes at step 60
//! ```

use std::path::PathBuf;

use ckptio::manager::{CheckpointManager, ManagerConfig, Monitor};
use ckptio::optim::{Adam, Optimizer};
use ckptio::runtime::Builder;
use ckptio::state::{restore, Stateful};
use ckptio::{LoadOptions, SnapshotMode, TorchCheckpointIo};
use clap::Parser;
use tch::nn::{Module, VarStore};
use tch::{nn, Device, Kind, Tensor};

#[derive(Parser)]
struct Args {
    /// Train until this step.
    #[arg(long, default_value_t = 60)]
    steps: u64,
    /// Checkpoint directory.
    #[arg(long, default_value = "target/train-resume")]
    dir: PathBuf,
}

fn main() -> ckptio::Result<()> {
    let args = Args::parse();
    tch::manual_seed(0);
    let mut vs = VarStore::new(Device::Cpu);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "l1", 32, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs.root() / "l2", 64, 1, Default::default()));
    let params: Vec<Tensor> = ckptio::tch::named_variables(&vs)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let mut opt = Adam::adamw(params, 1e-3, 0.01);
    let mut step = 0i64;

    // Resume from the newest complete checkpoint, if any.
    ckptio::clean_temp_files(&args.dir)?;
    if let Some(path) = CheckpointManager::<TorchCheckpointIo>::resume_path(&args.dir)? {
        let tree = ckptio::torch::load(&path, &LoadOptions::default())?;
        let rest = restore(
            tree,
            &path,
            &mut [
                ("model", &mut vs),
                ("optimizer", &mut opt),
                ("step", &mut step),
            ],
            true,
        )?;
        println!(
            "resumed from {} at step {step} (also in the file: {:?})",
            path.display(),
            rest.map(|r| r
                .as_dict()
                .map(|d| d.keys().map(ToString::to_string).collect::<Vec<_>>()))
        );
    }

    let io = Builder::default()
        .snapshot_mode(SnapshotMode::Deferred)
        .build(TorchCheckpointIo::new());
    let cfg = ManagerConfig::new(&args.dir)
        .every_n_steps(10)
        .top_k(2, Monitor::Min)
        .filename("step={step}-loss={metric:.5}.ckpt");
    let mut mgr = CheckpointManager::new(io, cfg);
    while (step as u64) < args.steps {
        step += 1;
        tch::manual_seed(step);
        let x = Tensor::randn([128, 32], (Kind::Float, Device::Cpu));
        let y = x.sum_dim_intlist(1, true, Kind::Float).sin();
        opt.zero_grad();
        let loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        loss.backward();
        opt.step()?;
        let state: [(&str, &dyn Stateful); 3] =
            [("model", &vs), ("optimizer", &opt), ("step", &step)];
        if let Some(p) = mgr.step(step as u64, 0, Some(loss.double_value(&[])), &state)? {
            println!(
                "step {step}: loss {:.5}, checkpoint {}",
                loss.double_value(&[]),
                p.display()
            );
        }
    }
    mgr.finish()?;
    println!("{:?}", mgr.io().status());
    Ok(())
}
