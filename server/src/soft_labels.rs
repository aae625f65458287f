//! Soft labels: for every answer position, the teacher's top-k (token id, log-probability)
//! pairs and the log-probability of the token it emitted, stored as one compact blob per
//! generation. Natural log, from the teacher's raw distribution at temperature 1.
//!
//! Layout, version 1 (all integers little-endian):
//!
//! ```text
//! offset  size            field
//! 0       4               magic b"DSL" + version byte 1
//! 4       1               flags: bit 0 set = token ids are u32, clear = u16; other bits 0
//! 5       1               reserved, 0
//! 6       2               k: pairs per position (u16)
//! 8       4               n: positions (u32)
//! 12      2·n             chosen: log-probability of the emitted token per position (f16)
//! ..      n·k·(2 or 4)    ids: top-k token ids per position, position-major
//! ..      2·n·k           logprobs: their log-probabilities (f16), same order, descending
//! ```
//!
//! Ids are u16 whenever every id fits (SmolLM2's 49,152 tokens do), so a pair costs 4 bytes
//! and a generation 12 + n·(2 + 4k) bytes: 4.1 bytes per pair at k = 20. Log-probabilities
//! are f16 (at −10 a step of 0.008 nats), with −∞ kept; NaN and positive values are refused.
//! Decoding gives back exactly the f16 values that were stored.

use half::f16;
use serde::Serialize;
use utoipa::ToSchema;

const MAGIC: [u8; 3] = *b"DSL";
const VERSION: u8 = 1;
const HEADER: usize = 12;
const FLAG_U32_IDS: u8 = 1;

/// One answer position: the emitted token's log-probability and the top-k pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub chosen_logprob: f32,
    /// (token id, log-probability), highest first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SoftLabelError {
    #[error("position {0} has {1} pairs, the others {2}: every position needs the same k")]
    RaggedK(usize, usize, usize),
    #[error("k = {0} is more than the format's 65,535")]
    KTooLarge(usize),
    #[error("position {0}: log-probability {1} is not ≤ 0 (NaN or positive)")]
    BadLogprob(usize, f32),
    #[error("position {0}: the top-k pairs are not sorted by log-probability, highest first")]
    Unsorted(usize),
    #[error("blob of {0} bytes is too short for its header or its {1} positions × k = {2}")]
    Truncated(usize, usize, usize),
    #[error("not a soft-label blob (magic {0:?})")]
    BadMagic([u8; 3]),
    #[error("soft-label blob version {0}; this build reads version {VERSION}")]
    Version(u8),
    #[error("soft-label blob flags {0:#04x} are unknown to this build")]
    Flags(u8),
}

fn check_logprob(pos: usize, v: f32) -> Result<(), SoftLabelError> {
    if v.is_nan() || v > 0.0 {
        return Err(SoftLabelError::BadLogprob(pos, v));
    }
    Ok(())
}

/// Encodes `positions` (all with the same number of pairs, sorted highest first).
pub fn encode(positions: &[Position]) -> Result<Vec<u8>, SoftLabelError> {
    let k = positions.first().map_or(0, |p| p.top.len());
    if k > u16::MAX as usize {
        return Err(SoftLabelError::KTooLarge(k));
    }
    let mut wide = false;
    for (i, p) in positions.iter().enumerate() {
        if p.top.len() != k {
            return Err(SoftLabelError::RaggedK(i, p.top.len(), k));
        }
        check_logprob(i, p.chosen_logprob)?;
        for (j, &(id, lp)) in p.top.iter().enumerate() {
            check_logprob(i, lp)?;
            if j > 0 && lp > p.top[j - 1].1 {
                return Err(SoftLabelError::Unsorted(i));
            }
            wide |= id > u16::MAX as u32;
        }
    }
    let n = positions.len();
    let id_bytes = if wide { 4 } else { 2 };
    let mut out = Vec::with_capacity(HEADER + n * (2 + k * (id_bytes + 2)));
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(if wide { FLAG_U32_IDS } else { 0 });
    out.push(0);
    out.extend_from_slice(&(k as u16).to_le_bytes());
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for p in positions {
        out.extend_from_slice(&f16::from_f32(p.chosen_logprob).to_le_bytes());
    }
    for p in positions {
        for &(id, _) in &p.top {
            if wide {
                out.extend_from_slice(&id.to_le_bytes());
            } else {
                out.extend_from_slice(&(id as u16).to_le_bytes());
            }
        }
    }
    for p in positions {
        for &(_, lp) in &p.top {
            out.extend_from_slice(&f16::from_f32(lp).to_le_bytes());
        }
    }
    Ok(out)
}

