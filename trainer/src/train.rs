//! The training run: data → student → AdamW steps with warmup + cosine, clipping and gradient
//! accumulation → evaluations, checkpoints, metrics, plot → an HF folder. Deterministic for a
//! seed: the data order of epoch e is a shuffle seeded by (seed, e), so a resumed run replays
//! exactly the batches an uninterrupted one would have seen.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use server::model::chat_template::ChatTemplate;

use crate::checkpoint::{self, State};
use crate::cli::{DataArgs, EvalArgs, TrainArgs};
use crate::data::{self, Batch, Example, Selection};
use crate::eval::{evaluate, BatchTensors, EvalResult};
use crate::init::{self, Init, TokenizerAndTemplate};
use crate::kd::kd_loss;
use crate::model::{masked_cross_entropy, Llama};
use crate::optim::{accumulate_grads, clip_grad_norm, lr_at, AdamW, AdamWConfig};
use crate::report::{plot, Metric, MetricsLog};

/// Examples ready for training, with what it took to make them.
pub struct Prepared {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub template_source: Option<String>,
    pub used_teacher_ids: bool,
}

fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(Device::new_cuda(0)?);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

/// Reads the database and turns the selected answers into split, tokenized examples.
/// With `kd`, every example carries its soft labels (or this fails saying why).
pub fn prepare(args: &DataArgs, tok: &TokenizerAndTemplate, kd: bool) -> anyhow::Result<Prepared> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let records = rt.block_on(async {
        let pool = data::open(&args.from_db).await?;
        let sel = Selection { jobs: args.jobs.clone(), include_truncated: args.include_truncated };
        let r = data::records(&pool, &sel).await;
        pool.close().await;
        r
    })?;
    let needs_template = records.iter().any(|r| r.endpoint == "chat");
    let template_source = tok.template.clone();
    let template = match (&template_source, needs_template) {
        (Some(t), _) => ChatTemplate::new(
            t,
            &tok.tokenizer.token_text(tok.tokenizer.special.bos),
            &tok.tokenizer.token_text(Some(tok.tokenizer.special.eos)),
        )?,
        (None, true) => bail!(
            "the student's tokenizer has no chat template, and the answers are chat conversations; \
             use an init model with one (GGUF metadata or tokenizer_config.json) or --tokenizer"
        ),
        (None, false) => ChatTemplate::new("", "", "")?,
    };
    let enc = data::Encoder { tokenizer: &tok.tokenizer, template: &template, use_teacher_ids: false, soft_labels: false };
    // The teacher's own ids are used when the student's tokenizer and template reproduce the
    // teacher's prompt ids exactly (same vocabulary); otherwise everything is re-tokenized.
    let with_ids: Vec<&data::Record> = records.iter().filter(|r| r.prompt_token_ids.is_some()).collect();
    let mut same = !with_ids.is_empty();
    for r in with_ids.iter().take(64) {
        if enc.render_prompt(r)? != *r.prompt_token_ids.as_ref().unwrap() {
            same = false;
            break;
        }
    }
    let enc = data::Encoder { use_teacher_ids: same, soft_labels: kd, ..enc };
    let (examples, stats) = enc.encode(&records)?;
    eprintln!(
        "data: {} answers from {} → {} examples ({} with the teacher's token ids, {} re-tokenized{})",
        records.len(),
        args.from_db.display(),
        examples.len(),
        stats.from_teacher_ids,
        stats.rendered,
        if stats.prompt_mismatch > 0 { format!(", {} prompts re-render differently", stats.prompt_mismatch) } else { String::new() }
    );
    let (train, val) = data::split(examples, args.val_fraction, args.min_val)?;
    Ok(Prepared { train, val, template_source, used_teacher_ids: same })
}

/// The packed micro-batches of one epoch: examples shuffled by (seed, epoch), then packed.
fn epoch_batches(train: &[Example], seed: u64, epoch: u64, max_len: usize, rows: usize) -> Vec<Batch> {
    let mut order: Vec<&Example> = train.iter().collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch);
    order.shuffle(&mut rng);
    data::pack(&order, max_len, rows)
}

fn rows_per_batch(batch_tokens: usize, max_len: usize) -> usize {
    (batch_tokens / max_len).max(1)
}

