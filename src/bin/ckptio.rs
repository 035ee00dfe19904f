//! `ckptio`: inspect and convert `torch.save` checkpoints and sharded checkpoint directories in
//! PyTorch's Distributed Checkpoint (DCP) format.
//!
//! ```text
//! ckptio inspect FILE            a table: key path, dtype, shape, bytes; totals
//! ckptio inspect --json FILE     the whole tree as one JSON document
//! ckptio inspect DIR             a DCP checkpoint: every key with its chunks and where each
//!                                lies, its values, its data files, the world size their
//!                                names show and the save id
//! ckptio inspect --json DIR      the same as one JSON document
//! ckptio convert IN OUT          load with TorchCheckpointIo and save again
//! ckptio convert DIR OUT         a DCP checkpoint consolidated into one torch.save file
//!                                (as PyTorch's format_utils.dcp_to_torch_save)
//! ckptio convert IN DIR/         a torch.save file holding a dict, saved as a DCP checkpoint
//!                                of one rank (as format_utils.torch_save_to_dcp)
//! ```
//!
//! `convert` reads a directory as a DCP checkpoint and anything else as a `torch.save` file.
//! It writes a DCP checkpoint when `--to dcp` says so, or when the source is a file and `OUT`
//! is an existing directory or ends with `/`; otherwise a `torch.save` file (`--to torch`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ckptio::dcp::{DcpReader, Entry, Item, Metadata, Rank};
use ckptio::{CheckpointIo, DcpCheckpointIo, LoadOptions, SaveOptions, TorchCheckpointIo, Value};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value as Json};

#[derive(Parser)]
#[command(
    name = "ckptio",
    version,
    about = "Inspect and convert torch.save checkpoints and sharded (DCP) checkpoint directories"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what a checkpoint holds.
    Inspect {
        /// The checkpoint file (torch.save / Lightning .ckpt), or a DCP checkpoint directory
        /// (one holding `.metadata`).
        file: PathBuf,
        /// Print one JSON document instead of a table: the whole tree of a file, the layout
        /// of a DCP checkpoint.
        #[arg(long)]
        json: bool,
        /// Accept arbitrary Python objects (kept inert; nothing is executed).
        #[arg(long)]
        unsafe_objects: bool,
    },
    /// Load a checkpoint and save it again with ckptio, converting between a torch.save file
    /// and a DCP checkpoint directory.
    Convert {
        /// Input: a torch.save file, or a DCP checkpoint directory.
        input: PathBuf,
        /// Output: a torch.save file (written atomically), or a DCP checkpoint directory
        /// (committed by writing `.metadata` last).
        output: PathBuf,
        /// What to write. Default: a torch.save file when the input is a directory; a DCP
        /// checkpoint when the output is an existing directory or ends with `/`; otherwise a
        /// torch.save file.
        #[arg(long, value_enum)]
        to: Option<Format>,
        /// Accept arbitrary Python objects in a torch.save input (kept inert and written back
        /// as they were).
        #[arg(long)]
        unsafe_objects: bool,
    },
}

/// The two checkpoint formats `convert` reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One `torch.save` file.
    Torch,
    /// A PyTorch Distributed Checkpoint directory.
    Dcp,
}

impl Format {
    /// What `path` holds when read: a directory is a DCP checkpoint.
    fn of_input(path: &Path) -> Format {
        if path.is_dir() {
            Format::Dcp
        } else {
            Format::Torch
        }
    }

    /// What to write to `path` when `--to` does not say, converting from `input`.
    fn of_output(path: &Path, input: Format) -> Format {
        let names_dir = path.is_dir() || path.to_string_lossy().ends_with(std::path::is_separator);
        match input {
            Format::Torch if names_dir => Format::Dcp,
            _ => Format::Torch,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Format::Torch => "torch.save file",
            Format::Dcp => "DCP checkpoint",
        }
    }
}

fn human(n: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
}

