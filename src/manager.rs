//! [`CheckpointManager`]: the policy a training loop calls every step, after Lightning's
//! `ModelCheckpoint`: save every N steps and/or every T seconds, keep the top k by a monitored
//! metric, keep a `last` link to the newest complete checkpoint, resume from a directory.
//!
//! Bookkeeping acts when a save is **durable**, never when it is merely queued: `last` moves and
//! old checkpoints are deleted only after their replacement is on disk, and deletions go through
//! the async runtime so they run after any pending write of the same path.
//!
//! ```no_run
//! use ckptio::manager::{CheckpointManager, ManagerConfig, Monitor};
//! use ckptio::{AsyncCheckpointIo, TorchCheckpointIo};
//! # fn main() -> ckptio::Result<()> {
//! let io = AsyncCheckpointIo::new(TorchCheckpointIo::new());
//! let cfg = ManagerConfig::new("runs/ckpt")
//!     .every_n_steps(100)
//!     .top_k(3, Monitor::Min)
//!     .filename("step={step}-loss={metric:.4}.ckpt");
//! let mut mgr = CheckpointManager::new(io, cfg);
//! let mut step = 0i64;
//! for s in 1..=1000u64 {
//!     step = s as i64;
//!     let loss = 1.0 / s as f64;
//!     mgr.step(s, 0, Some(loss), &[("step", &step)])?;
//! }
//! mgr.finish()?;
//! let resume_from = CheckpointManager::<TorchCheckpointIo>::resume_path("runs/ckpt".as_ref())?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::atomic::{is_temp_file, list_dir, sync_dir, TEMP_MARKER};
use crate::error::{Error, Result};
use crate::io::CheckpointIo;
use crate::runtime::{AsyncCheckpointIo, SaveHandle};
use crate::state::{checkpoint, Stateful};

/// Whether a lower or a higher metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Monitor {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

/// The name of the link to the newest complete checkpoint.
pub const LAST: &str = "last.ckpt";

/// What the manager does.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ManagerConfig {
    /// Directory of the checkpoints.
    pub dir: PathBuf,
    /// File name template: `{step}`, `{epoch}`, `{metric}` and `{metric:.N}`.
    pub filename: String,
    /// Save when `step % n == 0`.
    pub every_n_steps: Option<u64>,
    /// Save when this much time passed since the last save.
    pub every: Option<Duration>,
    /// Keep `last.ckpt` naming the newest complete checkpoint (default true).
    pub save_last: bool,
    /// Keep only the best k by the metric (and the newest, which `last` names).
    pub top_k: Option<(usize, Monitor)>,
}

impl ManagerConfig {
    /// Saves into `dir` as `step={step}.ckpt`, keeping everything, with `last.ckpt`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManagerConfig {
            dir: dir.into(),
            filename: "step={step}.ckpt".into(),
            every_n_steps: None,
            every: None,
            save_last: true,
            top_k: None,
        }
    }
    /// Sets the file name template.
    pub fn filename(mut self, template: impl Into<String>) -> Self {
        self.filename = template.into();
        self
    }
    /// Saves every `n` steps.
    pub fn every_n_steps(mut self, n: u64) -> Self {
        self.every_n_steps = Some(n.max(1));
        self
    }
    /// Saves every `t` of wall time.
    pub fn every(mut self, t: Duration) -> Self {
        self.every = Some(t);
        self
    }
    /// Keeps (or not) `last.ckpt`.
    pub fn save_last(mut self, yes: bool) -> Self {
        self.save_last = yes;
        self
    }
    /// Keeps only the best `k` by the metric.
    pub fn top_k(mut self, k: usize, monitor: Monitor) -> Self {
        self.top_k = Some((k, monitor));
        self
    }
}

struct Pending {
    path: PathBuf,
    step: u64,
    metric: Option<f64>,
    handle: SaveHandle,
}

#[derive(Clone, Debug)]
struct Kept {
    path: PathBuf,
    step: u64,
    metric: Option<f64>,
}

/// What a directory entry is, for sharded (DCP) checkpoints.
enum Sharded {
    /// A directory with `.metadata`: a committed sharded checkpoint.
    Committed,
    /// A directory with parts of a sharded checkpoint but no `.metadata`.
    Incomplete,
    /// Anything else.
    No,
}

