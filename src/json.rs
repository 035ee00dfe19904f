//! A checkpoint tree as one JSON document (what `ckptio inspect --json` prints).
//!
//! This is the command line tool's JSON form (feature `cli`), public only so that the tool, the
//! tests and the examples can share it; it is not a stable API and may change in any release.
//!
//! - dicts whose keys are all strings: JSON objects, in order;
//! - other dicts: `{"$dict": [[key, value], ...]}`;
//! - lists and tuples: arrays;
//! - tensors: `{"$tensor": {"dtype": "bfloat16", "shape": [3, 5], "sha256": HEX}}`, the digest
//!   taken over the elements in row-major order, little-endian (bool as one byte 0/1);
//! - bytes: `{"$bytes": BASE64}`; non-finite floats: `"NaN"`, `"Infinity"`, `"-Infinity"`;
//! - other Python objects: `{"$object": "module.Class", "args": [...], "state": ...}`.
//!
//! ```
//! use ckptio::{json::to_json, Dict, Value};
//! let mut d = Dict::new();
//! d.insert("lr", 1e-3);
//! d.insert(0i64, Value::Float(f64::NAN));
//! assert_eq!(to_json(&Value::from(d)).to_string(), r#"{"$dict":[["lr",0.001],[0,"NaN"]]}"#);
//! ```

use base64::Engine;
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};

use crate::tensor::HostTensor;
use crate::value::{Key, ObjectKind, Value};

/// The JSON document for `v`.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::None => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => json!(i),
        Value::Float(f) => float(*f),
        Value::Str(s) => Json::String(s.clone()),
        Value::Bytes(b) => json!({ "$bytes": base64::engine::general_purpose::STANDARD.encode(b) }),
        Value::List(items) | Value::Tuple(items) => {
            Json::Array(items.iter().map(to_json).collect())
        }
        Value::Dict(d) => {
            if d.has_string_keys() {
                let mut m = Map::new();
                for (k, v) in d.iter() {
                    m.insert(k.as_str().unwrap_or_default().to_owned(), to_json(v));
                }
                Json::Object(m)
            } else {
                let pairs = d.iter().map(|(k, v)| json!([key(k), to_json(v)])).collect();
                json!({ "$dict": Json::Array(pairs) })
            }
        }
        Value::Tensor(t) => tensor(t),
        Value::Live(l) => match l.to_host() {
            Ok(t) => tensor(&t),
            Err(e) => json!({ "$error": e.to_string() }),
        },
        Value::Sharded(s) => json!({
            "$sharded": {
                "dtype": s.dtype().name(),
                "shape": s.shape(),
                "shards": s.shards().iter().map(|c| json!({
                    "offsets": c.chunk.offsets,
                    "tensor": to_json(&c.tensor),
                })).collect::<Vec<_>>(),
            }
        }),
        Value::Object(o) => {
            let mut m = Map::new();
            m.insert("$object".into(), Json::String(o.class_name()));
            if o.kind != ObjectKind::Global {
                m.insert(
                    "args".into(),
                    Json::Array(o.args.iter().map(to_json).collect()),
                );
            }
            if let Some(s) = &o.state {
                m.insert("state".into(), to_json(s));
            }
            if !o.list_items.is_empty() {
                m.insert(
                    "items".into(),
                    Json::Array(o.list_items.iter().map(to_json).collect()),
                );
            }
            if !o.dict_items.is_empty() {
                let pairs = o
                    .dict_items
                    .iter()
                    .map(|(k, v)| json!([to_json(k), to_json(v)]))
                    .collect();
                m.insert("dict_items".into(), Json::Array(pairs));
            }
            Json::Object(m)
        }
    }
}

fn float(f: f64) -> Json {
    if f.is_nan() {
        json!("NaN")
    } else if f.is_infinite() {
        json!(if f > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        json!(f)
    }
}

fn key(k: &Key) -> Json {
    to_json(&k.to_value())
}

/// SHA-256 (hex) of a tensor's elements in row-major order, little-endian.
pub fn tensor_digest(t: &HostTensor) -> String {
    let mut h = Sha256::new();
    h.update(t.contiguous_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn tensor(t: &HostTensor) -> Json {
    json!({ "$tensor": { "dtype": t.dtype().name(), "shape": t.shape(), "sha256": tensor_digest(t) } })
}
