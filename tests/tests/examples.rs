//! The files a new user touches first: docker-compose.yml agrees with the server's flags,
//! the committed openapi.json is current, and the example prompt sets and templates work.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use distill_tests::harness::TestApp;
use distill_tests::mock_openai::MockOpenAi;
use serde_json::json;
use serde_yaml::Value as Yaml;
use server::config::{Cli, Settings, TeacherSpec};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .expect("a list")
        .iter()
        .map(|x| match x {
            Yaml::String(s) => s.clone(),
            Yaml::Number(n) => n.to_string(),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

fn flag(args: &[String], name: &str) -> String {
    let i = args.iter().position(|a| a == name).unwrap_or_else(|| panic!("{name} missing in {args:?}"));
    args[i + 1].clone()
}

/// The container side of a `host:container` or `ip:host:container` mapping.
fn container_port(mapping: &str) -> u16 {
    mapping.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn docker_compose_services_ports_and_flags_agree() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let doc: Yaml = serde_yaml::from_str(&text).unwrap();
    let services = &doc["services"];
    let teacher = &services["teacher"];
    let server = &services["server"];
    assert!(teacher["image"].as_str().unwrap().starts_with("vllm/vllm-openai"));

    let t_args = strings(&teacher["command"]);
    assert_eq!(flag(&t_args, "--max-logprobs"), "20");
    let t_port: u16 = flag(&t_args, "--port").parse().unwrap();
    let t_ports = strings(&teacher["ports"]);
    assert!(t_ports.iter().any(|m| container_port(m) == t_port), "{t_ports:?} does not publish {t_port}");
    let served = flag(&t_args, "--served-model-name");

    // The server's command must parse with the real CLI and point at the teacher service.
    let s_args = strings(&server["command"]);
    let cli = Cli::try_parse_from(std::iter::once("server".to_string()).chain(s_args.clone()))
        .unwrap_or_else(|e| panic!("compose server command does not parse: {e}"));
    assert!(server["environment"]["DISTILL_API_TOKEN"].is_string(), "a public bind needs the token");
    let mut cli = cli;
    cli.api_token = Some("from-compose-env".into());
    let settings = Settings::from_cli(cli).unwrap();
    assert_eq!(settings.teachers.len(), 1);
    let TeacherSpec::OpenAi { base_url, model } = &settings.teachers[0].spec else { panic!("not openai") };
    let url = reqwest::Url::parse(base_url).unwrap();
    assert_eq!(url.host_str(), Some("teacher"), "the server must reach the teacher by its service name");
    assert_eq!(url.port(), Some(t_port));
    assert_eq!(model, &served, "the model after # must be vLLM's --served-model-name");
    let s_ports = strings(&server["ports"]);
    assert!(s_ports.iter().any(|m| container_port(m) == settings.bind.port()), "{s_ports:?} vs {}", settings.bind);
    assert_eq!(server["depends_on"]["teacher"]["condition"].as_str(), Some("service_healthy"));
    assert!(repo().join("Dockerfile").exists());
}

#[test]
fn committed_openapi_json_is_current() {
    let path = repo().join("openapi.json");
    let fresh = server::http::openapi::spec_json();
    if std::env::var("UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed.trim_end() == fresh.trim_end(),
        "openapi.json is stale: regenerate it with `cargo run -p server -- --print-openapi > openapi.json` \
         (or UPDATE_OPENAPI=1 cargo test -p distill-tests --test examples)"
    );
}

/// The committed 320-prompt set is what its generator writes.
#[test]
fn short_instructions_are_what_their_generator_writes() {
    let out = std::process::Command::new("python3")
        .arg(repo().join("prompts/make_short_instructions.py"))
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let committed = std::fs::read(repo().join("prompts/short-instructions.jsonl")).unwrap();
    assert!(out.stdout == committed, "prompts/short-instructions.jsonl is stale: regenerate it with the script");
}

#[tokio::test]
async fn example_prompt_sets_and_templates_work() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let mut ids = Vec::new();
    for file in ["math-word-problems.jsonl", "general-knowledge.jsonl", "short-instructions.jsonl"] {
        let body = std::fs::read(repo().join("prompts").join(file)).unwrap();
        let lines = body.iter().filter(|b| **b == b'\n').count() as i64;
        let (st, v) = t.post_raw(&format!("/v1/prompt-sets?name={file}"), "application/x-ndjson", body).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["count"], lines);
        assert!(lines >= 30);
        ids.push(v["id"].as_i64().unwrap());
    }
    let templates = std::fs::read_dir(repo().join("prompts/templates")).unwrap();
    for entry in templates {
        let template = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let job = t.job(json!({"prompt_set": ids[0], "teacher": "mock", "template": template, "max_new_tokens": 16})).await;
        let v = t.wait_done(job, Duration::from_secs(30)).await;
        assert_eq!(v["counts"]["done"], 32, "{v}");
    }
    t.shutdown().await;
}
