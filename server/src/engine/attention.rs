//! Attention of one query head over a sequence's cache, in llama.cpp's arithmetic order.
//!
//! Keys are stored per position (`[pos][kv_dim]`), values transposed in blocks of 32 positions
//! (`[block][kv_dim][32]`, zero-filled), so both products are contiguous dot products. Every dot
//! product accumulates like ggml's f16 dot on AVX2: 4 accumulators of 8 lanes over strides of
//! 32, then a fixed reduction tree. With the same order both engines give bit-identical
//! results, which matters because 8-bit activation rounding turns ulps into different tokens.

/// Positions per value block.
pub const VBLOCK: usize = 32;

/// Dot product of two slices whose length is a multiple of 32.
pub fn dot32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dot_strided(a, b, 0, 32)
}

/// Dot product of `a` (length a multiple of 32) with 32-value runs of `b`: run `i` starts at
/// `first + i·stride`. Lets the value product read the blocked cache in place.
pub fn dot_strided(a: &[f32], b: &[f32], first: usize, stride: usize) -> f32 {
    debug_assert_eq!(a.len() % 32, 0);
    let runs = a.len() / 32;
    if runs > 0 {
        assert!(first + (runs - 1) * stride + 32 <= b.len(), "dot_strided out of bounds");
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are available (checked above); bounds asserted above.
            return unsafe { dot_strided_avx2(a, b, first, stride) };
        }
    }
    dot_strided_scalar(a, b, first, stride)
}

fn dot_strided_scalar(a: &[f32], b: &[f32], first: usize, stride: usize) -> f32 {
    let mut acc = [[0f32; 8]; 4];
    for r in 0..a.len() / 32 {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, s) in lanes.iter_mut().enumerate() {
                let (ka, kb) = (r * 32 + j * 8 + l, first + r * stride + j * 8 + l);
                *s = a[ka].mul_add(b[kb], *s);
            }
        }
    }
    for l in 0..8 {
        acc[0][l] += acc[2][l];
        acc[1][l] += acc[3][l];
    }
    for l in 0..8 {
        acc[0][l] += acc[1][l];
    }
    let t: [f32; 4] = std::array::from_fn(|l| acc[0][l] + acc[0][l + 4]);
    (t[0] + t[1]) + (t[2] + t[3])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_strided_avx2(a: &[f32], b: &[f32], first: usize, stride: usize) -> f32 {
    use std::arch::x86_64::*;
    let (pa, pb) = (a.as_ptr(), b.as_ptr().add(first));
    let mut acc = [_mm256_setzero_ps(); 4];
    for r in 0..a.len() / 32 {
        for (j, s) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(pa.add(r * 32 + 8 * j));
            let y = _mm256_loadu_ps(pb.add(r * stride + 8 * j));
            *s = _mm256_fmadd_ps(x, y, *s);
        }
    }
    let s0 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    let t = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    let h = _mm_hadd_ps(t, t);
    _mm_cvtss_f32(_mm_hadd_ps(h, h))
}

/// Softmax with the sum in f64 and a reciprocal scale; with `f16`, weights end in f16 (as
/// llama.cpp's attention weights do before they meet the f16 values). Entries past `n` stay zero.
pub fn softmax(x: &mut [f32], n: usize, f16: bool) {
    let max = x[..n].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in x[..n].iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x[..n].iter_mut() {
        *v *= inv;
        if f16 {
            *v = half::f16::from_f32(*v).to_f32();
        }
    }
}

/// One query head against positions `0..n` of a layer's cache; writes `out` (head_dim).
/// `f16`: attention weights rounded to f16 (llama.cpp's arithmetic).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    f16: bool,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    kv_head: usize,
    kv_dim: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    let padded = n.div_ceil(VBLOCK) * VBLOCK;
    scores.clear();
    scores.resize(padded, 0.0);
    for (j, s) in scores[..n].iter_mut().enumerate() {
        let k = &keys[j * kv_dim + kv_head * hd..j * kv_dim + (kv_head + 1) * hd];
        *s = dot32(q, k) * scale;
    }
    softmax(scores, n, f16);
    for (c, o) in out.iter_mut().enumerate() {
        // Over positions, one block of 32 at a time, read in place from the blocked cache.
        *o = dot_strided(scores, values, (kv_head * hd + c) * VBLOCK, kv_dim * VBLOCK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_scalar_dots_are_bit_identical() {
        let a: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        let b: Vec<f32> = (0..96).map(|i| ((i * 53 % 89) as f32 - 40.0) / 7.0).collect();
        assert_eq!(dot32(&a, &b).to_bits(), dot_strided_scalar(&a, &b, 0, 32).to_bits());
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot32(&a, &b) as f64 - exact).abs() < 1e-3);
    }

    #[test]
    fn softmax_sums_to_one_and_leaves_padding_zero() {
        let mut x = vec![1.0, 2.0, 3.0, 0.0, 0.0];
        softmax(&mut x, 3, true);
        assert!((x[..3].iter().sum::<f32>() - 1.0).abs() < 2e-3);
        assert_eq!(&x[3..], &[0.0, 0.0]);
    }
}
