//! Start-up, the accept loop, TLS, the revocation watcher and shutdown.
//!
//! `start` is the testable entry point: the binary passes the data dir and
//! waits for a signal; tests pass a temp dir and `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::admission::Admission;
use crate::auth::keys::{KeyError, ServerKey};
use crate::auth::pairing::{LISTEN_URL_KEY, create_offer};
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_TOML};
use crate::connection::{self, BoxIo};
use crate::protocol::close;
use crate::rpc::Registry;
use crate::state::{AppState, DataDir};
use crate::storage::{Db, StorageError, devices};

/// How often failed handshakes are written to the audit log, in aggregate.
const FAILURE_REPORT_EVERY: Duration = Duration::from_secs(60);
/// How often sessions of devices revoked by the CLI are looked for (SPEC: within 5 s).
const REVOCATION_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "refusing to listen on {addr} without TLS: set server.tls_cert and server.tls_key, or server.allow_insecure = true"
    )]
    Insecure { addr: String },
    #[error("cannot resolve listen address {addr:?}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Socket(#[from] crate::secrets::socket::SocketError),
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    /// Overrides `server.listen`.
    pub listen: Option<String>,
    /// Print a pairing code on stdout when no device is paired (the CLI does).
    pub print_pairing_code: bool,
}

/// A running server.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub url: String,
    pub state: Arc<AppState>,
    /// Every registered action name, sorted.
    pub actions: Vec<&'static str>,
    /// The gated ones (they wait for a biometric approval), sorted.
    pub gated: Vec<&'static str>,
    accept: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stops accepting, lets sessions answer what is in flight, closes them,
    /// waits for every task, flushes the audit log and closes the database.
    pub async fn shutdown(self) {
        self.state.shutdown.cancel();
        let _ = self.accept.await;
        self.state.tasks.close();
        if tokio::time::timeout(Duration::from_secs(15), self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not finish within 15 s of shutdown");
        }
        self.state.audit.close_async().await;
        tracing::info!("server stopped");
    }
}

/// Creates the data dir layout (SPEC §3) and the commented default config.
/// The directory is private (0700) and everything this process creates from
/// here on is 0600 (see `private_fs`).
pub fn prepare_data_dir(dir: &DataDir) -> Result<(), StartError> {
    crate::private_fs::set_private_umask();
    let mk = |p: PathBuf| {
        crate::private_fs::create_private_dir(&p).map_err(|source| StartError::DataDir {
            path: p.display().to_string(),
            source,
        })
    };
    mk(dir.root.clone())?;
    mk(dir.plugins())?;
    mk(dir.skills())?;
    crate::config_file::remove_stale_temp_files(&dir.root);
    let cfg = dir.config();
    if !cfg.exists() {
        std::fs::write(&cfg, DEFAULT_CONFIG_TOML).map_err(|source| StartError::DataDir {
            path: cfg.display().to_string(),
            source,
        })?;
    }
    // An older data dir, or one loosened by hand: tighten what we know of.
    let audit_dir = Config::load(&cfg)
        .map(|c| dir.resolve(&c.audit.dir))
        .unwrap_or_else(|_| dir.root.join("audit"));
    crate::private_fs::tighten_known_files(&dir.root, &audit_dir);
    Ok(())
}

