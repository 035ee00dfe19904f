//! A pickle reader that never executes anything.
//!
//! It runs the pickle machine over an in-memory stream into a private object graph ([`Py`]),
//! then turns the graph into a [`Value`] tree. Calls (`REDUCE`, `NEWOBJ`) are never executed:
//! the known tensor rebuild functions are interpreted, and everything else becomes an inert
//! [`Object`].
//!
//! # Limits (hostile input is the normal case)
//! - every length read from the stream is checked against the bytes that remain;
//! - nesting deeper than [`Limits::max_depth`] is refused;
//! - the tree built from the graph may not exceed [`Limits::max_output_bytes`] (memo references
//!   to one object are expanded into copies, so a "billion laughs" pickle is stopped there);
//! - graph containers drop iteratively, and reference cycles are broken before the graph is
//!   released, so no input can overflow the stack or leak.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use bytes::Bytes;

use super::opcodes as op;
use crate::tensor::{DType, HostTensor, Storage};
use crate::value::{Dict, DictKind, FloatKey, Key, Object, ObjectKind, Value};

/// Limits on what one pickle stream may make the reader do.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Deepest nesting of containers accepted (default 256; real checkpoints nest a few levels,
    /// and `torch.load` itself crashes near 900).
    pub max_depth: usize,
    /// Largest tree, in bytes of memory, that one stream may expand into (default 64 MiB); the
    /// effective cap is `max(max_output_bytes, 64 * stream length)`. Tensor data is not counted:
    /// it is sliced from the file, never copied.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 256,
            max_output_bytes: 64 << 20,
        }
    }
}

/// Why a stream was refused.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Malformed stream or a limit hit, at a byte offset.
    Bad { offset: u64, reason: String },
    /// Refused under weights_only.
    Unsafe(String),
    /// A storage or tensor did not check out.
    Tensor { what: String, reason: String },
}

impl ReadError {
    /// The crate's error for a stream of the file at `path`.
    pub(crate) fn at(self, path: &std::path::Path) -> crate::Error {
        match self {
            ReadError::Bad { offset, reason } => crate::Error::Pickle {
                path: path.to_path_buf(),
                offset,
                reason,
            },
            ReadError::Unsafe(what) => crate::Error::Unsafe {
                path: path.to_path_buf(),
                what,
            },
            ReadError::Tensor { what, reason } => crate::Error::tensor(path, what, reason),
        }
    }
}

type R<T> = std::result::Result<T, ReadError>;

/// Resolves a storage key to its bytes (the archive's `data/<key>` record).
pub(crate) trait StorageSource {
    /// The storage `key`, which the pickle says holds `nbytes` bytes at `location`.
    fn storage(&mut self, key: &str, location: &str, nbytes: u64) -> Result<Storage, String>;
}

// ---------------------------------------------------------------------------------------------
// The object graph

#[derive(Clone)]
enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Bytes),
    Tuple(Rc<Seq>),
    List(Rc<RefCell<Seq>>),
    Dict(Rc<RefCell<PyDict>>),
    Global(Rc<(String, String)>),
    Storage(Rc<(Storage, Option<DType>)>),
    Tensor(Rc<HostTensor>),
    Object(Rc<RefCell<PyObject>>),
}

/// A sequence whose drop never recurses deeply (see [`drain`]).
#[derive(Default)]
struct Seq(Vec<Py>);

#[derive(Default)]
struct PyDict {
    kind: DictKind,
    items: Vec<(Py, Py)>,
    attrs: Option<Py>,
}

struct PyObject {
    module: String,
    name: String,
    kind: ObjectKind,
    args: Vec<Py>,
    state: Option<Py>,
    list_items: Vec<Py>,
    dict_items: Vec<(Py, Py)>,
}

impl PyDict {
    /// Moves every value it holds into `work`, leaving it empty.
    fn empty_into(&mut self, work: &mut Vec<Py>) {
        for (k, x) in self.items.drain(..) {
            work.push(k);
            work.push(x);
        }
        work.extend(self.attrs.take());
    }
}

impl PyObject {
    /// Moves every value it holds into `work`, leaving it empty.
    fn empty_into(&mut self, work: &mut Vec<Py>) {
        work.append(&mut self.args);
        work.extend(self.state.take());
        work.append(&mut self.list_items);
        for (k, x) in self.dict_items.drain(..) {
            work.push(k);
            work.push(x);
        }
    }
}

impl Drop for Seq {
    fn drop(&mut self) {
        drain(std::mem::take(&mut self.0));
    }
}
impl Drop for PyDict {
    fn drop(&mut self) {
        let mut v = Vec::new();
        self.empty_into(&mut v);
        drain(v);
    }
}
impl Drop for PyObject {
    fn drop(&mut self) {
        let mut v = Vec::new();
        self.empty_into(&mut v);
        drain(v);
    }
}

/// Moves the contents of a mutable container into `work` (tuples are immutable: untouched).
fn empty_into(p: &Py, work: &mut Vec<Py>) {
    match p {
        Py::List(l) => work.append(&mut l.borrow_mut().0),
        Py::Dict(d) => d.borrow_mut().empty_into(work),
        Py::Object(o) => o.borrow_mut().empty_into(work),
        _ => {}
    }
}

/// Drops a batch of values without recursion: before a container is released, its contents
/// are moved into the work list, so each drop sees an empty container.
fn drain(mut work: Vec<Py>) {
    while let Some(p) = work.pop() {
        match p {
            Py::Tuple(mut t) => {
                if let Some(seq) = Rc::get_mut(&mut t) {
                    work.append(&mut seq.0);
                }
            }
            Py::List(ref l) if Rc::strong_count(l) == 1 => empty_into(&p, &mut work),
            Py::Dict(ref d) if Rc::strong_count(d) == 1 => empty_into(&p, &mut work),
            Py::Object(ref o) if Rc::strong_count(o) == 1 => empty_into(&p, &mut work),
            _ => {}
        }
    }
}