fn sharded_state(p: &Path) -> Sharded {
    if !p.is_dir() {
        return Sharded::No;
    }
    if p.join(crate::dcp::METADATA).is_file() {
        return Sharded::Committed;
    }
    // Only parts of a sharded save (or nothing: a save killed before its first file) make
    // an incomplete checkpoint; a directory holding anything else is not the manager's.
    let Ok(entries) = std::fs::read_dir(p) else {
        return Sharded::No;
    };
    let ours = entries.flatten().all(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        crate::dcp::is_part_file(&n) || is_temp_file(&n)
    });
    if ours {
        Sharded::Incomplete
    } else {
        Sharded::No
    }
}

/// The step and metric a torch.save checkpoint written by the manager holds.
fn file_step(p: &Path) -> Option<(u64, Option<f64>)> {
    let v = crate::torch::load(p, &crate::io::LoadOptions::default().mmap(true)).ok()?;
    let step = v.get("ckptio_step").and_then(crate::Value::as_int)?;
    Some((
        step as u64,
        v.get("ckptio_metric").and_then(crate::Value::as_float),
    ))
}

/// The step and metric a committed sharded checkpoint written by the manager holds.
fn dcp_step(p: &Path) -> Option<(u64, Option<f64>)> {
    let r = crate::dcp::DcpReader::open(p).ok()?;
    let step = r.read_value("ckptio_step").ok()?.as_int()?;
    let metric = r
        .read_value("ckptio_metric")
        .ok()
        .and_then(|v| v.as_float());
    Some((step as u64, metric))
}

/// Whether `p` is a whole checkpoint: a committed sharded directory, or a file whose zip
/// directory reads.
fn is_whole(p: &Path) -> bool {
    match sharded_state(p) {
        Sharded::Committed => crate::dcp::DcpReader::open(p).is_ok(),
        Sharded::Incomplete => false,
        Sharded::No => std::fs::read(p)
            .ok()
            .is_some_and(|d| crate::torch::zip::read_directory(&d[..]).is_ok()),
    }
}

/// Saves on a schedule through an [`AsyncCheckpointIo`] and keeps the directory tidy.
pub struct CheckpointManager<I: CheckpointIo + 'static> {
    io: AsyncCheckpointIo<I>,
    cfg: ManagerConfig,
    last_time: Option<Instant>,
    pending: Vec<Pending>,
    kept: Vec<Kept>,
    newest: Option<Kept>,
}

impl<I: CheckpointIo + 'static> std::fmt::Debug for CheckpointManager<I> {
    /// The configuration and the checkpoints it keeps track of (not the backend).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pending: Vec<&Path> = self.pending.iter().map(|p| p.path.as_path()).collect();
        let kept: Vec<&Path> = self.kept.iter().map(|k| k.path.as_path()).collect();
        f.debug_struct("CheckpointManager")
            .field("cfg", &self.cfg)
            .field("pending", &pending)
            .field("kept", &kept)
            .field("newest", &self.newest.as_ref().map(|n| n.path.as_path()))
            .finish_non_exhaustive()
    }
}

fn render(template: &str, step: u64, epoch: u64, metric: Option<f64>) -> Result<String> {
    let refuse = |reason: String| Error::Template {
        template: template.to_owned(),
        reason,
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let j = rest[i..]
            .find('}')
            .ok_or_else(|| refuse("a { is not closed".into()))?
            + i;
        let field = &rest[i + 1..j];
        let (name, prec) = match field.split_once(":.") {
            Some((n, p)) => (n, p.parse::<usize>().ok()),
            None => (field, None),
        };
        match name {
            "step" => out.push_str(&step.to_string()),
            "epoch" => out.push_str(&epoch.to_string()),
            "metric" => {
                let m = metric.ok_or_else(|| {
                    refuse("it names {metric}, but the step passed no metric".into())
                })?;
                out.push_str(&match prec {
                    Some(p) => format!("{m:.p$}"),
                    None => m.to_string(),
                });
            }
            other => {
                return Err(refuse(format!(
                    "unknown field {{{other}}} (fields: step, epoch, metric, metric:.N)"
                )))
            }
        }
        rest = &rest[j + 1..];
    }
    out.push_str(rest);
    if out.contains('/') || out == LAST || out.contains(TEMP_MARKER) {
        return Err(refuse(format!(
            "it renders {out:?}, which is not allowed (a path, {LAST:?}, or a temporary name)"
        )));
    }
    Ok(out)
}

