//! The `secrets-agent` binary: command line, logging, signals (SPEC §2).

mod secret_cli;

use std::path::PathBuf;

/// mimalloc: the request path allocates many small, short-lived buffers;
/// glibc malloc/free were ~20% of server CPU under load (perf, see README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use secrets_agent::auth::keys::ServerKey;
use secrets_agent::auth::pairing::create_offer;
use secrets_agent::clock::{rfc3339_ms, system_now_ms};
use secrets_agent::config::Config;
use secrets_agent::server::prepare_data_dir;
use secrets_agent::state::DataDir;
use secrets_agent::storage::audit::{AuditEntry, ChainWriter, Retention, verify};
use secrets_agent::storage::{Db, devices};

#[derive(Parser)]
#[command(
    name = "secrets-agent",
    version,
    about = "Control plane of a personal AI agent, administered from a paired phone"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct DirArg {
    /// Data directory [default: $SECRETS_AGENT_HOME, else the platform data dir]
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve {
        #[command(flatten)]
        dir: DirArg,
        /// Address to listen on [default: server.listen, 127.0.0.1:7420]
        #[arg(long)]
        listen: Option<String>,
    },
    /// Create a one-time pairing code for a running server on this data dir.
    Pair {
        #[command(flatten)]
        dir: DirArg,
        /// How long the code stays valid, in seconds.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
        ttl_secs: u64,
        /// Print one JSON line: {"code","expires_at","server_key","url","web_url"}.
        #[arg(long)]
        json: bool,
        /// Also print the web companion's pairing link (`web_url`) as a QR code.
        #[arg(long)]
        qr: bool,
    },
    /// List or revoke paired devices.
    Devices {
        #[command(subcommand)]
        cmd: DevicesCmd,
    },
    /// Memories.
    Memory {
        #[command(subcommand)]
        cmd: MemoryCmd,
    },
    /// Check the audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// The local secrets interface: set, get, exec, list, rm.
    Secret {
        #[command(subcommand)]
        cmd: secret_cli::SecretCmd,
    },
}

#[derive(Subcommand)]
enum DevicesCmd {
    List {
        #[command(flatten)]
        dir: DirArg,
    },
    Revoke {
        device_id: String,
        #[command(flatten)]
        dir: DirArg,
    },
}

#[derive(Subcommand)]
enum MemoryCmd {
    /// Import memories from JSON Lines (one object per line: content, and
    /// optionally category, tags, confidence, id, created_at, updated_at).
    Import {
        file: PathBuf,
        #[command(flatten)]
        dir: DirArg,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verify the hash chain; exits non-zero at the first bad record.
    Verify {
        #[command(flatten)]
        dir: DirArg,
    },
}

fn data_dir(d: &DirArg) -> Result<DataDir> {
    if let Some(p) = &d.data_dir {
        return Ok(DataDir::new(p));
    }
    if let Some(p) = std::env::var_os("SECRETS_AGENT_HOME").filter(|v| !v.is_empty()) {
        return Ok(DataDir::new(PathBuf::from(p)));
    }
    let base = dirs::data_dir()
        .context("no platform data directory: pass --data-dir or set SECRETS_AGENT_HOME")?;
    Ok(DataDir::new(base.join("secrets-agent")))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(secrets_agent::logging::filter(
            &std::env::var("SECRETS_AGENT_LOG").unwrap_or_default(),
        ))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve { dir, listen } => serve(data_dir(&dir)?, listen),
        Cmd::Pair {
            dir,
            ttl_secs,
            json,
            qr,
        } => pair(data_dir(&dir)?, ttl_secs, json, qr),
        Cmd::Devices {
            cmd: DevicesCmd::List { dir },
        } => devices_list(data_dir(&dir)?),
        Cmd::Devices {
            cmd: DevicesCmd::Revoke { device_id, dir },
        } => devices_revoke(data_dir(&dir)?, &device_id),
        Cmd::Audit {
            cmd: AuditCmd::Verify { dir },
        } => audit_verify(data_dir(&dir)?),
        Cmd::Memory {
            cmd: MemoryCmd::Import { file, dir },
        } => memory_import(data_dir(&dir)?, &file),
        Cmd::Secret { cmd } => secret_cli::run(cmd),
    }
}

