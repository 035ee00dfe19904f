//! The `.metadata` file of a DCP checkpoint: a pickled
//! `torch.distributed.checkpoint.metadata.Metadata`, read and written here.
//!
//! Reading never executes anything (ckptio's pickle reader is inert) and accepts only the
//! classes a `FileSystemWriter` puts there; any other global is refused with
//! [`Error::Unsafe`], and every size, offset and chunk is checked before it is used.

use indexmap::IndexMap;

use crate::dcp::shard::{check_cover, Chunk};
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage};
use crate::torch::pickle::reader::{read_pickle, Limits, StorageSource};
use crate::torch::pickle::writer::{PickleWriter, StorageTable};
use crate::value::{Dict, Key, Object, ObjectKind, Value};

const META: &str = "torch.distributed.checkpoint.metadata";
const FS: &str = "torch.distributed.checkpoint.filesystem";

/// What a checkpoint holds under one flattened key (`"model.layer.weight"`).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Entry {
    /// A tensor: its global shape and dtype, and the chunks it was saved in.
    Tensor(TensorEntry),
    /// Any other value, saved as the bytes of a `torch.save` of it.
    Bytes,
}

/// A tensor of a DCP checkpoint (`TensorStorageMetadata`).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    /// Element type.
    pub dtype: DType,
    /// Global shape.
    pub shape: Vec<usize>,
    /// Whether it required grad.
    pub requires_grad: bool,
    /// The chunks it was saved in; together they cover it exactly.
    pub chunks: Vec<Chunk>,
}

/// Where one saved item lies: a chunk of a tensor, or a bytes value (`MetadataIndex` ->
/// `_StorageInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The flattened key.
    pub fqn: String,
    /// The chunk's offsets, for a tensor chunk.
    pub offsets: Option<Vec<usize>>,
    /// The data file, relative to the checkpoint directory.
    pub file: String,
    /// Where the item starts in the file.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
}

/// The metadata of a DCP checkpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    /// Every flattened key, in order, with what it holds.
    pub entries: IndexMap<String, Entry>,
    /// The nested key path of each flattened key (`"model.w"` -> `["model", "w"]`).
    pub paths: IndexMap<String, Vec<Key>>,
    /// Where every saved item lies.
    pub items: Vec<Item>,
    /// The id of the save that wrote it (`StorageMeta.save_id`).
    pub save_id: Option<String>,
}

impl Metadata {
    /// The item holding `fqn`'s chunk at `offsets` (or its bytes, for `None`).
    pub fn item(&self, fqn: &str, offsets: Option<&[usize]>) -> Option<&Item> {
        self.items
            .iter()
            .find(|i| i.fqn == fqn && i.offsets.as_deref() == offsets)
    }

    /// Checks that the metadata is consistent: every tensor's chunks cover it exactly, every
    /// chunk and bytes value has exactly one item, every item belongs to an entry, and file
    /// names stay inside the directory. `path` names the file in errors.
    pub fn validate(&self, path: &std::path::Path) -> Result<()> {
        let bad = |reason: String| Error::format(path, reason);
        let mut seen = std::collections::HashSet::new();
        for it in &self.items {
            if !seen.insert((it.fqn.as_str(), it.offsets.as_deref())) {
                return Err(bad(format!("{}: an item is listed twice", it.fqn)));
            }
            check_file_name(&it.file).map_err(|r| bad(format!("{}: {r}", it.fqn)))?;
            it.offset
                .checked_add(it.length)
                .ok_or_else(|| bad(format!("{}: item offset overflows", it.fqn)))?;
            let known = match (self.entries.get(&it.fqn), &it.offsets) {
                (Some(Entry::Tensor(t)), Some(o)) => t.chunks.iter().any(|c| &c.offsets == o),
                (Some(Entry::Bytes), None) => true,
                _ => false,
            };
            if !known {
                return Err(bad(format!(
                    "{}: an item at {:?} matches no saved chunk or value",
                    it.fqn, it.offsets
                )));
            }
        }
        for (fqn, e) in &self.entries {
            match e {
                Entry::Tensor(t) => {
                    check_cover(&t.shape, &t.chunks).map_err(|r| bad(format!("{fqn}: {r}")))?;
                    for c in &t.chunks {
                        if !seen.contains(&(fqn.as_str(), Some(c.offsets.as_slice()))) {
                            return Err(bad(format!(
                                "{fqn}: the chunk at {:?} has no data item",
                                c.offsets
                            )));
                        }
                    }
                }
                Entry::Bytes => {
                    if !seen.contains(&(fqn.as_str(), None)) {
                        return Err(bad(format!("{fqn}: the value has no data item")));
                    }
                }
            }
        }
        Ok(())
    }

