//! The checkpoint tree.
//!
//! A checkpoint is a tree of [`Value`]s, the subset of Python objects that training checkpoints
//! hold: `None`, bools, ints, floats, strings, bytes, lists, tuples, dicts (ordered, with string,
//! integer and other hashable keys) and tensors. Anything else a file holds (for example a
//! hyper-parameter namespace in a Lightning checkpoint loaded with `weights_only=false`) is kept as
//! an inert [`Object`]: its class name and the arguments it was built from. Nothing is executed.
//!
//! ```
//! use ckptio::{Dict, HostTensor, Value};
//! let mut model = Dict::ordered();
//! model.insert("weight", HostTensor::from_slice(&[1.0f32, 2.0], &[2]).unwrap());
//! let mut ckpt = Dict::new();
//! ckpt.insert("state_dict", model);
//! ckpt.insert("global_step", 100i64);
//! let ckpt = Value::from(ckpt);
//! assert_eq!(ckpt.get("global_step").and_then(Value::as_int), Some(100));
//! assert_eq!(ckpt.tensors().count(), 1);
//! ```

use std::fmt;
use std::hash::{Hash, Hasher};

use bytes::Bytes;
use indexmap::IndexMap;

use crate::dcp::ShardedTensor;
use crate::error::Result;
use crate::tensor::{HostTensor, LiveTensor};

/// A dict key: Python dict keys that checkpoints use.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// A `str` key (module names, "state_dict", ...).
    Str(String),
    /// An `int` key (optimizer state dicts key parameters by index).
    Int(i64),
    /// A `bool` key.
    Bool(bool),
    /// `None` as a key.
    None,
    /// A `float` key (compared by bit pattern).
    Float(FloatKey),
    /// A `bytes` key.
    Bytes(Vec<u8>),
    /// A tuple of hashable keys.
    Tuple(Vec<Key>),
}

/// A float used as a dict key, compared and hashed by its bit pattern.
#[derive(Clone, Copy, Debug)]
pub struct FloatKey(pub f64);

impl PartialEq for FloatKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for FloatKey {}
impl Hash for FloatKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

impl Key {
    /// The string, if this is a string key.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Key::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The key as a value.
    pub fn to_value(&self) -> Value {
        match self {
            Key::Str(s) => Value::Str(s.clone()),
            Key::Int(i) => Value::Int(*i),
            Key::Bool(b) => Value::Bool(*b),
            Key::None => Value::None,
            Key::Float(f) => Value::Float(f.0),
            Key::Bytes(b) => Value::Bytes(Bytes::from(b.clone())),
            Key::Tuple(t) => Value::Tuple(t.iter().map(Key::to_value).collect()),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Str(s) => f.write_str(s),
            Key::Int(i) => write!(f, "{i}"),
            Key::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Key::None => f.write_str("None"),
            Key::Float(x) => write!(f, "{}", x.0),
            Key::Bytes(b) => write!(f, "b{:?}", String::from_utf8_lossy(b)),
            Key::Tuple(t) => {
                f.write_str("(")?;
                for (i, k) in t.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}")?;
                }
                f.write_str(")")
            }
        }
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key::Str(s.to_owned())
    }
}
impl From<String> for Key {
    fn from(s: String) -> Key {
        Key::Str(s)
    }
}
impl From<i64> for Key {
    fn from(i: i64) -> Key {
        Key::Int(i)
    }
}
impl From<usize> for Key {
    fn from(i: usize) -> Key {
        Key::Int(i as i64)
    }
}

/// Whether a dict was a plain `dict` or a `collections.OrderedDict` (both keep insertion order;
/// the kind is kept so that a file converted by ckptio loads in Python as the same type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DictKind {
    /// `dict`
    #[default]
    Plain,
    /// `collections.OrderedDict` (what `Module.state_dict()` returns)
    Ordered,
}

/// An insertion-ordered dict.
#[derive(Clone, Debug, Default)]
pub struct Dict {
    kind: DictKind,
    entries: IndexMap<Key, Value>,
    attrs: Option<Box<Value>>,
}

impl Dict {
    /// An empty plain `dict`.
    pub fn new() -> Dict {
        Dict::default()
    }

    /// An empty `collections.OrderedDict`.
    pub fn ordered() -> Dict {
        Dict {
            kind: DictKind::Ordered,
            ..Dict::default()
        }
    }

    /// Plain dict or OrderedDict.
    pub fn kind(&self) -> DictKind {
        self.kind
    }

    /// Sets the kind.
    pub fn set_kind(&mut self, kind: DictKind) {
        self.kind = kind;
    }

    /// Instance attributes of an OrderedDict (`state_dict()._metadata` lives here as
    /// `{"_metadata": ...}`), kept so they survive a round trip.
    pub fn attrs(&self) -> Option<&Value> {
        self.attrs.as_deref()
    }

