//! Intel AMX tile products for the bfloat16 kernels: one matrix product
//! `C[n][cout] = A[n][cin] · B[cin][cout]` (bf16 in, f32 out) run by the
//! AMX-BF16 unit, 16 rows by 16 columns per tile instruction, where the CPU
//! and the operating system allow it. On CPUs whose AVX512-BF16
//! `vdpbf16ps` is no faster than an f32 FMA, this is what makes the bf16
//! kernels pay.
//!
//! Reads and writes the same layouts as the AVX-512 bf16 kernels of
//! [`super::direct`] and of the face detector (inputs row-major, or read as
//! runs through [`Rows`]; weights in input-channel pairs), so either can run
//! a layer. Knows nothing of networks, only of one product.

/// Rows of a tile, and f32 columns of an accumulator tile.
const ROWS: usize = 16;
/// Input channels one tile product takes at most (64 bytes of bf16).
const K_MAX: usize = 32;

/// Whether this CPU has AMX-BF16 and the kernel let this process use it
/// (asked once; Linux on x86-64 only).
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static GRANTED: OnceLock<bool> = OnceLock::new();
        *GRANTED.get_or_init(|| {
            // The transforms around the tiles run on AVX-512.
            if std::env::var_os("PROFILE_NO_AMX").is_some()
                || super::simd::Isa::detect() != Some(super::simd::Isa::Avx512)
            {
                return false;
            }
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let leaf = std::arch::x86_64::__cpuid_count(7, 0);
            if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
                return false;
            }
            // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux
            // keeps the 8 KiB of tile registers off until a process asks.
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let granted = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            granted == 0
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The tile configuration (palette 1): tiles 0-3 accumulate 16x16 f32;
/// tiles 4/5 hold A and B for 32 input channels, tiles 6/7 for 16.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        // Bytes per row (two bytes each, tiles 0-15 from byte 16), rows
        // (one byte each, from byte 48).
        let tiles: [(u16, u8); 8] = [
            (64, 16),
            (64, 16),
            (64, 16),
            (64, 16),
            (64, 16),
            (64, 16),
            (32, 16),
            (64, 8),
        ];
        for (t, (bytes, rows)) in tiles.into_iter().enumerate() {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&bytes.to_le_bytes());
            c[48 + t] = rows;
        }
        Self(c)
    }
}

/// The tile registers, configured for [`product`] on this thread until
/// dropped.
pub struct Tiles(());

