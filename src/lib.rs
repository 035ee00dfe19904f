//! # ckptio: checkpoints that never stall the training loop
//!
//! ckptio is a checkpointing runtime for Rust training loops (mostly [tch]). Its files are
//! PyTorch's own `torch.save` format, so a checkpoint written in Rust loads in Python with
//! `torch.load(weights_only=True)`, and a PyTorch or Lightning checkpoint loads in Rust.
//!
//! - [`Value`], [`Dict`], [`HostTensor`]: the checkpoint tree (what `torch.save` can hold).
//! - [`CheckpointIo`]: the backend contract, after Lightning's `CheckpointIO` plugin.
//! - [`TorchCheckpointIo`]: the `torch.save` backend (atomic, durable saves; zero-copy loads).
//! - [`AsyncCheckpointIo`]: wraps any backend and writes off the training thread.
//! - [`DcpCheckpointIo`] and [`dcp`]: sharded checkpoints from every rank in PyTorch's
//!   Distributed Checkpoint format, loadable at any world size.
//! - `ckptio::tch` (feature `tch`, on by default): `tch::Tensor` <-> [`HostTensor`], `VarStore`
//!   state dicts.
//! - [`clean_temp_files`]: removes the temporary files a crash left behind.
//!
//! # Features
//! - `tch` (default): the tch integration (`ckptio::tch`, `ckptio::optim`, tch state in
//!   `ckptio::state`); needs libtorch.
//! - `cli` (default): the `ckptio` command line tool and its dependencies (`clap`,
//!   `serde_json`, `sha2`, `base64`). A library user can leave it out with
//!   `default-features = false, features = ["tch"]`.
//! - `serde_json` (part of `cli`): `serde_json::Value` as [`Stateful`](state::Stateful)
//!   metadata.
//!
//! ```no_run
//! use ckptio::{CheckpointIo, Dict, HostTensor, LoadOptions, SaveOptions, TorchCheckpointIo, Value};
//! # fn main() -> ckptio::Result<()> {
//! let io = TorchCheckpointIo::new();
//! let mut state_dict = Dict::ordered();
//! state_dict.insert("linear.weight", HostTensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4], &[2, 2])?);
//! let mut ckpt = Dict::new();
//! ckpt.insert("state_dict", state_dict);
//! ckpt.insert("global_step", 1000i64);
//! io.save_checkpoint(&Value::from(ckpt), "ckpt/step-1000.ckpt".as_ref(), &SaveOptions::default())?;
//! let loaded = io.load_checkpoint("ckpt/step-1000.ckpt".as_ref(), &LoadOptions::default(), None)?;
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
#![warn(missing_debug_implementations)]

mod aligned;
mod atomic;
pub mod dcp;
mod error;
mod huge;
mod io;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod json;
pub mod manager;
pub mod runtime;
mod sink;
pub mod state;
mod tensor;
#[cfg(test)]
mod testing;
pub mod torch;
mod value;

#[cfg(feature = "tch")]
pub mod optim;
#[cfg(feature = "tch")]
pub mod tch;

pub use crate::atomic::{clean_temp_files, is_temp_file};
pub use crate::dcp::{DcpCheckpointIo, ShardedTensor};
pub use crate::error::{Error, Result};
pub use crate::io::{
    finish_load, CheckpointIo, LoadOptions, MapLocation, Restore, SaveOptions, WriteStats,
};
pub use crate::runtime::{AsyncCheckpointIo, Backpressure, SaveHandle, SaveReport, SnapshotMode};
pub use crate::tensor::{
    contiguous_strides, DType, Element, HostMemory, HostTensor, LiveTensor, Storage, TensorSource,
    MAX_SNAPSHOT,
};
pub use crate::torch::TorchCheckpointIo;
pub use crate::value::{Dict, DictKind, FloatKey, Key, KeyRef, Object, ObjectKind, Value};

/// The README's examples, compiled as doc tests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
#[derive(Debug)]
pub struct ReadmeDoctests;
