//! Soft labels end to end on the local teacher (SmolLM2, native engine): a job with
//! `"logprobs": k` stores the teacher's exact top-k at every answer token, compactly; the API
//! and both export formats give them back; a rescore job teacher-forces given answers; bad
//! requests are refused naming the field; a version-2 database upgrades without losing rows.

use std::time::Duration;

use arrow::array::Array;

use distill_tests::harness::{smollm2_greedy_fixtures, smollm2_gguf, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use server::config::{Precision, Settings, TeacherSpec};
use server::engine::llama::{Chunk, KvCache, Llama};

const K: usize = 20;

fn local(name: &str) -> server::config::TeacherSettings {
    let spec = TeacherSpec::parse(&format!("local:{}", smollm2_gguf().display())).unwrap();
    let mut t = Settings::teacher_defaults(name, spec);
    t.max_in_flight = 4;
    t
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    // JSON has no −∞: it comes back as null.
    v.as_array().unwrap().iter().map(|x| x.as_f64().map_or(f32::NEG_INFINITY, |f| f as f32)).collect()
}

/// Checks one generation's soft labels against a log-softmax over the full logits of a
/// teacher-forced pass computed here; returns the worst |Δ| and the number of positions.
/// `greedy`: the answer was decoded, so its token is each position's top-1.
fn check(model: &Llama, g: &Value, greedy: bool) -> (f64, usize) {
    let prompt = u32s(&g["prompt_token_ids"]);
    let answer = u32s(&g["completion_token_ids"]);
    let s = &g["soft_labels"];
    assert_eq!(s["k"], K as u64, "{s}");
    let (ids, lps, chosen) = (&s["target_token_ids"], &s["target_logprobs"], f32s(&s["token_logprobs"]));
    assert_eq!(ids.as_array().unwrap().len(), answer.len());
    assert_eq!(chosen.len(), answer.len());
    let full: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
    let mut cache = KvCache::new(&model.cfg);
    let all = model.forward(&mut [Chunk { cache: &mut cache, tokens: &full, all_logits: true }]).unwrap().remove(0);
    let v = model.cfg.vocab;
    let mut worst = 0f64;
    for (i, &tok) in answer.iter().enumerate() {
        let (ids, lps) = (u32s(&ids[i]), f32s(&lps[i]));
        assert_eq!(ids.len(), K);
        if greedy {
            assert_eq!(ids[0], tok, "position {i}: the greedy token is the top-1");
        }
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{lps:?}");
        assert!(lps.iter().map(|l| (*l as f64).exp()).sum::<f64>() <= 1.0 + 1e-3);
        let row = &all[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
        let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
        let mut check = |id: u32, got: f32| {
            let want = row[id as usize] as f64 - lse;
            // Stored as f16: half a unit in the last place of the value, plus 1e-4.
            let tol = 1e-4 + want.abs() * 2f64.powi(-11);
            let d = (got as f64 - want).abs();
            assert!(d <= tol, "position {i} token {id}: stored {got}, log-softmax {want}");
            worst = worst.max(d);
        };
        check(tok, chosen[i]);
        for (&id, &lp) in ids.iter().zip(&lps) {
            check(id, lp);
        }
    }
    (worst, answer.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_teacher_soft_labels_are_exact_compact_and_exported() {
    let t = TestApp::start_with(|s| s.teachers.push(local("smol"))).await;
    let fx: Vec<Value> = smollm2_greedy_fixtures().into_iter().take(4).collect();
    let prompts: Vec<String> = fx.iter().map(|f| f["prompt"].as_str().unwrap().to_string()).collect();
    let set = t.prompt_set("fixtures", &prompts).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "smol", "max_new_tokens": 40, "logprobs": K})).await;
    let v = t.wait_done(job, Duration::from_secs(600)).await;
    assert_eq!(v["counts"]["done"], 4, "{v}");

    // Pages leave the soft labels out unless asked; one generation has them.
    let page = t.all_generations(job, None).await;
    assert!(page.iter().all(|g| g["soft_labels"].is_null()));
    let (st, with) = t.get(&format!("/v1/jobs/{job}/generations?soft_labels=true")).await;
    assert_eq!(st, StatusCode::OK);
    let with = with["items"].as_array().unwrap().clone();
    let model = Llama::load(&smollm2_gguf(), Precision::Quantized).unwrap();
    let (mut worst, mut positions) = (0f64, 0);
    for g in &page {
        let (st, one) = t.get(&format!("/v1/generations/{}", g["id"])).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(with.iter().find(|w| w["id"] == g["id"]).unwrap()["soft_labels"], one["soft_labels"]);
        let (w, n) = check(&model, &one, true);
        worst = worst.max(w);
        positions += n;
        // Token texts for the web UI's colouring: every id of the answer and its alternatives,
        // spelling the answer (these fixtures are ASCII, so no token splits a character).
        let (st, texts) = t.get(&format!("/v1/generations/{}?token_texts=true", g["id"])).await;
        assert_eq!(st, StatusCode::OK, "{texts}");
        let map = texts["token_texts"].as_object().expect("a local teacher decodes its tokens");
        let text_of = |id: &u32| map[&id.to_string()].as_str().unwrap().to_string();
        let ids = u32s(&one["completion_token_ids"]);
        let spelled: String = ids.iter().map(text_of).collect();
        assert!(spelled.starts_with(one["text"].as_str().unwrap()), "{spelled:?} vs {}", one["text"]);
        for alt in one["soft_labels"]["target_token_ids"].as_array().unwrap() {
            u32s(alt).iter().for_each(|id| assert!(map.contains_key(&id.to_string()), "{id}"));
        }
        assert!(one.get("token_texts").is_none(), "only when asked");
    }
    eprintln!("soft labels vs a teacher-forced log-softmax: worst |Δ| {worst:.2e} over {positions} positions");

    // Storage: one blob per completion, ≤ 4.5 bytes per (id, log-probability) pair.
    let dir = t.shutdown().await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}?mode=ro", dir.path().join("gen.sqlite").display())).await.unwrap();
    let blobs: Vec<(Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT soft_labels, completion_token_ids FROM completions").fetch_all(&pool).await.unwrap();
    assert_eq!(blobs.len(), 4);
    let (bytes, pairs): (usize, usize) = blobs.iter().map(|(b, ids)| (b.len(), ids.len() / 4 * K)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let per_pair = bytes as f64 / pairs as f64;
    eprintln!("soft-label storage: {bytes} bytes for {pairs} pairs = {per_pair:.3} bytes per pair");
    assert!(per_pair <= 4.5, "{per_pair}");
    for (b, ids) in &blobs {
        let p = server::soft_labels::decode(b).unwrap();
        assert_eq!(p.len(), ids.len() / 4);
    }
    pool.close().await;

    // Exports, from a restarted server on the same database.
    let settings = {
        let mut s = distill_tests::harness::test_settings(dir.path());
        s.teachers.push(local("smol"));
        s
    };
    let t = TestApp::start_in(dir, settings).await;
    let (st, body) = t.get_bytes(&format!("/v1/jobs/{job}/export?format=jsonl")).await;
    assert_eq!(st, StatusCode::OK);
    let lines: Vec<Value> = body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    for l in &lines {
        let g = with.iter().find(|w| w["id"] == l["generation_id"]).unwrap();
        assert_eq!(l["completion_token_ids"], g["completion_token_ids"]);
        assert_eq!(l["prompt_token_ids"], g["prompt_token_ids"]);
        assert_eq!(l["target_token_ids"], g["soft_labels"]["target_token_ids"]);
        assert_eq!(l["target_logprobs"], g["soft_labels"]["target_logprobs"]);
        assert_eq!(l["token_logprobs"], g["soft_labels"]["token_logprobs"]);
    }
    let (st, body) = t.get_bytes(&format!("/v1/jobs/{job}/export?format=parquet")).await;
    assert_eq!(st, StatusCode::OK);
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(body).unwrap().build().unwrap();
    let mut rows = 0;
    for batch in reader {
        let batch = batch.unwrap();
        let lists = |name: &str| {
            batch.column_by_name(name).unwrap().as_any().downcast_ref::<arrow::array::ListArray>().unwrap().clone()
        };
        let (gid, ids, lps) = (batch.column_by_name("generation_id").unwrap(), lists("target_token_ids"), lists("target_logprobs"));
        let gid = gid.as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
        for r in 0..batch.num_rows() {
            let l = lines.iter().find(|l| l["generation_id"] == gid.value(r)).unwrap();
            let per_pos = ids.value(r);
            let per_pos = per_pos.as_any().downcast_ref::<arrow::array::ListArray>().unwrap();
            let lp_pos = lps.value(r);
            let lp_pos = lp_pos.as_any().downcast_ref::<arrow::array::ListArray>().unwrap();
            assert_eq!(per_pos.len(), l["target_token_ids"].as_array().unwrap().len());
            for p in 0..per_pos.len() {
                let a = per_pos.value(p);
                let a = a.as_any().downcast_ref::<arrow::array::UInt32Array>().unwrap();
                assert_eq!(a.values().to_vec(), u32s(&l["target_token_ids"][p]));
                let b = lp_pos.value(p);
                let b = b.as_any().downcast_ref::<arrow::array::Float32Array>().unwrap();
                assert_eq!(b.values().to_vec(), f32s(&l["target_logprobs"][p]));
            }
            rows += 1;
        }
    }
    assert_eq!(rows, 4);

    // Re-scoring: the same answers given back as conversations are teacher-forced, not decoded,
    // and give the same ids (a given answer is a whole turn: it ends with the end-of-turn
    // token) and, to rounding, the same soft labels.
    let convs: Vec<Value> = with
        .iter()
        .map(|g| {
            json!({"messages": [
                {"role": "user", "content": g["prompt"]},
                {"role": "assistant", "content": g["text"]},
            ]})
        })
        .collect();
    let (st, v) = t.post_json("/v1/prompt-sets", json!({"name": "answers", "prompts": convs})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let answers = v["id"].as_i64().unwrap();
    let rescore = t.job(json!({"prompt_set": answers, "teacher": "smol", "mode": "rescore", "logprobs": K})).await;
    let v = t.wait_done(rescore, Duration::from_secs(600)).await;
    assert_eq!(v["counts"]["done"], convs.len() as u64, "{v}");
    let (st, scored) = t.get(&format!("/v1/jobs/{rescore}/generations?soft_labels=true")).await;
    assert_eq!(st, StatusCode::OK);
    let eos = 2;
    for s in scored["items"].as_array().unwrap() {
        let g = with.iter().find(|g| g["text"] == s["text"]).unwrap();
        assert_eq!(s["prompt_token_ids"], g["prompt_token_ids"]);
        let (got, mut want) = (u32s(&s["completion_token_ids"]), u32s(&g["completion_token_ids"]));
        if g["finish_reason"] == "length" {
            want.push(eos);
        }
        assert_eq!(got, want, "the re-tokenized answer differs from the generated ids");
        assert_eq!(s["finish_reason"], "stop");
        let n = g["completion_token_ids"].as_array().unwrap().len();
        let head = |v: &Value| v.as_array().unwrap()[..n].to_vec();
        assert_eq!(head(&s["soft_labels"]["target_token_ids"]), head(&g["soft_labels"]["target_token_ids"]));
        for (a, b) in f32s(&s["soft_labels"]["token_logprobs"]).iter().zip(f32s(&g["soft_labels"]["token_logprobs"])) {
            assert!((a - b).abs() <= 1e-3 + b.abs() * 2f32.powi(-10), "{a} vs {b}");
        }
        check(&model, s, false);
    }

    // Refused up front, naming the field.
    for (body, field) in [
        (json!({"prompt_set": set, "teacher": "smol", "logprobs": 101}), "logprobs"),
        (json!({"prompt_set": set, "teacher": "smol", "logprobs": "20"}), "logprobs"),
        (json!({"prompt_set": set, "teacher": "smol", "mode": "rescore", "logprobs": 5}), "mode"),
        (json!({"prompt_set": answers, "teacher": "smol", "logprobs": 5}), "mode"),
        (json!({"prompt_set": answers, "teacher": "smol", "mode": "rescore"}), "logprobs"),
    ] {
        let (st, v) = t.post_json("/v1/jobs", body.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body} → {v}");
        assert!(v["error"]["field"].as_str().unwrap_or_default().starts_with(field), "{body} → {v}");
    }
    t.shutdown().await;
}

/// A database written at schema version 2 (before soft labels) opens, migrates to version 3
/// and keeps every row; its completions simply have no soft labels.
#[tokio::test]
async fn a_version_2_database_upgrades_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gen.sqlite");
    {
        let pool = distill_tests::harness::database_at_version(&path, 2).await;
        sqlx::query(
            "INSERT INTO completions (cache_key, teacher_identity, endpoint, request, text, latency_ms, http_attempts, created_at)
             VALUES ('k', 't', 'chat', '[]', 'an answer', 5, 1, 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        let v: String = sqlx::query_scalar("SELECT value FROM meta").fetch_one(&pool).await.unwrap();
        assert_eq!(v, "2");
        pool.close().await;
    }
    let db = server::db::Db::open(&path).await.unwrap();
    let v: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'schema_version'").fetch_one(&db.reader).await.unwrap();
    assert_eq!(v, server::db::SCHEMA_VERSION.to_string());
    let (text, soft): (String, Option<Vec<u8>>) =
        sqlx::query_as("SELECT text, soft_labels FROM completions").fetch_one(&db.reader).await.unwrap();
    assert_eq!((text.as_str(), soft), ("an answer", None));
}

/// An OpenAI-compatible teacher that returns ids (vLLM's `return_tokens_as_token_ids`; here
/// the mock, which behaves like vLLM): the ids and values are stored as the server gave them,
/// in natural log; a k above the server's cap is refused at submission with its reason; a
/// base-10 server is detected by the probe and refused until `--logprob-base NAME=10`, then
/// normalised.
#[tokio::test]
async fn openai_teacher_soft_labels_ids_cap_and_base() {
    use distill_tests::mock_openai::{mock_natural_logprobs, mock_token_id, MockOpenAi};
    let mock = MockOpenAi::start().await;
    mock.record_bodies(true);
    let t = TestApp::start_with(|s| {
        distill_tests::harness::with_mock(s, &mock);
        let mut ten = Settings::teacher_defaults("mock10", TeacherSpec::parse(&mock.spec()).unwrap());
        ten.logprob_base = server::config::LogprobBase::Ten;
        s.teachers.push(ten);
    })
    .await;
    let prompts: Vec<String> = ["one two", "three"].iter().map(|s| s.to_string()).collect();
    let set = t.prompt_set("p", &prompts).await;
    let k = 5;
    for endpoint in ["chat", "completions"] {
        let job = t.job(json!({"prompt_set": set, "teacher": "mock", "logprobs": k, "endpoint": endpoint})).await;
        t.wait_done(job, Duration::from_secs(30)).await;
        let (_, page) = t.get(&format!("/v1/jobs/{job}/generations?soft_labels=true")).await;
        for g in page["items"].as_array().unwrap() {
            let words: Vec<&str> = g["text"].as_str().unwrap().split_whitespace().collect();
            let ids: Vec<u32> = words.iter().map(|w| mock_token_id(w)).collect();
            assert_eq!(u32s(&g["completion_token_ids"]), ids, "{g}");
            let want: Vec<f32> = mock_natural_logprobs(k).iter().map(|v| half::f16::from_f64(*v).to_f32()).collect();
            for (i, lps) in g["soft_labels"]["target_logprobs"].as_array().unwrap().iter().enumerate() {
                assert_eq!(f32s(lps), want, "position {i}: {g}");
                assert_eq!(u32s(&g["soft_labels"]["target_token_ids"][i])[0], ids[i]);
            }
        }
    }
    let asked: Vec<Value> = mock.received().into_iter().map(|(_, b)| b).collect();
    assert!(asked.iter().any(|b| b["return_tokens_as_token_ids"] == true && b["top_logprobs"] == k));
    assert!(asked.iter().all(|b| b["temperature"] == 0.0));

    // Above the server's cap: refused with the server's reason, nothing queued.
    let (st, v) = t.post_json("/v1/jobs", json!({"prompt_set": set, "teacher": "mock", "logprobs": 25})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["field"], "logprobs");
    assert!(v["error"]["message"].as_str().unwrap().contains("top_logprobs must be <= 20"), "{v}");

    // A base-10 server read as natural logs: refused, naming the flag; then normalised.
    mock.state.base10.store(true, std::sync::atomic::Ordering::Relaxed);
    let (st, v) = t.post_json("/v1/jobs", json!({"prompt_set": set, "teacher": "mock", "logprobs": k})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--logprob-base mock=10"), "{v}");
    let job = t.job(json!({"prompt_set": set, "teacher": "mock10", "logprobs": k})).await;
    t.wait_done(job, Duration::from_secs(30)).await;
    let (_, page) = t.get(&format!("/v1/jobs/{job}/generations?soft_labels=true")).await;
    let g = &page["items"][0];
    let got = f32s(&g["soft_labels"]["target_logprobs"][0]);
    for (a, b) in got.iter().zip(mock_natural_logprobs(k)) {
        assert!((*a as f64 - b).abs() <= 2e-3 * b.abs(), "{got:?}");
    }
    t.shutdown().await;
}
