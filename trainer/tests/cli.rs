//! The `trainer` binary end to end on a database filled by the real server with the local
//! SmolLM2 teacher: training a pruned student, resume equal to an uninterrupted run, the output
//! folder served back as a teacher, the un-pruned student agreeing with the teacher, and bad
//! input refused with a message and nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use distill_tests::harness::{repo_root, smollm2_gguf, TestApp};
use serde_json::{json, Value};
use server::config::{Precision, Settings, TeacherSpec};

/// The shared database: the local teacher's answers to both example prompt sets (job
/// `QUANTIZED_JOB`, llama.cpp arithmetic, what users run), and to the math set by the same
/// model in f32 arithmetic (job `F32_JOB`).
const QUANTIZED_JOB: &str = "1";
const F32_JOB: &str = "2";
/// The math set again, from the quantized teacher with top-20 soft labels.
const KD_JOB: &str = "3";

/// The gen.sqlite described above (made once; the server's folder is kept, WAL files included).
fn teacher_db() -> &'static Path {
    static DB: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DB.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let t = TestApp::start_with(|s| {
                let spec = TeacherSpec::parse(&format!("local:{}", smollm2_gguf().display())).unwrap();
                let mut t = Settings::teacher_defaults("smol", spec.clone());
                t.max_in_flight = 16;
                s.teachers.push(t);
                let mut t = Settings::teacher_defaults("smol-f32", spec);
                t.max_in_flight = 16;
                t.local_precision = Precision::F32;
                s.teachers.push(t);
            })
            .await;
            let read = |f: &str| -> Vec<String> {
                let text = std::fs::read_to_string(repo_root().join("prompts").join(f)).unwrap();
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()["prompt"].as_str().unwrap().to_string())
                    .collect()
            };
            let math = read("math-word-problems.jsonl");
            let both = [read("general-knowledge.jsonl"), math.clone()].concat();
            let set = t.prompt_set("both", &both).await;
            let job = t.job(json!({"prompt_set": set, "teacher": "smol", "max_new_tokens": 160})).await;
            assert_eq!(job.to_string(), QUANTIZED_JOB);
            t.wait_done(job, Duration::from_secs(900)).await;
            let set = t.prompt_set("math", &math).await;
            let job = t.job(json!({"prompt_set": set, "teacher": "smol-f32", "max_new_tokens": 160})).await;
            assert_eq!(job.to_string(), F32_JOB);
            t.wait_done(job, Duration::from_secs(900)).await;
            let job = t.job(json!({"prompt_set": set, "teacher": "smol", "max_new_tokens": 160, "logprobs": 20})).await;
            assert_eq!(job.to_string(), KD_JOB);
            t.wait_done(job, Duration::from_secs(900)).await;
            let dir = t.shutdown().await;
            let path = dir.path().join("gen.sqlite");
            (dir, path)
        })
    })
    .1
}

/// A consistent copy of a database (`VACUUM INTO`), to damage in a test.
fn copy_db(src: &Path, dst: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(src)).await.unwrap();
        sqlx::query("VACUUM INTO ?").bind(dst.display().to_string()).execute(&pool).await.unwrap();
        pool.close().await;
    });
}

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).output().expect("trainer runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// metrics.jsonl as JSON values.
fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const STUDENT_LAYERS: &str = "0,5,10,15,20,25,29";

fn train_args<'a>(db: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    train_args_for(QUANTIZED_JOB, db, out, extra)
}

