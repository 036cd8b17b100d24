//! The inference network as direct AVX-512 convolutions: no im2col copy, no
//! intermediate tensors, batch norm already folded into the weights.
//!
//! Each picture runs through every block while its activations stay in cache.
//! A block whose input has a multiple of 16 channels (every block but the
//! first) is a Winograd F(2x2, 3x3) convolution: each 2x2 output tile, which
//! is exactly one max-pool window, costs 16 multiplies per input/output
//! channel pair instead of 36; the input and output transforms are adds only,
//! and the 16 products per tile are 16 small matrix products run by a
//! register-tiled kernel. The first block (3 input channels) computes two
//! output rows at a time with a direct register-tiled kernel (a strip of
//! pixels times 16 or 32 output channels, accumulated over the nine taps and
//! every input channel). Either way the block then max-pools, adds the bias,
//! applies ReLU and writes straight into the zero-padded input of the next
//! block; the last block feeds global average pooling and the linear layer.
//! Scratch buffers are kept by the network and handed to whichever thread
//! runs, so the hot path does not allocate.
//!
//! Only for x86-64 CPUs with AVX-512F and for shapes the tiles fit (output
//! channels a multiple of 16, every block's input side a multiple of 8):
//! [`DirectNet::new`] says `None` otherwise and the caller keeps the im2col
//! path. This module knows nothing of candle tensors, files or training.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Output channels held by one AVX-512 register.
const LANES: usize = 16;
/// Taps of a 3x3 kernel.
const TAPS: usize = 9;
/// Winograd tiles transformed and multiplied together (bounds the scratch
/// to a few hundred KiB, so it stays in L2).
const WINO_CHUNK: usize = 64;
/// Positions of a Winograd F(2x2, 3x3) tile (4x4).
const WINO: usize = 16;
/// Pictures a thread claims at a time in [`DirectNet::logits`], and the
/// fewest worth a thread of their own.
pub const MIN_PER_THREAD: usize = 4;

/// One folded conv block: packed weights and bias.
struct Block {
    /// Input side (square) and channels; output channels.
    side: usize,
    cin: usize,
    cout: usize,
    /// Output-channel registers per register tile (1, 2 or 3).
    group: usize,
    /// Pixels (direct) or Winograd tiles per register tile (8 or 16).
    strip: usize,
    /// Whether this block runs as Winograd F(2x2, 3x3).
    winograd: bool,
    /// Direct: `[cout / (16*group)][9][cin][16*group]`.
    /// Winograd: `[16][cout / (16*group)][cin][16*group]`, transformed.
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
    /// Scratch of the threads not running now, kept warm between batches
    /// (the helper threads of a split batch are new each time).
    scratch: Mutex<Vec<Scratch>>,
}