/// Decodes a blob written by [`encode`] (any version this build knows).
pub fn decode(blob: &[u8]) -> Result<Vec<Position>, SoftLabelError> {
    if blob.len() < HEADER {
        return Err(SoftLabelError::Truncated(blob.len(), 0, 0));
    }
    let magic = [blob[0], blob[1], blob[2]];
    if magic != MAGIC {
        return Err(SoftLabelError::BadMagic(magic));
    }
    if blob[3] != VERSION {
        return Err(SoftLabelError::Version(blob[3]));
    }
    let flags = blob[4];
    if flags & !FLAG_U32_IDS != 0 || blob[5] != 0 {
        return Err(SoftLabelError::Flags(flags));
    }
    let wide = flags & FLAG_U32_IDS != 0;
    let k = u16::from_le_bytes([blob[6], blob[7]]) as usize;
    let n = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]) as usize;
    let id_bytes = if wide { 4 } else { 2 };
    let need = n.checked_mul(2 + k * (id_bytes + 2)).and_then(|b| b.checked_add(HEADER));
    if need != Some(blob.len()) {
        return Err(SoftLabelError::Truncated(blob.len(), n, k));
    }
    let f16_at = |off: usize| f16::from_le_bytes([blob[off], blob[off + 1]]).to_f32();
    let chosen = HEADER;
    let ids = chosen + 2 * n;
    let lps = ids + n * k * id_bytes;
    let positions = (0..n)
        .map(|i| {
            let top = (0..k)
                .map(|j| {
                    let e = i * k + j;
                    let o = ids + e * id_bytes;
                    let id = if wide {
                        u32::from_le_bytes([blob[o], blob[o + 1], blob[o + 2], blob[o + 3]])
                    } else {
                        u16::from_le_bytes([blob[o], blob[o + 1]]) as u32
                    };
                    (id, f16_at(lps + 2 * e))
                })
                .collect();
            Position { chosen_logprob: f16_at(chosen + 2 * i), top }
        })
        .collect();
    Ok(positions)
}

/// Soft labels by column, the way the API and exports show them (and axolotl's KD datasets
/// name them): one entry per answer token, aligned with `completion_token_ids`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SoftLabelColumns {
    /// Pairs per position.
    pub k: usize,
    /// Natural-log probability of the token the teacher emitted, per position.
    pub token_logprobs: Vec<f32>,
    /// The teacher's top-k token ids per position, most likely first.
    pub target_token_ids: Vec<Vec<u32>>,
    /// Their natural-log probabilities (−∞ is written as `null` in JSON, which has no infinity).
    pub target_logprobs: Vec<Vec<f32>>,
}

impl SoftLabelColumns {
    pub fn from_positions(positions: &[Position]) -> Self {
        SoftLabelColumns {
            k: positions.first().map_or(0, |p| p.top.len()),
            token_logprobs: positions.iter().map(|p| p.chosen_logprob).collect(),
            target_token_ids: positions.iter().map(|p| p.top.iter().map(|t| t.0).collect()).collect(),
            target_logprobs: positions.iter().map(|p| p.top.iter().map(|t| t.1).collect()).collect(),
        }
    }