    /// Sets the instance attributes.
    pub fn set_attrs(&mut self, attrs: Option<Value>) {
        self.attrs = attrs.map(Box::new);
    }

    /// Inserts or replaces (keeping the original position, as Python does).
    pub fn insert(&mut self, key: impl Into<Key>, value: impl Into<Value>) -> Option<Value> {
        self.entries.insert(key.into(), value.into())
    }

    /// The value at `key`.
    pub fn get<'k>(&self, key: impl Into<KeyRef<'k>>) -> Option<&Value> {
        match key.into() {
            KeyRef::Str(s) => self.entries.get(&Key::Str(s.to_owned())),
            KeyRef::Key(k) => self.entries.get(k),
        }
    }

    /// The value at `key`, mutably.
    pub fn get_mut(&mut self, key: &Key) -> Option<&mut Value> {
        self.entries.get_mut(key)
    }

    /// Removes `key`, keeping the order of the others.
    pub fn remove(&mut self, key: &Key) -> Option<Value> {
        self.entries.shift_remove(key)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Key, &Value)> {
        self.entries.iter()
    }

    /// Entries in order, values mutable.
    pub fn iter_mut(&mut self) -> impl ExactSizeIterator<Item = (&Key, &mut Value)> {
        self.entries.iter_mut()
    }

    /// Keys in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &Key> {
        self.entries.keys()
    }

    /// Whether every key is a string.
    pub fn has_string_keys(&self) -> bool {
        self.entries.keys().all(|k| matches!(k, Key::Str(_)))
    }
}

impl PartialEq for Dict {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.attrs == other.attrs
            && self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(other.entries.iter())
                .all(|(a, b)| a == b)
    }
}

impl IntoIterator for Dict {
    type Item = (Key, Value);
    type IntoIter = indexmap::map::IntoIter<Key, Value>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<K: Into<Key>, V: Into<Value>> FromIterator<(K, V)> for Dict {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Dict {
        let mut d = Dict::new();
        for (k, v) in iter {
            d.insert(k, v);
        }
        d
    }
}

/// A borrowed key for lookups: `dict.get("name")` or `dict.get(&Key::Int(0))`.
#[derive(Clone, Copy, Debug)]
pub enum KeyRef<'a> {
    /// A string key.
    Str(&'a str),
    /// Any key.
    Key(&'a Key),
}
impl<'a> From<&'a str> for KeyRef<'a> {
    fn from(s: &'a str) -> Self {
        KeyRef::Str(s)
    }
}
impl<'a> From<&'a Key> for KeyRef<'a> {
    fn from(k: &'a Key) -> Self {
        KeyRef::Key(k)
    }
}

/// How an [`Object`] was built in the pickle stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// A bare reference to a class or function (`GLOBAL` alone), e.g. `torch.float32`.
    Global,
    /// `callable(*args)` (`REDUCE`).
    Reduce,
    /// `cls.__new__(cls, *args)` (`NEWOBJ`).
    NewObj,
}

/// A Python object ckptio does not model, kept inert: what built it and what was set on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Module of the class or function (`"argparse"`).
    pub module: String,
    /// Its name (`"Namespace"`).
    pub name: String,
    /// How it was built.
    pub kind: ObjectKind,
    /// Arguments it was built from.
    pub args: Vec<Value>,
    /// State set by `BUILD` (`__setstate__` / `__dict__`), if any.
    pub state: Option<Value>,
    /// Items appended to it (list subclasses).
    pub list_items: Vec<Value>,
    /// Items set on it (dict subclasses).
    pub dict_items: Vec<(Value, Value)>,
}

impl Object {
    /// An object of class `module.name` built as `kind`, with no arguments, state or items
    /// yet (set the fields that apply).
    ///
    /// ```
    /// use ckptio::{Object, ObjectKind, Value};
    /// let dtype = Object::new("torch", "float32", ObjectKind::Global);
    /// let call = Object { args: vec![Value::Int(0)], ..Object::new("m", "f", ObjectKind::Reduce) };
    /// assert_eq!(call.class_name(), "m.f");
    /// # let _ = dtype;
    /// ```
    pub fn new(module: impl Into<String>, name: impl Into<String>, kind: ObjectKind) -> Object {
        Object {
            module: module.into(),
            name: name.into(),
            kind,
            args: vec![],
            state: None,
            list_items: vec![],
            dict_items: vec![],
        }
    }

    /// `module.name`.
    pub fn class_name(&self) -> String {
        format!("{}.{}", self.module, self.name)
    }
}

