//! `AsyncCheckpointIo` reports through `tracing`: spans for save, stage, write and fsync, and
//! events with the bytes and the durations of stage, queue, write and fsync.
//!
//! The recording subscriber is the process's global default, so this binary holds one test:
//! another test's saves would add their spans and events to what is counted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ckptio::runtime::Builder;
use ckptio::{DType, Dict, LiveTensor, SnapshotMode, TensorSource, TorchCheckpointIo, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Records the name of every span opened and, for every event, its message and field names.
#[derive(Default)]
struct Recorder {
    next: AtomicU64,
    /// Spans opened, by name and the value of their `mode` or `target` field.
    spans: Mutex<BTreeMap<String, usize>>,
    events: Mutex<Vec<(String, BTreeSet<String>)>>,
}

#[derive(Default)]
struct Fields {
    message: String,
    names: BTreeSet<String>,
    /// String values, as given.
    values: BTreeMap<String, String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.names.insert(field.name().to_string());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &value);
        self.values
            .insert(field.name().to_string(), value.to_string());
    }
}

impl Subscriber for &'static Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut f = Fields::default();
        span.record(&mut f);
        let key = match f.values.get("mode").or(f.values.get("target")) {
            Some(v) => format!("{} {v}", span.metadata().name()),
            None => span.metadata().name().to_string(),
        };
        *self.spans.lock().unwrap().entry(key).or_default() += 1;
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut f = Fields::default();
        event.record(&mut f);
        self.events.lock().unwrap().push((f.message, f.names));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

struct Ramp(usize);

impl TensorSource for Ramp {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![self.0]
    }
    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        for (i, d) in dst.chunks_exact_mut(4).enumerate() {
            d.copy_from_slice(&(i as f32).to_le_bytes());
        }
        Ok(())
    }
}

fn tree() -> Value {
    let mut d = Dict::new();
    d.insert("w", LiveTensor::new(Ramp(1 << 16)));
    d.insert("step", 1i64);
    Value::Dict(d)
}

#[test]
fn saves_are_traced_with_spans_for_each_phase_and_events_with_their_durations() {
    let rec: &'static Recorder = Box::leak(Box::default());
    tracing::subscriber::set_global_default(rec).expect("the only subscriber in this binary");
    let dir = tempfile::tempdir().unwrap();
    for mode in [SnapshotMode::Eager, SnapshotMode::Deferred] {
        let io = Builder::default()
            .snapshot_mode(mode)
            .build(TorchCheckpointIo::new());
        io.save(&tree(), dir.path().join(format!("{mode:?}.pt")))
            .unwrap()
            .wait()
            .unwrap();
        io.teardown().unwrap();
    }
    // Two durable saves, one per mode.
    let spans = rec.spans.lock().unwrap().clone();
    for (name, count) in [
        ("ckptio_save", 2),
        ("ckptio_stage eager", 1),
        ("ckptio_stage deferred", 1),
        ("ckptio_write", 2),
        ("ckptio_fsync file", 2),
        ("ckptio_fsync directory", 2),
    ] {
        assert_eq!(spans.get(name), Some(&count), "span {name}: {spans:?}");
    }
    let events = rec.events.lock().unwrap().clone();
    let fields_of = |msg: &str| -> Vec<BTreeSet<String>> {
        events
            .iter()
            .filter(|(m, _)| m.contains(msg))
            .map(|(_, f)| f.clone())
            .collect()
    };
    let durable = fields_of("checkpoint durable");
    assert_eq!(durable.len(), 2, "{events:?}");
    for f in &durable {
        for name in [
            "bytes",
            "stage_ms",
            "copied_ms",
            "queue_ms",
            "write_ms",
            "fsync_ms",
        ] {
            assert!(f.contains(name), "no {name} in {f:?}");
        }
    }
    let staged = fields_of("snapshot taken");
    assert_eq!(staged.len(), 2, "one per mode: {events:?}");
    assert!(staged
        .iter()
        .all(|f| f.contains("stage_ms") && f.contains("bytes")));
    assert!(
        fields_of("queue wait")
            .iter()
            .any(|f| f.contains("queue_ms")),
        "{events:?}"
    );
}