    /// The pickle of this metadata, as `torch.distributed.checkpoint.FileSystemWriter`
    /// writes it (protocol 2; `pickle.load` reads it into the same classes).
    pub(crate) fn to_pickle(&self) -> Result<Vec<u8>> {
        pickle_value(&self.to_value())
    }

    pub(crate) fn to_value(&self) -> Value {
        let mut sdm = Dict::new();
        for (fqn, e) in &self.entries {
            sdm.insert(fqn.as_str(), entry_value(e));
        }
        let mut planner = Dict::new();
        for (fqn, p) in &self.paths {
            planner.insert(
                fqn.as_str(),
                Value::Tuple(p.iter().map(Key::to_value).collect()),
            );
        }
        let storage: Vec<(Value, Value)> = self.items.iter().map(item_values).collect();
        let mut storage_meta = Dict::new();
        storage_meta.insert("checkpoint_id", Value::None);
        storage_meta.insert(
            "save_id",
            self.save_id.clone().map_or(Value::None, Value::Str),
        );
        storage_meta.insert("load_id", Value::None);
        storage_meta.insert("modules", Value::List(vec![]));
        let mut state = Dict::new();
        state.insert("state_dict_metadata", sdm);
        state.insert("planner_data", planner);
        state.insert("storage_data", builtins_dict(storage));
        state.insert(
            "storage_meta",
            new_object(META, "StorageMeta", Value::Dict(storage_meta)),
        );
        state.insert("version", "1.0.0");
        new_object(META, "Metadata", Value::Dict(state))
    }

    /// Reads a `.metadata` pickle (`path` names it in errors), accepting only the classes
    /// DCP writes there, and validates it.
    pub fn from_pickle(data: &[u8], path: &std::path::Path) -> Result<Metadata> {
        let v = unpickle(data, path)?;
        let m = Metadata::from_value(&v, path)?;
        m.validate(path)?;
        Ok(m)
    }

    pub(crate) fn from_value(v: &Value, path: &std::path::Path) -> Result<Metadata> {
        let p = Parse { path };
        let state = p.object_state(v, META, "Metadata")?;
        let mut m = Metadata::default();
        for (k, e) in p.dict(
            p.field(state, "state_dict_metadata")?,
            "state_dict_metadata",
        )? {
            let fqn = p.key_str(k)?;
            m.entries.insert(fqn.clone(), p.entry(e, &fqn)?);
        }
        match state.get("planner_data") {
            None | Some(Value::None) => {}
            Some(pd) => {
                for (k, t) in p.dict(pd, "planner_data")? {
                    let fqn = p.key_str(k)?;
                    m.paths.insert(fqn, p.key_path(t)?);
                }
            }
        }
        for (k, v) in p.object_dict(p.field(state, "storage_data")?, "storage_data")? {
            m.items.push(p.item(k, v)?);
        }
        if let Some(sm) = state.get("storage_meta").filter(|v| **v != Value::None) {
            let sm = p.object_state(sm, META, "StorageMeta")?;
            m.save_id = sm.get("save_id").and_then(Value::as_str).map(str::to_owned);
        }
        Ok(m)
    }
}

/// A relative file name must be one plain name inside the checkpoint directory.
pub(crate) fn check_file_name(name: &str) -> std::result::Result<(), String> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0');
    if plain {
        Ok(())
    } else {
        Err(format!(
            "data file {name:?} is not a plain file name inside the checkpoint directory"
        ))
    }
}

/// Pickles a tree of plain values and objects (no tensors).
pub(crate) fn pickle_value(v: &Value) -> Result<Vec<u8>> {
    let mut table = StorageTable::default();
    PickleWriter::new(&mut table)
        .finish(v)
        .map_err(|reason| Error::Argument {
            name: "metadata",
            reason,
        })
}

/// A pickle source with no storages: metadata holds none.
struct NoStorages;

impl StorageSource for NoStorages {
    fn storage(&mut self, key: &str, _: &str, _: u64) -> std::result::Result<Storage, String> {
        Err(format!("metadata refers to storage {key:?}; it holds none"))
    }
}

