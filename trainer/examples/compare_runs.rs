//! Plots runs against each other: validation cross-entropy and greedy agreement per step, from
//! each run's metrics.jsonl (the soft-label experiment in the README uses it).
//!
//!     cargo run --release -p trainer --example compare_runs -- OUT.png NAME=RUN_DIR...
//!
//! (NAME may contain `=`; the run folder is what follows the last one.)

use std::path::PathBuf;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().context("usage: compare_runs OUT.png NAME=RUN_DIR...")?);
    let mut runs = Vec::new();
    for a in args {
        let (name, dir) = a.rsplit_once('=').with_context(|| format!("`{a}`: give runs as NAME=RUN_DIR"))?;
        runs.push((name.to_string(), trainer::report::read_metrics(&PathBuf::from(dir).join("metrics.jsonl"))?));
    }
    anyhow::ensure!(!runs.is_empty(), "no runs given: NAME=RUN_DIR...");
    trainer::report::plot_runs(&runs, &out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