/// One node of a checkpoint tree.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Value {
    /// `None`
    #[default]
    None,
    /// `bool`
    Bool(bool),
    /// `int` (ckptio refuses ints that do not fit in 64 bits, with an error)
    Int(i64),
    /// `float`
    Float(f64),
    /// `str`
    Str(String),
    /// `bytes` / `bytearray`
    Bytes(Bytes),
    /// `list`
    List(Vec<Value>),
    /// `tuple` (and `torch.Size`)
    Tuple(Vec<Value>),
    /// `dict` / `OrderedDict`
    Dict(Dict),
    /// A tensor (or Parameter) with its bytes on the host
    Tensor(HostTensor),
    /// Anything else, kept inert
    Object(Box<Object>),
    /// A tensor that lives elsewhere (e.g. a `tch::Tensor`) and is copied when saved.
    Live(LiveTensor),
    /// A tensor split over ranks, of which this rank holds some chunks: saved by
    /// [`DcpCheckpointIo`](crate::dcp::DcpCheckpointIo).
    Sharded(ShardedTensor),
}

impl PartialEq for HostTensor {
    /// Equal dtype, shape, flags and elements (layout and storage identity may differ).
    fn eq(&self, other: &Self) -> bool {
        self.requires_grad() == other.requires_grad()
            && self.is_parameter() == other.is_parameter()
            && self.data_eq(other)
    }
}