/// Unpickles `data` inertly, then refuses any global outside DCP's metadata classes.
pub(crate) fn unpickle(data: &[u8], path: &std::path::Path) -> Result<Value> {
    let limits = Limits::default();
    let v = read_pickle(data, false, &limits, &mut NoStorages).map_err(|e| e.at(path))?;
    let mut refused = None;
    v.visit(&mut |x| {
        if let Value::Object(o) = x {
            if refused.is_none() && !allowed(&o.module, &o.name) {
                refused = Some(o.class_name());
            }
        }
        if let Value::Tensor(_) | Value::Live(_) | Value::Sharded(_) = x {
            refused.get_or_insert_with(|| "a tensor".to_owned());
        }
    });
    match refused {
        Some(what) => Err(Error::Unsafe {
            path: path.to_path_buf(),
            what: format!("{what} in DCP metadata (only DCP's metadata classes are allowed)"),
        }),
        None => Ok(v),
    }
}

/// The globals a DCP `.metadata` may name.
fn allowed(module: &str, name: &str) -> bool {
    match module {
        META => matches!(
            name,
            "Metadata"
                | "TensorStorageMetadata"
                | "BytesStorageMetadata"
                | "ChunkStorageMetadata"
                | "TensorProperties"
                | "_MEM_FORMAT_ENCODING"
                | "MetadataIndex"
                | "StorageMeta"
        ),
        FS => name == "_StorageInfo",
        "torch" => DType::from_name(name).is_some_and(|d| d.name() == name),
        "torch.serialization" => name == "_get_layout",
        "pathlib" => matches!(name, "PosixPath" | "PurePosixPath" | "WindowsPath"),
        "builtins" => name == "dict",
        _ => false,
    }
}

fn new_object(module: &str, name: &str, state: Value) -> Value {
    Value::Object(Box::new(Object {
        state: Some(state),
        ..Object::new(module, name, ObjectKind::NewObj)
    }))
}

fn call(module: &str, name: &str, args: Vec<Value>) -> Value {
    Value::Object(Box::new(Object {
        args,
        ..Object::new(module, name, ObjectKind::Reduce)
    }))
}

/// `builtins.dict()` filled with items: a dict whose keys are objects.
fn builtins_dict(items: Vec<(Value, Value)>) -> Value {
    Value::Object(Box::new(Object {
        dict_items: items,
        ..Object::new("builtins", "dict", ObjectKind::Reduce)
    }))
}

fn size(v: &[usize]) -> Value {
    call(
        "torch",
        "Size",
        vec![Value::Tuple(
            v.iter().map(|&x| Value::Int(x as i64)).collect(),
        )],
    )
}

fn entry_value(e: &Entry) -> Value {
    let t = match e {
        Entry::Bytes => return new_object(META, "BytesStorageMetadata", Value::Dict(Dict::new())),
        Entry::Tensor(t) => t,
    };
    let dtype = Value::Object(Box::new(Object::new(
        "torch",
        t.dtype.name(),
        ObjectKind::Global,
    )));
    let props = new_object(
        META,
        "TensorProperties",
        Value::Tuple(vec![
            dtype,
            call(
                "torch.serialization",
                "_get_layout",
                vec!["torch.strided".into()],
            ),
            Value::Bool(t.requires_grad),
            call(META, "_MEM_FORMAT_ENCODING", vec![Value::Int(0)]),
            Value::Bool(false),
        ]),
    );
    let chunks = t
        .chunks
        .iter()
        .map(|c| {
            let mut d = Dict::new();
            d.insert("offsets", size(&c.offsets));
            d.insert("sizes", size(&c.sizes));
            new_object(META, "ChunkStorageMetadata", Value::Dict(d))
        })
        .collect();
    let mut d = Dict::new();
    d.insert("properties", props);
    d.insert("size", size(&t.shape));
    d.insert("chunks", Value::List(chunks));
    new_object(META, "TensorStorageMetadata", Value::Dict(d))
}

fn item_values(it: &Item) -> (Value, Value) {
    let mut index = Dict::new();
    index.insert("fqn", it.fqn.as_str());
    index.insert("offset", it.offsets.as_deref().map_or(Value::None, size));
    index.insert(
        "index",
        match it.offsets {
            Some(_) => Value::Int(0),
            None => Value::None,
        },
    );
    let mut info = Dict::new();
    info.insert("relative_path", it.file.as_str());
    info.insert("offset", it.offset as i64);
    info.insert("length", it.length as i64);
    (
        new_object(META, "MetadataIndex", Value::Dict(index)),
        new_object(FS, "_StorageInfo", Value::Dict(info)),
    )
}

/// Reads DCP's classes out of an unpickled tree; every mismatch is a format error.
struct Parse<'a> {
    path: &'a std::path::Path,
}

