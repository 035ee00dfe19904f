//! Transparent huge pages for memory that already exists (`madvise(MADV_COLLAPSE)`, Linux 6.1).
//!
//! Memory that ckptio walks again and again (the tensors a write-protected save protects)
//! costs less in 2 MiB pages: one page-table entry where 4 KiB pages need 512. The tensors
//! belong to the caller and are already faulted in, so ckptio asks for huge pages after the
//! fact, off the training thread (the copier does, between saves).
//!
//! `MADV_COLLAPSE` copies each 2 MiB block into a huge page; it never changes the contents,
//! only how they are mapped, so it is harmless on memory that has been freed or reused since.
//! It ignores the administrator's THP setting, so [`allowed`] checks that setting first.

// Only the write-protect copier collapses memory, and it exists on these targets only.
#![cfg_attr(
    not(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )),
    allow(dead_code)
)]

/// The huge page size on x86_64, and on aarch64 with 4 KiB pages.
pub(crate) const HUGE: usize = 2 << 20;

/// Whether the kernel's transparent huge pages are 2 MiB and not turned off (`never`).
pub(crate) fn allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        let sys = "/sys/kernel/mm/transparent_hugepage";
        let enabled = std::fs::read_to_string(format!("{sys}/enabled")).unwrap_or_default();
        let size = std::fs::read_to_string(format!("{sys}/hpage_pmd_size")).unwrap_or_default();
        !enabled.contains("[never]") && size.trim().parse() == Ok(HUGE)
    })
}

/// Asks the kernel to back the 2 MiB block at `start` (a multiple of [`HUGE`]) with a huge
/// page now. The kernel copies the block's pages into the huge page, so this costs time in
/// proportion to the block, holding the process's memory-map lock meanwhile.
#[allow(unsafe_code)]
pub(crate) fn collapse(start: usize) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        /// `MADV_COLLAPSE` (Linux 6.1).
        const MADV_COLLAPSE: libc::c_int = 25;
        // SAFETY: `MADV_COLLAPSE` never changes the contents of memory, only how it is
        // mapped; on a range no longer mapped it fails, harmlessly.
        let r = unsafe { libc::madvise(start as *mut libc::c_void, HUGE, MADV_COLLAPSE) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = start;
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// The 2 MiB blocks that lie wholly inside `range`.
pub(crate) fn blocks(range: &std::ops::Range<usize>) -> impl Iterator<Item = usize> {
    let first = range.start.next_multiple_of(HUGE);
    let end = range.end;
    (first..end).step_by(HUGE).filter(move |b| b + HUGE <= end)
}

/// Kilobytes of `r` mapped with transparent huge pages, from `/proc/self/smaps` (for tests).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn huge_kib(r: &std::ops::Range<usize>) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a < r.end && r.start < b;
                continue;
            }
        }
        if let Some(v) = line.strip_prefix("AnonHugePages:") {
            if inside {
                kib += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    kib
}

/// Whether huge pages may be asked for here and the kernel gives one when asked for a block
/// of fresh memory (for tests).
#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)]
pub(crate) fn kernel_collapses() -> bool {
    if !allowed() {
        return false;
    }
    let len = 2 * HUGE;
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    let map = p as usize..p as usize + len;
    let block = map.start.next_multiple_of(HUGE);
    // SAFETY: a block inside the fresh mapping; nobody else uses it.
    unsafe { std::ptr::write_bytes(block as *mut u8, 1, HUGE) };
    let _ = collapse(block);
    let given = huge_kib(&map) > 0;
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(p, len) };
    given
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_blocks_of_a_range_are_the_whole_2_mib_blocks_inside_it() {
        let m = HUGE;
        assert_eq!(blocks(&(0..m)).collect::<Vec<_>>(), vec![0]);
        assert_eq!(blocks(&(1..m)).count(), 0);
        assert_eq!(blocks(&(4096..3 * m)).collect::<Vec<_>>(), vec![m, 2 * m]);
        assert_eq!(
            blocks(&(m..3 * m - 1)).collect::<Vec<_>>(),
            vec![m],
            "a block cut short is left out"
        );
        assert_eq!(blocks(&(5..5)).count(), 0);
    }
}
