//! Running the server for tests: in-process on port 0 with a fresh database, or the built
//! binary as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use server::config::{Settings, TeacherSpec};

use crate::mock_openai::MockOpenAi;

/// The server running in this process against a temporary database.
pub struct TestApp {
    pub app: server::App,
    pub url: String,
    pub client: reqwest::Client,
    pub db_path: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Settings for a test: a fresh DB in `dir`, loopback port 0, short leases.
pub fn test_settings(dir: &Path) -> Settings {
    let mut s = Settings::for_db(dir.join("gen.sqlite"));
    s.lease = Duration::from_secs(10);
    s.drain_timeout = Duration::from_secs(10);
    s
}

/// Adds the mock as teacher `mock` with a short request timeout.
pub fn with_mock(s: &mut Settings, mock: &MockOpenAi) {
    let mut t = Settings::teacher_defaults("mock", TeacherSpec::parse(&mock.spec()).unwrap());
    t.request_timeout = Duration::from_secs(2);
    t.max_in_flight = 8;
    s.teachers.push(t);
}

impl TestApp {
    pub async fn start(mock: &MockOpenAi) -> Self {
        Self::start_with(|s| with_mock(s, mock)).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = test_settings(dir.path());
        configure(&mut settings);
        Self::start_in(dir, settings).await
    }

    pub async fn start_in(dir: tempfile::TempDir, settings: Settings) -> Self {
        let db_path = settings.db.clone();
        let app = server::App::start(settings).await.expect("server starts");
        let url = app.url();
        TestApp { app, url, client: reqwest::Client::new(), db_path, dir }
    }

    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<(&str, Vec<u8>)>) -> (StatusCode, Value) {
        let mut rb = self.client.request(method, format!("{}{path}", self.url));
        if let Some((ct, bytes)) = body {
            rb = rb.header("content-type", ct).body(bytes);
        }
        let resp = rb.send().await.expect("request sent");
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value)
    }

    pub async fn post_json(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, Some(("application/json", serde_json::to_vec(&body).unwrap()))).await
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: impl Into<Vec<u8>>) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, Some((content_type, body.into()))).await
    }

    pub async fn post(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, None).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    pub async fn get_bytes(&self, path: &str) -> (StatusCode, bytes::Bytes) {
        let resp = self.client.get(format!("{}{path}", self.url)).send().await.unwrap();
        (resp.status(), resp.bytes().await.unwrap())
    }

    /// Creates a prompt set of text prompts; returns its id.
    pub async fn prompt_set(&self, name: &str, prompts: &[String]) -> i64 {
        let items: Vec<Value> = prompts.iter().map(|p| serde_json::json!({ "prompt": p })).collect();
        let (st, v) = self.post_json("/v1/prompt-sets", serde_json::json!({"name": name, "prompts": items})).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["id"].as_i64().unwrap()
    }

    /// Starts a job; returns its id.
    pub async fn job(&self, body: Value) -> i64 {
        let (st, v) = self.post_json("/v1/jobs", body).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["id"].as_i64().unwrap()
    }

    /// Polls a job until `pred` holds.
    pub async fn wait_job(&self, id: i64, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let (st, v) = self.get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            if pred(&v) {
                return v;
            }
            assert!(start.elapsed() < timeout, "job {id} did not get there in {timeout:?}: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_done(&self, id: i64, timeout: Duration) -> Value {
        self.wait_job(id, timeout, |v| v["status"] == "done").await
    }

    /// Every generation of a job, following keyset pagination.
    pub async fn all_generations(&self, job: i64, status: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let q = match status {
                Some(s) => format!("/v1/jobs/{job}/generations?after={after}&limit=1000&status={s}"),
                None => format!("/v1/jobs/{job}/generations?after={after}&limit=1000"),
            };
            let (st, v) = self.get(&q).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            out.extend(v["items"].as_array().unwrap().iter().cloned());
            match v["next_after"].as_i64() {
                Some(n) => after = n,
                None => return out,
            }
        }
    }

    pub async fn shutdown(self) -> tempfile::TempDir {
        self.app.shutdown().await;
        self.dir
    }
}