/// Empties every mutable container reachable from `roots`, so that reference cycles (a list
/// that contains itself) cannot leak once the roots are dropped.
fn break_cycles(roots: &[Py]) {
    let mut seen: HashSet<usize> = HashSet::new();
    let mut work: Vec<Py> = roots.to_vec();
    while let Some(p) = work.pop() {
        let id = match &p {
            Py::Tuple(t) => Rc::as_ptr(t) as usize,
            Py::List(l) => Rc::as_ptr(l) as *const u8 as usize,
            Py::Dict(d) => Rc::as_ptr(d) as *const u8 as usize,
            Py::Object(o) => Rc::as_ptr(o) as *const u8 as usize,
            _ => continue,
        };
        if seen.insert(id) {
            match &p {
                Py::Tuple(t) => work.extend(t.0.iter().cloned()),
                other => empty_into(other, &mut work),
            }
        }
        // `p` is dropped here; any container in it was emptied above or is still referenced.
        drain(vec![p]);
    }
}

impl Py {
    fn type_name(&self) -> String {
        match self {
            Py::None => "None".into(),
            Py::Bool(_) => "bool".into(),
            Py::Int(_) => "int".into(),
            Py::Float(_) => "float".into(),
            Py::Str(_) => "str".into(),
            Py::Bytes(_) => "bytes".into(),
            Py::Tuple(_) => "tuple".into(),
            Py::List(_) => "list".into(),
            Py::Dict(d) => match d.borrow().kind {
                DictKind::Plain => "dict".into(),
                DictKind::Ordered => "collections.OrderedDict".into(),
            },
            Py::Global(g) => format!("{}.{}", g.0, g.1),
            Py::Storage(_) => "storage".into(),
            Py::Tensor(_) => "torch.Tensor".into(),
            Py::Object(o) => {
                let o = o.borrow();
                format!("{}.{} instance", o.module, o.name)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The machine

/// Globals PyTorch's weights-only unpickler accepts (`_get_allowed_globals` in torch 2.13).
fn weights_only_allows(module: &str, name: &str) -> bool {
    match module {
        "collections" => matches!(name, "OrderedDict" | "Counter"),
        "torch.nn.parameter" => name == "Parameter",
        "torch.serialization" => name == "_get_layout",
        "_codecs" => name == "encode",
        "builtins" => matches!(name, "bytearray" | "set" | "complex"),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor"
                | "_rebuild_tensor_v2"
                | "_rebuild_tensor_v3"
                | "_rebuild_sparse_tensor"
                | "_rebuild_nested_tensor"
                | "_rebuild_device_tensor_from_cpu_tensor"
                | "_rebuild_device_tensor_from_numpy"
                | "_rebuild_meta_tensor_no_storage"
                | "_rebuild_wrapper_subclass"
                | "_rebuild_qtensor"
                | "_rebuild_parameter"
                | "_rebuild_parameter_with_state"
        ),
        "torch.storage" => matches!(name, "UntypedStorage" | "TypedStorage"),
        "torch" => {
            matches!(name, "Size" | "Tensor" | "device")
                || DType::from_name(name).is_some_and(|d| d.name() == name)
                || (name.starts_with("uint") || name.starts_with("int"))
                    && name[if name.starts_with('u') { 4 } else { 3 }..]
                        .parse::<u8>()
                        .is_ok_and(|b| (1..=7).contains(&b))
                || DType::from_storage_class(name).is_some()
                || matches!(
                    name,
                    "per_tensor_affine"
                        | "per_tensor_symmetric"
                        | "per_channel_affine"
                        | "per_channel_symmetric"
                        | "per_channel_affine_float_qparams"
                        | "quint8"
                        | "qint8"
                        | "qint32"
                        | "quint4x2"
                        | "quint2x4"
                        | "QUInt8Storage"
                        | "QInt8Storage"
                        | "QInt32Storage"
                        | "QUInt4x2Storage"
                        | "QUInt2x4Storage"
                        | "DoubleTensor"
                        | "FloatTensor"
                        | "HalfTensor"
                        | "BFloat16Tensor"
                        | "LongTensor"
                        | "IntTensor"
                        | "ShortTensor"
                        | "CharTensor"
                        | "ByteTensor"
                        | "BoolTensor"
                )
        }
        "torch.cuda" => {
            DType::from_storage_class(name).is_some()
                || name.ends_with("Tensor")
                    && DType::from_storage_class(&name.replace("Tensor", "Storage")).is_some()
        }
        _ => false,
    }
}

/// Python 2 names that Python 3's unpickler maps (`_compat_pickle`), the ones torch files use.
fn compat_name(module: &str, name: &str) -> (String, String) {
    match (module, name) {
        ("__builtin__", n) => ("builtins".into(), n.into()),
        ("copy_reg", n) => ("copyreg".into(), n.into()),
        _ => (module.into(), name.into()),
    }
}

pub(crate) struct Machine<'a, S: StorageSource> {
    data: &'a [u8],
    pos: usize,
    weights_only: bool,
    limits: Limits,
    stack: Vec<Py>,
    marks: Vec<Vec<Py>>,
    memo: HashMap<u32, Py>,
    storages: &'a mut S,
    storage_cache: HashMap<String, Storage>,
    call_depth: usize,
}

impl<S: StorageSource> Drop for Machine<'_, S> {
    fn drop(&mut self) {
        let mut roots: Vec<Py> = std::mem::take(&mut self.stack);
        for m in self.marks.drain(..) {
            roots.extend(m);
        }
        roots.extend(self.memo.drain().map(|(_, v)| v));
        break_cycles(&roots);
        drain(roots);
    }
}

/// Reads one pickle stream into a [`Value`].
pub(crate) fn read_pickle<S: StorageSource>(
    data: &[u8],
    weights_only: bool,
    limits: &Limits,
    storages: &mut S,
) -> R<Value> {
    let mut m = Machine {
        data,
        pos: 0,
        weights_only,
        limits: limits.clone(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages,
        storage_cache: HashMap::new(),
        call_depth: 0,
    };
    let root = m.run()?;
    let budget = limits.max_output_bytes.max(data.len().saturating_mul(64));
    let mut conv = Converter {
        budget,
        depth_limit: limits.max_depth,
        offset: m.pos as u64,
    };
    let out = conv.value(&root, 0);
    drain(vec![root]);
    out
}

impl<'a, S: StorageSource> Machine<'a, S> {
    fn bad<T>(&self, reason: impl Into<String>) -> R<T> {
        Err(ReadError::Bad {
            offset: self.pos as u64,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = match self.pos.checked_add(n) {
            Some(e) if e <= self.data.len() => e,
            _ => {
                return self.bad(format!(
                    "needs {n} more bytes but only {} remain",
                    self.data.len() - self.pos
                ))
            }
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> R<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        match rest.iter().position(|&c| c == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                Ok(&rest[..i])
            }
            None => self.bad("line without a newline"),
        }
    }
    fn len_from(&self, n: u64) -> R<usize> {
        let remain = (self.data.len() - self.pos) as u64;
        if n > remain {
            return self.bad(format!(
                "declared length {n} but only {remain} bytes remain"
            ));
        }
        Ok(n as usize)
    }

    fn push(&mut self, p: Py) {
        self.stack.push(p);
    }
    fn pop(&mut self) -> R<Py> {
        match self.stack.pop() {
            Some(p) => Ok(p),
            None => self.bad("stack underflow"),
        }
    }
    fn top(&mut self) -> R<&Py> {
        match self.stack.last() {
            Some(p) => Ok(p),
            None => self.bad("stack underflow"),
        }
    }
    fn pop_mark(&mut self) -> R<Vec<Py>> {
        match self.marks.pop() {
            Some(prev) => Ok(std::mem::replace(&mut self.stack, prev)),
            None => self.bad("no MARK on the stack"),
        }
    }
    fn string(&self, b: &[u8]) -> R<Py> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Py::Str(Rc::from(s))),
            Err(e) => self.bad(format!("string is not valid UTF-8: {e}")),
        }
    }
    fn memo_get(&self, i: u32) -> R<Py> {
        match self.memo.get(&i) {
            Some(p) => Ok(p.clone()),
            None => self.bad(format!("memo key {i} was never set")),
        }
    }
    fn memo_put(&mut self, i: u32) -> R<()> {
        let top = self.top()?.clone();
        if let Some(old) = self.memo.insert(i, top) {
            drain(vec![old]);
        }
        Ok(())
    }
    fn tuple(items: Vec<Py>) -> Py {
        Py::Tuple(Rc::new(Seq(items)))
    }

    fn run(&mut self) -> R<Py> {
        loop {
            let opcode = self.u8()?;
            if self.weights_only && !op::WEIGHTS_ONLY_OPCODES.contains(&opcode) {
                return Err(ReadError::Unsafe(op::name(opcode)));
            }
            match opcode {
                op::PROTO => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.bad(format!("unsupported pickle protocol {v}"));
                    }
                }
                op::FRAME => {
                    self.u64()?;
                }
                op::STOP => {
                    let root = self.pop()?;
                    return Ok(root);
                }
                op::MARK => {
                    let prev = std::mem::take(&mut self.stack);
                    self.marks.push(prev);
                    if self.marks.len() > self.limits.max_depth.saturating_mul(64) {
                        return self.bad("too many nested MARKs");
                    }
                }
                op::POP => {
                    let p = self.pop()?;
                    drain(vec![p]);
                }
                op::POP_MARK => {
                    let items = self.pop_mark()?;
                    drain(items);
                }
                op::DUP => {
                    let t = self.top()?.clone();
                    self.push(t);
                }
                op::NONE => self.push(Py::None),
                op::NEWTRUE => self.push(Py::Bool(true)),
                op::NEWFALSE => self.push(Py::Bool(false)),
                op::BININT => {
                    let v = self.u32()? as i32;
                    self.push(Py::Int(v as i64))
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Py::Int(v as i64))
                }
                op::BININT2 => {
                    let v = self.u16()?;
                    self.push(Py::Int(v as i64))
                }
                op::LONG1 => {
                    let n = self.u8()? as usize;
                    let v = self.long(n)?;
                    self.push(v)
                }
                op::LONG4 => {
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return self.bad("LONG4 with a negative length");
                    }
                    let n = self.len_from(n as u64)?;
                    let v = self.long(n)?;
                    self.push(v)
                }
                op::INT => {
                    let l = self.line()?.to_vec();
                    let v = match &l[..] {
                        b"00" => Py::Bool(false),
                        b"01" => Py::Bool(true),
                        _ => Py::Int(self.parse_int(&l)?),
                    };
                    self.push(v)
                }
                op::LONG => {
                    let mut l = self.line()?.to_vec();
                    if l.last() == Some(&b'L') {
                        l.pop();
                    }
                    let v = self.parse_int(&l)?;
                    self.push(Py::Int(v))
                }
                op::BINFLOAT => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Py::Float(f64::from_be_bytes(a)))
                }
                op::FLOAT => {
                    let l = self.line()?.to_vec();
                    let s = String::from_utf8_lossy(&l);
                    match s.trim().parse::<f64>() {
                        Ok(f) => self.push(Py::Float(f)),
                        Err(_) => return self.bad(format!("bad FLOAT literal {s:?}")),
                    }
                }
                op::BINUNICODE => {
                    let n = self.u32()? as u64;
                    let n = self.len_from(n)?;
                    let b = self.take(n)?;
                    let s = self.string(b)?;
                    self.push(s)
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let s = self.string(b)?;
                    self.push(s)
                }
                op::BINUNICODE8 => {
                    let n = self.u64()?;
                    let n = self.len_from(n)?;
                    let b = self.take(n)?;
                    let s = self.string(b)?;
                    self.push(s)
                }
                op::SHORT_BINSTRING | op::BINSTRING => {
                    let n = if opcode == op::SHORT_BINSTRING {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let n = self.len_from(n)?;
                    let b = self.take(n)?.to_vec();
                    // torch.load decodes Python 2 strings as UTF-8; keep bytes when they are not.
                    let v = match String::from_utf8(b) {
                        Ok(s) => Py::Str(Rc::from(s)),
                        Err(e) => Py::Bytes(Bytes::from(e.into_bytes())),
                    };
                    self.push(v)
                }
                op::SHORT_BINBYTES => {
                    let n = self.u8()? as usize;
                    let b = Bytes::copy_from_slice(self.take(n)?);
                    self.push(Py::Bytes(b))
                }
                op::BINBYTES => {
                    let n = self.u32()? as u64;
                    let n = self.len_from(n)?;
                    let b = Bytes::copy_from_slice(self.take(n)?);
                    self.push(Py::Bytes(b))
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = self.u64()?;
                    let n = self.len_from(n)?;
                    let b = Bytes::copy_from_slice(self.take(n)?);
                    self.push(Py::Bytes(b))
                }
                op::EMPTY_TUPLE => self.push(Self::tuple(vec![])),
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (opcode - op::TUPLE1 + 1) as usize;
                    if self.stack.len() < n {
                        return self.bad("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Self::tuple(items))
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Self::tuple(items))
                }
                op::EMPTY_LIST => self.push(Py::List(Rc::new(RefCell::new(Seq::default())))),
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push(Py::List(Rc::new(RefCell::new(Seq(items)))))
                }
                op::EMPTY_DICT => self.push(Py::Dict(Rc::new(RefCell::new(PyDict::default())))),
                op::DICT => {
                    let items = self.pop_mark()?;
                    let d = Py::Dict(Rc::new(RefCell::new(PyDict::default())));
                    self.push(d);
                    self.set_items(items)?;
                }
                op::EMPTY_SET => {
                    let set = self.make_set("set", vec![]);
                    self.push(set)
                }
                op::FROZENSET => {
                    let items = self.pop_mark()?;
                    let set = self.make_set("frozenset", items);
                    self.push(set)
                }
                op::ADDITEMS => {
                    let items = self.pop_mark()?;
                    let top = self.top()?.clone();
                    let ok = match &top {
                        Py::Object(o) => {
                            let o = o.borrow();
                            match (o.module.as_str(), o.name.as_str(), o.args.first()) {
                                ("builtins", "set", Some(Py::List(l))) => {
                                    l.borrow_mut().0.extend(items.iter().cloned());
                                    true
                                }
                                _ => false,
                            }
                        }
                        _ => false,
                    };
                    drain(items);
                    if !ok {
                        return self.bad(format!("ADDITEMS to a {}", top.type_name()));
                    }
                }
                op::APPEND => {
                    let item = self.pop()?;
                    self.append(vec![item])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                op::BINPUT => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                op::MEMOIZE => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                op::PUT => {
                    let l = self.line()?.to_vec();
                    let i = self.parse_int(&l)?;
                    let i = u32::try_from(i).or_else(|_| self.bad("bad PUT index"))?;
                    self.memo_put(i)?;
                }
                op::BINGET => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.push(v)
                }
                op::LONG_BINGET => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.push(v)
                }
                op::GET => {
                    let l = self.line()?.to_vec();
                    let i = self.parse_int(&l)?;
                    let i = u32::try_from(i).or_else(|_| self.bad("bad GET index"))?;
                    let v = self.memo_get(i)?;
                    self.push(v)
                }
                op::GLOBAL => {
                    let module = String::from_utf8_lossy(self.line()?).into_owned();
                    let name = String::from_utf8_lossy(self.line()?).into_owned();
                    let g = self.global(&module, &name)?;
                    self.push(g)
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Py::Str(m), Py::Str(n)) => {
                            let g = self.global(&m.clone(), &n.clone())?;
                            self.push(g)
                        }
                        _ => return self.bad("STACK_GLOBAL needs two strings"),
                    }
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let args = self.args_of(args)?;
                    let r = self.call(func, args, ObjectKind::Reduce)?;
                    self.push(r)
                }
                op::NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let args = self.args_of(args)?;
                    let r = self.call(cls, args, ObjectKind::NewObj)?;
                    self.push(r)
                }
                op::NEWOBJ_EX => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let mut args = self.args_of(args)?;
                    args.push(kwargs);
                    let r = self.call(cls, args, ObjectKind::NewObj)?;
                    self.push(r)
                }
                op::BUILD => {
                    let state = self.pop()?;
                    self.build(state)?;
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let s = self.persistent_load(pid)?;
                    self.push(s)
                }
                other => {
                    return self.bad(format!("{} is not supported", op::name(other)));
                }
            }
        }
    }

    fn parse_int(&self, l: &[u8]) -> R<i64> {
        let s = String::from_utf8_lossy(l);
        match s.trim().parse::<i64>() {
            Ok(v) => Ok(v),
            Err(_) => self.bad(format!(
                "bad integer literal {s:?} (or it does not fit in 64 bits)"
            )),
        }
    }

    /// Little-endian two's complement of `n` bytes, as LONG1/LONG4 encode.
    fn long(&mut self, n: usize) -> R<Py> {
        let b = self.take(n)?.to_vec();
        if b.is_empty() {
            return Ok(Py::Int(0));
        }
        let neg = b[b.len() - 1] & 0x80 != 0;
        let fill = if neg { 0xff } else { 0 };
        // Strip redundant sign bytes, then it must fit in 8.
        let mut len = b.len();
        while len > 8 && b[len - 1] == fill && (b[len - 2] & 0x80 != 0) == neg {
            len -= 1;
        }
        if len > 8 {
            return self.bad("integer does not fit in 64 bits");
        }
        let mut a = [fill; 8];
        a[..len].copy_from_slice(&b[..len]);
        Ok(Py::Int(i64::from_le_bytes(a)))
    }

    fn make_set(&self, name: &str, items: Vec<Py>) -> Py {
        Py::Object(Rc::new(RefCell::new(PyObject {
            module: "builtins".into(),
            name: name.into(),
            kind: ObjectKind::Reduce,
            args: vec![Py::List(Rc::new(RefCell::new(Seq(items))))],
            state: None,
            list_items: vec![],
            dict_items: vec![],
        })))
    }

    fn global(&mut self, module: &str, name: &str) -> R<Py> {
        let (module, name) = compat_name(module, name);
        if self.weights_only && !weights_only_allows(&module, &name) {
            return Err(ReadError::Unsafe(format!("global {module}.{name}")));
        }
        Ok(Py::Global(Rc::new((module, name))))
    }

    fn args_of(&self, args: Py) -> R<Vec<Py>> {
        match args {
            Py::Tuple(t) => Ok(t.0.clone()),
            other => self.bad(format!(
                "call arguments must be a tuple, got {}",
                other.type_name()
            )),
        }
    }

    fn append(&mut self, items: Vec<Py>) -> R<()> {
        let top = self.top()?.clone();
        match &top {
            Py::List(l) => {
                l.borrow_mut().0.extend(items);
                Ok(())
            }
            Py::Object(o) if !self.weights_only => {
                o.borrow_mut().list_items.extend(items);
                Ok(())
            }
            other => {
                let msg = format!("can only append to lists, got {}", other.type_name());
                drain(items);
                if self.weights_only {
                    Err(ReadError::Unsafe(msg))
                } else {
                    self.bad(msg)
                }
            }
        }
    }

    fn set_items(&mut self, items: Vec<Py>) -> R<()> {
        if items.len() % 2 != 0 {
            return self.bad("odd number of items for SETITEMS");
        }
        let top = self.top()?.clone();
        let counter = |o: &PyObject| o.module == "collections" && o.name == "Counter";
        let mut it = items.into_iter();
        match &top {
            Py::Dict(d) => {
                let mut d = d.borrow_mut();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.items.push((k, v));
                }
                Ok(())
            }
            Py::Object(o) if !self.weights_only || counter(&o.borrow()) => {
                let mut o = o.borrow_mut();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    o.dict_items.push((k, v));
                }
                Ok(())
            }
            other => {
                let msg = format!("can only set items on dicts, got {}", other.type_name());
                drain(it.collect());
                if self.weights_only {
                    Err(ReadError::Unsafe(msg))
                } else {
                    self.bad(msg)
                }
            }
        }
    }

    fn build(&mut self, state: Py) -> R<()> {
        let top = self.top()?.clone();
        match &top {
            Py::Dict(d) if d.borrow().kind == DictKind::Ordered => {
                let mut d = d.borrow_mut();
                if let Some(old) = d.attrs.replace(state) {
                    drain(vec![old]);
                }
                Ok(())
            }
            // Parameter.__setstate__ / legacy Tensor state: nothing we keep.
            Py::Tensor(_) => {
                drain(vec![state]);
                Ok(())
            }
            Py::Object(o) => {
                let mut o = o.borrow_mut();
                if self.weights_only {
                    let (m, n) = (o.module.clone(), o.name.clone());
                    if !weights_only_allows(&m, &n) {
                        drop(o);
                        drain(vec![state]);
                        return Err(ReadError::Unsafe(format!("BUILD of a {m}.{n} instance")));
                    }
                }
                if let Some(old) = o.state.replace(state) {
                    drain(vec![old]);
                }
                Ok(())
            }
            other => {
                let msg = format!("BUILD of a {}", other.type_name());
                drain(vec![state]);
                if self.weights_only {
                    Err(ReadError::Unsafe(msg))
                } else {
                    // A plain dict/list with instance state cannot exist in Python; refuse.
                    self.bad(msg)
                }
            }
        }
    }

    fn persistent_load(&mut self, pid: Py) -> R<Py> {
        let items = match &pid {
            Py::Tuple(t) => t.0.clone(),
            other => {
                return self.bad(format!(
                    "persistent id must be a tuple, got {}",
                    other.type_name()
                ))
            }
        };
        drain(vec![pid]);
        let [kind, class, key, location, numel] = match <[Py; 5]>::try_from(items) {
            Ok(a) => a,
            Err(v) => {
                let n = v.len();
                drain(v);
                return self.bad(format!("persistent id has {n} fields, expected 5 ('storage', class, key, location, numel)"));
            }
        };
        match &kind {
            Py::Str(s) if &**s == "storage" => {}
            Py::Bytes(b) if &b[..] == b"storage" => {}
            _ => {
                return Err(ReadError::Unsafe(
                    "persistent id that is not a storage".into(),
                ))
            }
        }
        let dtype = match &class {
            Py::Global(g) => match (g.0.as_str(), g.1.as_str()) {
                ("torch" | "torch.storage", "UntypedStorage") => None,
                ("torch" | "torch.cuda", name) => match DType::from_storage_class(name) {
                    Some(d) => Some(d),
                    None => return self.bad(format!("unknown storage class torch.{name}")),
                },
                (m, n) => return self.bad(format!("unknown storage class {m}.{n}")),
            },
            other => {
                return self.bad(format!(
                    "storage class must be a global, got {}",
                    other.type_name()
                ))
            }
        };
        let key = match &key {
            Py::Str(s) => s.to_string(),
            other => {
                return self.bad(format!(
                    "storage key must be a string, got {}",
                    other.type_name()
                ))
            }
        };
        let location = match &location {
            Py::Str(s) => s.to_string(),
            other => {
                return self.bad(format!(
                    "storage location must be a string, got {}",
                    other.type_name()
                ))
            }
        };
        let numel = match numel {
            Py::Int(n) if n >= 0 => n as u64,
            _ => return self.bad("storage size must be a non-negative int"),
        };
        let elem = dtype.map_or(1, DType::size) as u64;
        let nbytes = match numel.checked_mul(elem) {
            Some(n) => n,
            None => return self.bad("storage size overflows"),
        };
        let storage = match self.storage_cache.get(&key) {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .storages
                    .storage(&key, &location, nbytes)
                    .map_err(|reason| ReadError::Tensor {
                        what: format!("storage {key}"),
                        reason,
                    })?;
                self.storage_cache.insert(key.clone(), s.clone());
                s
            }
        };
        if (storage.len() as u64) < nbytes {
            return Err(ReadError::Tensor {
                what: format!("storage {key}"),
                reason: format!("declares {nbytes} bytes but holds {}", storage.len()),
            });
        }
        Ok(Py::Storage(Rc::new((storage, dtype))))
    }

    /// Interprets a call. Known constructors become values; anything else an inert object.
    fn call(&mut self, func: Py, args: Vec<Py>, kind: ObjectKind) -> R<Py> {
        let g = match &func {
            Py::Global(g) => g.clone(),
            other => {
                let msg = format!(
                    "call of a {} (only globals can be called)",
                    other.type_name()
                );
                drain(args);
                return if self.weights_only {
                    Err(ReadError::Unsafe(msg))
                } else {
                    self.bad(msg)
                };
            }
        };
        let (module, name) = (g.0.as_str(), g.1.as_str());
        let r = match (module, name) {
            ("collections", "OrderedDict") => {
                let mut pd = PyDict::default();
                pd.kind = DictKind::Ordered;
                let d = Py::Dict(Rc::new(RefCell::new(pd)));
                // OrderedDict([(k, v), ...]) as older protocols write it.
                if let Some(Py::List(l)) = args.first() {
                    let pairs = l.borrow().0.clone();
                    self.push(d.clone());
                    for p in pairs {
                        match &p {
                            Py::Tuple(t) if t.0.len() == 2 => {
                                self.set_items(t.0.clone())?;
                            }
                            Py::List(t) if t.borrow().0.len() == 2 => {
                                let kv = t.borrow().0.clone();
                                self.set_items(kv)?;
                            }
                            _ => return self.bad("OrderedDict argument is not a list of pairs"),
                        }
                    }
                    self.pop()?;
                }
                d
            }
            ("torch._utils", "_rebuild_tensor")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_tensor_v3") => self.rebuild_tensor(name, &args)?,
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state")
            | ("torch.nn.parameter", "Parameter") => {
                let rg = match args.get(1) {
                    Some(Py::Bool(b)) => *b,
                    None => true,
                    _ => return self.bad("Parameter requires_grad must be a bool"),
                };
                match args.first() {
                    Some(Py::Tensor(t)) => Py::Tensor(Rc::new(
                        (**t).clone().with_parameter(true).with_requires_grad(rg),
                    )),
                    _ => self.object(&g, args, kind),
                }
            }
            ("torch._tensor", "_rebuild_from_type_v2") => {
                // (func, new_type, args, state): result = func(*args), then retyped.
                let (f, ty, a) = match (args.first(), args.get(1), args.get(2)) {
                    (Some(f), Some(ty), Some(Py::Tuple(a))) => (f.clone(), ty.clone(), a.0.clone()),
                    _ => return self.bad("bad _rebuild_from_type_v2 arguments"),
                };
                if self.call_depth >= 16 {
                    return self.bad("_rebuild_from_type_v2 nested too deeply");
                }
                self.call_depth += 1;
                let inner = self.call(f, a, ObjectKind::Reduce);
                self.call_depth -= 1;
                let inner = inner?;
                match (&inner, &ty) {
                    (Py::Tensor(t), Py::Global(tg)) if tg.0 == "torch.nn.parameter" => {
                        Py::Tensor(Rc::new((**t).clone().with_parameter(true)))
                    }
                    (Py::Tensor(_), Py::Global(tg)) if tg.0 == "torch" && tg.1 == "Tensor" => inner,
                    _ => {
                        drain(vec![inner]);
                        self.object(&g, args, kind)
                    }
                }
            }
            ("_codecs", "encode") => match (args.first(), args.get(1)) {
                (Some(Py::Str(s)), enc) => {
                    let enc = match enc {
                        Some(Py::Str(e)) => e.to_ascii_lowercase().replace(['-', '_'], ""),
                        None => "utf8".into(),
                        _ => return self.bad("_codecs.encode encoding must be a string"),
                    };
                    Py::Bytes(self.encode(s, &enc)?)
                }
                _ => self.object(&g, args, kind),
            },
            ("builtins", "bytearray") | ("builtins", "bytes") => {
                match (args.first(), args.get(1)) {
                    (None, _) => Py::Bytes(Bytes::new()),
                    (Some(Py::Bytes(b)), None) => Py::Bytes(b.clone()),
                    (Some(Py::Str(s)), Some(Py::Str(e))) => {
                        let e = e.to_ascii_lowercase().replace(['-', '_'], "");
                        Py::Bytes(self.encode(s, &e)?)
                    }
                    _ => self.object(&g, args, kind),
                }
            }
            ("torch", "Size") => match args.first() {
                Some(Py::Tuple(t)) => Py::Tuple(t.clone()),
                None => Self::tuple(vec![]),
                _ => return self.bad("torch.Size argument must be a tuple"),
            },
            _ => {
                if self.weights_only && !weights_only_allows(module, name) {
                    return Err(ReadError::Unsafe(format!("call of {module}.{name}")));
                }
                self.object(&g, args, kind)
            }
        };
        Ok(r)
    }

    fn encode(&self, s: &str, enc: &str) -> R<Bytes> {
        match enc {
            "latin1" | "iso88591" | "l1" => {
                let mut out = Vec::with_capacity(s.len());
                for c in s.chars() {
                    let c = c as u32;
                    if c > 0xff {
                        return self.bad("latin-1 bytes hold a character above U+00FF");
                    }
                    out.push(c as u8);
                }
                Ok(Bytes::from(out))
            }
            "utf8" | "ascii" => Ok(Bytes::copy_from_slice(s.as_bytes())),
            other => self.bad(format!("unsupported encoding {other:?}")),
        }
    }

    fn object(&self, g: &Rc<(String, String)>, args: Vec<Py>, kind: ObjectKind) -> Py {
        Py::Object(Rc::new(RefCell::new(PyObject {
            module: g.0.clone(),
            name: g.1.clone(),
            kind,
            args,
            state: None,
            list_items: vec![],
            dict_items: vec![],
        })))
    }

    fn usize_tuple(&self, p: Option<&Py>, what: &str) -> R<Vec<usize>> {
        let items = match p {
            Some(Py::Tuple(t)) => t.0.clone(),
            Some(Py::List(l)) => l.borrow().0.clone(),
            _ => return self.bad(format!("tensor {what} must be a tuple of ints")),
        };
        items
            .iter()
            .map(|x| match x {
                Py::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => self.bad(format!("tensor {what} must hold non-negative ints")),
            })
            .collect()
    }

    fn rebuild_tensor(&mut self, which: &str, args: &[Py]) -> R<Py> {
        let (storage, sdtype) = match args.first() {
            Some(Py::Storage(s)) => (s.0.clone(), s.1),
            Some(other) => {
                return self.bad(format!(
                    "{which}: first argument must be a storage, got {}",
                    other.type_name()
                ))
            }
            None => return self.bad(format!("{which}: no arguments")),
        };
        let offset = match args.get(1) {
            Some(Py::Int(i)) if *i >= 0 => *i as usize,
            _ => {
                return self.bad(format!(
                    "{which}: storage offset must be a non-negative int"
                ))
            }
        };
        let shape = self.usize_tuple(args.get(2), "size")?;
        let strides = self.usize_tuple(args.get(3), "stride")?;
        let requires_grad = match args.get(4) {
            Some(Py::Bool(b)) => *b,
            None => false,
            _ => return self.bad(format!("{which}: requires_grad must be a bool")),
        };
        let dtype = if which == "_rebuild_tensor_v3" {
            match args.get(6) {
                Some(Py::Global(g)) if g.0 == "torch" => match DType::from_name(&g.1) {
                    Some(d) => d,
                    None => return self.bad(format!("unknown dtype torch.{}", g.1)),
                },
                _ => return self.bad("_rebuild_tensor_v3: 7th argument must be a dtype"),
            }
        } else {
            match sdtype {
                Some(d) => d,
                None => DType::UInt8,
            }
        };
        let t = HostTensor::from_parts(storage, dtype, shape, strides, offset).map_err(|e| {
            ReadError::Tensor {
                what: format!("{which} argument"),
                reason: match e {
                    crate::error::Error::Tensor { reason, .. } => reason,
                    other => other.to_string(),
                },
            }
        })?;
        Ok(Py::Tensor(Rc::new(t.with_requires_grad(requires_grad))))
    }
}

