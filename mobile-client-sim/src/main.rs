//! `mobile-sim`: a simulated phone on the command line — pair, send admin
//! requests, watch events and answer biometric approvals, and load-test.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use mobile_client_sim::client::{self, Endpoint};
use mobile_client_sim::{Approval, ApprovalAlg, Client, Identity, Origin};
use serde_json::{Map, Value, json};

use mobile_client_sim::bench;

#[derive(Parser)]
#[command(
    name = "mobile-sim",
    version,
    about = "A simulated secrets-agent phone: pairing, admin requests, approvals, load"
)]
struct Cli {
    /// Where the phone's keys and pinned server live.
    #[arg(
        long,
        global = true,
        env = "MOBILE_SIM_STATE",
        default_value = ".mobile-sim"
    )]
    state: PathBuf,
    /// CA certificate (PEM) to trust for wss:// URLs.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Approve {
    /// Answer every approval request with "approve".
    Always,
    /// Answer every approval request with "deny".
    Never,
    /// Ask on the terminal (stands in for the biometric prompt).
    Ask,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pair with a server using a one-time code; keys are saved in --state.
    Pair {
        #[arg(long)]
        url: String,
        #[arg(long)]
        code: String,
        /// The server key `secrets-agent pair` showed; pairing fails if the server's differs.
        #[arg(long)]
        server_key: Option<String>,
        /// For wss://: the `tls_spki_sha256` that `secrets-agent pair --json`
        /// showed. The TLS key is pinned: every later connection checks it.
        #[arg(long)]
        tls_pin: Option<String>,
        #[arg(long, default_value = "mobile-sim")]
        name: String,
        /// ed25519, or es256 (a Secure Enclave / StrongBox style P-256 key).
        #[arg(long, default_value = "ed25519")]
        approval_alg: ApprovalAlg,
    },
    /// Send one admin request and print the response payload as JSON.
    /// Params are key=value (value parsed as JSON when it is JSON; dotted keys nest:
    /// `section=llm value.model=x`). `key=@-` reads that value, as a string, from
    /// standard input to its end, less one trailing newline (e.g. a secret:
    /// `set_secret name=X value=@-`, so it is never in argv). Waits through a
    /// biometric approval.
    Admin {
        action: String,
        params: Vec<String>,
        /// Answer this request's approval from this phone too.
        #[arg(long)]
        approve: Option<Approve>,
        /// Use the JSON-RPC 2.0 codec instead of the admin envelope.
        #[arg(long)]
        jsonrpc: bool,
    },
    /// Stay connected, print every event as a JSON line, answer approvals by policy.
    Watch {
        #[arg(long, default_value = "ask")]
        approve: Approve,
    },
    /// Load generator and benchmark (see README: Performance).
    Bench(bench::BenchArgs),
    /// A bare WebSocket echo server: the bench's baseline (started by `bench`).
    #[command(hide = true)]
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(state: &std::path::Path) -> Result<Identity> {
    Identity::load(state).with_context(|| {
        format!(
            "no paired phone in {} (run `mobile-sim pair` first)",
            state.display()
        )
    })
}