fn table(v: &Value) -> String {
    let rows: Vec<(String, String, String, usize)> = v
        .named_tensors()
        .into_iter()
        .map(|(k, t)| {
            let name = if k.is_empty() { "<root>".to_owned() } else { k };
            (
                name,
                t.dtype().to_string(),
                format!("{:?}", t.shape()),
                t.nbytes(),
            )
        })
        .collect();
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(8);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(5);
    let w2 = rows.iter().map(|r| r.2.len()).max().unwrap_or(0).max(5);
    let mut out = format!(
        "{:w0$}  {:w1$}  {:w2$}  {:>12}\n",
        "key path", "dtype", "shape", "bytes"
    );
    let mut total = 0usize;
    for (k, d, s, b) in &rows {
        total += b;
        out.push_str(&format!("{k:w0$}  {d:w1$}  {s:w2$}  {b:>12}\n"));
    }
    let mut storages: Vec<&ckptio::Storage> = Vec::new();
    for t in v.tensors() {
        if !storages.iter().any(|s| s.ptr_eq(t.storage())) {
            storages.push(t.storage());
        }
    }
    let storage_bytes: usize = storages.iter().map(|s| s.len()).sum();
    out.push_str(&format!(
        "{} tensors, {} elements' bytes ({}), {} storages ({})\n",
        rows.len(),
        total,
        human(total),
        storages.len(),
        human(storage_bytes)
    ));
    out
}