fn train_args_for<'a>(job: &'a str, db: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let gguf: &'static str = Box::leak(smollm2_gguf().display().to_string().into_boxed_str());
    let mut a = vec![
        "--from-db", db, "--job", job, "--init", gguf, "--out", out, "--keep-layers", STUDENT_LAYERS, "--max-len", "256",
        "--batch-tokens", "1024", "--lr", "3e-4", "--warmup", "2", "--seed", "7",
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn trains_a_pruned_student_and_resume_equals_an_uninterrupted_run() {
    let db = teacher_db().display().to_string();
    let runs = tempfile::tempdir().unwrap();
    let full = runs.path().join("full").display().to_string();
    let o = trainer(&train_args(&db, &full, &["--max-steps", "6", "--eval-every", "3", "--save-every", "2"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let full_dir = Path::new(&full);
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "metrics.jsonl", "loss.png"] {
        assert!(full_dir.join(f).is_file(), "{f} missing: {}", stderr(&o));
    }
    let m = metrics(full_dir);
    let train: Vec<f64> = m.iter().filter(|x| x["kind"] == "train").map(|x| x["loss"].as_f64().unwrap()).collect();
    let evals: Vec<&Value> = m.iter().filter(|x| x["kind"] == "eval").collect();
    assert_eq!(train.len(), 6);
    assert_eq!(evals.iter().map(|e| e["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 3, 6]);
    let (v0, v6) = (evals[0]["val_loss"].as_f64().unwrap(), evals[2]["val_loss"].as_f64().unwrap());
    eprintln!("train loss {train:?}; val loss {v0:.4} → {v6:.4}");
    assert!(v6 < v0, "validation loss did not go down: {v0} → {v6}");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(full_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 7);
    let tc: Value = serde_json::from_str(&std::fs::read_to_string(full_dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc["chat_template"].as_str().unwrap().contains("im_start"));

    // Interrupted after 4 steps (checkpointed), then resumed: same curve, same weights.
    let split = runs.path().join("split").display().to_string();
    let o = trainer(&train_args(&db, &split, &["--max-steps", "6", "--eval-every", "3", "--save-every", "2", "--stop-after", "4"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!Path::new(&split).join("model.safetensors").exists());
    // Without --resume an existing run is not overwritten.
    let o = trainer(&train_args(&db, &split, &["--max-steps", "6", "--eval-every", "3", "--save-every", "2"]));
    assert!(!o.status.success() && stderr(&o).contains("--resume"), "{}", stderr(&o));
    // A different setting is refused on resume.
    let o = trainer(&train_args(&db, &split, &["--max-steps", "7", "--eval-every", "3", "--save-every", "2", "--resume"]));
    assert!(!o.status.success() && stderr(&o).contains("other settings"), "{}", stderr(&o));
    let o = trainer(&train_args(&db, &split, &["--max-steps", "6", "--eval-every", "3", "--save-every", "2", "--resume"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let untimed = |v: Vec<Value>| -> Vec<Value> {
        v.into_iter()
            .map(|mut x| {
                x.as_object_mut().unwrap().remove("tokens_per_s");
                x
            })
            .collect()
    };
    assert_eq!(untimed(metrics(Path::new(&split))), untimed(m.clone()), "the resumed run's losses differ");
    let a = std::fs::read(full_dir.join("model.safetensors")).unwrap();
    let b = std::fs::read(Path::new(&split).join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run's");
}

/// The training-step lines of a run, without their timing.
fn train_lines(dir: &Path) -> Vec<Value> {
    metrics(dir)
        .into_iter()
        .filter(|m| m["kind"] == "train")
        .map(|mut m| {
            m.as_object_mut().unwrap().remove("tokens_per_s");
            m
        })
        .collect()
}

#[test]
fn kd_with_lambda_zero_and_no_z_loss_is_the_hard_label_run() {
    // The KD path with λ = 0 and λ_Z = 0 is (1 − 0)·CE: the same losses, step for step, as a
    // run without --kd, so the KD wiring adds nothing of its own to the hard-label term.
    let db = teacher_db().display().to_string();
    let runs = tempfile::tempdir().unwrap();
    let (hard, kd) = (runs.path().join("hard").display().to_string(), runs.path().join("kd").display().to_string());
    let extra = ["--max-steps", "3", "--eval-every", "3"];
    let o = trainer(&train_args_for(KD_JOB, &db, &hard, &extra));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = trainer(&train_args_for(KD_JOB, &db, &kd, &[&extra[..], &["--kd", "--lambda", "0", "--z-loss", "0"]].concat()));
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (train_lines(Path::new(&hard)), train_lines(Path::new(&kd)));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() <= 1e-4 * lx.abs(), "hard {x} vs kd λ=0 {y}");
        assert!((y["ce"].as_f64().unwrap() - ly).abs() <= 1e-4 * ly.abs(), "{y}");
        assert!(x.get("kl").is_none() && y["kl"].as_f64().unwrap().is_finite());
    }
}

#[test]
fn kd_trains_on_the_teachers_soft_labels() {
    let db = teacher_db().display().to_string();
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("kd").display().to_string();
    let o = trainer(&train_args_for(KD_JOB, &db, &out, &["--max-steps", "6", "--eval-every", "6", "--kd", "--lambda", "1"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let m = metrics(Path::new(&out));
    let kl: Vec<f64> = m.iter().filter(|x| x["kind"] == "train").map(|x| x["kl"].as_f64().unwrap()).collect();
    let evals: Vec<f64> = m.iter().filter(|x| x["kind"] == "eval").map(|x| x["val_loss"].as_f64().unwrap()).collect();
    eprintln!("KD λ = 1: KL per step {kl:?}; validation CE {evals:?}");
    assert!(kl.iter().all(|k| k.is_finite() && *k >= 0.0), "{kl:?}");
    assert!(kl[5] < kl[0], "the KL to the teacher did not go down: {kl:?}");
    // Soft labels alone teach the hard labels too: the cross-entropy on held-out answers falls.
    assert!(evals[1] < evals[0], "{evals:?}");

    // The other tail rule and a temperature: finite, and a different loss.
    let renorm = runs.path().join("renorm").display().to_string();
    let o = trainer(&train_args_for(
        KD_JOB, &db, &renorm, &["--max-steps", "1", "--eval-every", "1", "--kd", "--tail", "renorm", "--temperature", "2"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let r = train_lines(Path::new(&renorm));
    assert!(r[0]["loss"].as_f64().unwrap().is_finite() && r[0]["kl"].as_f64().unwrap() >= 0.0, "{r:?}");

    // A student whose tokenizer does not reproduce the teacher's ids (here: its chat template
    // differs) is refused soft labels; hard labels still train.
    let cfg_path = Path::new(&out).join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let other = format!("Conversation:\n{}", cfg["chat_template"].as_str().unwrap());
    cfg["chat_template"] = Value::String(other);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let again = runs.path().join("again").display().to_string();
    let base = ["--from-db", &db, "--job", KD_JOB, "--init", &out, "--out", &again, "--max-steps", "1", "--max-len", "256"];
    let o = trainer(&[&base[..], &["--kd"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("does not reproduce the teacher's token ids"), "{}", stderr(&o));
    assert!(!Path::new(&again).exists());
    let o = trainer(&base);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `trainer eval` of the un-pruned student (the GGUF itself) on one job's answers.
fn unpruned_eval(job: &str) -> Value {
    let db = teacher_db().display().to_string();
    let gguf = smollm2_gguf().display().to_string();
    let o = trainer(&["eval", "--from-db", &db, "--job", job, "--model", &gguf, "--val-fraction", "1", "--max-len", "512"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn the_unpruned_student_agrees_with_the_local_teacher_on_its_own_answers() {
    // Loading, tokenizer and template all match: under teacher forcing, the f32 student made
    // from the GGUF picks the teacher's own greedy token at every answer position when the
    // teacher runs the same weights in f32 (measured: 100 % of 4,714 positions on the demo set).
    let exact = unpruned_eval(F32_JOB);
    eprintln!("un-pruned student vs the f32 teacher: {exact}");
    assert!(exact["val_tokens"].as_u64().unwrap() > 2000, "{exact}");
    assert!(exact["greedy_agreement"].as_f64().unwrap() >= 0.99, "{exact}");
    // Against the default (quantized) teacher the rate is lower, by near-ties only: 8-bit
    // activations and f16 attention move logits by a few tenths (measured 98.2 %, every miss
    // within 0.5 nats of the student's top token).
    let quantized = unpruned_eval(QUANTIZED_JOB);
    eprintln!("un-pruned student vs the quantized teacher: {quantized}");
    assert!(quantized["greedy_agreement"].as_f64().unwrap() >= 0.97, "{quantized}");
}

#[test]
fn the_trained_student_serves_as_a_teacher() {
    let db = teacher_db().display().to_string();
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("student").display().to_string();
    let o = trainer(&train_args(&db, &out, &["--max-steps", "2", "--eval-every", "2"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let t = TestApp::start_with(|s| {
            s.teachers.push(Settings::teacher_defaults("student", TeacherSpec::parse(&format!("local:{out}")).unwrap()));
        })
        .await;
        let (_, teachers) = t.get("/v1/teachers").await;
        assert!(teachers[0]["error"].is_null(), "{teachers}");
        let set = t.prompt_set("p", &["What is the capital of France?".to_string()]).await;
        let job = t.job(json!({"prompt_set": set, "teacher": "student", "max_new_tokens": 8})).await;
        t.wait_done(job, Duration::from_secs(120)).await;
        let g = &t.all_generations(job, None).await[0];
        assert!(g["completion_tokens"].as_u64().unwrap() >= 1, "{g}");
        t.shutdown().await;
    });
}

#[test]
fn bad_input_is_refused_with_a_message_and_nothing_written() {
    let db = teacher_db();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let out_s = out.display().to_string();
    let not_sqlite = d.join("notes.txt");
    std::fs::write(&not_sqlite, "hello").unwrap();
    let old = d.join("old.sqlite");
    copy_db(db, &old);
    let set_version = |path: &Path, v: &str| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
            let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
            sqlx::query("UPDATE meta SET value = ? WHERE key = 'schema_version'").bind(v).execute(&pool).await.unwrap();
            pool.close().await;
        });
    };
    set_version(&old, "1");
    let newer = d.join("newer.sqlite");
    copy_db(db, &newer);
    set_version(&newer, "99");
    let empty = d.join("empty.sqlite");
    copy_db(db, &empty);
    {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let pool = sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&empty)).await.unwrap();
            sqlx::query("UPDATE generations SET status = 'failed', completion_id = NULL").execute(&pool).await.unwrap();
            pool.close().await;
        });
    }
    let small_vocab = d.join("small.json");
    std::fs::write(
        &small_vocab,
        r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let gguf = smollm2_gguf().display().to_string();
    let db_s = db.display().to_string();
    let as_file = d.join("a-file");
    std::fs::write(&as_file, "x").unwrap();
    let s = |p: &Path| p.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--from-db".into(), s(&d.join("missing.sqlite"))], "does not exist"),
        (vec!["--from-db".into(), s(&not_sqlite)], "is not an SQLite database"),
        (vec!["--from-db".into(), s(&old)], "schema version 1"),
        (vec!["--from-db".into(), s(&newer)], "schema version 99"),
        (vec!["--from-db".into(), s(&empty)], "no done answers"),
        (vec!["--from-db".into(), db_s.clone(), "--job".into(), "42".into()], "job 42 is not in the database"),
        (vec!["--from-db".into(), db_s.clone(), "--keep-layers".into(), "0,30".into()], "layer index 30 is out of range"),
        (
            vec!["--from-db".into(), db_s.clone(), "--init".into(), format!("scratch:{}", s(&small_vocab)), "--tokenizer".into(), gguf.clone()],
            "does not match the tokenizer",
        ),
        (vec!["--from-db".into(), db_s.clone(), "--out".into(), s(&as_file.join("sub"))], "--out"),
        (vec!["--from-db".into(), db_s.clone(), "--job".into(), QUANTIZED_JOB.into(), "--kd".into()], "has no soft labels"),
        (vec!["--from-db".into(), db_s.clone(), "--job".into(), KD_JOB.into(), "--kd".into(), "--lambda".into(), "1.5".into()], "outside 0..=1"),
        (vec!["--from-db".into(), db_s.clone(), "--job".into(), KD_JOB.into(), "--kd".into(), "--tail".into(), "cut".into()], "bucket or renorm"),
        (vec!["--from-db".into(), db_s.clone(), "--job".into(), KD_JOB.into(), "--lambda".into(), "0.5".into()], "--kd"),
    ];
    for (args, want) in cases {
        let mut full: Vec<String> = args.clone();
        if !full.contains(&"--init".to_string()) {
            full.extend(["--init".into(), gguf.clone()]);
        }
        if !full.contains(&"--out".to_string()) {
            full.extend(["--out".into(), out_s.clone()]);
        }
        full.extend(["--max-steps".into(), "1".into()]);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let o = trainer(&refs);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: expected `{want}` in: {err}");
        assert!(!out.exists(), "{args:?} left {out_s} behind");
    }
}
