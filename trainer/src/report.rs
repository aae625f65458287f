//! What a run reports: `metrics.jsonl` (one JSON object per train step and per evaluation) and
//! `loss.png`, the train and validation loss curves (plotters).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Metric {
    Train {
        step: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens: u64,
        tokens_per_s: f64,
        /// KD runs: the step's mean cross-entropy and KL terms (`loss` is their weighted sum).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ce: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kl: Option<f64>,
    },
    Eval {
        step: u64,
        val_loss: f64,
        val_ppl: f64,
        greedy_agreement: f64,
        val_tokens: u64,
    },
}

impl Metric {
    pub fn step(&self) -> u64 {
        match self {
            Metric::Train { step, .. } | Metric::Eval { step, .. } => *step,
        }
    }
}

/// Appends metrics, one line each, flushed so a crash keeps what was reported.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    pub all: Vec<Metric>,
}

impl MetricsLog {
    /// Starts a fresh log, or (resuming) keeps the lines up to `resume_step` so the log reads as
    /// one uninterrupted run: a train line of step s was written after step s completed; eval
    /// lines at s describe the weights after step s.
    pub fn open(path: &Path, resume_step: Option<u64>) -> anyhow::Result<Self> {
        let mut all = Vec::new();
        if let Some(upto) = resume_step {
            if let Ok(text) = std::fs::read_to_string(path) {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let m: Metric = match serde_json::from_str(line) {
                        Ok(m) => m,
                        Err(_) => break, // a line cut by a crash
                    };
                    if m.step() <= upto {
                        all.push(m);
                    }
                }
            }
        }
        let tmp = path.with_extension("jsonl.tmp");
        {
            let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
            for m in &all {
                writeln!(f, "{}", serde_json::to_string(m)?)?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(MetricsLog { path: path.to_path_buf(), file, all })
    }

    pub fn push(&mut self, m: Metric) -> anyhow::Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(&m)?).with_context(|| format!("cannot write {}", self.path.display()))?;
        self.file.flush()?;
        self.all.push(m);
        Ok(())
    }
}

/// A font for the plot's text, if the system has one (Debian: fonts-dejavu-core). Without one
/// the curves are drawn without labels.
fn font() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
        ];
        for c in candidates {
            if let Ok(bytes) = std::fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Draws train loss (per step, with a moving average) and validation loss against steps.
pub fn plot(metrics: &[Metric], path: &Path) -> anyhow::Result<()> {
    let train: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| match m {
            Metric::Train { step, loss, .. } => Some((*step as f64, *loss)),
            _ => None,
        })
        .collect();
    let val: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| match m {
            Metric::Eval { step, val_loss, .. } => Some((*step as f64, *val_loss)),
            _ => None,
        })
        .collect();
    let ys = train.iter().chain(&val).map(|p| p.1).filter(|v| v.is_finite());
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return Ok(());
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let max_step = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let has_font = font();
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if has_font {
        builder.caption("loss (answer tokens)", ("sans-serif", 22)).x_label_area_size(40).y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    if has_font {
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("cross-entropy (nats)")
            .draw()
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    let window = (train.len() / 20).max(1);
    let smooth: Vec<(f64, f64)> = (0..train.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            let s = &train[lo..=i];
            (train[i].0, s.iter().map(|p| p.1).sum::<f64>() / s.len() as f64)
        })
        .collect();
    let light = RGBColor(150, 180, 230);
    chart.draw_series(LineSeries::new(train.iter().copied(), &light)).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let s = chart
        .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    if has_font {
        s.label("train").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    }
    let v = chart
        .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    if has_font {
        v.label("validation").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    chart.draw_series(val.iter().map(|p| Circle::new(*p, 3, RED.filled()))).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// Reads a run's metrics.jsonl (a line cut by a crash ends it).
pub fn read_metrics(path: &Path) -> anyhow::Result<Vec<Metric>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).map_while(|l| serde_json::from_str(l).ok()).collect())
}

/// Compares runs: validation cross-entropy (left) and greedy agreement with the teacher (right)
/// against steps, one colour per run.
pub fn plot_runs(runs: &[(String, Vec<Metric>)], path: &Path) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    let evals = |m: &[Metric], pick: fn(&Metric) -> Option<f64>| -> Vec<(f64, f64)> {
        m.iter().filter_map(|x| pick(x).map(|v| (x.step() as f64, v))).collect()
    };
    let loss = |m: &Metric| match m {
        Metric::Eval { val_loss, .. } => Some(*val_loss),
        _ => None,
    };
    let agree = |m: &Metric| match m {
        Metric::Eval { greedy_agreement, .. } => Some(100.0 * greedy_agreement),
        _ => None,
    };
    let has_font = font();
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (panel, (pick, title, unit)) in panels.iter().zip([
        (loss as fn(&Metric) -> Option<f64>, "validation cross-entropy", "nats per answer token"),
        (agree, "greedy agreement with the teacher", "% of answer tokens"),
    ]) {
        let series: Vec<Vec<(f64, f64)>> = runs.iter().map(|(_, m)| evals(m, pick)).collect();
        let all = series.iter().flatten();
        let (lo, hi) = all.clone().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let max_step = all.map(|p| p.0).fold(1.0, f64::max);
        if lo > hi {
            continue;
        }
        let pad = ((hi - lo) * 0.08).max(1e-3);
        let mut builder = ChartBuilder::on(panel);
        builder.margin(18);
        if has_font {
            builder.caption(title, ("sans-serif", 20)).x_label_area_size(40).y_label_area_size(60);
        }
        let mut chart = builder.build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad)).map_err(|e| err(&e))?;
        if has_font {
            chart.configure_mesh().x_desc("step").y_desc(unit).draw().map_err(|e| err(&e))?;
        }
        for (i, ((name, _), pts)) in runs.iter().zip(&series).enumerate() {
            let c = colours[i % colours.len()];
            let s = chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2))).map_err(|e| err(&e))?;
            if has_font {
                s.label(name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            }
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled()))).map_err(|e| err(&e))?;
        }
        if has_font {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}
