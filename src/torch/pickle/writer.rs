//! A protocol-2 pickle writer that emits only opcodes PyTorch's weights-only unpickler accepts,
//! in the shapes `torch.save` itself produces.

use std::collections::HashMap;

use super::opcodes as op;
use crate::tensor::{DType, HostTensor, Storage};
use crate::value::{Dict, DictKind, Key, Object, ObjectKind, Value};

/// Storages in first-seen order, keyed `"0"`, `"1"`, ... as `torch.save` keys them.
#[derive(Default)]
pub(crate) struct StorageTable {
    pub(crate) storages: Vec<Storage>,
    index: HashMap<usize, (usize, DType)>,
}

/// Why a tree cannot be pickled.
pub(crate) type WriteError = String;

const BATCH: usize = 1000;

pub(crate) struct PickleWriter<'a> {
    out: Vec<u8>,
    memo: HashMap<(&'static str, String), u32>,
    table: &'a mut StorageTable,
    depth: usize,
}

/// The dtype a storage is recorded with: its typed storage class, or bytes when untyped.
fn storage_dtype(d: DType) -> DType {
    if d.storage_class().is_some() {
        d
    } else {
        DType::UInt8
    }
}

impl<'a> PickleWriter<'a> {
    pub(crate) fn new(table: &'a mut StorageTable) -> Self {
        PickleWriter {
            out: Vec::with_capacity(4096),
            memo: HashMap::new(),
            table,
            depth: 0,
        }
    }

    /// Pickles `v` (protocol 2) and returns the stream.
    pub(crate) fn finish(mut self, v: &Value) -> Result<Vec<u8>, WriteError> {
        self.out.extend_from_slice(&[op::PROTO, 2]);
        self.value(v)?;
        self.out.push(op::STOP);
        Ok(self.out)
    }

    fn global(&mut self, module: &str, name: &str) {
        let key = ("g", format!("{module}\n{name}"));
        if let Some(&i) = self.memo.get(&key) {
            self.get(i);
            return;
        }
        self.out.push(op::GLOBAL);
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        let i = self.memo.len() as u32;
        self.put(i);
        self.memo.insert(key, i);
    }

