//! The KD loss (`trainer::kd`) against a plain float64 reference written from its definition:
//! value and gradient (central differences of the reference) on random inputs, both tail rules,
//! T = 1 and T = 2, with −∞ teacher log-probabilities, a teacher whose top-k holds all the mass
//! (zero tail), a position with no soft labels (all −∞: no KL), f16-rounded teacher values, and
//! masked / weighted positions.

use candle_core::{DType, Device, Tensor, Var};
use trainer::kd::{kd_loss, KdConfig, Tail};

const B: usize = 2;
const T: usize = 3;
const V: usize = 11;
const K: usize = 4;

struct Case {
    logits: Vec<f64>,
    targets: Vec<u32>,
    ids: Vec<u32>,
    tlp: Vec<f64>,
    mask: Vec<f64>,
}

fn rng(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn log_softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let l = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    x.iter().map(|v| v - l).collect()
}

fn case(seed: u64) -> Case {
    let mut r = rng(seed);
    let logits: Vec<f64> = (0..B * T * V).map(|_| r() * 6.0 - 3.0).collect();
    let targets: Vec<u32> = (0..B * T).map(|_| (r() * V as f64) as u32 % V as u32).collect();
    let mut ids = Vec::new();
    let mut tlp = Vec::new();
    for pos in 0..B * T {
        // A teacher distribution over V tokens; its top-K as stored (f16-rounded).
        let teacher: Vec<f64> = (0..V).map(|_| r() * 8.0 - 4.0).collect();
        let mut lp = log_softmax(&teacher);
        if pos == 1 {
            // All the mass on 3 tokens: the 4th stored pair is −∞ and the tail is empty.
            for (i, v) in lp.iter_mut().enumerate() {
                *v = match i {
                    0 => 0.5f64.ln(),
                    1 | 2 => 0.25f64.ln(),
                    _ => f64::NEG_INFINITY,
                };
            }
        }
        let mut order: Vec<usize> = (0..V).collect();
        order.sort_by(|a, b| lp[*b].partial_cmp(&lp[*a]).unwrap().then(a.cmp(b)));
        for &i in &order[..K] {
            ids.push(i as u32);
            // Position 4 has no soft labels at all: padding, id 0 and −∞.
            tlp.push(if pos == 4 { f64::NEG_INFINITY } else { half::f16::from_f64(lp[i]).to_f64() });
        }
        if pos == 4 {
            ids.truncate(ids.len() - K);
            ids.extend(std::iter::repeat_n(0, K));
        }
    }
    let mask = vec![1.0, 1.0, 0.0, 0.5, 1.0, 2.0];
    Case { logits, targets, ids, tlp, mask }
}

/// log(1 − exp(x)) for x ≤ 0, with the implementation's clamp.
fn log1m_exp(x: f64) -> f64 {
    (1.0 - x.min(0.0).exp()).max(1e-30).ln()
}

