//! `mobile-sim bench`: the load generator of SPEC §9 and issue 7.
//!
//! It starts (or targets) a server, pairs, and measures admin round trips
//! over authenticated sessions (C connections × K requests in flight),
//! full handshakes per second, an open-loop fixed rate, and the server's
//! memory with many idle sessions. In the same run it measures a bare
//! tokio-tungstenite echo server built into the bench (same machine, same
//! frames) and prints every figure next to that baseline.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Endpoint};
use crate::identity::{ApprovalAlg, Identity};
use crate::proto;
use crate::raw::connect_ws;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Target a running server (its phone must be paired in --state). Without
    /// it, the bench starts `secrets-agent serve` on a temp data dir.
    #[arg(long)]
    url: Option<String>,
    /// The server binary to start [default: `secrets-agent` next to this binary].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Seconds per measured scenario.
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// Scenarios to run (comma-separated): rtt1, c50k1, c50k32, handshakes, open10k, idle10k, or all;
    /// `soak` (not part of all) runs --mix at --open-rate for --duration-secs.
    #[arg(long, default_value = "all")]
    scenarios: String,
    /// The action measured for round trips.
    #[arg(long, default_value = "get_dashboard")]
    action: String,
    /// Sessions for the idle scenario.
    #[arg(long, default_value_t = 10_000)]
    idle_sessions: usize,
    /// Requests per second for the open-loop scenario (over 50 connections).
    #[arg(long, default_value_t = 10_000)]
    open_rate: u64,
    /// Print one JSON object per scenario instead of a table.
    #[arg(long)]
    json: bool,
    /// Soak: seconds between reports (RSS, rate, p99 of the interval).
    #[arg(long, default_value_t = 60)]
    report_secs: u64,
    /// Soak: the actions mixed round-robin (comma-separated).
    #[arg(
        long,
        default_value = "get_dashboard,list_devices,list_plugins,list_skills,get_config,list_approvals"
    )]
    mix: String,
}

/// A started server process and how to reach it.
struct Target {
    url: String,
    identity: Identity,
    child: Option<Child>,
    pid: Option<u32>,
    _dir: Option<tempdir::TempDirGuard>,
}

mod tempdir {
    /// Removes the bench's temp data dir on drop.
    pub struct TempDirGuard(pub std::path::PathBuf);
    impl Drop for TempDirGuard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

fn default_server_bin() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name("secrets-agent");
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "no secrets-agent binary next to {} (build it, or pass --server-bin)",
            me.display()
        )
    }
}

async fn start_target(args: &BenchArgs, state: &Path, ca: Option<PathBuf>) -> Result<Target> {
    if let Some(url) = &args.url {
        let identity = Identity::load(state)
            .with_context(|| format!("--url needs a phone paired in {}", state.display()))?;
        let _ = ca;
        return Ok(Target {
            url: url.clone(),
            identity,
            child: None,
            pid: None,
            _dir: None,
        });
    }
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => default_server_bin()?,
    };
    let dir = std::env::temp_dir().join(format!("secrets-agent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Generous limits so the load itself is measured, not refused: 1,024 in
    // flight per session and no per-device request budget (one bench device
    // sends far more than the default 200/s).
    std::fs::write(
        dir.join("config.toml"),
        "[server]\nmax_in_flight = 1024\ndevice_request_burst = 0\n",
    )?;
    let mut child = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .env("SECRETS_AGENT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let (code, url) = tokio::task::spawn_blocking(move || -> Result<(String, String)> {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().context("the server printed nothing")??;
        let code = first
            .split("Pairing code: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .context("no pairing code printed")?
            .to_string();
        let _key = lines.next();
        let url = lines
            .next()
            .context("no url printed")??
            .trim()
            .trim_start_matches("url: ")
            .to_string();
        Ok((code, url))
    })
    .await??;
    let mut identity = Identity::generate("bench", ApprovalAlg::Ed25519);
    let (c, _) = client::pair(&Endpoint::new(url.clone()), &mut identity, &code, None).await?;
    c.close().await;
    let pid = Some(child.id());
    Ok(Target {
        url,
        identity,
        child: Some(child),
        pid,
        _dir: Some(tempdir::TempDirGuard(dir)),
    })
}

/// Serves a bare tokio-tungstenite echo on `listen` until killed, printing
/// its URL first (`mobile-sim echo-server`, used as the bench's baseline).
pub fn serve_echo(listen: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        println!("ws://{}/ws", listener.local_addr()?);
        use std::io::Write;
        std::io::stdout().flush()?;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(m)) = rx.next().await {
                    let echo = matches!(m, Message::Text(_) | Message::Binary(_));
                    if matches!(m, Message::Close(_)) || (echo && tx.send(m).await.is_err()) {
                        break;
                    }
                }
            });
        }
    })
}

