//! Local teacher speed: the native engine against llama.cpp on the same GGUF, same cores,
//! in one run. Greedy, prompts of tests/fixtures/smollm2/greedy.jsonl, up to 128 new tokens,
//! prompt processing included.
//!
//! Run: `cargo bench -p distill-tests --bench engine` (needs models/ and the llama.cpp venv
//! from scripts/fetch-model.sh and scripts/setup-llama-server.sh). With `--features mistralrs`,
//! mistralrs 0.8.1 on the same file and prompts is measured too (once, after the rest).

use std::time::Instant;

use distill_tests::harness::{repo_root, smollm2_gguf};
use server::engine::llama::{argmax, Chunk, KvCache, Llama, Precision};

const MAX_NEW: usize = 128;

fn prompts(n: usize) -> Vec<Vec<u32>> {
    std::fs::read_to_string(repo_root().join("tests/fixtures/smollm2/greedy.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
        })
        .collect()
}

const STOP: [u32; 3] = [0, 2, 4];

/// Greedy-decodes all prompts as one batch; returns tokens generated.
fn run_batch(model: &Llama, batch: &[Vec<u32>]) -> usize {
    let mut caches: Vec<KvCache> = batch.iter().map(|_| KvCache::new(&model.cfg)).collect();
    let mut next: Vec<Option<u32>> = vec![None; batch.len()];
    let mut generated = 0;
    {
        let mut chunks: Vec<Chunk> = caches
            .iter_mut()
            .zip(batch)
            .map(|(c, p)| Chunk { cache: c, tokens: p, all_logits: false })
            .collect();
        let logits = model.forward(&mut chunks).unwrap();
        for (i, l) in logits.iter().enumerate() {
            next[i] = Some(argmax(l));
        }
    }
    let mut counts = vec![0usize; batch.len()];
    loop {
        let active: Vec<usize> = (0..batch.len())
            .filter(|&i| matches!(next[i], Some(t) if !STOP.contains(&t)) && counts[i] < MAX_NEW)
            .collect();
        if active.is_empty() {
            break;
        }
        let toks: Vec<[u32; 1]> = active.iter().map(|&i| [next[i].unwrap()]).collect();
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut rest: &mut [KvCache] = &mut caches;
        let mut offset = 0;
        for (k, &i) in active.iter().enumerate() {
            let (_, tail) = rest.split_at_mut(i - offset);
            let (cur, tail2) = tail.split_first_mut().unwrap();
            chunks.push(Chunk { cache: cur, tokens: &toks[k], all_logits: false });
            rest = tail2;
            offset = i + 1;
        }
        let logits = model.forward(&mut chunks).unwrap();
        for (k, &i) in active.iter().enumerate() {
            counts[i] += 1;
            generated += 1;
            next[i] = Some(argmax(&logits[k]));
        }
    }
    generated
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Runs scripts/bench-llama-cpp.py on the same prompts; None when its venv is missing.
fn llama_cpp(prompts: &[Vec<u32>], threads: usize) -> Option<serde_json::Value> {
    use std::io::Write;
    let python = distill_tests::harness::llama_python();
    if !python.exists() {
        eprintln!("llama.cpp side skipped: {} missing (scripts/setup-llama-server.sh)", python.display());
        return None;
    }
    let mut child = std::process::Command::new(python)
        .arg(repo_root().join("scripts/bench-llama-cpp.py"))
        .arg(smollm2_gguf())
        .arg(threads.to_string())
        .arg(MAX_NEW.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(serde_json::to_string(prompts).unwrap().as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    serde_json::from_slice(out.stdout.trim_ascii()).ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let threads = std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let reps = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    // As the server's engine thread does: run inside the pool, so products split among workers.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| bench(threads, reps));
}

fn bench(threads: usize, reps: usize) {
    let model = Llama::load(&smollm2_gguf(), Precision::Quantized).unwrap();
    let four = prompts(4);
    let eight = prompts(8);
    let (mut seq, mut conc, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut llama_rss = 0.0;
    // Interleaved repetitions, medians reported: the machine's noise hits both engines alike.
    for rep in 0..reps {
        let start = Instant::now();
        let toks: usize = four.iter().map(|p| run_batch(&model, std::slice::from_ref(p))).sum();
        seq.push(toks as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let toks = run_batch(&model, &eight);
        conc.push(toks as f64 / start.elapsed().as_secs_f64());
        if let Some(l) = llama_cpp(&four, threads) {
            base.push(l["tok_per_s"].as_f64().unwrap());
            llama_rss = l["peak_rss_mib"].as_f64().unwrap();
        }
        eprintln!("rep {rep}: native {:.1} / {:.1} tok/s, llama.cpp {:?}", seq[rep], conc[rep], base.last());
    }
    let (seq, conc) = (median(seq), median(conc));
    println!("threads {threads}, {reps} interleaved repetitions, medians; greedy, <= {MAX_NEW} new tokens, prompt processing included");
    println!("native sequential (4 prompts one after another): {seq:.1} tok/s");
    println!("native 8 concurrent (one batch): {conc:.1} tok/s aggregate");
    println!("native peak RSS: {:.0} MiB", peak_rss_mib());
    #[cfg(feature = "mistralrs")]
    mistralrs_side(&four);
    if !base.is_empty() {
        let base = median(base);
        println!("llama.cpp sequential: {base:.1} tok/s, peak RSS {llama_rss:.0} MiB");
        println!(
            "ratios: sequential {:.2}x llama.cpp (target >= 1.0), 8 concurrent {:.2}x llama.cpp sequential (target >= 2.0)",
            seq / base,
            conc / base
        );
    }
}

/// mistralrs on the same prompts, one after another (as the server runs it).
#[cfg(feature = "mistralrs")]
fn mistralrs_side(prompts: &[Vec<u32>]) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let engine = server::engine::mistral::MistralEngine::load(&smollm2_gguf(), "llama").await.unwrap();
        let start = Instant::now();
        let mut toks = 0;
        for p in prompts {
            toks += engine.generate(p.clone(), MAX_NEW, STOP.to_vec(), None).await.unwrap().ids.len();
        }
        println!("mistralrs 0.8.1 sequential: {:.1} tok/s (one run)", toks as f64 / start.elapsed().as_secs_f64());
    });
}
