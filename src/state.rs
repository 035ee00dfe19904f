//! Training state, Fabric style: save "the model, the optimizer and where I am" under names, and
//! restore it in place (feature `tch` for models and optimizers; plain values always).
//!
//! ```no_run
//! use ckptio::state::{load, save, Stateful};
//! use ckptio::optim::Adam;
//! use ckptio::TorchCheckpointIo;
//! use tch::{nn, Device};
//! # fn main() -> ckptio::Result<()> {
//! let io = TorchCheckpointIo::new();
//! let mut vs = nn::VarStore::new(Device::Cpu);
//! let _fc = nn::linear(vs.root() / "fc", 4, 2, Default::default());
//! let mut opt = Adam::adamw(vs.trainable_variables(), 1e-3, 0.01);
//! let mut step = 0i64;
//! save(&io, "ckpt.pt".as_ref(), &[("model", &vs), ("optimizer", &opt), ("step", &step)])?;
//! let rest = load(&io, "ckpt.pt".as_ref(), &mut [("model", &mut vs), ("optimizer", &mut opt), ("step", &mut step)], true)?;
//! assert!(rest.is_none()); // everything in the file was restored
//! # Ok(()) }
//! ```

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{CheckpointIo, LoadOptions, SaveOptions};
use crate::value::{Dict, Key, Value};

/// Something whose state can be saved and restored in place.
pub trait Stateful {
    /// The state as a tree (tensors may be live: they are copied when saved).
    fn state_dict(&self) -> Result<Value>;
    /// Restores the state in place. A state that does not have the expected form is an
    /// [`Error::State`] (whose key [`restore`] fills in).
    fn load_state_dict(&mut self, state: &Value) -> Result<()>;
}

macro_rules! plain {
    ($t:ty, $get:expr, $what:literal) => {
        impl Stateful for $t {
            fn state_dict(&self) -> Result<Value> {
                Ok(Value::from(self.clone()))
            }
            fn load_state_dict(&mut self, state: &Value) -> Result<()> {
                #[allow(clippy::redundant_closure_call)]
                let v: Option<$t> = ($get)(state);
                *self = v.ok_or_else(|| {
                    Error::state(format!(
                        concat!("expected ", $what, ", got {}"),
                        state.type_name()
                    ))
                })?;
                Ok(())
            }
        }
    };
}
plain!(i64, |v: &Value| v.as_int(), "an int");
plain!(f64, |v: &Value| v.as_float(), "a float");
plain!(
    bool,
    |v: &Value| match v {
        Value::Bool(b) => Some(*b),
        _ => None,
    },
    "a bool"
);
plain!(String, |v: &Value| v.as_str().map(str::to_owned), "a str");

/// Any tree (e.g. hyper-parameters or metadata) is its own state.
impl Stateful for Value {
    fn state_dict(&self) -> Result<Value> {
        Ok(self.clone())
    }
    fn load_state_dict(&mut self, state: &Value) -> Result<()> {
        *self = state.clone();
        Ok(())
    }
}

/// Serde-able metadata (feature `serde_json`): `serde_json::to_value(&my_config)` gives a value
/// that saves as a plain tree (objects as string-keyed dicts, arrays as lists) and loads back.
#[cfg(feature = "serde_json")]
impl Stateful for serde_json::Value {
    fn state_dict(&self) -> Result<Value> {
        fn conv(j: &serde_json::Value) -> Value {
            match j {
                serde_json::Value::Null => Value::None,
                serde_json::Value::Bool(b) => Value::Bool(*b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => Value::Int(i),
                    None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
                serde_json::Value::String(s) => Value::Str(s.clone()),
                serde_json::Value::Array(a) => Value::List(a.iter().map(conv).collect()),
                serde_json::Value::Object(o) => {
                    Value::Dict(o.iter().map(|(k, v)| (k.as_str(), conv(v))).collect())
                }
            }
        }
        Ok(conv(self))
    }
    fn load_state_dict(&mut self, state: &Value) -> Result<()> {
        fn conv(v: &Value) -> Result<serde_json::Value> {
            Ok(match v {
                Value::None => serde_json::Value::Null,
                Value::Bool(b) => serde_json::Value::Bool(*b),
                Value::Int(i) => serde_json::Value::from(*i),
                Value::Float(f) => serde_json::Number::from_f64(*f)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| Error::state(format!("{f} has no JSON form")))?,
                Value::Str(s) => serde_json::Value::String(s.clone()),
                Value::List(items) | Value::Tuple(items) => {
                    serde_json::Value::Array(items.iter().map(conv).collect::<Result<_>>()?)
                }
                Value::Dict(d) => {
                    let mut m = serde_json::Map::new();
                    for (k, v) in d.iter() {
                        let k = k
                            .as_str()
                            .ok_or_else(|| Error::state(format!("key {k} is not a string")))?;
                        m.insert(k.to_owned(), conv(v)?);
                    }
                    serde_json::Value::Object(m)
                }
                other => {
                    return Err(Error::state(format!(
                        "{} values have no JSON form",
                        other.type_name()
                    )))
                }
            })
        }
        *self = conv(state)?;
        Ok(())
    }
}