/// The echo baseline as a separate process, like the server under test.
struct Echo {
    url: String,
    child: Child,
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_echo() -> Result<Echo> {
    let me = std::env::current_exe()?;
    let mut child = Command::new(me)
        .args(["echo-server", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("echo stdout")?;
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    Ok(Echo {
        url: line.trim().to_string(),
        child,
    })
}

type Ws = crate::raw::Ws;

/// An authenticated session (server), or a plain connection (echo).
async fn open(url: &str, id: Option<&Identity>) -> Result<Ws> {
    let mut ws = connect_ws(url, None).await?;
    if let Some(id) = id {
        let ch = next_json(&mut ws).await?;
        let (key, nonce, ts) = (
            ch["server_key"].as_str().unwrap_or(""),
            ch["nonce"].as_str().unwrap_or(""),
            ch["ts"].as_i64().unwrap_or(0),
        );
        let cn = proto::nonce32();
        let msg = proto::auth_string(key, nonce, &id.device_id(), &cn, ts);
        let auth = json!({"type": "auth", "protocol": 1, "device_id": id.device_id(), "nonce": nonce, "client_nonce": cn, "ts": ts, "signature": id.sign_device(&msg)});
        ws.send(Message::text(auth.to_string())).await?;
        let ok = next_json(&mut ws).await?;
        if ok["type"] != "auth_ok" {
            bail!("auth failed: {ok}");
        }
    }
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str())?),
            Some(Ok(Message::Close(c))) => bail!("closed: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed"),
        }
    }
}

