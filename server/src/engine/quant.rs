//! Quantized weights in GGML's block layouts, and the matrix products the engine runs on them.
//!
//! Weights stay in their file format (Q4_1, Q8_0, or F32); activations are quantized per row to
//! 8-bit blocks of 32 (like llama.cpp's Q8_1), so a product is integer dot products per block.
//! The products are batched: each weight block is unpacked once and used for every activation
//! row, which is what makes prompt processing and concurrent sequences cheap on a CPU.
//! AVX2 kernels are chosen at run time (`is_x86_feature_detected!`), with portable scalar
//! kernels otherwise, so one binary runs on any x86-64 (and other) CPU.

use half::f16;

use super::attention::dot32;
use rayon::prelude::*;

/// Values per quantization block.
pub const QK: usize = 32;

/// Storage format of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Blocks of 32: f16 scale d, f16 min m, 16 bytes of 4-bit q; w = q·d + m.
    Q4_1,
    /// Blocks of 32: f16 scale d, 32 signed bytes q; w = q·d.
    Q8_0,
    F32,
}

impl Format {
    /// Bytes per block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
            Format::F32 => 128,
        }
    }
}

/// A `rows × cols` weight matrix, row-major, each row a run of blocks along `cols`.
/// At load the file's blocks are split into f32 scales and packed quants, so the hot loops
/// read aligned runs and convert no f16.
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub format: Format,
    /// Per block: Q4_1 `[d, m]`, Q8_0 `[d]`; empty for F32.
    scales: Vec<f32>,
    /// Per block: Q4_1 16 bytes of nibbles, Q8_0 32 signed bytes; empty for F32.
    quants: Vec<u8>,
    /// F32 only: the values, row-major.
    values: Vec<f32>,
}

/// Activation rows quantized to 8-bit blocks: per block a scale `d`, `s = d·Σq`, and 32 q.
pub struct Q8Rows {
    pub rows: usize,
    pub blocks: usize,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub q: Vec<i8>,
}

