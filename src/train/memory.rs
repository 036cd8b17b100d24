//! How the process's allocator treats freed memory while training.
//!
//! Through candle's autograd every optimiser step builds and drops tens of
//! megabytes of tensors (the im2col buffers alone are larger than glibc's
//! largest mmap threshold), and glibc's defaults return such blocks to the
//! kernel at once and map them again on the next step: on two cores a
//! quarter of training went into page faults and zeroing fresh pages. The
//! CPU step of [`crate::model::backprop`] keeps its buffers itself; the
//! setting still serves validation, the autograd path and the benches.
//! Touches nothing but allocator settings; does nothing on other C libraries.

/// Blocks below this come from the heap, not from their own mapping.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1 << 30;
/// Free memory at the top of the heap kept before any is given back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Asks glibc to serve large blocks from its heap and keep freed memory for
/// the next step. Process-wide; meant for the training process. Returns
/// whether the allocator took the settings.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it takes plain
        // integers and is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_settings() {
        assert!(super::keep_freed_memory());
    }
}