    fn put(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[op::BINPUT, i as u8]);
        } else {
            self.out.push(op::LONG_BINPUT);
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[op::BINGET, i as u8]);
        } else {
            self.out.push(op::LONG_BINGET);
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    fn int(&mut self, i: i64) {
        if (0..256).contains(&i) {
            self.out.extend_from_slice(&[op::BININT1, i as u8]);
        } else if (0..65536).contains(&i) {
            self.out.push(op::BININT2);
            self.out.extend_from_slice(&(i as u16).to_le_bytes());
        } else if i32::try_from(i).is_ok() {
            self.out.push(op::BININT);
            self.out.extend_from_slice(&(i as i32).to_le_bytes());
        } else {
            // LONG1: minimal little-endian two's complement.
            let b = i.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let top = b[n - 1];
                let next_sign = b[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[op::LONG1, n as u8]);
            self.out.extend_from_slice(&b[..n]);
        }
    }

    fn str(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn tuple_of(&mut self, items: &[Value]) -> Result<(), WriteError> {
        match items.len() {
            0 => self.out.push(op::EMPTY_TUPLE),
            1..=3 => {
                for v in items {
                    self.value(v)?;
                }
                self.out.push(op::TUPLE1 + items.len() as u8 - 1);
            }
            _ => {
                self.out.push(op::MARK);
                for v in items {
                    self.value(v)?;
                }
                self.out.push(op::TUPLE);
            }
        }
        Ok(())
    }

    fn usize_tuple(&mut self, items: &[usize]) {
        if items.is_empty() {
            self.out.push(op::EMPTY_TUPLE);
            return;
        }
        if items.len() > 3 {
            self.out.push(op::MARK);
        }
        for &x in items {
            self.int(x as i64);
        }
        match items.len() {
            1..=3 => self.out.push(op::TUPLE1 + items.len() as u8 - 1),
            _ => self.out.push(op::TUPLE),
        }
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE]);
    }

    fn value(&mut self, v: &Value) -> Result<(), WriteError> {
        self.depth += 1;
        if self.depth > 256 {
            return Err("the tree nests deeper than 256 levels (the reader's limit)".into());
        }
        match v {
            Value::None => self.out.push(op::NONE),
            Value::Bool(b) => self.out.push(if *b { op::NEWTRUE } else { op::NEWFALSE }),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => {
                self.out.push(op::BINFLOAT);
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s),
            Value::Bytes(b) => {
                // Protocol 2 has no bytes opcode: _codecs.encode(latin-1 str, "latin1").
                self.global("_codecs", "encode");
                let s: String = b.iter().map(|&c| c as char).collect();
                self.str(&s);
                self.str("latin1");
                self.out.extend_from_slice(&[op::TUPLE2, op::REDUCE]);
            }
            Value::List(items) => {
                self.out.push(op::EMPTY_LIST);
                for chunk in items.chunks(BATCH) {
                    if chunk.len() == 1 {
                        self.value(&chunk[0])?;
                        self.out.push(op::APPEND);
                    } else {
                        self.out.push(op::MARK);
                        for x in chunk {
                            self.value(x)?;
                        }
                        self.out.push(op::APPENDS);
                    }
                }
            }
            Value::Tuple(items) => self.tuple_of(items)?,
            Value::Dict(d) => self.dict(d)?,
            Value::Tensor(t) => self.tensor(t)?,
            Value::Object(o) => self.object(o)?,
            Value::Live(_) => return Err("live tensors must be snapshotted before pickling".into()),
            Value::Sharded(_) => {
                return Err(
                    "a sharded tensor cannot go in a torch.save file: save it with \
                            ckptio::dcp::DcpCheckpointIo (PyTorch's Distributed Checkpoint \
                            format), or gather it into one tensor first"
                        .into(),
                )
            }
        }
        self.depth -= 1;
        Ok(())
    }

    fn key(&mut self, k: &Key) -> Result<(), WriteError> {
        match k {
            Key::Str(s) => self.str(s),
            Key::Int(i) => self.int(*i),
            other => self.value(&other.to_value())?,
        }
        Ok(())
    }

    fn dict(&mut self, d: &Dict) -> Result<(), WriteError> {
        match d.kind() {
            DictKind::Plain => self.out.push(op::EMPTY_DICT),
            DictKind::Ordered => self.empty_ordered_dict(),
        }
        let entries: Vec<_> = d.iter().collect();
        for chunk in entries.chunks(BATCH) {
            if chunk.len() == 1 {
                self.key(chunk[0].0)?;
                self.value(chunk[0].1)?;
                self.out.push(op::SETITEM);
            } else {
                self.out.push(op::MARK);
                for (k, v) in chunk {
                    self.key(k)?;
                    self.value(v)?;
                }
                self.out.push(op::SETITEMS);
            }
        }
        if let Some(attrs) = d.attrs() {
            if d.kind() != DictKind::Ordered {
                return Err(
                    "a plain dict cannot carry attributes (only an OrderedDict can)".into(),
                );
            }
            self.value(attrs)?;
            self.out.push(op::BUILD);
        }
        Ok(())
    }

    fn object(&mut self, o: &Object) -> Result<(), WriteError> {
        self.global(&o.module, &o.name);
        match o.kind {
            ObjectKind::Global => {
                if !o.args.is_empty()
                    || o.state.is_some()
                    || !o.list_items.is_empty()
                    || !o.dict_items.is_empty()
                {
                    return Err(format!(
                        "{}: a bare global cannot carry arguments, state or items",
                        o.class_name()
                    ));
                }
                return Ok(());
            }
            ObjectKind::Reduce => {
                self.tuple_of(&o.args)?;
                self.out.push(op::REDUCE);
            }
            ObjectKind::NewObj => {
                self.tuple_of(&o.args)?;
                self.out.push(op::NEWOBJ);
            }
        }
        if !o.list_items.is_empty() {
            self.out.push(op::MARK);
            for x in &o.list_items {
                self.value(x)?;
            }
            self.out.push(op::APPENDS);
        }
        if !o.dict_items.is_empty() {
            self.out.push(op::MARK);
            for (k, v) in &o.dict_items {
                self.value(k)?;
                self.value(v)?;
            }
            self.out.push(op::SETITEMS);
        }
        if let Some(s) = &o.state {
            self.value(s)?;
            self.out.push(op::BUILD);
        }
        Ok(())
    }

    fn tensor(&mut self, t: &HostTensor) -> Result<(), WriteError> {
        let sd = storage_dtype(t.dtype());
        let storage = t.storage();
        let key = match self.table.index.get(&storage.id()) {
            Some(&(k, d)) => {
                if d != sd {
                    return Err(format!(
                        "two tensors view one storage as different types ({} and {}); \
                         torch.save refuses this too",
                        d, sd
                    ));
                }
                k
            }
            None => {
                if storage.len() % sd.size() != 0 {
                    return Err(format!(
                        "a {} storage of {} bytes is not a whole number of elements",
                        sd,
                        storage.len()
                    ));
                }
                let k = self.table.storages.len();
                self.table.storages.push(storage.clone());
                self.table.index.insert(storage.id(), (k, sd));
                k
            }
        };
        if t.is_parameter() {
            self.global("torch._utils", "_rebuild_parameter");
            self.out.push(op::MARK);
        }
        let v3 = t.dtype().storage_class().is_none();
        self.global(
            "torch._utils",
            if v3 {
                "_rebuild_tensor_v3"
            } else {
                "_rebuild_tensor_v2"
            },
        );
        self.out.push(op::MARK);
        // persistent id: ('storage', class, key, location, numel)
        self.out.push(op::MARK);
        self.str("storage");
        match t.dtype().storage_class() {
            Some(class) => self.global("torch", class),
            None => self.global("torch.storage", "UntypedStorage"),
        }
        self.str(&key.to_string());
        self.str(storage.location());
        self.int((storage.len() / sd.size()) as i64);
        self.out.extend_from_slice(&[op::TUPLE, op::BINPERSID]);
        self.int(t.storage_offset() as i64);
        self.usize_tuple(t.shape());
        self.usize_tuple(t.strides());
        // A Parameter's inner tensor is saved with requires_grad=False, as torch does.
        let rg = t.requires_grad() && !t.is_parameter();
        self.out.push(if rg { op::NEWTRUE } else { op::NEWFALSE });
        self.empty_ordered_dict();
        if v3 {
            self.global("torch", t.dtype().name());
        }
        self.out.extend_from_slice(&[op::TUPLE, op::REDUCE]);
        if t.is_parameter() {
            self.out.push(if t.requires_grad() {
                op::NEWTRUE
            } else {
                op::NEWFALSE
            });
            self.empty_ordered_dict();
            self.out.extend_from_slice(&[op::TUPLE, op::REDUCE]);
        }
        Ok(())
    }
}