/// A new database at `path` migrated only up to schema `version`, as an older server left it
/// (for upgrade tests); the caller fills it and closes the pool.
pub async fn database_at_version(path: &Path, version: i64) -> sqlx::SqlitePool {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path).create_if_missing(true))
        .await
        .unwrap();
    let m = &server::db::MIGRATOR;
    let old = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(m.migrations.iter().filter(|m| m.version <= version).cloned().collect()),
        ignore_missing: m.ignore_missing,
        locking: m.locking,
        no_tx: m.no_tx,
    };
    old.run(&pool).await.unwrap();
    pool
}

/// Row counts of every table: a fingerprint to prove a rejected request changed nothing.
pub async fn table_counts(db: &Path) -> Vec<(String, i64)> {
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(db).read_only(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let mut out = Vec::new();
    for t in ["prompt_sets", "prompts", "jobs", "generations", "completions"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}")).fetch_one(&pool).await.unwrap();
        out.push((t.to_string(), n));
    }
    pool.close().await;
    out
}

/// Path of the built `server` binary, next to the running test executable.
pub fn server_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps/<test>");
    let bin = dir.join("server");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (it builds the server binary) \
         or `cargo build -p server` first",
        bin.display()
    );
    bin
}

/// The server binary running as a child process.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts `server` with `args` on a free loopback port and waits for `/health`.
    pub async fn start(args: &[String], log: PathBuf) -> Self {
        let port = free_port();
        let mut cmd = Command::new(server_bin());
        cmd.args(args).arg("--bind").arg(format!("127.0.0.1:{port}"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        cmd.stdout(Stdio::null()).stderr(out);
        let child = cmd.spawn().expect("server binary starts");
        let url = format!("http://127.0.0.1:{port}");
        let p = ServerProcess { child, url, log };
        p.wait_healthy(Duration::from_secs(30)).await;
        p
    }

    async fn wait_healthy(&self, timeout: Duration) {
        let start = Instant::now();
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.url)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "server did not become healthy; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(start.elapsed() < timeout, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF that `scripts/fetch-model.sh` puts in `models/`.
pub fn smollm2_gguf() -> PathBuf {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} missing: run scripts/fetch-model.sh (scripts/test.sh does)", p.display());
    p
}

/// llama.cpp's greedy answers on the SmolLM2 GGUF (tests/fixtures/smollm2/greedy.jsonl, made by
/// scripts/make-reference-fixtures.py), one JSON object per prompt.
pub fn smollm2_greedy_fixtures() -> Vec<serde_json::Value> {
    std::fs::read_to_string(repo_root().join("tests/fixtures/smollm2/greedy.jsonl"))
        .expect("tests/fixtures/smollm2/greedy.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("fixture line is JSON"))
        .collect()
}

/// The python of the llama.cpp venv that `scripts/setup-llama-server.sh` makes
/// (`LLAMA_SERVER_PYTHON` overrides it); it may not exist yet.
pub fn llama_python() -> PathBuf {
    venv_python("LLAMA_SERVER_PYTHON", "llama-venv")
}

/// `$override_var` if set, else the python of the venv `name` that the repo's setup scripts
/// make under `${XDG_CACHE_HOME:-~/.cache}/distill/`; it may not exist yet.
pub fn venv_python(override_var: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(override_var) {
        return PathBuf::from(p);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache"));
    cache.join("distill").join(name).join("bin/python")
}

/// A GGUF with SmolLM2's tokenizer metadata, the given architecture and no tensors (for
/// load-failure tests).
pub fn header_only_gguf(path: &Path, arch: &str) {
    use candle_core::quantized::gguf_file::{Content, Value};
    let mut f = std::fs::File::open(smollm2_gguf()).unwrap();
    let content = Content::read(&mut f).unwrap();
    let arch_value = Value::String(arch.to_string());
    let mut md: Vec<(&str, &Value)> = vec![("general.architecture", &arch_value)];
    md.extend(content.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.as_str(), v)));
    let mut out = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut out, &md, &[]).unwrap();
}