/// libtorch's global RNG, as far as tch allows: tch can seed it but not read its state, so the
/// checkpoint records a seed and loading re-seeds with it. Reseed with [`RngSeed::reseed`] at a
/// point that is the same in the saved and the resumed run (e.g. per step, from the step).
#[cfg(feature = "tch")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngSeed(pub i64);

#[cfg(feature = "tch")]
impl RngSeed {
    /// Seeds libtorch's global RNG with `seed` and remembers it.
    pub fn reseed(&mut self, seed: i64) {
        self.0 = seed;
        tch::manual_seed(seed);
    }
}

#[cfg(feature = "tch")]
impl Stateful for RngSeed {
    fn state_dict(&self) -> Result<Value> {
        Ok(Value::Int(self.0))
    }
    fn load_state_dict(&mut self, state: &Value) -> Result<()> {
        let seed = state.as_int().ok_or_else(|| {
            Error::state(format!(
                "an RNG seed must be an int, got {}",
                state.type_name()
            ))
        })?;
        self.reseed(seed);
        Ok(())
    }
}

#[cfg(feature = "tch")]
impl Stateful for tch::nn::VarStore {
    /// Live tensors: an async save copies them once, at snapshot time.
    fn state_dict(&self) -> Result<Value> {
        crate::tch::live_state_dict(self)
    }
    /// Strict: every variable must be in the state, and nothing else.
    fn load_state_dict(&mut self, state: &Value) -> Result<()> {
        crate::tch::load_state_dict(self, state, true).map(drop)
    }
}

#[cfg(feature = "tch")]
macro_rules! optimizer_state {
    ($t:ty) => {
        impl Stateful for $t {
            fn state_dict(&self) -> Result<Value> {
                crate::optim::Optimizer::state_dict(self)
            }
            fn load_state_dict(&mut self, state: &Value) -> Result<()> {
                crate::optim::Optimizer::load_state_dict(self, state)
            }
        }
    };
}
#[cfg(feature = "tch")]
optimizer_state!(crate::optim::Sgd);
#[cfg(feature = "tch")]
optimizer_state!(crate::optim::Adam);

/// The checkpoint for named state: `{name: state_dict(), ...}`. Live tensors in it stay live
/// (a save snapshots them); keep the tree for later only after
/// [`materialize`](crate::Value::materialize), or it shows the tensors' values of that later
/// moment.
pub fn checkpoint(state: &[(&str, &dyn Stateful)]) -> Result<Value> {
    let mut d = Dict::new();
    for (name, s) in state {
        d.insert(*name, s.state_dict()?);
    }
    Ok(Value::Dict(d))
}

/// Saves named state to `path` through any backend (an `AsyncCheckpointIo` returns after the
/// snapshot).
pub fn save(io: &dyn CheckpointIo, path: &Path, state: &[(&str, &dyn Stateful)]) -> Result<()> {
    io.save_checkpoint(&checkpoint(state)?, path, &SaveOptions::default())
}

/// Restores named state in place from the checkpoint at `path`; returns what the file held that
/// the state did not ask for (`None` when nothing is left, as Fabric's `load`). In `strict` mode
/// a name missing from the file is an error ([`Error::KeyMismatch`]) and nothing is restored.
pub fn load(
    io: &dyn CheckpointIo,
    path: &Path,
    state: &mut [(&str, &mut dyn Stateful)],
    strict: bool,
) -> Result<Option<Value>> {
    let tree = io
        .load_checkpoint(path, &LoadOptions::default(), None)?
        .ok_or_else(|| Error::format(path, "the backend returned no checkpoint"))?;
    restore(tree, path, state, strict)
}

/// [`load`] on a tree already in memory.
pub fn restore(
    tree: Value,
    path: &Path,
    state: &mut [(&str, &mut dyn Stateful)],
    strict: bool,
) -> Result<Option<Value>> {
    let mut top = match tree {
        Value::Dict(d) => d,
        other => {
            return Err(Error::format(
                path,
                format!("checkpoint is a {}, expected a dict", other.type_name()),
            ))
        }
    };
    let missing: Vec<String> = state
        .iter()
        .filter(|(n, _)| top.get(*n).is_none())
        .map(|(n, _)| (*n).to_owned())
        .collect();
    if strict && !missing.is_empty() {
        let unexpected = top
            .keys()
            .filter(|k| !state.iter().any(|(n, _)| k.as_str() == Some(*n)))
            .map(ToString::to_string)
            .collect();
        return Err(Error::KeyMismatch {
            path: path.to_path_buf(),
            missing,
            unexpected,
        });
    }
    for (name, s) in state.iter_mut() {
        if let Some(v) = top.remove(&Key::Str((*name).to_owned())) {
            s.load_state_dict(&v).map_err(|e| e.in_state(name))?;
        }
    }
    Ok((!top.is_empty()).then_some(Value::Dict(top)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_of_the_wrong_type_is_refused_naming_its_key() {
        let mut d = Dict::new();
        d.insert("step", "ten");
        let mut step = 0i64;
        let err = restore(
            Value::Dict(d),
            Path::new("c.pt"),
            &mut [("step", &mut step)],
            true,
        )
        .unwrap_err();
        match &err {
            Error::State { key, reason } => {
                assert_eq!(key, "step");
                assert!(reason.contains("expected an int"), "{reason}");
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains("\"step\""), "{err}");
        assert_eq!(step, 0, "nothing restored");
    }
}