impl Tiles {
    /// Configures the tiles.
    ///
    /// # Safety
    /// [`available`] is true.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn configure() -> Self {
        let config = Config::new();
        // SAFETY: AMX is available (the caller's contract); the
        // configuration is 64 readable bytes.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly))
        };
        Self(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure`, which needs AMX.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem))
        };
    }
}

/// Where the rows of a product's A lie: row `r`'s `k` values are `runs`
/// runs of `k / runs` values, `pitch` values apart, from value `r * stride`.
/// A dense `[n][k]` matrix is one run ([`Rows::dense`]); the detector's stem
/// reads its 5x5 windows straight from the picture as five runs.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    /// Values from one row's first to the next's.
    pub stride: usize,
    /// Runs per row (each a multiple of 16 values).
    pub runs: usize,
    /// Values from one run's first to the next's.
    pub pitch: usize,
}

impl Rows {
    /// Rows of `k` values back to back.
    pub fn dense(k: usize) -> Self {
        Self {
            stride: k,
            runs: 1,
            pitch: 0,
        }
    }
}

/// `c[r][col] = Σ_k a[r][k] · w[k][col]` for `n` rows (a multiple of 16),
/// `cin` input channels and `cout` output channels (a multiple of `width`,
/// itself a multiple of 16). `a` is bf16, its rows laid out as `rows` says
/// (each run a multiple of 16 values); `w` is `[cout / width][cin / 2][width][2]`
/// bf16 (blocks of `width` output channels in input-channel pairs, as the
/// AVX-512 bf16 kernels read them); `c` is `[n][cout]` f32, overwritten.
///
/// # Safety
/// The tiles are configured ([`Tiles`]); `a` holds every value `rows`
/// names for `n` rows, `w` `cin * cout` values, `c` has room for
/// `n * cout`; the divisibility above holds.
#[cfg(target_arch = "x86_64")]
pub unsafe fn product(
    _tiles: &Tiles,
    a: *const u16,
    rows: Rows,
    (n, cin, cout, width): (usize, usize, usize, usize),
    w: *const u16,
    c: *mut f32,
) {
    let run = cin / rows.runs;
    debug_assert!(n.is_multiple_of(ROWS) && run * rows.runs == cin && run.is_multiple_of(ROWS));
    debug_assert!(width.is_multiple_of(ROWS) && cout.is_multiple_of(width));
    let (a_stride, w_stride, c_stride) = (rows.stride * 2, width * 4, cout * 4);
    let columns = cout / ROWS;
    // SAFETY: the tile loads read 16 rows of at most 64 bytes, `a_stride`
    // apart from row r's value k0 of a run (k0 + 32 <= run, or 16 values
    // where only 16 are left), and at most 16 rows of 64 bytes `w_stride`
    // apart from pair (k / 2) of one block's 16 output channels (inside `w`);
    // the stores write 16 rows of 16 f32 `c_stride` apart from row r, column
    // col (col + 16 <= cout). All inside the buffers by the contract.
    unsafe {
        for r in (0..n).step_by(ROWS) {
            for first in (0..columns).step_by(4) {
                let count = (columns - first).min(4);
                for t in 0..count {
                    zero(t);
                }
                for j in 0..rows.runs {
                    let from = a.add(r * rows.stride + j * rows.pitch);
                    let mut k0 = 0;
                    while k0 < run {
                        let wide = run - k0 >= K_MAX;
                        load_a(wide, from.add(k0), a_stride);
                        let k = j * run + k0;
                        for t in 0..count {
                            let col = (first + t) * ROWS;
                            let block = w.add((col / width) * cin * width + (k / 2) * width * 2);
                            let b = block.add((col % width) * 2);
                            multiply(t, wide, b, w_stride);
                        }
                        k0 += if wide { K_MAX } else { ROWS };
                    }
                }
                for t in 0..count {
                    store(t, c.add(r * cout + (first + t) * ROWS), c_stride);
                }
            }
        }
    }
}

/// Zeroes accumulator tile `t` (0-3).
#[cfg(target_arch = "x86_64")]
unsafe fn zero(t: usize) {
    // SAFETY: tiles are configured (the caller's contract).
    unsafe {
        match t {
            0 => std::arch::asm!("tilezero tmm0", options(nostack, nomem)),
            1 => std::arch::asm!("tilezero tmm1", options(nostack, nomem)),
            2 => std::arch::asm!("tilezero tmm2", options(nostack, nomem)),
            _ => std::arch::asm!("tilezero tmm3", options(nostack, nomem)),
        }
    }
}

/// Loads A: 16 rows of 32 channels (tile 4) or of 16 (tile 6).
#[cfg(target_arch = "x86_64")]
unsafe fn load_a(wide: bool, a: *const u16, stride: usize) {
    // SAFETY: by the caller's contract, 16 rows `stride` apart are readable.
    unsafe {
        if wide {
            std::arch::asm!("tileloadd tmm4, [{} + {}*1]", in(reg) a, in(reg) stride,
                options(nostack, readonly));
        } else {
            std::arch::asm!("tileloadd tmm6, [{} + {}*1]", in(reg) a, in(reg) stride,
                options(nostack, readonly));
        }
    }
}

/// Loads B (16 pairs of rows into tile 5, or 8 into tile 7) and adds A·B
/// to accumulator tile `t`.
#[cfg(target_arch = "x86_64")]
unsafe fn multiply(t: usize, wide: bool, b: *const u16, stride: usize) {
    macro_rules! go {
        ($acc:literal) => {
            if wide {
                std::arch::asm!(
                    "tileloadd tmm5, [{b} + {s}*1]",
                    concat!("tdpbf16ps ", $acc, ", tmm4, tmm5"),
                    b = in(reg) b, s = in(reg) stride, options(nostack, readonly))
            } else {
                std::arch::asm!(
                    "tileloadd tmm7, [{b} + {s}*1]",
                    concat!("tdpbf16ps ", $acc, ", tmm6, tmm7"),
                    b = in(reg) b, s = in(reg) stride, options(nostack, readonly))
            }
        };
    }
    // SAFETY: by the caller's contract, the rows of B are readable.
    unsafe {
        match t {
            0 => go!("tmm0"),
            1 => go!("tmm1"),
            2 => go!("tmm2"),
            _ => go!("tmm3"),
        }
    }
}

/// Stores accumulator tile `t`: 16 rows of 16 f32, `stride` bytes apart.
#[cfg(target_arch = "x86_64")]
unsafe fn store(t: usize, c: *mut f32, stride: usize) {
    // SAFETY: by the caller's contract, 16 rows `stride` apart are writable.
    unsafe {
        match t {
            0 => std::arch::asm!("tilestored [{} + {}*1], tmm0", in(reg) c, in(reg) stride,
                options(nostack)),
            1 => std::arch::asm!("tilestored [{} + {}*1], tmm1", in(reg) c, in(reg) stride,
                options(nostack)),
            2 => std::arch::asm!("tilestored [{} + {}*1], tmm2", in(reg) c, in(reg) stride,
                options(nostack)),
            _ => std::arch::asm!("tilestored [{} + {}*1], tmm3", in(reg) c, in(reg) stride,
                options(nostack)),
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::model::direct::{pair_bf16, to_bf16};

    fn from_bf16(v: u16) -> f32 {
        f32::from_bits((v as u32) << 16)
    }

    /// Runs [`product`] on `a` (rows as `rows` says) and `w`
    /// (`[cout / width][cin][width]` f32, paired here as the kernels read it)
    /// and checks every sum against plain loops over the same bfloat16
    /// values.
    fn check_product(
        a: &[u16],
        rows: Rows,
        (n, cin, cout, width): (usize, usize, usize, usize),
        w: &[f32],
    ) {
        let paired = pair_bf16(w, cin, width);
        let mut c = vec![f32::NAN; n * cout];
        // SAFETY: AMX is available (the callers check); `a` holds every value
        // `rows` names for `n` rows, `paired` cin * cout values, `c` n * cout,
        // and the shapes divide as `product` asks (the callers' cases).
        unsafe {
            let tiles = Tiles::configure();
            product(
                &tiles,
                a.as_ptr(),
                rows,
                (n, cin, cout, width),
                paired.as_ptr(),
                c.as_mut_ptr(),
            );
        }
        let run = cin / rows.runs;
        for r in 0..n {
            for col in 0..cout {
                let (g, lane) = (col / width, col % width);
                let want: f32 = (0..cin)
                    .map(|k| {
                        let at = r * rows.stride + (k / run) * rows.pitch + k % run;
                        let wk = to_bf16(w[(g * cin + k) * width + lane]);
                        from_bf16(a[at]) * from_bf16(wk)
                    })
                    .sum();
                let got = c[r * cout + col];
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs().max(1.0),
                    "n {n} cin {cin} cout {cout}: [{r}][{col}] {got} against {want}"
                );
            }
        }
    }

    /// The tile product against plain loops over the same bfloat16 values,
    /// for the channel counts of the shipped network's blocks (32-channel
    /// steps, a 16-channel rest, 1-3 registers per weight group).
    #[test]
    fn tile_products_match_plain_loops() {
        if !available() {
            eprintln!("this CPU has no AMX-BF16: nothing to compare");
            return;
        }
        for (n, cin, cout, width) in [(16, 16, 48, 16), (32, 48, 96, 32), (48, 96, 192, 48)] {
            let a: Vec<u16> = (0..n * cin)
                .map(|i| to_bf16(((i * 37 % 101) as f32 - 50.0) / 25.0))
                .collect();
            let w: Vec<f32> = (0..cin * cout)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 40.0)
                .collect();
            check_product(&a, Rows::dense(cin), (n, cin, cout, width), &w);
        }
    }

    /// Rows read as runs (the detector's stem: five runs of 16 values per
    /// row, rows 6 values apart, runs `pitch` apart, overlapping).
    #[test]
    fn tile_products_read_rows_in_runs() {
        if !available() {
            eprintln!("this CPU has no AMX-BF16: nothing to compare");
            return;
        }
        let (n, runs, len, stride, pitch, cout) = (32, 5, 16, 6, 201, 32);
        let cin = runs * len;
        let a: Vec<u16> = (0..(n - 1) * stride + (runs - 1) * pitch + len)
            .map(|i| to_bf16(((i * 29 % 89) as f32 - 44.0) / 22.0))
            .collect();
        let w: Vec<f32> = (0..cin * cout)
            .map(|i| ((i * 61 % 83) as f32 - 41.0) / 30.0)
            .collect();
        let rows = Rows {
            stride,
            runs,
            pitch,
        };
        check_product(&a, rows, (n, cin, cout, cout), &w);
    }
}
