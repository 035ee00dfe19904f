//! A panic on a checkpoint thread outside the backend's calls (here: a `tracing` subscriber that
//! panics once on the writer's "write starts" event) ends that one operation with the panic,
//! and `flush`, `teardown` and later saves go on: nothing waits for a job that was lost, and
//! nothing it held stays counted.
//!
//! The panicking subscriber is the process's global default, so this binary holds one test.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use ckptio::runtime::Builder;
use ckptio::{
    DType, Dict, Error, LiveTensor, SnapshotMode, TensorSource, TorchCheckpointIo, Value,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Panics at the first "write starts" event it sees on a thread that `armed` allows.
struct Tripwire {
    next: AtomicU64,
    armed: AtomicBool,
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for &'static Tripwire {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        if m.0.contains("write starts") && self.armed.swap(false, Ordering::SeqCst) {
            panic!("tripwire: a tracing layer panicked");
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// `n` ones, copied after a pause of `pause` (a slow device, say).
struct Ones {
    n: usize,
    pause: Duration,
}

impl TensorSource for Ones {
    fn dtype(&self) -> DType {
        DType::Float32
    }
    fn shape(&self) -> Vec<usize> {
        vec![self.n]
    }
    fn copy_to(&self, dst: &mut [u8]) -> ckptio::Result<()> {
        std::thread::sleep(self.pause);
        for c in dst.chunks_exact_mut(4) {
            c.copy_from_slice(&1f32.to_le_bytes());
        }
        Ok(())
    }
}

fn tree(pause: Duration) -> Value {
    let mut d = Dict::new();
    d.insert("w", LiveTensor::new(Ones { n: 1024, pause }));
    Value::Dict(d)
}

#[test]
fn a_panic_on_a_checkpoint_thread_ends_that_save_with_it_and_nothing_waits_for_it() {
    let trip: &'static Tripwire = Box::leak(Box::new(Tripwire {
        next: AtomicU64::new(0),
        armed: AtomicBool::new(false),
    }));
    tracing::subscriber::set_global_default(trip).expect("the only subscriber");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for mode in [SnapshotMode::Eager, SnapshotMode::Deferred] {
            let dir = tempfile::tempdir().unwrap();
            let io = Builder::default()
                .snapshot_mode(mode)
                .build(TorchCheckpointIo::new());
            trip.armed.store(true, Ordering::SeqCst);
            let lost = dir.path().join("lost.pt");
            // The copy is still running when the writer, handed the save before it, panics.
            let slow = tree(Duration::from_millis(300));
            let err = io.save(&slow, &lost).unwrap().wait().unwrap_err();
            match &err {
                Error::Background { source, .. } => assert!(
                    matches!(&**source, Error::Panic { message, .. } if message.contains("tripwire")),
                    "{mode:?}: {err}"
                ),
                other => panic!("{mode:?}: expected the panic, got {other:?}"),
            }
            // The lost job gave back its staging buffer (once its copy had ended) and its bytes
            // in flight before its handle heard, nothing waits for it, the writer serves the
            // next save, and the error, told through the handle, is not told again.
            let status = io.status();
            assert_eq!(status.bytes_in_flight, 0, "{mode:?}: {status:?}");
            assert_eq!(status.pool.in_use, 0, "{mode:?}: {status:?}");
            io.flush().unwrap();
            let next = dir.path().join("next.pt");
            io.save(&tree(Duration::ZERO), &next)
                .unwrap()
                .wait()
                .unwrap();
            assert!(next.exists(), "{mode:?}");
            io.teardown().unwrap();
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("hung: a job lost to a panic is still waited for");
}