/// Checks the output folder can be written before any work is done.
fn check_out_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("checkpoint"))
        .with_context(|| format!("cannot create output folder {}; choose a writable --out", dir.display()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("output folder {} is not writable; choose another --out", dir.display()))?;
    std::fs::remove_file(&probe)?;
    Ok(())
}

/// The student (consumes the init weights).
fn build_student(init: &mut Init, keep: Option<&[usize]>, seed: u64, device: &Device) -> anyhow::Result<Llama> {
    let model = match init.tensors.take() {
        Some(t) => Llama::from_tensors(init.config.clone(), t, DType::F32, device)?,
        None => Llama::random(init.config.clone(), seed, DType::F32, device)?,
    };
    match keep {
        Some(k) => model.keep_layers(k).context("--keep-layers"),
        None => Ok(model),
    }
}

/// Everything that must not change when a run resumes.
fn fingerprint(args: &TrainArgs, p: &Prepared, total_steps: u64) -> String {
    let ids: Vec<i64> = p.train.iter().map(|e| e.generation_id).collect();
    let data_hash = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for (e, id) in p.train.iter().zip(&ids) {
            h.update(id.to_le_bytes());
            h.update((e.prompt.len() as u64).to_le_bytes());
            h.update((e.answer.len() as u64).to_le_bytes());
        }
        hex_prefix(&h.finalize())
    };
    serde_json::json!({
        "init": format!("{:?}", args.init),
        "keep_layers": args.keep_layers,
        "seed": args.seed,
        "lr": args.lr,
        "warmup": args.warmup,
        "total_steps": total_steps,
        "batch_tokens": args.batch_tokens,
        "grad_accum": args.grad_accum,
        "max_len": args.data.max_len,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "train_examples": ids.len(),
        "data": data_hash,
        "kd": args.kd.config().ok().flatten().map(|c| format!("{c:?}")),
    })
    .to_string()
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

fn eval_metric(step: u64, r: EvalResult) -> Metric {
    Metric::Eval { step, val_loss: r.loss, val_ppl: r.ppl, greedy_agreement: r.greedy_agreement, val_tokens: r.tokens }
}

fn checkpoint_path(out: &Path) -> PathBuf {
    out.join("checkpoint").join("checkpoint.safetensors")
}