/// One thread's scratch while it runs pictures of one network: one padded
/// input buffer per block, two conv rows, Winograd buffers.
struct Scratch {
    padded: Vec<Vec<f32>>,
    rows: Vec<f32>,
    /// One pooled pixel's channels.
    pixel: Vec<f32>,
    /// Global average pool of the last block.
    features: Vec<f32>,
    /// Winograd: transformed input `[16][tiles][cin]` and products
    /// `[16][tiles][cout]` of one chunk of tiles.
    wino_in: Vec<f32>,
    wino_out: Vec<f32>,
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
            let winograd = cin.is_multiple_of(LANES);
            let (group, strip, weights) = if winograd {
                let group = if cout.is_multiple_of(3 * LANES) {
                    3
                } else if cout.is_multiple_of(2 * LANES) {
                    2
                } else {
                    1
                };
                let strip = if group == 1 { 16 } else { 8 };
                (group, strip, winograd_weights(w, cin, cout, group * LANES))
            } else {
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
                (group, strip, packed)
            };
            blocks.push(Block {
                side,
                cin,
                cout,
                group,
                strip,
                winograd,
                weights,
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
            scratch: Mutex::new(Vec::new()),
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
        let mut scratch = self
            .scratch
            .lock()
            .ok()
            .and_then(|mut kept| kept.pop())
            .unwrap_or_else(|| self.new_scratch());
        for (picture, logits) in input
            .chunks_exact(self.input_len())
            .zip(out.chunks_exact_mut(self.labels))
        {
            self.picture(picture, &mut scratch, logits);
        }
        if let Ok(mut kept) = self.scratch.lock() {
            kept.push(scratch);
        }
    }

    /// Scratch laid out for this network. The padded buffers start zeroed;
    /// pictures write their interiors only, so the borders stay zero.
    fn new_scratch(&self) -> Scratch {
        let most = |size: fn(&Block) -> usize| self.blocks.iter().map(size).max().unwrap_or(0);
        Scratch {
            padded: self
                .blocks
                .iter()
                .map(|b| vec![0.0; (b.side + 2) * (b.side + 2) * b.cin])
                .collect(),
            rows: vec![0.0; most(|b| 2 * b.side * b.cout)],
            pixel: vec![0.0; most(|b| b.cout)],
            features: Vec::new(),
            wino_in: vec![
                0.0;
                most(|b| if b.winograd {
                    WINO * b.wino_chunk() * b.cin
                } else {
                    0
                })
            ],
            wino_out: vec![
                0.0;
                most(|b| if b.winograd {
                    WINO * b.wino_chunk() * b.cout
                } else {
                    0
                })
            ],
        }
    }

    fn picture(&self, picture: &[f32], s: &mut Scratch, out: &mut [f32]) {
        let Scratch {
            padded,
            rows,
            pixel,
            features: pooled,
            wino_in,
            wino_out,
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
            if block.winograd {
                let pixel = &mut pixel[..block.cout];
                if i == last {
                    block.winograd_pool(input, wino_in, wino_out, pixel, |_, _, v| {
                        for (p, v) in pooled.iter_mut().zip(v) {
                            *p += v;
                        }
                    });
                } else {
                    let next = &mut rest[0];
                    let c = block.cout;
                    block.winograd_pool(input, wino_in, wino_out, pixel, |y, x, v| {
                        next[((y + 1) * (half + 2) + x + 1) * c..][..c].copy_from_slice(v);
                    });
                }
                continue;
            }
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
                            (16, 1) => tile::<16, 1, 3>(i, row_stride, cin, wp, o, cout),
                            (8, 1) => tile::<8, 1, 3>(i, row_stride, cin, wp, o, cout),
                            _ => tile::<8, 2, 3>(i, row_stride, cin, wp, o, cout),
                        }
                    }
                }
            }
        }
    }

    /// Tiles per Winograd chunk: all of them for small sides, else
    /// [`WINO_CHUNK`]. Every chunk, the last included, is a multiple of 16
    /// tiles (sides are multiples of 8), so of every register tile's `strip`.
    fn wino_chunk(&self) -> usize {
        ((self.side / 2) * (self.side / 2)).min(WINO_CHUNK)
    }

    /// The whole block as Winograd F(2x2, 3x3) from the padded input
    /// `[side+2][side+2][cin]`: each 2x2 output tile is max-pooled, biased
    /// and ReLU'd, and handed to `emit(y, x, values)` as pooled pixel (y, x).
    fn winograd_pool(
        &self,
        input: &[f32],
        v: &mut [f32],
        m: &mut [f32],
        pixel: &mut [f32],
        mut emit: impl FnMut(usize, usize, &[f32]),
    ) {
        let (side, cin, cout) = (self.side, self.cin, self.cout);
        let (half, chunk, width) = (side / 2, self.wino_chunk(), self.group * LANES);
        let total = half * half;
        assert!(input.len() == (side + 2) * (side + 2) * cin);
        assert!(v.len() >= WINO * chunk * cin && m.len() >= WINO * chunk * cout);
        assert!(pixel.len() == cout && self.bias.len() == cout);
        assert!(self.weights.len() == WINO * cout * cin);
        assert!(total.is_multiple_of(16) && chunk.is_multiple_of(16) && 16 % self.strip == 0);
        assert!(cin.is_multiple_of(LANES) && cout.is_multiple_of(width));
        let row_stride = (side + 2) * cin;
        for start in (0..total).step_by(chunk) {
            // The last chunk may be shorter (a multiple of 16 tiles all the same).
            let n = chunk.min(total - start);
            // SAFETY (all three steps): `available()` was checked when the
            // network was built. Tile t reads padded rows 2y..2y+4 and columns
            // 2x..2x+4 (y, x < half), inside `input`; the chunk's transformed
            // input spans WINO * n * cin values of `v`, its products
            // WINO * n * cout values of `m`, and the weights of one
            // position and register group cin * width values of `weights`
            // (all checked above); channel offsets step by whole registers.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                for k in 0..n {
                    let (y, x) = ((start + k) / half, (start + k) % half);
                    let src = input.as_ptr().add((2 * y * (side + 2) + 2 * x) * cin);
                    for c in (0..cin).step_by(LANES) {
                        let dst = v.as_mut_ptr().add(k * cin + c);
                        wino_input(src.add(c), row_stride, cin, dst, n * cin);
                    }
                }
                for pos in 0..WINO {
                    let vp = v.as_ptr().add(pos * n * cin);
                    let mp = m.as_mut_ptr().add(pos * n * cout);
                    for g in 0..cout / width {
                        let u = self
                            .weights
                            .as_ptr()
                            .add((pos * (cout / width) + g) * cin * width);
                        for k in (0..n).step_by(self.strip) {
                            let (i, o) = (vp.add(k * cin), mp.add(k * cout + g * width));
                            match self.group {
                                // One position: a 1x1 "convolution" of the tiles.
                                3 => tile::<8, 3, 1>(i, 0, cin, u, o, cout),
                                2 => tile::<8, 2, 1>(i, 0, cin, u, o, cout),
                                _ => tile::<16, 1, 1>(i, 0, cin, u, o, cout),
                            }
                        }
                    }
                }
                for k in 0..n {
                    for c in (0..cout).step_by(LANES) {
                        wino_output(
                            m.as_ptr().add(k * cout + c),
                            n * cout,
                            self.bias.as_ptr().add(c),
                            pixel.as_mut_ptr().add(c),
                        );
                    }
                    emit((start + k) / half, (start + k) % half, pixel);
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

/// One register tile: `P` pixels times `G` registers of output channels,
/// summed over a `K`x`K` window and `cin` input channels. `K = 3` is the
/// direct 3x3 convolution of one output row; `K = 1` is one Winograd
/// position's product (each "pixel" then a tile's `cin` transformed inputs).
///
/// # Safety
/// The CPU supports AVX-512F; `input` points at pixel (row, x) of a buffer
/// with `row_stride` values per row and `cin` per pixel, and holds rows
/// row..row+K, columns x..x+P+K-1; `w` holds `K * K * cin * 16 * G` values
/// (`[K*K][cin][16*G]`); `out` has room for `P` pixels `out_stride` apart of
/// `16 * G` values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn tile<const P: usize, const G: usize, const K: usize>(
    input: *const f32,
    row_stride: usize,
    cin: usize,
    w: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); G]; P];
    for ky in 0..K {
        for kx in 0..K {
            // SAFETY: in bounds by the function's contract.
            let ip = unsafe { input.add(ky * row_stride + kx * cin) };
            let wp = unsafe { w.add((ky * K + kx) * cin * G * LANES) };
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

/// Winograd F(2x2, 3x3) weights `U = G g G^T` of a block's `[cout][cin][3][3]`
/// weights, laid out `[16][cout / width][cin][width]` for [`tile`].
fn winograd_weights(w: &[f32], cin: usize, cout: usize, width: usize) -> Vec<f32> {
    let mut u = vec![0f32; WINO * cout * cin];
    for co in 0..cout {
        let (grp, lane) = (co / width, co % width);
        for ci in 0..cin {
            let g = |r: usize, c: usize| f64::from(w[(co * cin + ci) * TAPS + r * 3 + c]);
            // G g: 4x3.
            let gg: [[f64; 3]; 4] = std::array::from_fn(|i| {
                std::array::from_fn(|c| match i {
                    0 => g(0, c),
                    1 => (g(0, c) + g(1, c) + g(2, c)) / 2.0,
                    2 => (g(0, c) - g(1, c) + g(2, c)) / 2.0,
                    _ => g(2, c),
                })
            });
            for (i, [a, b, c]) in gg.into_iter().enumerate() {
                let row = [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c];
                for (j, value) in row.into_iter().enumerate() {
                    let pos = i * 4 + j;
                    u[((pos * (cout / width) + grp) * cin + ci) * width + lane] = value as f32;
                }
            }
        }
    }
    u
}

/// Input transform `V = B^T d B` of one 4x4 tile for 16 channels: reads
/// pixel (r, c) at `src + r * row_stride + c * pixel_stride`, writes
/// position p at `dst + p * pos_stride`.
///
/// # Safety
/// The CPU supports AVX-512F; the reads and writes are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wino_input(
    src: *const f32,
    row_stride: usize,
    pixel_stride: usize,
    dst: *mut f32,
    pos_stride: usize,
) {
    use std::arch::x86_64::*;
    let d: [[__m512; 4]; 4] = std::array::from_fn(|r| {
        std::array::from_fn(|c| unsafe {
            _mm512_loadu_ps(src.add(r * row_stride + c * pixel_stride))
        })
    });
    // t = B^T d (over rows), then V = t B (over columns).
    let mut t = [[_mm512_setzero_ps(); 4]; 4];
    for c in 0..4 {
        t[0][c] = _mm512_sub_ps(d[0][c], d[2][c]);
        t[1][c] = _mm512_add_ps(d[1][c], d[2][c]);
        t[2][c] = _mm512_sub_ps(d[2][c], d[1][c]);
        t[3][c] = _mm512_sub_ps(d[1][c], d[3][c]);
    }
    for (i, r) in t.iter().enumerate() {
        let v = [
            _mm512_sub_ps(r[0], r[2]),
            _mm512_add_ps(r[1], r[2]),
            _mm512_sub_ps(r[2], r[1]),
            _mm512_sub_ps(r[1], r[3]),
        ];
        for (j, v) in v.into_iter().enumerate() {
            unsafe { _mm512_storeu_ps(dst.add((i * 4 + j) * pos_stride), v) };
        }
    }
}

/// Output transform `Y = A^T M A` of one tile for 16 channels (position p
/// read at `src + p * pos_stride`), then the max of the 2x2 outputs plus the
/// bias, ReLU'd, into `out`.
///
/// # Safety
/// The CPU supports AVX-512F; the reads and the write are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wino_output(src: *const f32, pos_stride: usize, bias: *const f32, out: *mut f32) {
    use std::arch::x86_64::*;
    let m: [__m512; 16] =
        std::array::from_fn(|p| unsafe { _mm512_loadu_ps(src.add(p * pos_stride)) });
    // s = A^T m (over rows): 2x4.
    let s: [[__m512; 4]; 2] = std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let (a, b, c, d) = (m[j], m[4 + j], m[8 + j], m[12 + j]);
            if i == 0 {
                _mm512_add_ps(_mm512_add_ps(a, b), c)
            } else {
                _mm512_sub_ps(_mm512_sub_ps(b, c), d)
            }
        })
    });
    let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
    for r in &s {
        let y0 = _mm512_add_ps(_mm512_add_ps(r[0], r[1]), r[2]);
        let y1 = _mm512_sub_ps(_mm512_sub_ps(r[1], r[2]), r[3]);
        best = _mm512_max_ps(best, _mm512_max_ps(y0, y1));
    }
    let b = unsafe { _mm512_loadu_ps(bias) };
    let y = _mm512_max_ps(_mm512_add_ps(best, b), _mm512_setzero_ps());
    unsafe { _mm512_storeu_ps(out, y) };
}
