//! The inference network as direct AVX-512 convolutions: no im2col copy, no
//! intermediate tensors, batch norm already folded into the weights.
//!
//! Each picture runs through every block while its activations stay in cache:
//! a conv block computes two output rows at a time with a register-tiled
//! kernel (a strip of pixels times 16 or 32 output channels, accumulated over
//! the nine taps and every input channel), then max-pools the two rows, adds
//! the bias, applies ReLU and writes straight into the zero-padded input of
//! the next block; the last block feeds global average pooling and the linear
//! layer. Scratch buffers are kept per thread and reused, so the hot path does
//! not allocate.
//!
//! Only for x86-64 CPUs with AVX-512F and for shapes the tiles fit (output
//! channels a multiple of 16, every block's input side a multiple of 8):
//! [`DirectNet::new`] says `None` otherwise and the caller keeps the im2col
//! path. This module knows nothing of candle tensors, files or training.

use std::cell::RefCell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Output channels held by one AVX-512 register.
const LANES: usize = 16;
/// Taps of a 3x3 kernel.
const TAPS: usize = 9;
/// Fewest pictures worth a thread of their own in [`DirectNet::logits`].
pub const MIN_PER_THREAD: usize = 4;

/// One folded conv block: packed weights and bias.
struct Block {
    /// Input side (square) and channels; output channels.
    side: usize,
    cin: usize,
    cout: usize,
    /// Output-channel registers per tile (1 or 2).
    group: usize,
    /// Pixels per tile (8 or 16).
    strip: usize,
    /// `[cout / (16*group)][9][cin][16*group]`.
    weights: Vec<f32>,
    bias: Vec<f32>,
}

/// The folded network in the layout the kernels read.
pub struct DirectNet {
    blocks: Vec<Block>,
    /// `[features, labels]`, row-major.
    fc_w: Vec<f32>,
    fc_b: Vec<f32>,
    labels: usize,
}