impl Parse<'_> {
    fn bad(&self, reason: impl Into<String>) -> Error {
        Error::format(self.path, format!("DCP metadata: {}", reason.into()))
    }

    /// The state (`BUILD` argument) of an object of class `module.name`.
    fn object_state<'v>(&self, v: &'v Value, module: &str, name: &str) -> Result<&'v Value> {
        match v {
            Value::Object(o) if o.module == module && o.name == name => o
                .state
                .as_ref()
                .ok_or_else(|| self.bad(format!("a {name} without state"))),
            other => Err(self.bad(format!("expected a {name}, found {}", describe(other)))),
        }
    }

    fn field<'v>(&self, state: &'v Value, name: &str) -> Result<&'v Value> {
        state
            .get(name)
            .ok_or_else(|| self.bad(format!("no field {name:?}")))
    }

    fn dict<'v>(&self, v: &'v Value, what: &str) -> Result<Vec<(&'v Key, &'v Value)>> {
        match v {
            Value::Dict(d) => Ok(d.iter().collect()),
            other => Err(self.bad(format!("{what} is a {}, not a dict", describe(other)))),
        }
    }

    /// A dict whose keys may be objects (kept by the reader as `builtins.dict` items).
    fn object_dict<'v>(&self, v: &'v Value, what: &str) -> Result<Vec<(Value, &'v Value)>> {
        match v {
            Value::Dict(d) if d.is_empty() => Ok(vec![]),
            Value::Object(o) if o.module == "builtins" && o.name == "dict" => {
                Ok(o.dict_items.iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            other => Err(self.bad(format!("{what} is a {}, not a dict", describe(other)))),
        }
    }

    fn key_str(&self, k: &Key) -> Result<String> {
        k.as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.bad(format!("key {k} is not a string")))
    }

    fn key_path(&self, v: &Value) -> Result<Vec<Key>> {
        let items = v
            .as_seq()
            .ok_or_else(|| self.bad(format!("a key path is a {}", describe(v))))?;
        items
            .iter()
            .map(|x| match x {
                Value::Str(s) => Ok(Key::Str(s.clone())),
                Value::Int(i) if *i >= 0 => Ok(Key::Int(*i)),
                other => Err(self.bad(format!("a key path holds a {}", describe(other)))),
            })
            .collect()
    }

    fn usizes(&self, v: &Value, what: &str) -> Result<Vec<usize>> {
        let items = v
            .as_seq()
            .ok_or_else(|| self.bad(format!("{what} is a {}", describe(v))))?;
        items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as usize),
                other => Err(self.bad(format!("{what} holds {}", describe(other)))),
            })
            .collect()
    }

    fn u64_field(&self, state: &Value, name: &str) -> Result<u64> {
        match self.field(state, name)? {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            other => Err(self.bad(format!("{name} is {}", describe(other)))),
        }
    }

    fn entry(&self, v: &Value, fqn: &str) -> Result<Entry> {
        if let Value::Object(o) = v {
            if o.module == META && o.name == "BytesStorageMetadata" {
                return Ok(Entry::Bytes);
            }
        }
        let s = self.object_state(v, META, "TensorStorageMetadata")?;
        let props = self.object_state(self.field(s, "properties")?, META, "TensorProperties")?;
        let props = props
            .as_seq()
            .filter(|p| p.len() == 5)
            .ok_or_else(|| self.bad(format!("{fqn}: TensorProperties is not a 5-tuple")))?;
        let dtype = match &props[0] {
            Value::Object(o) if o.module == "torch" && o.kind == ObjectKind::Global => {
                DType::from_name(&o.name)
            }
            _ => None,
        }
        .ok_or_else(|| self.bad(format!("{fqn}: unknown dtype {}", describe(&props[0]))))?;
        let strided = matches!(&props[1], Value::Object(o)
            if o.name == "_get_layout" && o.args.first().and_then(Value::as_str) == Some("torch.strided"));
        if !strided {
            return Err(self.bad(format!("{fqn}: only strided tensors are supported")));
        }
        let requires_grad = matches!(props[2], Value::Bool(true));
        let shape = self.usizes(self.field(s, "size")?, "size")?;
        let chunks = match self.field(s, "chunks")? {
            Value::List(cs) => cs
                .iter()
                .map(|c| {
                    let c = self.object_state(c, META, "ChunkStorageMetadata")?;
                    let offsets = self.usizes(self.field(c, "offsets")?, "chunk offsets")?;
                    let sizes = self.usizes(self.field(c, "sizes")?, "chunk sizes")?;
                    Ok(Chunk::new(offsets, sizes))
                })
                .collect::<Result<Vec<_>>>()?,
            other => return Err(self.bad(format!("{fqn}: chunks is {}", describe(other)))),
        };
        Ok(Entry::Tensor(TensorEntry {
            dtype,
            shape,
            requires_grad,
            chunks,
        }))
    }

    fn item(&self, index: Value, info: &Value) -> Result<Item> {
        let index = self.object_state(&index, META, "MetadataIndex")?;
        let fqn = match self.field(index, "fqn")? {
            Value::Str(s) => s.clone(),
            other => return Err(self.bad(format!("MetadataIndex.fqn is {}", describe(other)))),
        };
        let offsets = match index.get("offset") {
            None | Some(Value::None) => None,
            Some(o) => Some(self.usizes(o, "MetadataIndex.offset")?),
        };
        let info = self.object_state(info, FS, "_StorageInfo")?;
        if let Some(t) = info.get("transform_descriptors") {
            if t.as_seq().is_none_or(|s| !s.is_empty()) && *t != Value::None {
                return Err(self.bad(format!(
                    "{fqn}: items with storage transforms (compression) are not supported"
                )));
            }
        }
        let file = match self.field(info, "relative_path")? {
            Value::Str(s) => s.clone(),
            other => return Err(self.bad(format!("relative_path is {}", describe(other)))),
        };
        Ok(Item {
            fqn,
            offsets,
            file,
            offset: self.u64_field(info, "offset")?,
            length: self.u64_field(info, "length")?,
        })
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Object(o) => o.class_name(),
        other => other.type_name().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) fn sample() -> Metadata {
        let mut m = Metadata::default();
        m.entries.insert(
            "model.w".into(),
            Entry::Tensor(TensorEntry {
                dtype: DType::Float32,
                shape: vec![7, 5],
                requires_grad: false,
                chunks: vec![
                    Chunk::new(vec![0, 0], vec![4, 5]),
                    Chunk::new(vec![4, 0], vec![3, 5]),
                ],
            }),
        );
        m.entries.insert("step".into(), Entry::Bytes);
        m.paths
            .insert("model.w".into(), vec!["model".into(), "w".into()]);
        m.paths.insert("step".into(), vec!["step".into()]);
        let item = |fqn: &str, offsets: Option<Vec<usize>>, file: &str, offset| Item {
            fqn: fqn.into(),
            offsets,
            file: file.into(),
            offset,
            length: 100,
        };
        m.items = vec![
            item("model.w", Some(vec![0, 0]), "__0_0.distcp", 0),
            item("model.w", Some(vec![4, 0]), "__1_0.distcp", 0),
            item("step", None, "__1_0.distcp", 128),
        ];
        m.save_id = Some("s1".into());
        m
    }

    #[test]
    fn metadata_round_trips_through_its_pickle() {
        let m = sample();
        let back = Metadata::from_pickle(&m.to_pickle().unwrap(), Path::new("m")).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn inconsistent_metadata_is_refused() {
        let p = Path::new(".metadata");
        let mut m = sample();
        m.items.pop();
        let e = Metadata::from_pickle(&m.to_pickle().unwrap(), p).unwrap_err();
        assert!(e.to_string().contains("no data item"), "{e}");
        let mut m = sample();
        m.items[0].file = "../etc/passwd".into();
        let e = Metadata::from_pickle(&m.to_pickle().unwrap(), p).unwrap_err();
        assert!(e.to_string().contains("plain file name"), "{e}");
        let mut m = sample();
        if let Some(Entry::Tensor(t)) = m.entries.get_mut("model.w") {
            t.chunks[1].sizes[0] = 4;
        }
        let e = Metadata::from_pickle(&m.to_pickle().unwrap(), p).unwrap_err();
        assert!(e.to_string().contains("beyond"), "{e}");
    }

    #[test]
    fn a_global_outside_dcp_metadata_is_refused() {
        let mut v = sample().to_value();
        if let Value::Object(o) = &mut v {
            if let Some(Value::Dict(d)) = &mut o.state {
                d.insert("version", call("os", "system", vec!["true".into()]));
            }
        }
        let e = Metadata::from_pickle(&pickle_value(&v).unwrap(), Path::new("m")).unwrap_err();
        assert!(matches!(e, Error::Unsafe { .. }), "{e}");
        assert!(e.to_string().contains("os.system"), "{e}");
    }
}
