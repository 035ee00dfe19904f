//! A checkpoint whose `data.pkl` was pickled elsewhere: the level below the checkpoint tree.
//!
//! `torch.save` pickles the object structure in Python and writes each storage as a record of
//! its own; the pickle refers to a storage by a persistent id `("storage", storage class, key,
//! location, numel)` whose key is the storage's number in order of first appearance (`"0"`,
//! `"1"`, ...). A caller that pickles the structure itself (ckptio's Python package does, with
//! Python's pickler, exactly as `torch.save` does) hands ckptio that pickle and the storages in
//! key order as a [`pickled`] value: [`TorchCheckpointIo`](super::TorchCheckpointIo) writes it
//! as the archive `torch.save` would write, and [`AsyncCheckpointIo`](crate::AsyncCheckpointIo)
//! snapshots its live storages like any other live tensors.
//!
//! ```no_run
//! use ckptio::{torch, HostTensor};
//! # fn main() -> ckptio::Result<()> {
//! # let pickle_from_python: Vec<u8> = vec![];
//! let storage = HostTensor::from_slice(&[1u8, 2, 3, 4], &[4])?;
//! let value = torch::pickled(pickle_from_python, vec![storage.into()])?;
//! torch::save(&value, "model.pt")?;
//! # Ok(()) }
//! ```

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::tensor::Storage;
use crate::value::{Object, ObjectKind, Value};

/// The module and name of the object that marks a pickled checkpoint in a tree.
const MODULE: &str = "ckptio";
const NAME: &str = "PickledArchive";

/// A checkpoint made of a finished pickle (`data.pkl`) and its storages in key order: each a
/// [`Value::Tensor`] or [`Value::Live`] whose bytes are the whole storage (a one-dimensional
/// `uint8` tensor is the natural shape). Only the top of a tree may be one.
pub fn pickled(pickle: impl Into<Bytes>, storages: Vec<Value>) -> Result<Value> {
    for (i, s) in storages.iter().enumerate() {
        if !matches!(s, Value::Tensor(_) | Value::Live(_)) {
            return Err(Error::Argument {
                name: "storages",
                reason: format!("storage {i} is a {}, not a tensor", s.type_name()),
            });
        }
    }
    Ok(Value::Object(Box::new(Object {
        args: vec![Value::Bytes(pickle.into()), Value::List(storages)],
        ..Object::new(MODULE, NAME, ObjectKind::NewObj)
    })))
}

/// The pickle and the storages of a [`pickled`] value; `None` for any other tree.
///
/// Each storage is its tensor's whole storage, so the tensor must cover it: a snapshot always
/// does, and a host tensor that views part of a larger storage is refused.
pub(crate) fn parts(value: &Value) -> Option<Result<(&Bytes, Vec<Storage>)>> {
    let Value::Object(o) = value else { return None };
    if o.module != MODULE || o.name != NAME {
        return None;
    }
    let (Some(Value::Bytes(pickle)), Some(Value::List(items))) = (o.args.first(), o.args.get(1))
    else {
        return None;
    };
    Some(
        items
            .iter()
            .enumerate()
            .map(storage_of)
            .collect::<Result<Vec<_>>>()
            .map(|s| (pickle, s)),
    )
}

fn storage_of((i, v): (usize, &Value)) -> Result<Storage> {
    let reason = match v {
        Value::Tensor(t) => {
            let nbytes = t.shape().iter().product::<usize>() * t.dtype().size();
            if t.storage_offset() == 0 && nbytes == t.storage().len() {
                return Ok(t.storage().clone());
            }
            format!(
                "is a view of {nbytes} bytes of a {}-byte storage",
                t.storage().len()
            )
        }
        Value::Live(_) => "was not snapshotted (a live tensor)".to_owned(),
        other => format!("is a {}", other.type_name()),
    };
    Err(Error::Argument {
        name: "storages",
        reason: format!("storage {i} {reason}; each must be a whole storage"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostTensor;

    #[test]
    fn only_tensors_are_storages() {
        let err = pickled(vec![0x80, 2], vec![Value::Int(3)]).unwrap_err();
        assert!(err.to_string().contains("storage 0 is a int"), "{err}");
    }

    #[test]
    fn a_view_of_part_of_a_storage_is_refused() {
        let t = HostTensor::from_slice(&[1u8, 2, 3, 4], &[4]).unwrap();
        let half = t.narrow(0, 0, 2).unwrap();
        let v = pickled(vec![0x80, 2], vec![half.into()]).unwrap();
        let err = parts(&v).unwrap().unwrap_err();
        assert!(
            err.to_string()
                .contains("view of 2 bytes of a 4-byte storage"),
            "{err}"
        );
    }

    #[test]
    fn a_pickled_checkpoint_is_written_as_its_pickle_and_storages_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.pt");
        let pickle = b"\x80\x02K\x07.".to_vec(); // the int 7
        let a = HostTensor::from_slice(&[1u8, 2, 3], &[3]).unwrap();
        let b = HostTensor::from_slice(&[9.5f32; 4], &[4]).unwrap();
        let v = pickled(pickle.clone(), vec![a.into(), b.into()]).unwrap();
        super::super::save(&v, &p).unwrap();
        let data = std::fs::read(&p).unwrap();
        let r = super::super::Records::index(&data, &p, true).unwrap();
        assert_eq!(r.record(&data, "data.pkl").unwrap(), &pickle[..]);
        assert_eq!(r.record(&data, "data/0").unwrap(), &[1, 2, 3]);
        assert_eq!(r.record(&data, "data/1").unwrap().len(), 16);
        assert!(!r.contains("data/2"));
        let loaded = super::super::load(&p, &crate::LoadOptions::default()).unwrap();
        assert_eq!(loaded, Value::Int(7));
    }

    #[test]
    fn other_trees_are_not_pickled() {
        assert!(parts(&Value::Int(1)).is_none());
    }
}
