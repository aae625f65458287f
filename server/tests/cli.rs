//! The `server` binary's command line. (Its presence also makes `cargo test` build the binary
//! that the end-to-end tests in `tests/` drive.)

use std::process::Command;

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_server"))
}

#[test]
fn help_lists_every_flag() {
    let out = server().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in ["--db", "--bind", "--teacher", "--config", "--api-token", "--max-in-flight", "--requests-per-minute",
        "--tokens-per-minute", "--request-timeout-secs", "--max-retries", "--max-attempts", "--lease-secs",
        "--body-limit-mib", "--drain-timeout-secs", "--chat-template", "local:PATH", "TEACHER_<NAME>_API_KEY"] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn refuses_a_public_bind_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = server()
        .args(["--bind", "0.0.0.0:0", "--db"])
        .arg(dir.path().join("g.sqlite"))
        .env_remove("DISTILL_API_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-token"), "{err}");
    assert!(!dir.path().join("g.sqlite").exists(), "nothing is created when start-up is refused");
}

#[test]
fn bad_teacher_spec_and_config_file_are_explained() {
    let out = server().args(["--teacher", "gpt=openai:http://x/v1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("#MODEL"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "bnd = \"127.0.0.1:1\"\n").unwrap();
    let out = server().arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("c.toml") && err.contains("bnd"), "{err}");
}

#[test]
fn a_second_server_on_the_same_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.sqlite");
    let mut first = server().arg("--db").arg(&db).args(["--bind", "127.0.0.1:0"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !dir.path().join("g.sqlite-wal").exists() && start.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = server().arg("--db").arg(&db).args(["--bind", "127.0.0.1:0"]).output().unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another server"));
}