fn save_checkpoint(out: &Path, model: &Llama, opt: &AdamW, state: &State) -> anyhow::Result<()> {
    let mut tensors: Vec<(String, candle_core::Tensor)> =
        model.params().into_iter().map(|(n, v)| (format!("model.{n}"), v.as_tensor().clone())).collect();
    let mut opt_state: Vec<(String, candle_core::Tensor)> = opt.state_tensors()?.into_iter().collect();
    opt_state.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.extend(opt_state.into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
    checkpoint::save(&checkpoint_path(out), &tensors, state)
}

/// Runs `trainer --from-db ... --init ... --out ...`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if args.grad_accum == 0 || args.batch_tokens == 0 || args.data.max_len < 2 {
        bail!("--grad-accum and --batch-tokens must be positive and --max-len at least 2");
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    let out = args.out.clone();
    if checkpoint_path(&out).exists() && !args.resume {
        bail!("{} already holds a run (checkpoint/); pass --resume to continue it, or choose another --out", out.display());
    }
    let dev = device()?;
    let mut init = init::load(&args.init, args.data.tokenizer.as_deref())?;
    let kd = args.kd.config()?;
    let prepared = prepare(&args.data, &init.tokenizer, kd.is_some())?;
    let model = build_student(&mut init, args.keep_layers.as_deref(), args.seed, &dev)?;
    check_out_dir(&out)?;
    let rows = rows_per_batch(args.batch_tokens, args.data.max_len);
    let val_batches = data::pack(&prepared.val.iter().collect::<Vec<_>>(), args.data.max_len, rows);

    // Steps: --max-steps, else --epochs (default 1) over the packed micro-batches.
    let epoch0 = epoch_batches(&prepared.train, args.seed, 0, args.data.max_len, rows).len() as u64;
    let steps_per_epoch = epoch0.div_ceil(args.grad_accum as u64).max(1);
    let total_steps = args.max_steps.unwrap_or(steps_per_epoch * args.epochs.unwrap_or(1).max(1));
    if total_steps == 0 {
        bail!("--max-steps must be at least 1");
    }
    let fp = fingerprint(&args, &prepared, total_steps);
    let adam = AdamWConfig { weight_decay: args.weight_decay, ..AdamWConfig::default() };

    let (mut opt, mut state) = if args.resume && checkpoint_path(&out).exists() {
        let (tensors, state) = checkpoint::load(&checkpoint_path(&out), &dev)?;
        if state.fingerprint != fp {
            bail!(
                "--resume: the checkpoint in {} was made with other settings or data.\n  checkpoint: {}\n  now:        {fp}\n\
                 Run with the same flags and database, or start a new --out",
                out.display(),
                state.fingerprint
            );
        }
        for (name, var) in model.params() {
            let t = tensors.get(&format!("model.{name}")).with_context(|| format!("checkpoint has no weights for {name}"))?;
            var.set(t)?;
        }
        let opt_state = tensors
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("optim.").map(|k| (k.to_string(), v)))
            .collect();
        let opt = AdamW::from_state_tensors(adam, &opt_state, &model.params())?;
        eprintln!("resuming at step {} of {total_steps}", state.step);
        (opt, state)
    } else {
        if args.resume {
            eprintln!("--resume: no checkpoint in {} yet; starting from the beginning", out.display());
        }
        (AdamW::new(adam), State { step: 0, epoch: 0, batch_in_epoch: 0, fingerprint: fp.clone(), tokens: 0 })
    };
    let mut log = MetricsLog::open(&out.join("metrics.jsonl"), Some(state.step).filter(|_| state.step > 0))?;
    eprintln!(
        "student: {} layers, {:.1} M parameters; {} train / {} validation examples; {} micro-batches of {rows}×{} tokens per epoch, \
         {} per step; {total_steps} steps",
        model.config().num_hidden_layers,
        model.num_params() as f64 / 1e6,
        prepared.train.len(),
        prepared.val.len(),
        epoch0,
        args.data.max_len,
        args.grad_accum
    );
    if state.step == 0 {
        let r = evaluate(&model, &val_batches)?;
        eprintln!("step 0: val loss {:.4}, ppl {:.2}, greedy agreement {:.2}%", r.loss, r.ppl, 100.0 * r.greedy_agreement);
        log.push(eval_metric(0, r))?;
    }

    let bar = ProgressBar::new(total_steps).with_position(state.step);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut batches = epoch_batches(&prepared.train, args.seed, state.epoch, args.data.max_len, rows);
    let params = model.params();
    let started_here = state.step;
    let max_epochs = if args.max_steps.is_some() { u64::MAX } else { args.epochs.unwrap_or(1).max(1) };
    while state.step < total_steps {
        let t0 = Instant::now();
        // The step's micro-batches, crossing into the next epoch when this one runs out.
        let mut micro: Vec<Batch> = Vec::with_capacity(args.grad_accum);
        while micro.len() < args.grad_accum {
            if state.batch_in_epoch as usize >= batches.len() {
                if state.epoch + 1 >= max_epochs {
                    break;
                }
                state.epoch += 1;
                state.batch_in_epoch = 0;
                batches = epoch_batches(&prepared.train, args.seed, state.epoch, args.data.max_len, rows);
            }
            micro.push(batches[state.batch_in_epoch as usize].clone());
            state.batch_in_epoch += 1;
        }
        if micro.is_empty() {
            break;
        }
        let step_tokens: usize = micro.iter().map(|b| b.loss_tokens).sum();
        let mut grads = None;
        let mut loss_sum = 0f64;
        let (mut ce_sum, mut kl_sum) = (0f64, 0f64);
        let mut seen_tokens = 0u64;
        let per_token = 1.0 / step_tokens.max(1) as f64;
        for b in &micro {
            let t = BatchTensors::new(b, &dev, DType::F32)?;
            let logits = model.forward(&t.input, &t.positions, &t.segments)?;
            let sum = match (&kd, &t.teacher) {
                (Some(cfg), Some((ids, lps))) => {
                    let terms = kd_loss(&logits, &t.target, ids, lps, &t.mask, cfg)?;
                    ce_sum += terms.ce.to_dtype(DType::F64)?.to_scalar::<f64>()? * per_token;
                    kl_sum += terms.kl.to_dtype(DType::F64)?.to_scalar::<f64>()? * per_token;
                    terms.total
                }
                (Some(_), None) => bail!("--kd: a micro-batch has no soft labels"),
                (None, _) => masked_cross_entropy(&logits, &t.target, &t.mask)?.0,
            };
            // Mean over the answer tokens of the whole step, not per micro-batch.
            let loss = (sum * per_token)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            accumulate_grads(&mut grads, loss.backward()?, &params)?;
            seen_tokens += b.segments.iter().filter(|s| **s > 0).count() as u64;
        }
        let mut grads = grads.expect("at least one micro-batch");
        let norm = if args.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, &params, args.max_grad_norm)?
        } else {
            crate::optim::grad_norm(&grads, &params)?
        };
        if !norm.is_finite() {
            bail!("step {}: the gradient norm is {norm}; lower --lr", state.step + 1);
        }
        let lr = lr_at(state.step, args.lr, args.warmup, total_steps);
        opt.step(&params, &grads, lr)?;
        state.step += 1;
        state.tokens += seen_tokens;
        let secs = t0.elapsed().as_secs_f64();
        log.push(Metric::Train {
            step: state.step,
            loss: loss_sum,
            lr,
            grad_norm: norm,
            tokens: state.tokens,
            tokens_per_s: seen_tokens as f64 / secs.max(1e-9),
            ce: kd.is_some().then_some(ce_sum),
            kl: kd.is_some().then_some(kl_sum),
        })?;
        bar.set_position(state.step);
        bar.set_message(format!("loss {loss_sum:.4}  {:.0} tok/s", seen_tokens as f64 / secs.max(1e-9)));
        let last = state.step == total_steps;
        if state.step % args.eval_every.max(1) == 0 || last {
            let r = evaluate(&model, &val_batches)?;
            bar.println(format!(
                "step {}: val loss {:.4}, ppl {:.2}, greedy agreement {:.2}%",
                state.step,
                r.loss,
                r.ppl,
                100.0 * r.greedy_agreement
            ));
            log.push(eval_metric(state.step, r))?;
        }
        let stop_now = args.stop_after.is_some_and(|n| state.step - started_here >= n);
        if state.step % args.save_every.max(1) == 0 || last || stop_now {
            save_checkpoint(&out, &model, &opt, &state)?;
        }
        if stop_now {
            bar.abandon_with_message("stopped (--stop-after); continue with --resume");
            plot(&log.all, &out.join("loss.png"))?;
            return Ok(());
        }
    }
    bar.finish_with_message("done");
    let tensors = model.named_tensors()?;
    server::model::hf::write_folder(&out, model.config(), &tensors, &init.tokenizer.tokenizer, prepared.template_source.as_deref())?;
    plot(&log.all, &out.join("loss.png"))?;
    eprintln!(
        "wrote {} (model.safetensors, config.json, tokenizer files), metrics.jsonl, loss.png\n\
         serve it as a teacher: server --teacher student=local:{}",
        out.display(),
        out.display()
    );
    Ok(())
}

/// Runs `trainer eval`: validation loss, perplexity and greedy agreement, printed as JSON.
pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let dev = device()?;
    let mut init = init::load(&args.model, args.data.tokenizer.as_deref())?;
    let prepared = prepare(&args.data, &init.tokenizer, false)?;
    let model = build_student(&mut init, args.keep_layers.as_deref(), 0, &dev)?;
    let rows = rows_per_batch(args.batch_tokens, args.data.max_len);
    let val = data::pack(&prepared.val.iter().collect::<Vec<_>>(), args.data.max_len, rows);
    let r = evaluate(&model, &val)?;
    println!(
        "{}",
        serde_json::json!({
            "val_loss": r.loss, "val_ppl": r.ppl, "greedy_agreement": r.greedy_agreement,
            "val_tokens": r.tokens, "val_examples": prepared.val.len(),
        })
    );
    Ok(())
}