impl<I: CheckpointIo + 'static> CheckpointManager<I> {
    /// A manager saving through `io` as `cfg` says. Checkpoints it wrote into `cfg.dir` before
    /// (a resumed run) are adopted, so top-k and `last` continue across restarts; files that
    /// are not whole ckptio checkpoints are left alone.
    pub fn new(io: AsyncCheckpointIo<I>, cfg: ManagerConfig) -> Self {
        let mut m = CheckpointManager {
            io,
            cfg,
            // The time interval counts from the start, as Lightning's `train_time_interval`.
            last_time: Some(Instant::now()),
            pending: Vec::new(),
            kept: Vec::new(),
            newest: None,
        };
        m.adopt_existing();
        m
    }

    fn adopt_existing(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.cfg.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == LAST || is_temp_file(&name) {
                continue;
            }
            let found = match sharded_state(&e.path()) {
                Sharded::Committed => dcp_step(&e.path()),
                // A sharded save that never committed (or one another rank is writing now):
                // never resumed from; `finish` removes it.
                Sharded::Incomplete => continue,
                Sharded::No if e.path().is_file() => file_step(&e.path()),
                Sharded::No => None,
            };
            let Some((step, metric)) = found else {
                continue;
            };
            let k = Kept {
                path: e.path(),
                step,
                metric,
            };
            if self.newest.as_ref().is_none_or(|n| k.step > n.step) {
                self.newest = Some(k.clone());
            }
            self.kept.push(k);
        }
    }

    /// The async runtime (for status, flush, loads).
    pub fn io(&self) -> &AsyncCheckpointIo<I> {
        &self.io
    }

    /// Call once per step. Saves `state` (plus `step`, `epoch` and `metric`) when due and returns
    /// its path; also acts on saves that became durable since the last call.
    pub fn step(
        &mut self,
        step: u64,
        epoch: u64,
        metric: Option<f64>,
        state: &[(&str, &dyn Stateful)],
    ) -> Result<Option<PathBuf>> {
        self.poll(false)?;
        let by_step = self.cfg.every_n_steps.is_some_and(|n| step % n == 0);
        let by_time = self
            .cfg
            .every
            .is_some_and(|t| self.last_time.is_none_or(|l| l.elapsed() >= t));
        if !(by_step || by_time) {
            return Ok(None);
        }
        let name = render(&self.cfg.filename, step, epoch, metric)?;
        let path = self.cfg.dir.join(name);
        let mut tree = checkpoint(state)?;
        if let Some(d) = tree.as_dict_mut() {
            d.insert("ckptio_step", step as i64);
            d.insert("ckptio_epoch", epoch as i64);
            if let Some(m) = metric {
                d.insert("ckptio_metric", m);
            }
        }
        let handle = self.io.save(&tree, &path)?;
        self.last_time = Some(Instant::now());
        self.pending.push(Pending {
            path: path.clone(),
            step,
            metric,
            handle,
        });
        Ok(Some(path))
    }

    /// Waits for every pending save and acts on it, then removes the incomplete sharded
    /// checkpoints in the directory (interrupted saves; the backend's remove decides which rank
    /// removes: rank 0 for [`DcpCheckpointIo`](crate::DcpCheckpointIo), once its saves are
    /// committed, so every rank has handed in every part); returns the first error.
    pub fn finish(&mut self) -> Result<()> {
        self.poll(true)?;
        for p in self.incomplete()? {
            drop(self.io.remove(&p)?);
        }
        self.io.flush()
    }

    /// Directories in the checkpoint directory holding parts of a sharded checkpoint that
    /// was never committed.
    fn incomplete(&self) -> Result<Vec<PathBuf>> {
        Ok(list_dir(&self.cfg.dir)?
            .into_iter()
            .map(|e| e.path())
            .filter(|p| matches!(sharded_state(p), Sharded::Incomplete))
            .collect())
    }

    /// Acts on saves that are durable (all of them, waiting, when `wait`), in submission order.
    fn poll(&mut self, wait: bool) -> Result<()> {
        while let Some(p) = self.pending.first() {
            if !wait && !p.handle.is_finished() {
                break;
            }
            let p = self.pending.remove(0);
            let report = p.handle.wait()?;
            if report.skipped {
                continue;
            }
            self.on_durable(Kept {
                path: p.path,
                step: p.step,
                metric: p.metric,
            })?;
        }
        Ok(())
    }

    fn on_durable(&mut self, k: Kept) -> Result<()> {
        if self.newest.as_ref().is_none_or(|n| k.step >= n.step) {
            if self.cfg.save_last {
                self.point_last_at(&k.path)?;
            }
            self.newest = Some(k.clone());
        }
        self.kept.retain(|o| o.path != k.path);
        self.kept.push(k);
        self.prune()
    }

    /// Deletes what is neither among the best k nor the newest checkpoint (`last` names it).
    fn prune(&mut self) -> Result<()> {
        let Some((k, monitor)) = self.cfg.top_k else {
            return Ok(());
        };
        let key = |c: &Kept| {
            let m = c.metric.unwrap_or(f64::NAN);
            // Best first; a missing metric ranks last.
            match monitor {
                Monitor::Min if m.is_nan() => f64::INFINITY,
                Monitor::Min => m,
                Monitor::Max if m.is_nan() => f64::INFINITY,
                Monitor::Max => -m,
            }
        };
        let mut ranked = self.kept.clone();
        ranked.sort_by(|a, b| key(a).total_cmp(&key(b)));
        let mut keep: Vec<PathBuf> = ranked.iter().take(k).map(|c| c.path.clone()).collect();
        keep.extend(self.newest.as_ref().map(|n| n.path.clone()));
        for c in ranked {
            if !keep.contains(&c.path) {
                drop(self.io.remove(&c.path)?);
                self.kept.retain(|o| o.path != c.path);
            }
        }
        Ok(())
    }

    /// Replaces `last.ckpt` atomically with a link to `target` (a file in the same directory).
    fn point_last_at(&self, target: &Path) -> Result<()> {
        let name = target.file_name().ok_or_else(|| Error::Path {
            path: target.to_path_buf(),
            reason: "it has no file name".into(),
        })?;
        let link = self.cfg.dir.join(LAST);
        let tmp = self
            .cfg
            .dir
            .join(format!(".{LAST}{TEMP_MARKER}{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).map_err(|e| Error::io("create link", &tmp, e))?;
        std::fs::rename(&tmp, &link).map_err(|e| Error::io("replace link", &link, e))?;
        sync_dir(&self.cfg.dir)
    }

    /// The newest complete checkpoint in `dir`: the one `last.ckpt` names when it is whole,
    /// else the newest (by modification time) file that is a whole checkpoint archive.
    pub fn resume_path(dir: &Path) -> Result<Option<PathBuf>> {
        let whole = is_whole;
        let link = dir.join(LAST);
        if let Ok(target) = std::fs::read_link(&link) {
            let p = dir.join(target);
            if whole(&p) {
                return Ok(Some(p));
            }
        }
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for e in list_dir(dir)? {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == LAST || is_temp_file(&name) {
                continue;
            }
            let meta = e
                .metadata()
                .map_err(|err| Error::io("stat", e.path(), err))?;
            let committed_dir =
                meta.is_dir() && matches!(sharded_state(&e.path()), Sharded::Committed);
            if meta.is_file() || committed_dir {
                files.push((
                    meta.modified()
                        .map_err(|err| Error::io("stat", e.path(), err))?,
                    e.path(),
                ));
            }
        }
        files.sort();
        Ok(files.into_iter().rev().map(|(_, p)| p).find(|p| whole(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_bad_ones_are_refused() {
        assert_eq!(
            render(
                "step={step}-e{epoch}-{metric:.3}.ckpt",
                12,
                1,
                Some(0.12345)
            )
            .unwrap(),
            "step=12-e1-0.123.ckpt"
        );
        for bad in [
            "{metric}.ckpt",
            "{nope}.ckpt",
            "a/{step}",
            LAST,
            "step={step",
        ] {
            match render(bad, 1, 0, None) {
                Err(Error::Template { template, .. }) => assert_eq!(template, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }
}
