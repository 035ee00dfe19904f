//! `AsyncCheckpointIo` reports through `tracing`: spans for save, stage, write and fsync, and
//! events with the bytes and the durations of stage, queue, write and fsync.

use std::collections::BTreeSet;
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
    spans: Mutex<BTreeSet<String>>,
    events: Mutex<Vec<(String, BTreeSet<String>)>>,
}

#[derive(Default)]
struct Fields {
    message: String,
    names: BTreeSet<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.names.insert(field.name().to_string());
        }
    }
}

impl Subscriber for &'static Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.spans
            .lock()
            .unwrap()
            .insert(span.metadata().name().to_string());
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
    let spans = rec.spans.lock().unwrap().clone();
    for name in [
        "ckptio_save",
        "ckptio_stage",
        "ckptio_write",
        "ckptio_fsync",
    ] {
        assert!(spans.contains(name), "no span {name}: {spans:?}");
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
        for name in ["bytes", "stage_ms", "queue_ms", "write_ms", "fsync_ms"] {
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
