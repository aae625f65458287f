//! Memory allocator settings for training.
//!
//! A training step allocates and frees hundreds of large tensors (activations, their
//! gradients, optimizer temporaries). glibc serves every allocation above its mmap threshold
//! (at most 32 MiB) with a fresh mmap and returns it with munmap on free, so each step faults
//! in and zeroes gigabytes of new pages: measured on the 8-layer SmolLM2 bench step, 2 million
//! minor page faults and 5 CPU-seconds of kernel time per step. Keeping freed memory in the
//! heap for reuse removes most of it (154 thousand faults, 2 s), at the cost of a higher peak
//! RSS from fragmentation (see README, "Benchmarks").

/// Makes glibc malloc keep freed memory for reuse: no mmap for large blocks, no trimming of
/// the heap top. Call at start-up before the first large allocation. No effect (and no
/// error) with another libc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
