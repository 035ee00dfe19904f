//! A checkpoint tree <-> DCP's flat items, with DCP's rules (`_traverse.py`,
//! `flatten_state_dict`): dicts are walked (keys become strings), a list is walked by index
//! when it holds a tensor or a container that is walked, and everything else is one leaf
//! whose flattened key is its path joined with dots.

use crate::dcp::shard::ShardedTensor;
use crate::error::{Error, Result};
use crate::value::{Dict, Key, Value};

/// What one flattened key holds.
#[derive(Debug)]
pub(crate) enum Leaf<'a> {
    /// A whole tensor (host or live): the same on every rank, written by one.
    Tensor(&'a Value),
    /// A tensor split over ranks.
    Sharded(&'a ShardedTensor),
    /// Any other value: written by one rank, as a `torch.save` of it.
    Value(&'a Value),
}

/// One leaf of the tree with its flattened key and nested path.
#[derive(Debug)]
pub(crate) struct Flat<'a> {
    pub(crate) fqn: String,
    pub(crate) path: Vec<Key>,
    pub(crate) leaf: Leaf<'a>,
}

/// The leaves of `tree`, which must be a dict (a state dict), in order.
pub(crate) fn flatten(tree: &Value) -> Result<Vec<Flat<'_>>> {
    let Value::Dict(d) = tree else {
        return Err(Error::Argument {
            name: "checkpoint",
            reason: format!(
                "a sharded checkpoint is a dict (a state dict), not a {}",
                tree.type_name()
            ),
        });
    };
    let mut out = Vec::new();
    walk_dict(d, &mut Vec::new(), &mut out);
    Ok(out)
}

fn walk_dict<'a>(d: &'a Dict, path: &mut Vec<Key>, out: &mut Vec<Flat<'a>>) {
    for (k, v) in d.iter() {
        let key = match k {
            Key::Str(s) => Key::Str(s.clone()),
            other => Key::Str(other.to_string()),
        };
        path.push(key);
        walk(v, path, out);
        path.pop();
    }
}

fn walk<'a>(v: &'a Value, path: &mut Vec<Key>, out: &mut Vec<Flat<'a>>) {
    match v {
        Value::Dict(d) => walk_dict(d, path, out),
        Value::List(items) if !is_terminal(v) => {
            for (i, x) in items.iter().enumerate() {
                path.push(Key::Int(i as i64));
                walk(x, path, out);
                path.pop();
            }
        }
        _ => {
            let leaf = match v {
                Value::Tensor(_) | Value::Live(_) => Leaf::Tensor(v),
                Value::Sharded(s) => Leaf::Sharded(s),
                other => Leaf::Value(other),
            };
            out.push(Flat {
                fqn: fqn_of(path),
                path: path.clone(),
                leaf,
            });
        }
    }
}

/// DCP's `_is_terminal`: a list is one leaf unless it holds a tensor, a dict, or a list that
/// is not a leaf itself.
fn is_terminal(v: &Value) -> bool {
    match v {
        Value::Dict(_) => false,
        Value::List(items) => items.iter().all(|x| match x {
            Value::Tensor(_) | Value::Live(_) | Value::Sharded(_) | Value::Dict(_) => false,
            Value::List(_) => is_terminal(x),
            _ => true,
        }),
        _ => true,
    }
}