pub async fn start(opts: Options) -> Result<ServerHandle, StartError> {
    let dir = DataDir::new(opts.data_dir.clone());
    prepare_data_dir(&dir)?;
    let mut config = Config::load(&dir.config())?;
    if let Some(l) = &opts.listen {
        config.server.listen = l.clone();
    }
    let tls = crate::tls::acceptor(&dir, &config)?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&config.server.listen)
        .await
        .map_err(|source| StartError::Resolve {
            addr: config.server.listen.clone(),
            source,
        })?
        .collect();
    if tls.is_none() && !config.server.allow_insecure && addrs.iter().any(|a| !a.ip().is_loopback())
    {
        return Err(StartError::Insecure {
            addr: config.server.listen.clone(),
        });
    }
    // The local secrets socket (SPEC §10): a path too long for a socket
    // address, or another server on this data dir, stops the start here,
    // before anything of the running server is touched.
    let socket_path = dir.root.join("agent.sock");
    let socket = crate::secrets::socket::bind(&socket_path)?;
    let db = Db::open(&dir.db())?;
    let key = ServerKey::load_or_create(&dir.server_key())?;
    let listener = TcpListener::bind(&addrs[..])
        .await
        .map_err(|source| StartError::Bind {
            addr: config.server.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.server.listen.clone(),
        source,
    })?;
    let url = format!("{}://{addr}/ws", if tls.is_some() { "wss" } else { "ws" });
    db.set_meta(LISTEN_URL_KEY, url.clone()).await?;

    let web_origin = config.server.web_origin.clone().unwrap_or_else(|| {
        if addr.ip().is_loopback() {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("{scheme}://localhost:{}", addr.port())
        } else {
            String::new()
        }
    });
    let state = Arc::new(AppState::new(dir, config, db, key, web_origin));
    state.approvals.expire_stale_on_start().await;
    tracing::info!(%url, server_key = state.key.public_b64(), "listening");

    if opts.print_pairing_code {
        use std::io::Write;
        let paired = state.db.call(|c| devices::count_active_devices(c)).await?;
        if paired == 0 {
            let offer = create_offer(
                &state.db,
                state.clock.now_ms(),
                300,
                &state.key,
                url.clone(),
            )?;
            let mut text = format!(
                "No device is paired yet. Pairing code: {} (valid 5 minutes)\n  server key: {}\n  url: {}\n",
                offer.code, offer.server_key, offer.url
            );
            if !state.web_origin.is_empty() {
                let web = crate::web::pairing_url(&state.web_origin, &offer.code);
                text.push_str(&format!("  web: {web}\n"));
            }
            // Never println!: a closed stdout must not stop the server.
            let _ = std::io::stdout().write_all(text.as_bytes());
        } else {
            let _ = writeln!(std::io::stdout(), "listening on {url}");
        }
        let _ = std::io::stdout().flush();
    }

    let registry = crate::handlers::registry(state.clone());
    let actions = registry.action_names();
    let gated = registry.gated_names();
    state.tasks.spawn(watch_revocations(state.clone()));
    state.tasks.spawn(report_failures(state.clone()));
    {
        let (last_seen, db, stop) = (
            state.last_seen.clone(),
            state.db.clone(),
            state.shutdown.clone(),
        );
        state
            .tasks
            .spawn(async move { last_seen.run(db, stop).await });
    }
    state
        .tasks
        .spawn(state.memory.clone().watch(state.shutdown.clone()));
    state.scheduler.start(state.approvals.host());
    state.tasks.spawn(crate::secrets::socket::serve(
        socket,
        socket_path,
        state.secrets.clone(),
        state.approvals.host(),
        state.shutdown.clone(),
        state.tasks.clone(),
    ));
    let accept = tokio::spawn(accept_loop(listener, state.clone(), registry, tls));
    Ok(ServerHandle {
        addr,
        url,
        state,
        actions,
        gated,
        accept,
    })
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<AppState>,
    registry: Registry,
    tls: Option<TlsAcceptor>,
) {
    // Connections served at once, sized from the open-file limit (raised to
    // its hard maximum); further ones wait in the kernel's backlog. Half of
    // them may be unauthenticated, a few per peer (see `admission`).
    let capacity = crate::admission::connection_capacity();
    let permits = Arc::new(Semaphore::new(capacity));
    let admission = Admission::new(crate::admission::PER_PEER, (capacity / 2).max(16));
    tracing::info!(
        connections = capacity,
        unauthenticated = admission.total(),
        "connection limits"
    );
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = state.shutdown.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // e.g. EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = state.shutdown.cancelled() => break,
        };
        // A peer holding its share of unauthenticated connections gets no
        // more: closed at once (not counted as a failure).
        let Some(ticket) = admission.admit(peer.ip()) else {
            tracing::debug!(%peer, "too many unauthenticated connections from this peer");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (state2, registry2, tls2) = (state.clone(), registry.clone(), tls.clone());
        state.tasks.spawn(async move {
            let io: BoxIo = match tls2 {
                None => Box::new(tcp),
                Some(acc) => {
                    let timeout = Duration::from_secs(state2.config().server.auth_timeout_secs);
                    let accepted = tokio::select! {
                        r = tokio::time::timeout(timeout, acc.accept(tcp)) => r,
                        _ = ticket.evicted.cancelled() => return,
                    };
                    match accepted {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(_)) => return,
                        Err(_) => {
                            state2.limiter.record_failure(peer.ip(), false, "timeout");
                            return;
                        }
                    }
                }
            };
            // Every log line of this connection carries its peer and, once
            // authenticated, its device (recorded by `connection::serve`).
            let span = tracing::info_span!("conn", %peer, device = tracing::field::Empty);
            tracing::Instrument::instrument(
                connection::serve(state2, registry2, io, peer, ticket),
                span,
            )
            .await;
            drop(permit);
        });
    }
}

/// Writes failed handshakes to the audit log once a minute, in aggregate
/// (one record per peer), and a last time at shutdown.
async fn report_failures(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(FAILURE_REPORT_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => crate::auth::handshake::report_failures(&state).await,
            _ = state.shutdown.cancelled() => break,
        }
    }
    crate::auth::handshake::report_failures(&state).await;
}

/// Closes sessions of devices revoked by another process (the CLI), and
/// expires the approvals they originated.
async fn watch_revocations(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(REVOCATION_POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let mut ids = state.sessions.device_ids();
        ids.extend(state.approvals.origin_devices());
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            continue;
        }
        match state
            .db
            .call(move |c| devices::revoked_among(c, &ids))
            .await
        {
            Ok(revoked) => {
                for id in revoked {
                    state.approvals.expire_originated_by(&id);
                    let n = state.sessions.close_device(&id, close::REVOKED);
                    tracing::info!(device = %id, sessions = n, "closed sessions of a revoked device");
                }
            }
            Err(e) => tracing::error!(error = %e, "revocation check failed"),
        }
    }
}

/// The server's state on `dir` without a listener: for the fuzz targets and
/// tools that drive the registry directly. Must run inside a tokio runtime.
pub fn test_state(dir: &std::path::Path) -> Arc<AppState> {
    let dir = DataDir::new(dir);
    prepare_data_dir(&dir).expect("data dir");
    let config = Config::load(&dir.config()).expect("config");
    let db = Db::open(&dir.db()).expect("database");
    let key = ServerKey::load_or_create(&dir.server_key()).expect("server key");
    Arc::new(AppState::new(dir, config, db, key, String::new()))
}