    /// Decodes a stored blob.
    pub fn from_blob(blob: &[u8]) -> Result<Self, SoftLabelError> {
        decode(blob).map(|p| Self::from_positions(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, k: usize, max_id: u32) -> Vec<Position> {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        (0..n)
            .map(|_| {
                let mut lps: Vec<f32> = (0..k).map(|_| -((next() % 20_000) as f32) / 1000.0).collect();
                lps.sort_by(|a, b| b.partial_cmp(a).unwrap());
                let top = lps.iter().map(|lp| ((next() % (max_id as u64 + 1)) as u32, *lp)).collect();
                Position { chosen_logprob: lps[0], top }
            })
            .collect()
    }

    fn rounded(p: &[Position]) -> Vec<Position> {
        let r = |v: f32| f16::from_f32(v).to_f32();
        p.iter()
            .map(|p| Position { chosen_logprob: r(p.chosen_logprob), top: p.top.iter().map(|&(i, v)| (i, r(v))).collect() })
            .collect()
    }

    #[test]
    fn round_trips_exactly_to_f16_and_meets_the_size_target() {
        for (max_id, per_pair) in [(49_151u32, 4.2), (151_935, 6.2)] {
            let p = sample(300, 20, max_id);
            let blob = encode(&p).unwrap();
            assert_eq!(decode(&blob).unwrap(), rounded(&p));
            let bytes_per_pair = blob.len() as f64 / (300.0 * 20.0);
            assert!(bytes_per_pair <= per_pair, "{bytes_per_pair} bytes per pair");
            // f16 error bound: half an ulp, ≤ 2^-11 relative.
            for (a, b) in decode(&blob).unwrap().iter().zip(&p) {
                for ((_, x), (_, y)) in a.top.iter().zip(&b.top) {
                    assert!((x - y).abs() <= y.abs() / 2048.0 + 1e-7, "{x} vs {y}");
                }
            }
        }
        // u16 ids: 12 + n·(2 + 4k) bytes.
        assert_eq!(encode(&sample(300, 20, 49_151)).unwrap().len(), 12 + 300 * (2 + 4 * 20));
    }

    #[test]
    fn keeps_minus_infinity_and_empty_answers() {
        let p = vec![Position { chosen_logprob: f32::NEG_INFINITY, top: vec![(7, 0.0), (3, f32::NEG_INFINITY)] }];
        assert_eq!(decode(&encode(&p).unwrap()).unwrap(), p);
        assert_eq!(decode(&encode(&[]).unwrap()).unwrap(), vec![]);
    }

    #[test]
    fn refuses_bad_input_and_damaged_blobs() {
        let ok = sample(3, 4, 100);
        let mut ragged = ok.clone();
        ragged[1].top.pop();
        assert_eq!(encode(&ragged), Err(SoftLabelError::RaggedK(1, 3, 4)));
        let mut nan = ok.clone();
        nan[2].top[1].1 = f32::NAN;
        assert!(matches!(encode(&nan), Err(SoftLabelError::BadLogprob(2, _))));
        let mut pos = ok.clone();
        pos[0].chosen_logprob = 0.5;
        assert!(matches!(encode(&pos), Err(SoftLabelError::BadLogprob(0, _))));
        let mut unsorted = ok.clone();
        unsorted[1].top.swap(0, 3);
        assert_eq!(encode(&unsorted), Err(SoftLabelError::Unsorted(1)));
        let blob = encode(&ok).unwrap();
        assert!(matches!(decode(&blob[..blob.len() - 1]), Err(SoftLabelError::Truncated(..))));
        assert!(matches!(decode(&blob[..5]), Err(SoftLabelError::Truncated(..))));
        let mut v2 = blob.clone();
        v2[3] = 2;
        assert_eq!(decode(&v2), Err(SoftLabelError::Version(2)));
        let mut magic = blob.clone();
        magic[0] = b'X';
        assert!(matches!(decode(&magic), Err(SoftLabelError::BadMagic(_))));
        let mut flags = blob;
        flags[4] = 0x80;
        assert_eq!(decode(&flags), Err(SoftLabelError::Flags(0x80)));
    }
}
