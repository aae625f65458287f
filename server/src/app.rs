//! Building and running the server: open the database, recover leases, start the workers and
//! the HTTP listener, and shut down gracefully (drain in-flight requests on SIGTERM).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::Db;
use crate::http::{self, AppState};
use crate::teacher::{self, Teacher};
use crate::worker::Workers;

/// A running server.
pub struct App {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    pub state: AppState,
    workers: Workers,
    stop_http: CancellationToken,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    drain: std::time::Duration,
}

impl App {
    /// Starts with the teachers named in `settings`.
    pub async fn start(settings: Settings) -> anyhow::Result<App> {
        Self::start_with(settings, Vec::new()).await
    }

    /// Starts with the configured teachers plus `extra` ones built by the caller (tests).
    pub async fn start_with(settings: Settings, extra: Vec<Arc<dyn Teacher>>) -> anyhow::Result<App> {
        tracing::info!(?settings, "starting");
        let db = Db::open(&settings.db).await?;
        let recovered = crate::queue::recover_all(&db).await?;
        if recovered > 0 {
            tracing::warn!(items = recovered, "requeued items left running by a previous server");
        }
        let mut teachers: BTreeMap<String, Arc<dyn Teacher>> = BTreeMap::new();
        for t in &settings.teachers {
            teachers.insert(t.name.clone(), teacher::build(t).await?);
        }
        for t in extra {
            teachers.insert(t.name().to_string(), t);
        }
        let workers = Workers::start(
            db.clone(),
            teachers.values().cloned().collect(),
            settings.lease,
            settings.max_attempts,
        );
        let stop_http = CancellationToken::new();
        let state = AppState {
            db,
            teachers: Arc::new(teachers),
            workers: Arc::clone(&workers.shared),
            api_token: settings.api_token.as_deref().map(Arc::from),
            body_limit: settings.body_limit,
            stopping: stop_http.clone(),
        };
        let listener = tokio::net::TcpListener::bind(settings.bind)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind))?;
        let addr = listener.local_addr()?;
        let stop = stop_http.clone();
        let router = http::router(state.clone());
        let http = tokio::spawn(async move {
            axum::serve(listener, router).with_graceful_shutdown(async move { stop.cancelled().await }).await
        });
        tracing::info!(%addr, "listening");
        Ok(App { addr, state, workers, stop_http, http, drain: settings.drain_timeout })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, drains in-flight teacher requests, releases what is left.
    pub async fn shutdown(self) {
        self.stop_http.cancel();
        self.workers.shutdown(self.drain).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.http).await;
        self.state.db.writer.close().await;
        self.state.db.reader.close().await;
    }
}

/// Logs to stderr; `RUST_LOG` overrides the default `info`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Runs until SIGTERM or Ctrl-C, then shuts down gracefully.
pub async fn run_until_signal(settings: Settings) -> anyhow::Result<()> {
    let app = App::start(settings).await?;
    eprintln!("server listening on {}", app.url());
    wait_for_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    app.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