fn lse(x: &[f64]) -> f64 {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// The loss from its definition, position by position, in f64.
fn reference(c: &Case, logits: &[f64], cfg: &KdConfig) -> f64 {
    let mut total = 0.0;
    for pos in 0..B * T {
        let z = &logits[pos * V..(pos + 1) * V];
        let w = c.mask[pos];
        let l = lse(z);
        let ce = l - z[c.targets[pos] as usize];
        let zl = l * l;
        let ids = &c.ids[pos * K..(pos + 1) * K];
        let tlp: Vec<f64> = c.tlp[pos * K..(pos + 1) * K].to_vec();
        let zk: Vec<f64> = ids.iter().map(|&i| z[i as usize]).collect();
        let (mut lp, mut lq) = match cfg.tail {
            Tail::Renorm => (log_softmax(&tlp), log_softmax(&zk)),
            Tail::Bucket => {
                let mut lp = tlp.clone();
                lp.push(log1m_exp(lse(&tlp)));
                let mut lq: Vec<f64> = zk.iter().map(|v| v - l).collect();
                let top = lse(&lq);
                lq.push(log1m_exp(top));
                (lp, lq)
            }
        };
        if cfg.temperature != 1.0 {
            let t = cfg.temperature;
            lp = log_softmax(&lp.iter().map(|v| v.max(-1e4) / t).collect::<Vec<_>>());
            lq = log_softmax(&lq.iter().map(|v| v / t).collect::<Vec<_>>());
        }
        let kl: f64 = lp.iter().zip(&lq).filter(|(p, _)| p.exp() > 0.0).map(|(p, q)| p.exp() * (p - q)).sum();
        // No soft labels at this position: no KL term.
        let kl = if tlp.iter().all(|v| *v == f64::NEG_INFINITY) { 0.0 } else { kl };
        total += w * ((1.0 - cfg.lambda) * ce + cfg.lambda * cfg.temperature * cfg.temperature * kl + cfg.z_loss * zl);
    }
    total
}

fn ours(c: &Case, logits: &Tensor, cfg: &KdConfig) -> Tensor {
    let dev = Device::Cpu;
    let targets = Tensor::from_vec(c.targets.clone(), (B, T), &dev).unwrap();
    let ids = Tensor::from_vec(c.ids.clone(), (B, T, K), &dev).unwrap();
    let tlp = Tensor::from_vec(c.tlp.iter().map(|v| *v as f32).collect::<Vec<f32>>(), (B, T, K), &dev).unwrap();
    let mask = Tensor::from_vec(c.mask.clone(), (B, T), &dev).unwrap();
    kd_loss(logits, &targets, &ids, &tlp, &mask, cfg).unwrap().total
}

#[test]
fn loss_and_gradient_match_a_float64_reference() {
    let mut worst = (0f64, 0f64);
    for seed in 1..=4u64 {
        let c = case(seed);
        for tail in [Tail::Bucket, Tail::Renorm] {
            for (lambda, temperature, z_loss) in [(1.0, 1.0, 0.0), (0.5, 1.0, 1e-4), (0.5, 2.0, 1e-4), (0.0, 1.0, 0.0)] {
                let cfg = KdConfig { lambda, temperature, z_loss, tail };
                let x = Var::from_tensor(&Tensor::from_vec(c.logits.clone(), (B, T, V), &Device::Cpu).unwrap()).unwrap();
                let loss = ours(&c, x.as_tensor(), &cfg);
                let got = loss.to_scalar::<f64>().unwrap();
                assert!(got.is_finite(), "{cfg:?}: {got}");
                let want = reference(&c, &c.logits, &cfg);
                let rel = (got - want).abs() / want.abs().max(1e-12);
                assert!(rel < 1e-6, "{cfg:?} seed {seed}: loss {got} vs reference {want}");
                worst.0 = worst.0.max(rel);
                let grad: Vec<f64> = loss.backward().unwrap().get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert!(grad.iter().all(|g| g.is_finite()), "{cfg:?}: non-finite gradient");
                let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
                for i in 0..B * T * V {
                    let at = |d: f64| {
                        let mut l = c.logits.clone();
                        l[i] += d;
                        reference(&c, &l, &cfg)
                    };
                    let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
                    let err = (fd - grad[i]).abs() / scale;
                    assert!(err < 1e-6, "{cfg:?} seed {seed}: d/dz[{i}] {} vs reference {fd}", grad[i]);
                    worst.1 = worst.1.max(err);
                }
                // Masked position 2 gets no gradient at all.
                assert!(grad[2 * V..3 * V].iter().all(|g| *g == 0.0));
            }
        }
    }
    eprintln!("KD loss vs f64 reference: worst relative error {:.1e} (loss), {:.1e} (gradient)", worst.0, worst.1);
}

#[test]
fn lambda_zero_is_the_cross_entropy_and_f32_is_finite() {
    let c = case(9);
    let cfg = KdConfig { lambda: 0.0, temperature: 1.0, z_loss: 0.0, tail: Tail::Bucket };
    let x = Tensor::from_vec(c.logits.clone(), (B, T, V), &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let targets = Tensor::from_vec(c.targets.clone(), (B, T), &dev).unwrap();
    let mask = Tensor::from_vec(c.mask.clone(), (B, T), &dev).unwrap();
    let (ce, _) = trainer::model::masked_cross_entropy(&x, &targets, &mask).unwrap();
    let kd = ours(&c, &x, &cfg).to_scalar::<f64>().unwrap();
    assert!((kd - ce.to_scalar::<f64>().unwrap()).abs() < 1e-9);
    // f32 logits and f16-rounded teacher values with −∞: finite loss and gradient.
    let x32 = Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
    for tail in [Tail::Bucket, Tail::Renorm] {
        let cfg = KdConfig { lambda: 1.0, temperature: 2.0, z_loss: 1e-4, tail };
        let loss = ours(&c, x32.as_tensor(), &cfg);
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        let g: Vec<f32> = loss.backward().unwrap().get(&x32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
    }
}