/// The flattened key of a path: its parts joined with dots.
pub(crate) fn fqn_of(path: &[Key]) -> String {
    path.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// Puts `value` at `path` in `root`, creating dicts (for string keys) and lists (for integer
/// keys) on the way, as DCP's `set_element` does. `slots` is how many list slots the rebuild
/// may still add (a list grows to reach an index, padded with `None`); every slot added is
/// taken from it, so that hostile key paths cannot size lists beyond what the checkpoint
/// describes.
pub(crate) fn set_path(
    root: &mut Dict,
    path: &[Key],
    value: Value,
    slots: &mut usize,
) -> Result<()> {
    let bad = |reason: String| Error::Argument {
        name: "path",
        reason,
    };
    let (first, rest) = path
        .split_first()
        .ok_or_else(|| bad("an empty key path".into()))?;
    if rest.is_empty() {
        root.insert(first.clone(), value);
        return Ok(());
    }
    let empty = container_for(&rest[0]);
    if root.get(first).is_none() {
        root.insert(first.clone(), empty);
    }
    let slot = root
        .get_mut(first)
        .ok_or_else(|| bad(format!("no slot for {first}")))?;
    set_in(slot, rest, value, slots).map_err(|r| bad(format!("{}: {r}", fqn_of(path))))
}

fn container_for(next: &Key) -> Value {
    match next {
        Key::Int(_) => Value::List(Vec::new()),
        _ => Value::Dict(Dict::new()),
    }
}

/// Most list slots a key path may ask for (a hostile index must not allocate without bound).
const MAX_LIST_INDEX: i64 = 1 << 24;

fn set_in(
    slot: &mut Value,
    path: &[Key],
    value: Value,
    slots: &mut usize,
) -> std::result::Result<(), String> {
    let (key, rest) = path.split_first().ok_or("an empty key path")?;
    let child = match (slot, key) {
        (Value::Dict(d), _) => {
            if rest.is_empty() {
                d.insert(key.clone(), value);
                return Ok(());
            }
            if d.get(key).is_none() {
                d.insert(key.clone(), container_for(&rest[0]));
            }
            d.get_mut(key).ok_or("missing slot")?
        }
        (Value::List(items), Key::Int(i)) if (0..MAX_LIST_INDEX).contains(i) => {
            let i = *i as usize;
            if items.len() <= i {
                let add = i + 1 - items.len();
                *slots = slots.checked_sub(add).ok_or_else(|| {
                    format!("list index {i} needs {add} more list slots than the checkpoint has entries")
                })?;
                items.resize(i + 1, Value::None);
            }
            if rest.is_empty() {
                items[i] = value;
                return Ok(());
            }
            if items[i] == Value::None {
                items[i] = container_for(&rest[0]);
            }
            &mut items[i]
        }
        (other, key) => {
            return Err(format!(
                "key {key} cannot index a {} (key paths disagree)",
                other.type_name()
            ))
        }
    };
    set_in(child, rest, value, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostTensor;

    fn t() -> Value {
        Value::Tensor(HostTensor::from_slice(&[1f32], &[1]).unwrap())
    }

    #[test]
    fn trees_flatten_as_dcp_flattens_them() {
        let mut model = Dict::new();
        model.insert("w", t());
        model.insert("blocks", Value::List(vec![t(), t()]));
        let mut root = Dict::new();
        root.insert("model", model);
        root.insert("names", Value::List(vec!["a".into(), "b".into()]));
        root.insert(Key::Int(3), 7i64);
        root.insert("pair", Value::Tuple(vec![t(), 1i64.into()]));
        let tree = Value::Dict(root);
        let flat = flatten(&tree).unwrap();
        let keys: Vec<&str> = flat.iter().map(|f| f.fqn.as_str()).collect();
        assert_eq!(
            keys,
            [
                "model.w",
                "model.blocks.0",
                "model.blocks.1",
                "names",
                "3",
                "pair"
            ]
        );
        assert!(matches!(flat[1].leaf, Leaf::Tensor(_)));
        assert!(matches!(flat[3].leaf, Leaf::Value(Value::List(_))));
        assert!(matches!(flat[5].leaf, Leaf::Value(Value::Tuple(_))));
        assert_eq!(
            flat[1].path,
            vec![Key::from("model"), "blocks".into(), Key::Int(0)]
        );
        assert!(flatten(&t()).is_err());
    }

    #[test]
    fn paths_rebuild_the_nesting() {
        let mut root = Dict::new();
        let p = |ks: &[Key]| ks.to_vec();
        let mut slots = usize::MAX;
        set_path(
            &mut root,
            &p(&["m".into(), "b".into(), Key::Int(1)]),
            2i64.into(),
            &mut slots,
        )
        .unwrap();
        set_path(
            &mut root,
            &p(&["m".into(), "b".into(), Key::Int(0)]),
            1i64.into(),
            &mut slots,
        )
        .unwrap();
        set_path(&mut root, &p(&["s".into()]), 3i64.into(), &mut slots).unwrap();
        let v = Value::Dict(root.clone());
        let b = v.get("m").and_then(|m| m.get("b")).unwrap();
        assert_eq!(b, &Value::List(vec![1i64.into(), 2i64.into()]));
        let clash = set_path(
            &mut root,
            &p(&["s".into(), "x".into()]),
            1i64.into(),
            &mut slots,
        );
        assert!(clash.is_err());
        let huge = set_path(
            &mut root,
            &p(&["l".into(), Key::Int(1 << 40)]),
            1i64.into(),
            &mut slots,
        );
        assert!(huge.is_err());
        // A list grows only as far as the slots allow.
        let mut slots = 3;
        let far = p(&["k".into(), Key::Int(3)]);
        assert!(set_path(&mut root, &far, 1i64.into(), &mut slots).is_err());
        let near = p(&["k".into(), Key::Int(2)]);
        set_path(&mut root, &near, 1i64.into(), &mut slots).unwrap();
        assert_eq!(slots, 0);
    }
}