fn frame(action: &str, rid: &str) -> String {
    format!(r#"{{"type":"admin","request_id":"{rid}","payload":{{"action":"{action}"}}}}"#)
}

/// Extracts `"request_id":"..."` without a full parse.
fn request_id(text: &str) -> Option<&str> {
    let i = text.find(r#""request_id":""#)? + 14;
    let end = text[i..].find('"')?;
    Some(&text[i..i + end])
}

#[derive(Debug, Clone)]
struct Measure {
    requests: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    /// CPU time the measured process spent per request, in µs (when known).
    cpu_us_per_req: Option<f64>,
}

impl Measure {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    fn from(h: &Histogram<u64>, secs: f64, errors: u64) -> Measure {
        Measure {
            requests: h.len(),
            secs,
            p50_us: h.value_at_quantile(0.50) as f64,
            p99_us: h.value_at_quantile(0.99) as f64,
            p999_us: h.value_at_quantile(0.999) as f64,
            errors,
            cpu_us_per_req: None,
        }
    }
}

/// CPU time a process has used so far, in ns: the sum of its threads'
/// `schedstat` run times (ns precision, unlike `stat`'s clock ticks).
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let s = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Runs `f` and adds the CPU the process `pid` spent per request meanwhile.
async fn with_cpu<F>(pid: Option<u32>, f: F) -> Result<Measure>
where
    F: std::future::Future<Output = Result<Measure>>,
{
    let before = pid.and_then(cpu_ns);
    let mut m = f.await?;
    if let (Some(pid), Some(before)) = (pid, before)
        && let Some(after) = cpu_ns(pid)
        && m.requests > 0
    {
        m.cpu_us_per_req = Some((after - before) as f64 / 1000.0 / m.requests as f64);
    }
    Ok(m)
}

/// Starts the server `tries` times on a fresh data dir and measures, each
/// time, how long it takes from SIGTERM to the process's exit.
async fn sigterm_to_exit(bin: &Path, tries: usize) -> Result<Vec<Duration>> {
    let dir = std::env::temp_dir().join(format!("secrets-agent-bench-exit-{}", std::process::id()));
    let _guard = tempdir::TempDirGuard(dir.clone());
    let mut out = Vec::with_capacity(tries);
    for _ in 0..tries {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .env("SECRETS_AGENT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("server stdout")?;
        // Read the first line, then keep draining (the server must not find
        // its stdout closed: it would only lose its output, but this is not
        // what is measured).
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        rx.await?.context("the server printed nothing")??;
        // Idle: listening, nothing connected.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = std::time::Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        let status = tokio::task::spawn_blocking(move || child.wait()).await??;
        out.push(t.elapsed());
        if !status.success() {
            bail!("the server exited with {status} after SIGTERM");
        }
    }
    Ok(out)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Closed loop: `conns` connections, each keeping `k` requests in flight.
async fn closed_loop(
    url: &str,
    id: Option<&Identity>,
    action: &str,
    conns: usize,
    k: usize,
    dur: Duration,
) -> Result<Measure> {
    let mut sockets = Vec::with_capacity(conns);
    for _ in 0..conns {
        sockets.push(open(url, id).await?);
    }
    let merged = Arc::new(Mutex::new(hist()));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for (ci, ws) in sockets.into_iter().enumerate() {
        let (merged, errors, action) = (merged.clone(), errors.clone(), action.to_string());
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let mut sent: HashMap<String, Instant> = HashMap::with_capacity(k * 2);
            let mut h = hist();
            let mut seq = 0u64;
            for _ in 0..k {
                seq += 1;
                let rid = format!("c{ci}-{seq}");
                sent.insert(rid.clone(), Instant::now());
                if tx.send(Message::text(frame(&action, &rid))).await.is_err() {
                    return;
                }
            }
            while let Some(Ok(m)) = rx.next().await {
                let Message::Text(t) = m else { continue };
                let now = Instant::now();
                let Some(rid) = request_id(t.as_str()) else {
                    continue;
                };
                if let Some(t0) = sent.remove(rid) {
                    h.saturating_record(now.duration_since(t0).as_micros() as u64);
                }
                if t.as_str().contains(r#""result":"error""#) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                if now >= deadline {
                    if sent.is_empty() {
                        break;
                    }
                    continue;
                }
                seq += 1;
                let rid = format!("c{ci}-{seq}");
                sent.insert(rid.clone(), Instant::now());
                if tx.send(Message::text(frame(&action, &rid))).await.is_err() {
                    break;
                }
            }
            let _ = tx.send(Message::Close(None)).await;
            merged.lock().await.add(&h).expect("same bounds");
        }));
    }
    for t in tasks {
        let _ = tokio::time::timeout(dur + Duration::from_secs(30), t).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let h = merged.lock().await.clone();
    Ok(Measure::from(&h, secs, errors.load(Ordering::Relaxed)))
}

/// Full handshakes (connect, challenge, auth, auth_ok, close) per second;
/// for the echo: connect, one round trip, close.
async fn handshakes(
    url: &str,
    id: Option<&Identity>,
    workers: usize,
    dur: Duration,
) -> Result<Measure> {
    let merged = Arc::new(Mutex::new(hist()));
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (merged, url, id) = (merged.clone(), url.to_string(), id.cloned());
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let Ok(mut ws) = open(&url, id.as_ref()).await else {
                    continue;
                };
                if id.is_none() {
                    let _ = ws.send(Message::text("{}")).await;
                    let _ = next_json(&mut ws).await;
                }
                let _ = ws.close(None).await;
                h.saturating_record(t0.elapsed().as_micros() as u64);
            }
            merged.lock().await.add(&h).expect("same bounds");
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let h = merged.lock().await.clone();
    Ok(Measure::from(&h, secs, 0))
}

/// Open loop: `rate` requests/s of `actions` (round-robin) over 50
/// connections for `dur`, sent on a fixed, staggered schedule whatever the
/// responses do (a separate reader per connection), so slow responses cannot
/// slow the senders; a server that cannot keep up shows as an achieved rate
/// below the target. Latency is measured from the moment each request is
/// written. With `report`, prints each interval's rate, p50/p99 and the
/// server's RSS (the soak); returns the whole run's measure.
async fn fixed_rate(
    url: &str,
    id: Option<&Identity>,
    actions: Vec<String>,
    rate: u64,
    dur: Duration,
    report: Option<(Duration, Option<u32>, bool)>,
) -> Result<Measure> {
    let conns = 50;
    let mut sockets = Vec::with_capacity(conns);
    for _ in 0..conns {
        sockets.push(open(url, id).await?);
    }
    let window = Arc::new(std::sync::Mutex::new(hist()));
    let total = Arc::new(std::sync::Mutex::new(hist()));
    let errors = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(conns as f64 / rate.max(1) as f64);
    let end = tokio::time::Instant::now() + dur;
    let actions = Arc::new(actions);
    let mut tasks = Vec::new();
    for (ci, ws) in sockets.into_iter().enumerate() {
        let (window, total, errors, actions) = (
            window.clone(),
            total.clone(),
            errors.clone(),
            actions.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
            let s2 = sent.clone();
            let reader = tokio::spawn(async move {
                while let Some(Ok(m)) = rx.next().await {
                    let Message::Text(t) = m else { continue };
                    if t.as_str().contains(r#""result":"error""#) {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(rid) = request_id(t.as_str()) {
                        let t0 = s2.lock().unwrap().remove(rid);
                        if let Some(t0) = t0 {
                            let us = t0.elapsed().as_micros() as u64;
                            window.lock().unwrap().saturating_record(us);
                            total.lock().unwrap().saturating_record(us);
                        }
                    }
                }
            });
            // Staggered, so the 50 connections do not fire in one burst.
            let first = tokio::time::Instant::now() + interval.mul_f64(ci as f64 / conns as f64);
            let mut ticker = tokio::time::interval_at(first, interval);
            let mut seq = 0u64;
            while ticker.tick().await < end {
                seq += 1;
                let rid = format!("s{ci}-{seq}");
                let action = &actions[(seq as usize + ci) % actions.len()];
                sent.lock().unwrap().insert(rid.clone(), Instant::now());
                if tx.send(Message::text(frame(action, &rid))).await.is_err() {
                    break;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while !sent.lock().unwrap().is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
            })
            .await;
            let _ = tx.send(Message::Close(None)).await;
            reader.abort();
        }));
    }
    let start = Instant::now();
    if let Some((every, pid, json_out)) = report {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut n = 0;
        while tokio::time::Instant::now() < end {
            tick.tick().await;
            n += 1;
            let h = std::mem::replace(&mut *window.lock().unwrap(), hist());
            let rss = pid.and_then(rss_kib).map(|k| k as f64 / 1024.0);
            let (rps, p50, p99) = (
                h.len() as f64 / every.as_secs_f64(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
            );
            let errs = errors.swap(0, Ordering::Relaxed);
            if json_out {
                println!(
                    "{}",
                    json!({"scenario": "soak", "report": n, "elapsed_secs": start.elapsed().as_secs(), "rps": rps, "p50_us": p50, "p99_us": p99, "errors": errs, "server_rss_mb": rss})
                );
            } else {
                let rss = rss
                    .map(|m| format!("{m:.1} MB"))
                    .unwrap_or_else(|| "n/a".into());
                println!(
                    "soak {:>5} s: {rps:>8.0} req/s  p50 {p50:>6} µs  p99 {p99:>6} µs  errors {errs}  server RSS {rss}",
                    start.elapsed().as_secs()
                );
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = dur.as_secs_f64();
    let h = total.lock().unwrap().clone();
    Ok(Measure::from(&h, secs, errors.load(Ordering::Relaxed)))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Opens `n` sessions and keeps them idle; returns (server RSS before, after) in KiB.
async fn idle_sessions(
    url: &str,
    id: &Identity,
    n: usize,
    pid: Option<u32>,
) -> Result<(Option<u64>, Option<u64>, usize, f64)> {
    let before = pid.and_then(rss_kib);
    let start = Instant::now();
    let mut held = Vec::with_capacity(n);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut next = 0;
    while held.len() < n {
        // The server keeps at most 32 unauthenticated connections per
        // address and evicts the oldest beyond (a flood defence): open
        // fewer than that at once.
        while pending.len() < 16 && next < n {
            let (u, i) = (url.to_string(), id.clone());
            pending.push(async move { open(&u, Some(&i)).await });
            next += 1;
        }
        match pending.next().await {
            Some(Ok(ws)) => held.push(ws),
            Some(Err(e)) => bail!("session {} failed: {e}", held.len()),
            None => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = pid.and_then(rss_kib);
    let opened = held.len();
    for mut ws in held {
        let _ = ws.close(None).await;
    }
    Ok((before, after, opened, secs))
}

fn row(json_out: bool, name: &str, server: &Measure, echo: &Measure) {
    if json_out {
        println!(
            "{}",
            json!({"scenario": name, "server": {"rps": server.rate(), "p50_us": server.p50_us, "p99_us": server.p99_us, "p999_us": server.p999_us, "requests": server.requests, "errors": server.errors, "cpu_us_per_req": server.cpu_us_per_req},
                   "echo": {"rps": echo.rate(), "p50_us": echo.p50_us, "p99_us": echo.p99_us, "p999_us": echo.p999_us, "requests": echo.requests, "cpu_us_per_req": echo.cpu_us_per_req},
                   "ratio": {"rps": server.rate() / echo.rate(), "p50": server.p50_us / echo.p50_us, "p99": server.p99_us / echo.p99_us}})
        );
    } else {
        let cpu = |m: &Measure| {
            m.cpu_us_per_req
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{name:<26} {:>11.0}/s {:>9.0} {:>9.0} {:>9.0} {:>8} | {:>11.0}/s {:>8.0} {:>8.0} {:>8.0} {:>8} | {:>5.2}x {:>5.2}x {:>5.2}x{}",
            server.rate(),
            server.p50_us,
            server.p99_us,
            server.p999_us,
            cpu(server),
            echo.rate(),
            echo.p50_us,
            echo.p99_us,
            echo.p999_us,
            cpu(echo),
            server.rate() / echo.rate(),
            server.p50_us / echo.p50_us,
            server.p99_us / echo.p99_us,
            if server.errors > 0 {
                format!("  ({} errors)", server.errors)
            } else {
                String::new()
            }
        );
    }
}

pub async fn run(
    args: BenchArgs,
    state: &Path,
    ca: Option<PathBuf>,
) -> Result<std::process::ExitCode> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let target = start_target(&args, state, ca).await?;
    let echo_proc = start_echo()?;
    let echo = echo_proc.url.clone();
    let dur = Duration::from_secs(args.duration_secs);
    let want =
        |s: &str| args.scenarios == "all" || args.scenarios.split(',').any(|x| x.trim() == s);
    let id = Some(&target.identity);
    if !args.json {
        println!(
            "secrets-agent bench: action {:?}, {} s per scenario, server {} vs built-in echo",
            args.action, args.duration_secs, target.url
        );
        println!(
            "{:<26} {:>13} {:>9} {:>9} {:>9} {:>8} | {:>13} {:>8} {:>8} {:>8} {:>8} | ratio rps/p50/p99",
            "scenario (server | echo)",
            "rate",
            "p50 µs",
            "p99 µs",
            "p999 µs",
            "CPU µs",
            "rate",
            "p50",
            "p99",
            "p999",
            "CPU µs"
        );
    }
    for (name, c, k) in [("rtt1", 1, 1), ("c50k1", 50, 1), ("c50k32", 50, 32)] {
        if want(name) {
            let s = with_cpu(
                target.pid,
                closed_loop(&target.url, id, &args.action, c, k, dur),
            )
            .await?;
            let e = with_cpu(
                Some(echo_proc.child.id()),
                closed_loop(&echo, None, &args.action, c, k, dur),
            )
            .await?;
            row(args.json, &format!("C={c} K={k}"), &s, &e);
        }
    }
    if want("open10k") {
        let one = vec![args.action.clone()];
        let s = fixed_rate(&target.url, id, one.clone(), args.open_rate, dur, None).await?;
        let e = fixed_rate(&echo, None, one, args.open_rate, dur, None).await?;
        row(
            args.json,
            &format!("open loop {}/s, 50 conns", args.open_rate),
            &s,
            &e,
        );
    }
    if want("handshakes") {
        let s = with_cpu(target.pid, handshakes(&target.url, id, 8, dur)).await?;
        let e = with_cpu(Some(echo_proc.child.id()), handshakes(&echo, None, 8, dur)).await?;
        row(args.json, "full handshakes (8 workers)", &s, &e);
    }
    if want("sigterm") && args.url.is_none() {
        let bin = match &args.server_bin {
            Some(b) => b.clone(),
            None => default_server_bin()?,
        };
        let mut t = sigterm_to_exit(&bin, 20).await?;
        t.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        if args.json {
            println!(
                "{}",
                json!({"scenario": "sigterm_to_exit", "tries": t.len(), "min_ms": ms(t[0]), "median_ms": ms(t[t.len() / 2]), "max_ms": ms(t[t.len() - 1])})
            );
        } else {
            println!(
                "SIGTERM to exit, idle ({} tries): min {:.1} ms, median {:.1} ms, max {:.1} ms",
                t.len(),
                ms(t[0]),
                ms(t[t.len() / 2]),
                ms(t[t.len() - 1])
            );
        }
    }
    if args.scenarios.split(',').any(|x| x.trim() == "soak") {
        let mix = args
            .mix
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        let report = Some((Duration::from_secs(args.report_secs), target.pid, args.json));
        let m = fixed_rate(&target.url, id, mix, args.open_rate, dur, report).await?;
        if !args.json {
            println!(
                "soak total: {:.0} req/s, p50 {} µs, p99 {} µs, {} errors",
                m.rate(),
                m.p50_us,
                m.p99_us,
                m.errors
            );
        }
    }
    if want("idle10k") {
        let (before, after, n, secs) = idle_sessions(
            &target.url,
            &target.identity,
            args.idle_sessions,
            target.pid,
        )
        .await?;
        let fmt = |k: Option<u64>| {
            k.map(|k| format!("{:.1} MB", k as f64 / 1024.0))
                .unwrap_or_else(|| "n/a (remote server)".into())
        };
        if args.json {
            println!(
                "{}",
                json!({"scenario": "idle_sessions", "sessions": n, "open_secs": secs, "server_rss_before_kib": before, "server_rss_after_kib": after})
            );
        } else {
            println!(
                "{n} idle authenticated sessions opened in {secs:.1} s; server RSS {} before, {} with them open",
                fmt(before),
                fmt(after)
            );
        }
    }
    drop(target);
    drop(echo_proc);
    Ok(std::process::ExitCode::SUCCESS)
}