// ---------------------------------------------------------------------------------------------
// Graph -> tree

struct Converter {
    budget: usize,
    depth_limit: usize,
    offset: u64,
}

/// Whether `p` can be a [`Key`] (hashable plain values and tuples of them); tuples nested
/// deeper than `depth_left` say no, and the conversion then refuses them by its depth limit.
fn keyable(p: &Py, depth_left: usize) -> bool {
    match p {
        Py::Str(_) | Py::Int(_) | Py::Bool(_) | Py::None | Py::Float(_) | Py::Bytes(_) => true,
        Py::Tuple(t) => depth_left > 0 && t.0.iter().all(|x| keyable(x, depth_left - 1)),
        _ => false,
    }
}

impl Converter {
    fn global_value(&mut self, g: &(String, String)) -> R<Value> {
        self.charge(g.0.len() + g.1.len())?;
        Ok(Value::Object(Box::new(Object::new(
            g.0.clone(),
            g.1.clone(),
            ObjectKind::Global,
        ))))
    }

    fn charge(&mut self, bytes: usize) -> R<()> {
        let cost = bytes.saturating_add(48);
        if cost > self.budget {
            return Err(ReadError::Bad {
                offset: self.offset,
                reason: "the object graph expands beyond the output limit (memo reuse bomb?)"
                    .into(),
            });
        }
        self.budget -= cost;
        Ok(())
    }