/// Lays out rows of text cells in aligned columns: a header, then one line per row; the columns
/// `right` names are right-aligned (numbers).
fn columns(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let text: Vec<String> = cells
            .zip(&widths)
            .zip(right)
            .map(|((c, &w), &r)| {
                if r {
                    format!("{c:>w$}")
                } else {
                    format!("{c:w$}")
                }
            })
            .collect();
        format!("{}\n", text.join("  ").trim_end())
    };
    let mut out = line(&mut header.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> ckptio::Error {
    ckptio::Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A data file of a DCP checkpoint directory.
struct DataFile {
    name: String,
    bytes: u64,
    /// Whether `.metadata` names it (a file it does not name holds nothing it reads).
    named: bool,
}

/// The rank and the index of a data file named `__{rank}_{n}.distcp`.
fn data_file_rank(name: &str) -> Option<(usize, usize)> {
    let (rank, n) = name
        .strip_prefix("__")?
        .strip_suffix(".distcp")?
        .split_once('_')?;
    Some((rank.parse().ok()?, n.parse().ok()?))
}

/// The data files `.metadata` names and any other `__{rank}_{n}.distcp` in `dir`, with their
/// sizes, in rank order.
fn data_files(dir: &Path, meta: &Metadata) -> ckptio::Result<Vec<DataFile>> {
    let mut names: Vec<(String, bool)> = Vec::new();
    for it in &meta.items {
        if !names.iter().any(|(n, _)| *n == it.file) {
            names.push((it.file.clone(), true));
        }
    }
    let listing = std::fs::read_dir(dir).map_err(|e| io_error("list", dir, e))?;
    for entry in listing {
        let entry = entry.map_err(|e| io_error("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if data_file_rank(&name).is_some() && !names.iter().any(|(n, _)| *n == name) {
            names.push((name, false));
        }
    }
    names.sort_by_key(|(n, _)| (data_file_rank(n), n.clone()));
    names
        .into_iter()
        .map(|(name, named)| {
            let path = dir.join(&name);
            let bytes = std::fs::metadata(&path)
                .map_err(|e| io_error("open data file", &path, e))?
                .len();
            Ok(DataFile { name, bytes, named })
        })
        .collect()
}

/// The world size the data file names show: one more than the highest rank in them.
fn guess_world_size(files: &[DataFile]) -> Option<usize> {
    files
        .iter()
        .filter_map(|f| data_file_rank(&f.name))
        .map(|(rank, _)| rank.saturating_add(1))
        .max()
}

/// Bytes of the elements of a box of `sizes` (`None` past `u64`).
fn elements_bytes(sizes: &[usize], esize: usize) -> Option<u64> {
    sizes
        .iter()
        .try_fold(esize as u64, |n, &s| n.checked_mul(s as u64))
}

fn or_dash(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// What `inspect` shows of a DCP checkpoint.
struct DcpView<'a> {
    dir: &'a Path,
    meta: &'a Metadata,
    /// The item of every chunk (key, offsets) and value (key, `None`).
    items: HashMap<(&'a str, Option<&'a [usize]>), &'a Item>,
    files: Vec<DataFile>,
    world_size: Option<usize>,
}

impl<'a> DcpView<'a> {
    fn new(reader: &'a DcpReader) -> ckptio::Result<DcpView<'a>> {
        let meta = reader.metadata();
        let items = meta
            .items
            .iter()
            .map(|it| ((it.fqn.as_str(), it.offsets.as_deref()), it))
            .collect();
        let files = data_files(reader.dir(), meta)?;
        let world_size = guess_world_size(&files);
        Ok(DcpView {
            dir: reader.dir(),
            meta,
            items,
            files,
            world_size,
        })
    }

    fn item(&self, fqn: &str, offsets: Option<&[usize]>) -> Option<&'a Item> {
        self.items.get(&(fqn, offsets)).copied()
    }

    /// Cells of where an item lies: file, offset, length (dashes when none).
    fn place(item: Option<&Item>) -> [String; 3] {
        match item {
            Some(i) => [i.file.clone(), i.offset.to_string(), i.length.to_string()],
            None => ["-".into(), "-".into(), "-".into()],
        }
    }

    /// The key table: a row per key, then a row per chunk of a tensor.
    fn table(&self) -> String {
        let mut rows = Vec::new();
        for (fqn, e) in &self.meta.entries {
            match e {
                Entry::Tensor(t) => {
                    let esize = t.dtype.size();
                    rows.push(vec![
                        fqn.clone(),
                        t.dtype.to_string(),
                        format!("{:?}", t.shape),
                        or_dash(elements_bytes(&t.shape, esize)),
                    ]);
                    for c in &t.chunks {
                        let mut row = vec![
                            format!("  chunk {:?}", c.offsets),
                            String::new(),
                            format!("{:?}", c.sizes),
                            or_dash(elements_bytes(&c.sizes, esize)),
                        ];
                        row.extend(Self::place(self.item(fqn, Some(&c.offsets))));
                        rows.push(row);
                    }
                }
                Entry::Bytes => {
                    let mut row = vec![fqn.clone(), "value".into(), String::new(), String::new()];
                    row.extend(Self::place(self.item(fqn, None)));
                    rows.push(row);
                }
                _ => rows.push(vec![fqn.clone(), "?".into()]),
            }
        }
        for r in &mut rows {
            r.resize(7, String::new());
        }
        columns(
            &[
                "key path", "dtype", "shape", "bytes", "file", "offset", "length",
            ],
            &rows,
            &[false, false, false, true, false, true, true],
        )
    }

    /// The data file table.
    fn file_table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .files
            .iter()
            .map(|f| {
                let note = if f.named {
                    ""
                } else {
                    "not named by .metadata"
                };
                vec![f.name.clone(), f.bytes.to_string(), note.to_owned()]
            })
            .collect();
        columns(&["data file", "bytes", ""], &rows, &[false, true, false])
    }

    fn summary(&self) -> String {
        let (mut tensors, mut chunks, mut values, mut bytes) = (0, 0, 0, 0u64);
        for e in self.meta.entries.values() {
            match e {
                Entry::Tensor(t) => {
                    tensors += 1;
                    chunks += t.chunks.len();
                    let b = elements_bytes(&t.shape, t.dtype.size());
                    bytes = bytes.saturating_add(b.unwrap_or(u64::MAX));
                }
                Entry::Bytes => values += 1,
                _ => {}
            }
        }
        let file_bytes: u64 = self.files.iter().map(|f| f.bytes).sum();
        let world = self.world_size.map_or_else(
            || "unknown (no data file is named __{rank}_{n}.distcp)".to_owned(),
            |w| format!("{w} (from the data file names)"),
        );
        format!(
            "{} keys: {tensors} tensors in {chunks} chunks, {bytes} elements' bytes ({}), \
             {values} values\n{} data files ({}), world size {world}, save id {}\n",
            self.meta.entries.len(),
            human(bytes as usize),
            self.files.len(),
            human(file_bytes as usize),
            self.meta.save_id.as_deref().unwrap_or("none"),
        )
    }

    fn text(&self) -> String {
        format!(
            "DCP checkpoint {}\n{}\n{}{}",
            self.dir.display(),
            self.table(),
            self.file_table(),
            self.summary()
        )
    }

    fn place_json(item: Option<&Item>) -> Json {
        match item {
            Some(i) => json!({"file": i.file, "offset": i.offset, "length": i.length}),
            None => Json::Null,
        }
    }

    fn json(&self) -> Json {
        let entries: Vec<Json> = self
            .meta
            .entries
            .iter()
            .map(|(fqn, e)| match e {
                Entry::Tensor(t) => {
                    let chunks: Vec<Json> = t
                        .chunks
                        .iter()
                        .map(|c| {
                            json!({
                                "offsets": c.offsets,
                                "sizes": c.sizes,
                                "item": Self::place_json(self.item(fqn, Some(&c.offsets))),
                            })
                        })
                        .collect();
                    json!({
                        "key": fqn,
                        "kind": "tensor",
                        "dtype": t.dtype.name(),
                        "shape": t.shape,
                        "requires_grad": t.requires_grad,
                        "bytes": elements_bytes(&t.shape, t.dtype.size()),
                        "chunks": chunks,
                    })
                }
                Entry::Bytes => json!({
                    "key": fqn,
                    "kind": "value",
                    "item": Self::place_json(self.item(fqn, None)),
                }),
                _ => json!({"key": fqn, "kind": "unknown"}),
            })
            .collect();
        let files: Vec<Json> = self
            .files
            .iter()
            .map(|f| json!({"name": f.name, "bytes": f.bytes, "named_by_metadata": f.named}))
            .collect();
        json!({
            "format": "dcp",
            "dir": self.dir.display().to_string(),
            "save_id": self.meta.save_id,
            "world_size": self.world_size,
            "entries": entries,
            "files": files,
        })
    }
}

fn load_options(unsafe_objects: bool) -> LoadOptions {
    LoadOptions::default()
        .weights_only(!unsafe_objects)
        .mmap(true)
}

fn inspect(path: &Path, json: bool, unsafe_objects: bool) -> ckptio::Result<()> {
    if path.is_dir() {
        let reader = DcpReader::open(path)?;
        let view = DcpView::new(&reader)?;
        if json {
            println!("{}", view.json());
        } else {
            print!("{}", view.text());
        }
        return Ok(());
    }
    let v = TorchCheckpointIo::new().load(path, &load_options(unsafe_objects))?;
    if json {
        println!("{}", ckptio::json::to_json(&v));
    } else {
        print!("{}", table(&v));
    }
    Ok(())
}

fn load(path: &Path, format: Format, unsafe_objects: bool) -> ckptio::Result<Value> {
    match format {
        Format::Torch => TorchCheckpointIo::new().load(path, &load_options(unsafe_objects)),
        Format::Dcp => DcpReader::open(path)?
            .weights_only(!unsafe_objects)
            .read_all(),
    }
}

fn save(v: &Value, path: &Path, format: Format, input: &Path) -> ckptio::Result<()> {
    match format {
        Format::Torch => ckptio::torch::save(v, path),
        Format::Dcp => {
            if !matches!(v, Value::Dict(_)) {
                return Err(ckptio::Error::Argument {
                    name: "input",
                    reason: format!(
                        "{} holds a {}; a DCP checkpoint is a state dict (a dict)",
                        input.display(),
                        v.type_name()
                    ),
                });
            }
            DcpCheckpointIo::new(Rank::single()).save_checkpoint(v, path, &SaveOptions::default())
        }
    }
}

fn convert(
    input: &Path,
    output: &Path,
    to: Option<Format>,
    unsafe_objects: bool,
) -> ckptio::Result<()> {
    let from = Format::of_input(input);
    let to = to.unwrap_or_else(|| Format::of_output(output, from));
    let v = load(input, from, unsafe_objects)?;
    save(&v, output, to, input)?;
    eprintln!("wrote {} {}", to.describe(), output.display());
    Ok(())
}

fn run(cli: Cli) -> ckptio::Result<()> {
    match cli.command {
        Command::Inspect {
            file,
            json,
            unsafe_objects,
        } => inspect(&file, json, unsafe_objects),
        Command::Convert {
            input,
            output,
            to,
            unsafe_objects,
        } => convert(&input, &output, to, unsafe_objects),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ckptio: error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