impl Q8Rows {
    /// Quantizes `rows` rows of `x` (row-major, `cols` a multiple of 32). Scales are rounded
    /// to f16, as llama.cpp does, so products match its numerics closely.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(cols % QK, 0, "columns must be a multiple of {QK}");
        assert_eq!(x.len(), rows * cols);
        let blocks = cols / QK;
        let n = rows * blocks;
        let mut out = Q8Rows { rows, blocks, d: vec![0.0; n], s: vec![0.0; n], q: vec![0; n * QK] };
        for (bi, chunk) in x.chunks_exact(QK).enumerate() {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let q = &mut out.q[bi * QK..(bi + 1) * QK];
            let mut sum = 0i32;
            for (qi, v) in q.iter_mut().zip(chunk) {
                // Round half to even without a libm call: |v·id| ≤ 127, far below 2^22.
                let r = ((v * id + 12_582_912.0) - 12_582_912.0) as i32;
                *qi = r as i8;
                sum += r;
            }
            // As llama.cpp: d stored as f16, s = f16(d·Σq) from the unrounded d.
            out.d[bi] = f16::from_f32(d).to_f32();
            out.s[bi] = f16::from_f32(d * sum as f32).to_f32();
        }
        out
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl QMatrix {
    /// Takes the file's bytes (GGML block layout) and repacks them.
    pub fn new(rows: usize, cols: usize, format: Format, data: Vec<u8>) -> anyhow::Result<Self> {
        if cols % QK != 0 {
            anyhow::bail!("matrix with {cols} columns: not a multiple of {QK}");
        }
        let want = rows * (cols / QK) * format.block_bytes();
        if data.len() != want {
            anyhow::bail!("{format:?} matrix {rows}x{cols} needs {want} bytes, got {}", data.len());
        }
        let blocks = rows * cols / QK;
        let (scales, quants) = match format {
            Format::Q4_1 => {
                let mut sc = Vec::with_capacity(2 * blocks);
                let mut q = Vec::with_capacity(16 * blocks);
                for b in data.chunks_exact(20) {
                    sc.push(f16_at(b, 0));
                    sc.push(f16_at(b, 2));
                    q.extend_from_slice(&b[4..20]);
                }
                (sc, q)
            }
            Format::Q8_0 => {
                let mut sc = Vec::with_capacity(blocks);
                let mut q = Vec::with_capacity(32 * blocks);
                for b in data.chunks_exact(34) {
                    sc.push(f16_at(b, 0));
                    q.extend_from_slice(&b[2..34]);
                }
                (sc, q)
            }
            Format::F32 => {
                let values = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                return Ok(Self::from_f32(rows, cols, values));
            }
        };
        Ok(QMatrix { rows, cols, format, scales, quants, values: Vec::new() })
    }

    /// An F32 matrix from row-major values (`cols` a multiple of 32, checked by the callers
    /// that take file data; asserted here).
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * cols);
        assert_eq!(cols % QK, 0);
        QMatrix { rows, cols, format: Format::F32, scales: Vec::new(), quants: Vec::new(), values }
    }

    /// The same matrix dequantized to F32 (the engine's exact mode multiplies in f32).
    pub fn to_f32(&self) -> Self {
        if self.format == Format::F32 {
            return Self::from_f32(self.rows, self.cols, self.values.clone());
        }
        let mut values = vec![0f32; self.rows * self.cols];
        for (r, row) in values.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        Self::from_f32(self.rows, self.cols, values)
    }

    /// Quantizes f32 weights (row-major) to Q8_0 the way ggml does: per block of 32,
    /// d = max|w|/127 stored as f16, q = round(w/d).
    pub fn quantize_q8_0(rows: usize, cols: usize, w: &[f32]) -> anyhow::Result<Self> {
        if w.len() != rows * cols {
            anyhow::bail!("{} values for a {rows}x{cols} matrix", w.len());
        }
        if cols % QK != 0 {
            anyhow::bail!("matrix with {cols} columns: not a multiple of {QK}");
        }
        let mut data = Vec::with_capacity(w.len() / QK * 34);
        for block in w.chunks_exact(QK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            data.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
        }
        Self::new(rows, cols, Format::Q8_0, data)
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / QK
    }

    /// Row `r` as f32 (embedding lookups, tests).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.blocks_per_row();
        for j in 0..nb {
            let blk = r * nb + j;
            let o = &mut out[j * QK..(j + 1) * QK];
            match self.format {
                Format::Q4_1 => {
                    let (d, m) = (self.scales[2 * blk], self.scales[2 * blk + 1]);
                    let q = &self.quants[16 * blk..16 * blk + 16];
                    for i in 0..16 {
                        o[i] = (q[i] & 0x0F) as f32 * d + m;
                        o[i + 16] = (q[i] >> 4) as f32 * d + m;
                    }
                }
                Format::Q8_0 => {
                    let d = self.scales[blk];
                    for i in 0..QK {
                        o[i] = self.quants[32 * blk + i] as i8 as f32 * d;
                    }
                }
                Format::F32 => o.copy_from_slice(&self.values[blk * QK..(blk + 1) * QK]),
            }
        }
    }

    /// `out[b·rows + n] = Σ_k W[n,k]·x[b,k]` for every activation row b: one output row per
    /// activation row. Parallel over weight rows.
    pub fn matmul(&self, x: &Q8Rows, xf: &[f32], out: &mut [f32]) {
        assert_eq!(x.blocks * QK, self.cols);
        assert_eq!(out.len(), x.rows * self.rows);
        let rows = self.rows;
        let b = x.rows;
        let out_ptr = SendPtr(out.as_mut_ptr());
        // Chunks of weight rows large enough to amortise scheduling, small enough that a
        // thread held up elsewhere does not leave the other waiting.
        let chunk = (rows / (rayon::current_num_threads() * 8)).clamp(16, 512);
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let lo = c * chunk;
            let hi = (lo + chunk).min(rows);
            let mut tile = vec![0f32; (hi - lo) * b];
            self.rows_range(lo, hi, x, xf, &mut tile);
            let p = out_ptr;
            for (i, n) in (lo..hi).enumerate() {
                for bi in 0..b {
                    // SAFETY: each task writes only its own weight rows [lo, hi) of every output row.
                    unsafe { *p.0.add(bi * rows + n) = tile[i * b + bi] };
                }
            }
        });
    }

    /// Computes weight rows [lo, hi) for all activation rows into `tile[(n-lo)·B + b]`.
    fn rows_range(&self, lo: usize, hi: usize, x: &Q8Rows, xf: &[f32], tile: &mut [f32]) {
        let nb = self.blocks_per_row();
        let b = x.rows;
        for (i, n) in (lo..hi).enumerate() {
            let dst = &mut tile[i * b..(i + 1) * b];
            match self.format {
                Format::Q4_1 => kernels::q4_1_row(
                    &self.scales[2 * n * nb..2 * (n + 1) * nb],
                    &self.quants[16 * n * nb..16 * (n + 1) * nb],
                    x,
                    dst,
                ),
                Format::Q8_0 => kernels::q8_0_row(
                    &self.scales[n * nb..(n + 1) * nb],
                    &self.quants[32 * n * nb..32 * (n + 1) * nb],
                    x,
                    dst,
                ),
                Format::F32 => {
                    let w = &self.values[n * self.cols..(n + 1) * self.cols];
                    for (bi, d) in dst.iter_mut().enumerate() {
                        *d = dot32(w, &xf[bi * self.cols..(bi + 1) * self.cols]);
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Dot products of one weight row with every activation row.
mod kernels {
    use super::{Q8Rows, QK};

    /// One Q4_1 row: `sc` holds `[d, m]` per block, `q` 16 bytes of nibbles per block.
    pub fn q4_1_row(sc: &[f32], q: &[u8], x: &Q8Rows, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                return unsafe { avx2::q4_1_row(sc, q, x, out) };
            }
        }
        scalar_q4_1_row(sc, q, x, out)
    }

    /// One Q8_0 row: `sc` holds `d` per block, `q` 32 signed bytes per block.
    pub fn q8_0_row(sc: &[f32], q: &[u8], x: &Q8Rows, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                return unsafe { avx2::q8_0_row(sc, q, x, out) };
            }
        }
        scalar_q8_0_row(sc, q, x, out)
    }

    pub fn scalar_q4_1_row(sc: &[f32], q: &[u8], x: &Q8Rows, out: &mut [f32]) {
        for (b, o) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for j in 0..sc.len() / 2 {
                let xi = b * x.blocks + j;
                let xq = &x.q[xi * QK..(xi + 1) * QK];
                let w = &q[16 * j..16 * j + 16];
                let mut sumi = 0i32;
                for i in 0..16 {
                    sumi += (w[i] & 0x0F) as i32 * xq[i] as i32 + (w[i] >> 4) as i32 * xq[i + 16] as i32;
                }
                acc += sc[2 * j] * x.d[xi] * sumi as f32 + sc[2 * j + 1] * x.s[xi];
            }
            *o = acc;
        }
    }

    pub fn scalar_q8_0_row(sc: &[f32], q: &[u8], x: &Q8Rows, out: &mut [f32]) {
        for (b, o) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (j, d) in sc.iter().enumerate() {
                let xi = b * x.blocks + j;
                let xq = &x.q[xi * QK..(xi + 1) * QK];
                let sumi: i32 = (0..QK).map(|i| q[32 * j + i] as i8 as i32 * xq[i] as i32).sum();
                acc += d * x.d[xi] * sumi as f32;
            }
            *o = acc;
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        use super::super::{Q8Rows, QK};

        /// Activation rows handled together, so each unpacked weight block is reused.
        const TILE: usize = 4;

        #[target_feature(enable = "avx2,fma")]
        unsafe fn hsum(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn q4_1_row(sc: &[f32], q: &[u8], x: &Q8Rows, out: &mut [f32]) {
            let nb = x.blocks;
            debug_assert_eq!(sc.len(), 2 * nb);
            let mask = _mm_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let (sp, qp) = (sc.as_ptr(), q.as_ptr());
            let (xd, xs, xq) = (x.d.as_ptr(), x.s.as_ptr(), x.q.as_ptr());
            let mut b0 = 0;
            while b0 < out.len() {
                let t = (out.len() - b0).min(TILE);
                let mut acc = [_mm256_setzero_ps(); TILE];
                let mut mins = [0f32; TILE];
                for j in 0..nb {
                    let d = *sp.add(2 * j);
                    let m = *sp.add(2 * j + 1);
                    let qs = _mm_loadu_si128(qp.add(16 * j) as *const __m128i);
                    let lo = _mm_and_si128(qs, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                    let wq = _mm256_set_m128i(hi, lo);
                    for k in 0..t {
                        let xi = (b0 + k) * nb + j;
                        let v = _mm256_loadu_si256(xq.add(xi * QK) as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, v), ones);
                        let scale = _mm256_set1_ps(d * *xd.add(xi));
                        acc[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[k]);
                        mins[k] += m * *xs.add(xi);
                    }
                }
                for k in 0..t {
                    out[b0 + k] = hsum(acc[k]) + mins[k];
                }
                b0 += t;
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn q8_0_row(sc: &[f32], q: &[u8], x: &Q8Rows, out: &mut [f32]) {
            let nb = x.blocks;
            debug_assert_eq!(sc.len(), nb);
            let ones = _mm256_set1_epi16(1);
            let (sp, qp) = (sc.as_ptr(), q.as_ptr());
            let (xd, xq) = (x.d.as_ptr(), x.q.as_ptr());
            let mut b0 = 0;
            while b0 < out.len() {
                let t = (out.len() - b0).min(TILE);
                let mut acc = [_mm256_setzero_ps(); TILE];
                for j in 0..nb {
                    let d = *sp.add(j);
                    let wq = _mm256_loadu_si256(qp.add(32 * j) as *const __m256i);
                    // maddubs needs an unsigned operand: |w| times x with w's sign moved onto x.
                    let wabs = _mm256_sign_epi8(wq, wq);
                    for k in 0..t {
                        let xi = (b0 + k) * nb + j;
                        let v = _mm256_loadu_si256(xq.add(xi * QK) as *const __m256i);
                        let xs = _mm256_sign_epi8(v, wq);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), ones);
                        let scale = _mm256_set1_ps(d * *xd.add(xi));
                        acc[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[k]);
                    }
                }
                for k in 0..t {
                    out[b0 + k] = hsum(acc[k]);
                }
                b0 += t;
            }
        }
    }

    #[cfg(test)]
    pub fn both(m: &super::QMatrix, x: &Q8Rows) -> (Vec<f32>, Vec<f32>) {
        let mut a = vec![0.0; x.rows];
        let mut s = vec![0.0; x.rows];
        match m.format {
            super::Format::Q4_1 => {
                q4_1_row(&m.scales, &m.quants, x, &mut a);
                scalar_q4_1_row(&m.scales, &m.quants, x, &mut s);
            }
            super::Format::Q8_0 => {
                q8_0_row(&m.scales, &m.quants, x, &mut a);
                scalar_q8_0_row(&m.scales, &m.quants, x, &mut s);
            }
            super::Format::F32 => unreachable!(),
        }
        (a, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_q4_1(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> QMatrix {
        let mut data = Vec::new();
        for _ in 0..rows * cols / QK {
            data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
            data.extend_from_slice(&f16::from_f32(rng.random_range(-0.4..0.0)).to_le_bytes());
            for _ in 0..16 {
                data.push(rng.random());
            }
        }
        QMatrix::new(rows, cols, Format::Q4_1, data).unwrap()
    }

    fn random_q8_0(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> QMatrix {
        let mut data = Vec::new();
        for _ in 0..rows * cols / QK {
            data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.02)).to_le_bytes());
            for _ in 0..QK {
                data.push(rng.random());
            }
        }
        QMatrix::new(rows, cols, Format::Q8_0, data).unwrap()
    }

    /// The product against an f64 reference on dequantized weights and activations: within
    /// `rel` of the magnitude of the terms.
    fn check(m: &QMatrix, seed: u64, batch: usize, rel: f64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let x: Vec<f32> = (0..batch * m.cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let xq = Q8Rows::quantize(&x, batch, m.cols);
        let mut out = vec![0.0; batch * m.rows];
        m.matmul(&xq, &x, &mut out);
        let mut w = vec![0.0; m.cols];
        for n in 0..m.rows {
            m.dequantize_row(n, &mut w);
            for b in 0..batch {
                let xr = &x[b * m.cols..(b + 1) * m.cols];
                let exact: f64 = w.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                let norm: f64 = w.iter().zip(xr).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                let got = out[b * m.rows + n] as f64;
                assert!((got - exact).abs() <= rel * norm + 1e-6, "row {n} batch {b}: {got} vs {exact}");
            }
        }
    }

    #[test]
    fn q4_1_and_q8_0_products_match_a_float_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for batch in [1, 3, 4, 9] {
            // 8-bit activations: error well under 1% of the magnitude of the terms.
            check(&random_q4_1(&mut rng, 37, 96), 10 + batch as u64, batch, 0.01);
            check(&random_q8_0(&mut rng, 29, 64), 20 + batch as u64, batch, 0.01);
        }
    }

    #[test]
    fn f32_products_are_exact_to_float_rounding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for batch in [1, 5] {
            let q4 = random_q4_1(&mut rng, 37, 96);
            let f = q4.to_f32();
            assert_eq!((f.format, f.rows, f.cols), (Format::F32, 37, 96));
            let (mut a, mut b) = (vec![0.0; 96], vec![0.0; 96]);
            for r in 0..37 {
                q4.dequantize_row(r, &mut a);
                f.dequantize_row(r, &mut b);
                assert_eq!(a, b, "row {r}");
            }
            // f32 activations, f32 accumulation: a few ulps of the terms' magnitude.
            check(&f, 30 + batch as u64, batch, 1e-6);
            check(&random_q8_0(&mut rng, 29, 64).to_f32(), 40 + batch as u64, batch, 1e-6);
        }
    }

    #[test]
    fn simd_kernels_equal_the_scalar_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let q4 = random_q4_1(&mut rng, 1, 256);
        let q8 = random_q8_0(&mut rng, 1, 256);
        let x: Vec<f32> = (0..7 * 256).map(|_| rng.random_range(-3.0..3.0)).collect();
        let xq = Q8Rows::quantize(&x, 7, 256);
        for (a, s) in [kernels::both(&q4, &xq), kernels::both(&q8, &xq)] {
            for (a, s) in a.iter().zip(&s) {
                assert!((a - s).abs() <= 1e-4 * s.abs().max(1.0), "{a} vs {s}");
            }
        }
    }

    #[test]
    fn quantized_activations_round_trip() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let q = Q8Rows::quantize(&x, 2, 32);
        for (i, v) in x.iter().enumerate() {
            let b = i / QK;
            let back = q.q[i] as f32 * q.d[b];
            assert!((back - v).abs() <= q.d[b] * 0.51 + 1e-3, "{i}: {back} vs {v}");
        }
    }
}