    fn depth(&self, depth: usize) -> R<()> {
        if depth > self.depth_limit {
            return Err(ReadError::Bad {
                offset: self.offset,
                reason: format!(
                    "nesting deeper than {} levels (or a cycle)",
                    self.depth_limit
                ),
            });
        }
        Ok(())
    }

    fn seq(&mut self, items: &[Py], depth: usize) -> R<Vec<Value>> {
        self.charge(items.len().saturating_mul(std::mem::size_of::<Value>()))?;
        items.iter().map(|p| self.value(p, depth + 1)).collect()
    }

    fn value(&mut self, p: &Py, depth: usize) -> R<Value> {
        self.depth(depth)?;
        self.charge(0)?;
        Ok(match p {
            Py::None => Value::None,
            Py::Bool(b) => Value::Bool(*b),
            Py::Int(i) => Value::Int(*i),
            Py::Float(f) => Value::Float(*f),
            Py::Str(s) => {
                self.charge(s.len())?;
                Value::Str(s.to_string())
            }
            Py::Bytes(b) => Value::Bytes(b.clone()),
            Py::Tuple(t) => Value::Tuple(self.seq(&t.0, depth)?),
            Py::List(l) => Value::List(self.seq(&l.borrow().0, depth)?),
            Py::Dict(d)
                if !d
                    .borrow()
                    .items
                    .iter()
                    .all(|(k, _)| keyable(k, self.depth_limit)) =>
            {
                // Keys ckptio's `Dict` cannot hold (objects, as DCP's metadata has): kept as
                // the items of an inert `builtins.dict` object.
                let d = d.borrow();
                if d.attrs.is_some() {
                    return Err(ReadError::Bad {
                        offset: self.offset,
                        reason: "a dict with object keys carries attributes".into(),
                    });
                }
                let mut dict_items = Vec::with_capacity(d.items.len());
                self.charge(
                    d.items
                        .len()
                        .saturating_mul(2 * std::mem::size_of::<Value>()),
                )?;
                for (k, v) in &d.items {
                    dict_items.push((self.value(k, depth + 1)?, self.value(v, depth + 1)?));
                }
                Value::Object(Box::new(Object {
                    dict_items,
                    ..Object::new("builtins", "dict", ObjectKind::Reduce)
                }))
            }
            Py::Dict(d) => {
                let d = d.borrow();
                let mut out = Dict::new();
                out.set_kind(d.kind);
                self.charge(
                    d.items
                        .len()
                        .saturating_mul(std::mem::size_of::<(Key, Value)>() + 16),
                )?;
                for (k, v) in &d.items {
                    let key = self.key(k, depth + 1)?;
                    let v = self.value(v, depth + 1)?;
                    out.insert(key, v);
                }
                if let Some(a) = &d.attrs {
                    out.set_attrs(Some(self.value(a, depth + 1)?));
                }
                Value::Dict(out)
            }
            Py::Global(g) => self.global_value(g)?,
            // A storage outside a tensor (e.g. `torch.save(t.untyped_storage())`): a 1-D tensor.
            Py::Storage(s) => {
                let dtype = s.1.unwrap_or(DType::UInt8);
                let n = s.0.len() / dtype.size();
                let t = HostTensor::from_parts(s.0.clone(), dtype, vec![n], vec![1], 0).map_err(
                    |e| ReadError::Tensor {
                        what: "storage".into(),
                        reason: e.to_string(),
                    },
                )?;
                Value::Tensor(t)
            }
            Py::Tensor(t) => {
                self.charge(t.shape().len() * 16)?;
                Value::Tensor((**t).clone())
            }
            Py::Object(o) => {
                let o = o.borrow();
                self.charge(o.module.len() + o.name.len())?;
                let args = self.seq(&o.args, depth)?;
                let state = match &o.state {
                    Some(s) => Some(self.value(s, depth + 1)?),
                    None => None,
                };
                let list_items = self.seq(&o.list_items, depth)?;
                let mut dict_items = Vec::with_capacity(o.dict_items.len());
                for (k, v) in &o.dict_items {
                    dict_items.push((self.value(k, depth + 1)?, self.value(v, depth + 1)?));
                }
                Value::Object(Box::new(Object {
                    module: o.module.clone(),
                    name: o.name.clone(),
                    kind: o.kind,
                    args,
                    state,
                    list_items,
                    dict_items,
                }))
            }
        })
    }

    fn key(&mut self, p: &Py, depth: usize) -> R<Key> {
        self.depth(depth)?;
        Ok(match p {
            Py::Str(s) => {
                self.charge(s.len())?;
                Key::Str(s.to_string())
            }
            Py::Int(i) => Key::Int(*i),
            Py::Bool(b) => Key::Bool(*b),
            Py::None => Key::None,
            Py::Float(f) => Key::Float(FloatKey(*f)),
            Py::Bytes(b) => {
                self.charge(b.len())?;
                Key::Bytes(b.to_vec())
            }
            Py::Tuple(t) => {
                let mut out = Vec::with_capacity(t.0.len());
                for x in &t.0 {
                    out.push(self.key(x, depth + 1)?);
                }
                Key::Tuple(out)
            }
            other => {
                return Err(ReadError::Bad {
                    offset: self.offset,
                    reason: format!("unsupported dict key type {}", other.type_name()),
                })
            }
        })
    }
}
