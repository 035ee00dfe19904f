//! Per-thread heap accounting for the hostile-input tests: a global allocator that forwards to
//! the system's and counts, per thread, the bytes in use and their peak. A test binary that
//! wants it includes this file (`#[path = "common/heap.rs"] mod heap;`), which installs the
//! allocator for that binary only; [`peak_of`] measures one call on the calling thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static CUR: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = CUR.try_with(|c| {
        let v = c.get() + delta;
        c.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        track(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            track(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`; returns its result and the peak heap it used on this thread beyond what was in
/// use when it started.
pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CUR.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = (PEAK.with(Cell::get) - base).max(0) as usize;
    (r, peak)
}