impl Value {
    /// The dict, if this is one.
    pub fn as_dict(&self) -> Option<&Dict> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }
    /// The dict, mutably.
    pub fn as_dict_mut(&mut self) -> Option<&mut Dict> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }
    /// The tensor, if this is one.
    pub fn as_tensor(&self) -> Option<&HostTensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }
    /// The int, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    /// The float (ints convert), if this is a number.
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The items of a list or tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// `self[key]` for a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict().and_then(|d| d.get(key))
    }

    /// A short name of the variant, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Tensor(_) => "tensor",
            Value::Object(_) => "object",
            Value::Live(_) => "live tensor",
            Value::Sharded(_) => "sharded tensor",
        }
    }

    /// Every tensor in the tree, depth first, in order.
    pub fn tensors(&self) -> impl Iterator<Item = &HostTensor> {
        let mut out = Vec::new();
        self.visit(&mut |v| {
            if let Value::Tensor(t) = v {
                out.push(t);
            }
        });
        out.into_iter()
    }

    /// Every tensor with its key path (`"state_dict.layer.weight"`, list items by index).
    pub fn named_tensors(&self) -> Vec<(String, &HostTensor)> {
        let mut out = Vec::new();
        fn walk<'a>(v: &'a Value, path: &mut String, out: &mut Vec<(String, &'a HostTensor)>) {
            let mut child = |name: &dyn fmt::Display, v: &'a Value, path: &mut String| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&name.to_string());
                walk(v, path, out);
                path.truncate(len);
            };
            match v {
                Value::Tensor(t) => out.push((path.clone(), t)),
                Value::Dict(d) => {
                    for (k, v) in d.iter() {
                        child(k, v, path);
                    }
                }
                Value::List(items) | Value::Tuple(items) => {
                    for (i, v) in items.iter().enumerate() {
                        child(&i, v, path);
                    }
                }
                Value::Object(o) => {
                    for (i, v) in o.args.iter().enumerate() {
                        child(&i, v, path);
                    }
                    if let Some(s) = &o.state {
                        child(&"__state__", s, path);
                    }
                }
                _ => {}
            }
        }
        walk(self, &mut String::new(), &mut out);
        out
    }

    /// Calls `f` on every node, parents before children.
    pub fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Value)) {
        f(self);
        match self {
            Value::List(items) | Value::Tuple(items) => items.iter().for_each(|v| v.visit(f)),
            Value::Dict(d) => {
                d.iter().for_each(|(_, v)| v.visit(f));
                if let Some(a) = d.attrs() {
                    a.visit(f);
                }
            }
            Value::Object(o) => {
                o.args.iter().for_each(|v| v.visit(f));
                if let Some(s) = &o.state {
                    s.visit(f);
                }
                o.list_items.iter().for_each(|v| v.visit(f));
                o.dict_items.iter().for_each(|(k, v)| {
                    k.visit(f);
                    v.visit(f);
                });
            }
            Value::Sharded(s) => s.shards().iter().for_each(|c| c.tensor.visit(f)),
            _ => {}
        }
    }

    /// Whether the tree holds live tensors that must be snapshotted before writing.
    pub fn has_live(&self) -> bool {
        let mut any = false;
        self.visit(&mut |v| any |= matches!(v, Value::Live(_)));
        any
    }

    /// Every distinct live tensor (by identity), in order.
    pub fn live_tensors(&self) -> Vec<LiveTensor> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        self.visit(&mut |v| {
            if let Value::Live(l) = v {
                if seen.insert(l.id()) {
                    out.push(l.clone());
                }
            }
        });
        out
    }

    /// A copy of the tree with every live tensor replaced by `snap(live)`; each distinct live
    /// tensor is snapshotted once, and the copies share its snapshot.
    pub fn replace_live(
        &self,
        snap: &mut dyn FnMut(&LiveTensor) -> Result<HostTensor>,
    ) -> Result<Value> {
        let mut cache: std::collections::HashMap<usize, HostTensor> = Default::default();
        let mut out = self.clone();
        let mut err = None;
        out.for_each_node_mut(&mut |v| {
            if err.is_some() {
                return;
            }
            if let Value::Live(l) = v {
                let t = match cache.get(&l.id()) {
                    Some(t) => t.clone(),
                    None => match snap(l) {
                        Ok(t) => {
                            cache.insert(l.id(), t.clone());
                            t
                        }
                        Err(e) => {
                            err = Some(e);
                            return;
                        }
                    },
                };
                *v = Value::Tensor(t);
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The tree with live tensors copied into new host memory (what a synchronous backend
    /// writes); borrowed unchanged when there are none.
    pub fn materialize(&self) -> Result<std::borrow::Cow<'_, Value>> {
        if self.has_live() {
            Ok(std::borrow::Cow::Owned(
                self.replace_live(&mut |l| l.to_host())?,
            ))
        } else {
            Ok(std::borrow::Cow::Borrowed(self))
        }
    }

    /// The tree with live tensors borrowed in place where they can be (host memory, row-major),
    /// copied otherwise: what a synchronous save writes from.
    ///
    /// # Safety
    ///
    /// The result aliases the live tensors' memory: it must be dropped before any of them can be
    /// written again (see [`HostMemory::borrow_bytes`](crate::HostMemory::borrow_bytes)).
    #[allow(unsafe_code)]
    pub(crate) unsafe fn materialize_borrowed(&self) -> Result<std::borrow::Cow<'_, Value>> {
        if self.has_live() {
            Ok(std::borrow::Cow::Owned(self.replace_live(&mut |l| {
                // SAFETY: the caller drops the tree before the tensors can be written.
                unsafe { l.borrow_host() }
            })?))
        } else {
            Ok(std::borrow::Cow::Borrowed(self))
        }
    }

    fn for_each_node_mut(&mut self, f: &mut impl FnMut(&mut Value)) {
        f(self);
        match self {
            Value::List(items) | Value::Tuple(items) => {
                items.iter_mut().for_each(|v| v.for_each_node_mut(f))
            }
            Value::Dict(d) => {
                d.iter_mut().for_each(|(_, v)| v.for_each_node_mut(f));
                if let Some(a) = d.attrs.as_deref_mut() {
                    a.for_each_node_mut(f);
                }
            }
            Value::Object(o) => {
                o.args.iter_mut().for_each(|v| v.for_each_node_mut(f));
                if let Some(s) = &mut o.state {
                    s.for_each_node_mut(f);
                }
                o.list_items.iter_mut().for_each(|v| v.for_each_node_mut(f));
                o.dict_items.iter_mut().for_each(|(k, v)| {
                    k.for_each_node_mut(f);
                    v.for_each_node_mut(f);
                });
            }
            Value::Sharded(s) => s
                .shards_mut()
                .iter_mut()
                .for_each(|c| c.tensor.for_each_node_mut(f)),
            _ => {}
        }
    }

    /// Calls `f` on every tensor, mutably (to move or rewrite tensors in place).
    pub fn for_each_tensor_mut(&mut self, f: &mut impl FnMut(&mut HostTensor)) {
        self.for_each_node_mut(&mut |v| {
            if let Value::Tensor(t) = v {
                f(t)
            }
        });
    }
}

macro_rules! from_impl {
    ($t:ty, $v:ident, $conv:expr) => {
        impl From<$t> for Value {
            fn from(x: $t) -> Value {
                #[allow(clippy::redundant_closure_call)]
                Value::$v($conv(x))
            }
        }
    };
}
from_impl!(bool, Bool, |x| x);
from_impl!(i64, Int, |x| x);
from_impl!(i32, Int, |x: i32| x as i64);
from_impl!(f64, Float, |x| x);
from_impl!(f32, Float, |x: f32| x as f64);
from_impl!(String, Str, |x| x);
from_impl!(&str, Str, |x: &str| x.to_owned());
from_impl!(Bytes, Bytes, |x| x);
from_impl!(Vec<Value>, List, |x| x);
from_impl!(Dict, Dict, |x| x);
from_impl!(HostTensor, Tensor, |x| x);
from_impl!(LiveTensor, Live, |x| x);
from_impl!(ShardedTensor, Sharded, |x| x);

impl From<()> for Value {
    fn from(_: ()) -> Value {
        Value::None
    }
}