/// Per-thread scratch: one padded input buffer per block and two conv rows.
#[derive(Default)]
struct Scratch {
    /// `(side, channels)` of each padded buffer, as last laid out.
    geometry: Vec<(usize, usize)>,
    padded: Vec<Vec<f32>>,
    rows: Vec<f32>,
    /// One pooled pixel's channels.
    pixel: Vec<f32>,
    /// Global average pool of the last block.
    features: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Whether this CPU runs the kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl DirectNet {
    /// Builds the network from folded blocks (`[Cout, Cin, 3, 3]` weights with
    /// the batch-norm scale applied, and the per-channel shift), the linear
    /// layer as `[features, labels]` and its bias. `None` when the CPU or the
    /// shapes do not suit the kernels.
    pub fn new(
        input_size: usize,
        input_channels: usize,
        convs: &[(Vec<f32>, Vec<f32>)],
        fc_w: Vec<f32>,
        fc_b: Vec<f32>,
    ) -> Option<Self> {
        if !available() || convs.is_empty() {
            return None;
        }
        let mut side = input_size;
        let mut cin = input_channels;
        let mut blocks = Vec::with_capacity(convs.len());
        for (w, b) in convs {
            let cout = b.len();
            if !cout.is_multiple_of(LANES)
                || !side.is_multiple_of(8)
                || side < 8
                || w.len() != cout * cin * TAPS
            {
                return None;
            }
            let group = if cout.is_multiple_of(2 * LANES) { 2 } else { 1 };
            let strip = if group == 1 && side.is_multiple_of(16) {
                16
            } else {
                8
            };
            let width = group * LANES;
            let mut packed = vec![0f32; w.len()];
            for co in 0..cout {
                let (g, lane) = (co / width, co % width);
                for ci in 0..cin {
                    for tap in 0..TAPS {
                        packed[((g * TAPS + tap) * cin + ci) * width + lane] =
                            w[(co * cin + ci) * TAPS + tap];
                    }
                }
            }
            blocks.push(Block {
                side,
                cin,
                cout,
                group,
                strip,
                weights: packed,
                bias: b.clone(),
            });
            side /= 2;
            cin = cout;
        }
        let labels = fc_b.len();
        if labels == 0 || fc_w.len() != cin * labels {
            return None;
        }
        Some(Self {
            blocks,
            fc_w,
            fc_b,
            labels,
        })
    }

    /// Input values per picture (`side * side * channels`, NHWC).
    pub fn input_len(&self) -> usize {
        let b = &self.blocks[0];
        b.side * b.side * b.cin
    }

    /// Number of outputs per picture.
    pub fn labels(&self) -> usize {
        self.labels
    }

    /// Logits `[n, labels]` for `n` normalised NHWC pictures laid end to end,
    /// on up to `threads` threads (this one included) when there are at
    /// least [`MIN_PER_THREAD`] pictures for each. The threads claim chunks
    /// of [`MIN_PER_THREAD`] pictures until none are left, so one slowed by
    /// other work (the decoders share the cores) holds the batch up by one
    /// chunk at most.
    ///
    /// # Panics
    /// When `input.len()` is not a whole number of pictures.
    pub fn logits(&self, input: &[f32], threads: usize) -> Vec<f32> {
        let len = self.input_len();
        assert!(
            input.len().is_multiple_of(len),
            "input is not a whole number of pictures"
        );
        let n = input.len() / len;
        let threads = threads.clamp(1, (n / MIN_PER_THREAD).max(1));
        let mut out = vec![0f32; n * self.labels];
        if threads == 1 {
            self.run(input, &mut out);
            return out;
        }
        let chunks: Vec<Mutex<(&[f32], &mut [f32])>> = input
            .chunks(MIN_PER_THREAD * len)
            .zip(out.chunks_mut(MIN_PER_THREAD * self.labels))
            .map(Mutex::new)
            .collect();
        let next = AtomicUsize::new(0);
        let work = || {
            while let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                // Each chunk is claimed once, so the lock is never contended.
                if let Ok(mut guard) = chunk.lock() {
                    let (pictures, logits) = &mut *guard;
                    self.run(pictures, logits);
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
        drop(chunks);
        out
    }

    /// Runs whole pictures on this thread, writing `labels` logits each.
    fn run(&self, input: &[f32], out: &mut [f32]) {
        SCRATCH.with_borrow_mut(|scratch| {
            self.prepare(scratch);
            for (picture, logits) in input
                .chunks_exact(self.input_len())
                .zip(out.chunks_exact_mut(self.labels))
            {
                self.picture(picture, scratch, logits);
            }
        });
    }

    /// Lays the scratch buffers out for this network. The padded buffers are
    /// zeroed only when the geometry changes (another network, after a
    /// reload): later pictures write interiors only, so borders stay zero.
    fn prepare(&self, s: &mut Scratch) {
        let same = s.geometry.len() == self.blocks.len()
            && s.geometry
                .iter()
                .zip(&self.blocks)
                .all(|(&g, b)| g == (b.side, b.cin));
        if !same {
            s.geometry = self.blocks.iter().map(|b| (b.side, b.cin)).collect();
            s.padded = self
                .blocks
                .iter()
                .map(|b| vec![0.0; (b.side + 2) * (b.side + 2) * b.cin])
                .collect();
        }
        let rows = self
            .blocks
            .iter()
            .map(|b| 2 * b.side * b.cout)
            .max()
            .unwrap_or(0);
        if s.rows.len() < rows {
            s.rows.resize(rows, 0.0);
        }
        let widest = self.blocks.iter().map(|b| b.cout).max().unwrap_or(0);
        s.pixel.resize(widest, 0.0);
    }

    fn picture(&self, picture: &[f32], s: &mut Scratch, out: &mut [f32]) {
        let Scratch {
            padded,
            rows,
            pixel,
            features: pooled,
            ..
        } = s;
        // Copy the picture into the first padded buffer's interior.
        let b0 = &self.blocks[0];
        let (side, c) = (b0.side, b0.cin);
        for y in 0..side {
            let to = ((y + 1) * (side + 2) + 1) * c;
            padded[0][to..to + side * c].copy_from_slice(&picture[y * side * c..][..side * c]);
        }
        let last = self.blocks.len() - 1;
        pooled.clear();
        pooled.resize(self.blocks[last].cout, 0.0);
        for (i, block) in self.blocks.iter().enumerate() {
            let (done, rest) = padded.split_at_mut(i + 1);
            let input = &done[i];
            let half = block.side / 2;
            for y in (0..block.side).step_by(2) {
                block.conv_rows(input, y, rows);
                let rows = &rows[..2 * block.side * block.cout];
                let pixel = &mut pixel[..block.cout];
                if i == last {
                    block.pool_rows(rows, pixel, |_, v| {
                        for (p, v) in pooled.iter_mut().zip(v) {
                            *p += v;
                        }
                    });
                } else {
                    let next = &mut rest[0];
                    let stride = (half + 2) * block.cout;
                    let row = &mut next[(y / 2 + 1) * stride..][..stride];
                    block.pool_rows(rows, pixel, |x, v| {
                        row[(x + 1) * block.cout..][..block.cout].copy_from_slice(v);
                    });
                }
            }
        }
        let count = {
            let b = &self.blocks[last];
            ((b.side / 2) * (b.side / 2)) as f32
        };
        for p in pooled.iter_mut() {
            *p /= count;
        }
        for (l, logit) in out.iter_mut().enumerate() {
            let mut acc = self.fc_b[l];
            for (f, p) in pooled.iter().enumerate() {
                acc += p * self.fc_w[f * self.labels + l];
            }
            *logit = acc;
        }
    }
}

impl Block {
    /// Conv output rows `y` and `y + 1` (without bias) into `rows`,
    /// `[2][side][cout]`, from the padded input `[side+2][side+2][cin]`.
    fn conv_rows(&self, input: &[f32], y: usize, rows: &mut [f32]) {
        let (side, cin, cout) = (self.side, self.cin, self.cout);
        let width = self.group * LANES;
        assert!(input.len() == (side + 2) * (side + 2) * cin);
        assert!(rows.len() >= 2 * side * cout && y + 1 < side);
        assert!(self.weights.len() == cout * TAPS * cin && side.is_multiple_of(self.strip));
        let row_stride = (side + 2) * cin;
        for dy in 0..2 {
            for x in (0..side).step_by(self.strip) {
                for g in 0..cout / width {
                    let src = ((y + dy) * (side + 2) + x) * cin;
                    let w = g * TAPS * cin * width;
                    let dst = (dy * side + x) * cout + g * width;
                    // SAFETY: `available()` was checked when the network was
                    // built. The tile reads padded rows y+dy..y+dy+2 and
                    // columns x..x+strip+2, all inside `input` (checked above);
                    // the weights of group g span TAPS*cin*width values inside
                    // `weights`; it writes `strip` pixels of `width` channels
                    // starting at `dst`, inside `rows`.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        let (i, wp, o) = (
                            input.as_ptr().add(src),
                            self.weights.as_ptr().add(w),
                            rows.as_mut_ptr().add(dst),
                        );
                        match (self.strip, self.group) {
                            (16, 1) => tile::<16, 1>(i, row_stride, cin, wp, o, cout),
                            (8, 1) => tile::<8, 1>(i, row_stride, cin, wp, o, cout),
                            _ => tile::<8, 2>(i, row_stride, cin, wp, o, cout),
                        }
                    }
                }
            }
        }
    }

    /// 2x2 max-pool of two conv rows, plus bias, then ReLU; hands each pooled
    /// pixel's channels to `emit(x, values)`.
    fn pool_rows(&self, rows: &[f32], pixel: &mut [f32], mut emit: impl FnMut(usize, &[f32])) {
        let (side, c) = (self.side, self.cout);
        let (top, bottom) = rows.split_at(side * c);
        for x in 0..side / 2 {
            let a = &top[2 * x * c..][..2 * c];
            let b = &bottom[2 * x * c..][..2 * c];
            for (ch, out) in pixel.iter_mut().enumerate() {
                let m = a[ch].max(a[c + ch]).max(b[ch].max(b[c + ch]));
                *out = (m + self.bias[ch]).max(0.0);
            }
            emit(x, pixel);
        }
    }
}

/// One register tile: `P` pixels of one output row times `G` registers of
/// output channels, summed over the 3x3 taps and `cin` input channels.
///
/// # Safety
/// The CPU supports AVX-512F; `input` points at padded pixel (row, x) of a
/// buffer with `row_stride` values per padded row and holds rows row..row+2,
/// columns x..x+P+2; `w` holds `9 * cin * 16 * G` values; `out` has room for
/// `P` pixels `out_stride` apart of `16 * G` values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const P: usize, const G: usize>(
    input: *const f32,
    row_stride: usize,
    cin: usize,
    w: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); G]; P];
    for ky in 0..3 {
        for kx in 0..3 {
            // SAFETY: in bounds by the function's contract.
            let ip = unsafe { input.add(ky * row_stride + kx * cin) };
            let wp = unsafe { w.add((ky * 3 + kx) * cin * G * LANES) };
            for ci in 0..cin {
                let mut wv = [_mm512_setzero_ps(); G];
                for (g, v) in wv.iter_mut().enumerate() {
                    *v = unsafe { _mm512_loadu_ps(wp.add((ci * G + g) * LANES)) };
                }
                for (p, row) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(unsafe { *ip.add(p * cin + ci) });
                    for (r, v) in row.iter_mut().zip(&wv) {
                        *r = _mm512_fmadd_ps(a, *v, *r);
                    }
                }
            }
        }
    }
    for (p, row) in acc.iter().enumerate() {
        for (g, r) in row.iter().enumerate() {
            unsafe { _mm512_storeu_ps(out.add(p * out_stride + g * LANES), *r) };
        }
    }
}
