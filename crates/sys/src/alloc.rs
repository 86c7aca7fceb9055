//! mimalloc, called the way its own C API is fastest, and asked to give freed memory back.
//!
//! The `mimalloc` crate's allocator passes every Rust allocation to `mi_malloc_aligned`, even at
//! the natural alignment. Above 1 KiB that takes mimalloc's generic aligned path, which
//! over-allocates and realigns (callgrind: ~600 instructions per proxied request, in hyper's
//! 8 KiB read buffers and the large request futures). Plain `mi_malloc` already returns
//! blocks aligned to 16 bytes (8 for blocks smaller than 16), so only larger alignments need
//! the aligned calls.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every `mi_malloc` block of at least this size has (`MI_MAX_ALIGN_SIZE`).
const MI_MAX_ALIGN: usize = 16;

/// mimalloc as the global allocator; see the module doc.
#[derive(Debug, Default, Clone, Copy)]
pub struct MiMalloc;

/// Whether `mi_malloc` alone guarantees `layout`'s alignment.
#[inline]
fn natural(layout: Layout) -> bool {
    layout.align() <= MI_MAX_ALIGN && layout.align() <= layout.size().max(8)
}

// SAFETY: every method forwards to the mimalloc function with the same contract as the
// `GlobalAlloc` method (a null return on failure; `mi_free`/`mi_realloc*` accept any pointer
// mimalloc returned). `natural` only sends a layout to the unaligned calls when mimalloc's
// documented minimum alignment (16 bytes for blocks of 16 bytes or more, 8 below) covers it.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl's comment.
        unsafe {
            if natural(layout) {
                mi::mi_malloc(layout.size()) as *mut u8
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl's comment.
        unsafe {
            if natural(layout) {
                mi::mi_zalloc(layout.size()) as *mut u8
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl's comment.
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl's comment; the new block keeps `layout.align()`.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            if natural(new_layout) {
                mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

/// Returns the calling thread's free mimalloc pages to the OS now (`mi_collect(true)`).
pub fn collect_freed_memory() {
    // SAFETY: `mi_collect` has no preconditions: it walks the calling thread's own heap and
    // returns its free pages to the OS.
    unsafe { mi::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_and_alignment_is_honoured_and_realloc_keeps_the_bytes() {
        let allocator = MiMalloc;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [
                1usize, 7, 8, 9, 15, 16, 24, 36, 40, 56, 72, 100, 200, 1024, 1025, 3000, 8192,
                70_000,
            ] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero-size layout; every pointer is freed with its layout.
                unsafe {
                    let p = allocator.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    std::ptr::write_bytes(p, 0xAB, size);
                    let grown = allocator.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "realloc {size} align {align}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xAB));
                    allocator.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                    let z = allocator.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    allocator.dealloc(z, layout);
                }
            }
        }
    }
}