fn serve(dir: DataDir, listen: Option<String>) -> Result<ExitCode> {
    // SQLite calls serialise on one connection, so a large blocking pool only
    // adds idle threads (and their stacks and allocator heaps) under load.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()?;
    let code = rt.block_on(async move {
        let opts = secrets_agent::Options {
            data_dir: dir.root.clone(),
            listen,
            print_pairing_code: true,
        };
        let server = secrets_agent::start(opts).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        server.shutdown().await;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    });
    // Everything the server owns has stopped; a blocking call that still
    // hangs (a webhook to a dead host, say) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}

/// Opens the data dir's database and config for a CLI command.
fn open(dir: &DataDir) -> Result<(Db, Config)> {
    prepare_data_dir(dir)?;
    let config = Config::load(&dir.config())?;
    let db = Db::open(&dir.db())?;
    Ok((db, config))
}

fn cli_audit(dir: &DataDir, db: &Db, config: &Config, action: &str, outcome: &str) -> Result<()> {
    // The same rotation and retention as the server: both append under the
    // audit dir's lock, so either may close or prune a segment.
    let mut w = ChainWriter::new(dir.resolve(&config.audit.dir), db.clone())
        .with_retention(Retention::from(&config.audit));
    w.append(&[AuditEntry {
        ts_ms: system_now_ms(),
        device_id: None,
        action: action.into(),
        params_digest: None,
        outcome: outcome.into(),
        approval_id: None,
        ..Default::default()
    }])?;
    Ok(())
}

fn pair(dir: DataDir, ttl_secs: u64, json: bool, qr: bool) -> Result<ExitCode> {
    let (db, config) = open(&dir)?;
    let key = ServerKey::load_or_create(&dir.server_key())?;
    let fallback = format!(
        "{}://{}/ws",
        if config.server.tls_cert.is_some() {
            "wss"
        } else {
            "ws"
        },
        config.server.listen
    );
    let mut offer = create_offer(&db, system_now_ms(), ttl_secs, &key, fallback)?;
    offer.tls_spki_sha256 = secrets_agent::tls::spki_sha256(&dir, &config)?;
    cli_audit(&dir, &db, &config, "cli.pair_code_created", "ok")?;
    // The web companion's link (SPEC §11): the code rides in the fragment.
    let web_url =
        secrets_agent::web::web_origin_for(config.server.web_origin.as_deref(), &offer.url)
            .map(|origin| secrets_agent::web::pairing_url(&origin, &offer.code));
    if json {
        let mut v = offer.to_json();
        if let Some(u) = &web_url {
            v["web_url"] = serde_json::json!(u);
        }
        println!("{v}");
    } else {
        println!("Pairing code: {}", offer.code);
        println!("  expires:    {}", rfc3339_ms(offer.expires_at_ms));
        println!("  server key: {}", offer.server_key);
        println!("  url:        {}", offer.url);
        if let Some(pin) = &offer.tls_spki_sha256 {
            println!("  tls pin:    {pin}");
        }
        if let Some(u) = &web_url {
            println!("  web:        {u}");
        }
    }
    if qr {
        // The web link when there is one; else the offer a native phone reads.
        let (text, what) = match &web_url {
            Some(u) => (u.clone(), "Scan to open the web companion and pair"),
            None => (
                offer.to_json().to_string(),
                "Scan with the phone app (no web origin: set server.web_origin for the web companion)",
            ),
        };
        let code = qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::L)
            .context("the pairing link does not fit in a QR code")?;
        let art = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build();
        if json {
            eprintln!("{what}:\n{art}");
        } else {
            println!("{what}:\n{art}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn devices_list(dir: DataDir) -> Result<ExitCode> {
    let (db, _) = open(&dir)?;
    let list = db.blocking(|c| devices::list_devices(c))?;
    if list.is_empty() {
        println!("No devices are paired. Run `secrets-agent pair` to make a pairing code.");
    }
    for d in list {
        // A name comes from a phone: shown escaped, so control or bidi
        // characters (refused since v1.1, but maybe stored earlier) cannot
        // move the cursor or reorder the line.
        println!(
            "{}  {:<24}  {:<7}  paired {}  last seen {}{}",
            escape(&d.device_id),
            escape(&d.device_name),
            d.approval_key_alg.as_str(),
            rfc3339_ms(d.paired_at),
            d.last_seen
                .map(rfc3339_ms)
                .unwrap_or_else(|| "never".into()),
            if d.revoked { "  REVOKED" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn devices_revoke(dir: DataDir, id: &str) -> Result<ExitCode> {
    let (db, config) = open(&dir)?;
    let id2 = id.to_string();
    if !db.blocking(move |c| devices::revoke_device(c, &id2))? {
        eprintln!("error: no paired device {id:?} (see `secrets-agent devices list`)");
        return Ok(ExitCode::FAILURE);
    }
    cli_audit(&dir, &db, &config, "cli.revoke_device", "ok")?;
    println!("Device {id} revoked; a running server closes its sessions within 5 s.");
    Ok(ExitCode::SUCCESS)
}

fn memory_import(dir: DataDir, file: &std::path::Path) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let (db, config) = open(&dir)?;
    let embedder =
        secrets_agent::memory::embedder::Embedder::start(dir.resolve(&config.memory.model_dir));
    let total = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} ({eta} left)")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let started = std::time::Instant::now();
    let report =
        secrets_agent::memory::import::run(&db, &embedder, file, system_now_ms(), |bytes| {
            if let Some(b) = &bar {
                b.set_position(bytes);
            }
        })
        .map_err(anyhow::Error::msg)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for (line, reason) in &report.failed {
        eprintln!("line {line}: {reason}");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {} memories in {secs:.1} s ({:.0}/s); {} line(s) failed",
        report.imported,
        report.imported as f64 / secs.max(0.001),
        report.failed.len()
    );
    cli_audit(
        &dir,
        &db,
        &config,
        "cli.memory_import",
        if report.failed.is_empty() {
            "ok"
        } else {
            "partial"
        },
    )?;
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn audit_verify(dir: DataDir) -> Result<ExitCode> {
    let (db, config) = open(&dir)?;
    let audit_dir = dir.resolve(&config.audit.dir);
    match verify(&audit_dir, &db) {
        Ok(r) => {
            let span = if r.records > 0 {
                format!(" (seq {}..={})", r.first_seq, r.last_seq)
            } else {
                String::new()
            };
            println!(
                "audit log OK: {} records{span} in {} segment file(s) under {}",
                r.records,
                r.files,
                audit_dir.display()
            );
            match &r.pruned {
                Some(a) => println!(
                    "pruned: {} records (seq 1..={}) in {} segment(s), {} bytes; last pruned {}; verified from the anchor at seq {}",
                    a.seq.saturating_sub(1),
                    a.seq.saturating_sub(1),
                    a.pruned_segments,
                    a.pruned_bytes,
                    rfc3339_ms(a.pruned_at_ms),
                    a.seq
                ),
                None => println!("pruned: nothing (the chain is verified from seq 1)"),
            }
            for name in &r.ignored {
                println!("ignored (not a segment): {name}");
            }
            if r.incomplete_tail > 0 {
                println!(
                    "incomplete last line: {} bytes of a write cut short (never synced; the next append cuts it off)",
                    r.incomplete_tail
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("audit log BROKEN: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `s` with control, bidi and other invisible format characters escaped as
/// `\u{..}`, for printing text that came from a device.
fn escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            let format_char = matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{061C}' | '\u{FEFF}');
            if c.is_control() || format_char {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
