//! `ckptio`: inspect and convert `torch.save` checkpoints.
//!
//! ```text
//! ckptio inspect FILE            a table: key path, dtype, shape, bytes; totals
//! ckptio inspect --json FILE     the whole tree as one JSON document
//! ckptio convert IN OUT          load with TorchCheckpointIo and save again
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use ckptio::{CheckpointIo, LoadOptions, SaveOptions, TorchCheckpointIo, Value};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ckptio",
    version,
    about = "Inspect and convert torch.save checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what a checkpoint holds.
    Inspect {
        /// The checkpoint file (torch.save / Lightning .ckpt).
        file: PathBuf,
        /// Print the whole tree as one JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Accept arbitrary Python objects (kept inert; nothing is executed).
        #[arg(long)]
        unsafe_objects: bool,
    },
    /// Load a checkpoint and save it again with ckptio.
    Convert {
        /// Input file.
        input: PathBuf,
        /// Output file (written atomically).
        output: PathBuf,
        /// Accept arbitrary Python objects (kept inert and written back as they were).
        #[arg(long)]
        unsafe_objects: bool,
    },
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

fn run(cli: Cli) -> ckptio::Result<()> {
    let io = TorchCheckpointIo::new();
    match cli.command {
        Command::Inspect {
            file,
            json,
            unsafe_objects,
        } => {
            let opts = LoadOptions::default()
                .weights_only(!unsafe_objects)
                .mmap(true);
            let v = io.load(&file, &opts)?;
            if json {
                println!("{}", ckptio::json::to_json(&v));
            } else {
                print!("{}", table(&v));
            }
        }
        Command::Convert {
            input,
            output,
            unsafe_objects,
        } => {
            let opts = LoadOptions::default()
                .weights_only(!unsafe_objects)
                .mmap(true);
            let v = io.load(&input, &opts)?;
            io.save_checkpoint(&v, &output, &SaveOptions::default())?;
            eprintln!("wrote {}", output.display());
        }
    }
    Ok(())
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