fn endpoint(id: &Identity, ca: &Option<PathBuf>) -> Result<Endpoint> {
    let pinned = id.pinned.as_ref().context("this phone is not paired")?;
    let mut ep = Endpoint::new(pinned.url.clone());
    ep.ca = ca.clone();
    ep.tls_pin = pinned.tls_spki_sha256.clone();
    Ok(ep)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Pair {
            url,
            code,
            server_key,
            tls_pin,
            name,
            approval_alg,
        } => {
            let mut id = Identity::generate(&name, approval_alg);
            let mut ep = Endpoint::new(url);
            ep.ca = cli.ca.clone();
            ep.tls_pin = tls_pin;
            let (c, conn) = client::pair(&ep, &mut id, &code, server_key.as_deref()).await?;
            id.save(&cli.state)?;
            c.close().await;
            println!(
                "{}",
                json!({"device_id": conn.device_id, "session_id": conn.session_id, "server_key": conn.server_key, "approval_key_alg": approval_alg.as_str()})
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Admin {
            action,
            params,
            approve,
            jsonrpc,
        } => {
            let id = load(&cli.state)?;
            let (c, _) = client::auth(&endpoint(&id, &cli.ca)?, &id).await?;
            let params = parse_params(&params)?;
            let payload = admin(&c, &id, &action, params, approve, jsonrpc).await?;
            println!("{}", serde_json::to_string_pretty(&payload)?);
            c.close().await;
            Ok(if payload["result"] == "error" {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Watch { approve } => {
            let id = load(&cli.state)?;
            let (c, conn) = client::auth(&endpoint(&id, &cli.ca)?, &id).await?;
            eprintln!(
                "connected as {} (session {}); Ctrl-C to stop",
                conn.device_id, conn.session_id
            );
            loop {
                let ev = tokio::select! {
                    ev = c.next_event() => ev,
                    _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                };
                let Some(ev) = ev else {
                    let closed = c.closed().await;
                    eprintln!("connection closed: {closed:?}");
                    return Ok(ExitCode::FAILURE);
                };
                if ev["type"] == "approval_request" {
                    // Marked: who asked, as far as this phone can tell.
                    let a = c.approval(&ev).await;
                    let mut shown = ev.clone();
                    shown["sim_origin"] = json!(a.origin.as_str());
                    println!("{shown}");
                    let _ = std::io::stdout().flush();
                    answer(&c, &id, &a, approve).await?;
                } else {
                    println!("{ev}");
                    let _ = std::io::stdout().flush();
                }
            }
        }
        Cmd::Bench(args) => bench::run(args, &cli.state, cli.ca.clone()).await,
        Cmd::EchoServer { listen } => {
            tokio::task::spawn_blocking(move || bench::serve_echo(&listen)).await??;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Sends the request; answers its approval if asked to; returns the final payload.
async fn admin(
    c: &Client,
    id: &Identity,
    action: &str,
    params: Value,
    approve: Option<Approve>,
    jsonrpc: bool,
) -> Result<Value> {
    let rid = format!("cli-{}", std::process::id());
    let call = async {
        if jsonrpc {
            let r = c.jsonrpc(json!(rid), action, params.clone()).await?;
            Ok::<Value, anyhow::Error>(match r.get("result") {
                Some(v) => v.clone(),
                None => {
                    json!({"result": "error", "code": r["error"]["data"]["code"], "message": r["error"]["message"]})
                }
            })
        } else {
            Ok(c.request_with_id(&rid, action, params.clone()).await?)
        }
    };
    tokio::pin!(call);
    // Our approval is the one our `approval_pending` names, never one that
    // merely carries our request_id.
    let own = c.own_approval(&rid, std::time::Duration::from_secs(86_400));
    tokio::pin!(own);
    let mut answered = false;
    loop {
        tokio::select! {
            r = &mut call => return r,
            a = &mut own, if !answered => {
                answered = true;
                let a = match a {
                    Ok(a) => a,
                    Err(client::ClientError::Closed(c)) => bail!("connection closed: {c:?}"),
                    Err(e) => return Err(e.into()),
                };
                match approve {
                    Some(policy) => answer(c, id, &a, policy).await?,
                    None => eprintln!("waiting for approval on a phone: {}", a.summary),
                }
            }
        }
    }
}

async fn answer(c: &Client, id: &Identity, a: &Approval, policy: Approve) -> Result<()> {
    let summary = match a.origin {
        Origin::ThisSession => a.summary.clone(),
        Origin::OtherSession => format!("[from another session of this device] {}", a.summary),
        Origin::OtherDevice => format!("[from device {}] {}", a.origin_device_id, a.summary),
    };
    let summary = summary.as_str();
    let decision = match policy {
        Approve::Always => "approve",
        Approve::Never => "deny",
        Approve::Ask => {
            let summary = summary.to_string();
            let yes = tokio::task::spawn_blocking(move || {
                eprint!("Approve? {summary} [y/N] ");
                let _ = std::io::stderr().flush();
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
                matches!(line.trim(), "y" | "Y" | "yes")
            })
            .await?;
            if yes { "approve" } else { "deny" }
        }
    };
    c.answer_approval(id, &a.frame, decision).await?;
    // Not eprintln!: a closed stderr must not stop a phone that answers.
    let _ = writeln!(std::io::stderr(), "{decision}d: {summary}");
    Ok(())
}

/// `key=value` pairs to a params object (JSON values, dotted keys nest).
fn parse_params(pairs: &[String]) -> Result<Value> {
    parse_params_with_stdin(pairs, &mut std::io::stdin().lock())
}

/// [`parse_params`], with `key=@-` read from `stdin` (once).
fn parse_params_with_stdin(pairs: &[String], stdin: &mut dyn std::io::Read) -> Result<Value> {
    let mut root = Map::new();
    let mut stdin_used = false;
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("expected key=value, got {p:?}"))?;
        let value: Value = if v == "@-" {
            anyhow::ensure!(!stdin_used, "only one value can be read from stdin (@-)");
            stdin_used = true;
            let mut text = String::new();
            stdin
                .read_to_string(&mut text)
                .context("reading a value from stdin (@-): it must be UTF-8")?;
            if text.ends_with("\r\n") {
                text.truncate(text.len() - 2);
            } else if text.ends_with('\n') {
                text.pop();
            }
            Value::String(text)
        } else {
            serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()))
        };
        let mut parts: Vec<&str> = k.split('.').collect();
        let last = parts.pop().context("empty key")?;
        let mut cur = &mut root;
        for part in parts {
            let entry = cur
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            cur = entry
                .as_object_mut()
                .with_context(|| format!("{part} is both a value and an object"))?;
        }
        cur.insert(last.to_string(), value);
    }
    Ok(Value::Object(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse_json_values_and_nest_dotted_keys() {
        let v = parse_params(&[
            "section=llm".into(),
            "value.model=claude".into(),
            "value.n=5".into(),
            "enabled=false".into(),
        ])
        .unwrap();
        assert_eq!(
            v,
            json!({"section": "llm", "value": {"model": "claude", "n": 5}, "enabled": false})
        );
        assert!(parse_params(&["novalue".into()]).is_err());
    }

    #[test]
    fn at_dash_reads_the_value_from_stdin() {
        let mut input: &[u8] = b"s3cr3t {not json}\n";
        let v = parse_params_with_stdin(&["name=X".into(), "value=@-".into()], &mut input).unwrap();
        assert_eq!(v, json!({"name": "X", "value": "s3cr3t {not json}"}));
        let mut input: &[u8] = b"a";
        assert!(parse_params_with_stdin(&["a=@-".into(), "b=@-".into()], &mut input).is_err());
    }
}
