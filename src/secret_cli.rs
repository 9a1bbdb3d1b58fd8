//! `secrets-agent secret set|get|exec|list|rm` (SPEC §10): the command-line
//! side of the local socket `DIR/agent.sock` (protocol: docs/secrets.md).
//!
//! Exit codes: 0 done; 2 usage, or an invalid name, value or lease; 3
//! denied, or refused because no device is paired; 4 expired; 5 no such
//! secret; 6 no server running on DIR; 1 any other error.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::{DirArg, data_dir};

/// What a release asks for, shared by `get` and `exec`.
#[derive(clap::Args)]
pub struct ReleaseArgs {
    /// Why the value is needed (shown on the phone).
    #[arg(long)]
    reason: String,
    /// Ask for a lease: the same requester gets these secrets again
    /// without asking until it ends.
    #[arg(long, default_value_t = 0)]
    lease_secs: u64,
    /// The requester key a lease is bound to [default: the executable
    /// of the process that ran this command]; may not start with "task:".
    #[arg(long)]
    requester: Option<String>,
}

#[derive(Subcommand)]
pub enum SecretCmd {
    /// Create or replace NAME with the value read from standard input (to
    /// its end, less one trailing newline; not echoed on a terminal).
    Set {
        name: String,
        /// What the secret is for (shown in lists).
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Wait for the phone's approval, then write the value to stdout.
    Get {
        name: String,
        #[command(flatten)]
        release: ReleaseArgs,
        #[command(flatten)]
        dir: DirArg,
    },
    /// One approval for all the named secrets, then run CMD with them in
    /// its environment; exits with CMD's status.
    Exec {
        #[command(flatten)]
        release: ReleaseArgs,
        /// VAR=NAME: put secret NAME into CMD's environment as VAR.
        #[arg(long = "env", value_name = "VAR=NAME", required = true)]
        env: Vec<String>,
        #[command(flatten)]
        dir: DirArg,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Names and metadata, never values.
    List {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Delete NAME (after a phone approval while a device is paired).
    Rm {
        name: String,
        #[command(flatten)]
        dir: DirArg,
    },
}

const EXIT_USAGE: u8 = 2;
const EXIT_DENIED: u8 = 3;
const EXIT_EXPIRED: u8 = 4;
const EXIT_NOT_FOUND: u8 = 5;
const EXIT_NO_SERVER: u8 = 6;
const EXIT_OTHER: u8 = 1;

/// A refusal with its exit code.
struct Fail(u8, String);

fn fail(code: u8, msg: impl Into<String>) -> Fail {
    Fail(code, msg.into())
}

fn code_exit(code: &str) -> u8 {
    match code {
        "invalid_request" => EXIT_USAGE,
        "approval_denied" | "forbidden" => EXIT_DENIED,
        "approval_expired" => EXIT_EXPIRED,
        "not_found" => EXIT_NOT_FOUND,
        _ => EXIT_OTHER,
    }
}

pub fn run(cmd: SecretCmd) -> Result<ExitCode> {
    let out = match cmd {
        SecretCmd::Set {
            name,
            description,
            dir,
        } => set(&dir, &name, description),
        SecretCmd::Get { name, release, dir } => get(&dir, &name, release),
        SecretCmd::Exec {
            release,
            env,
            dir,
            cmd,
        } => exec(&dir, release, &env, &cmd),
        SecretCmd::List { dir } => list(&dir),
        SecretCmd::Rm { name, dir } => rm(&dir, &name),
    };
    Ok(match out {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    })
}

fn check_name(name: &str) -> Result<(), Fail> {
    if secrets_agent::secrets::valid_name(name) {
        Ok(())
    } else {
        Err(fail(
            EXIT_USAGE,
            format!("invalid secret name {name:?}: names match ^[A-Za-z_][A-Za-z0-9_.-]{{0,63}}$"),
        ))
    }
}

/// Sends one request and reads answers until the final one; "pending"
/// lines are shown on stderr. The final `ok` object, or the refusal.
fn call(dir: &DirArg, request: &Value) -> Result<Zeroizing<String>, Fail> {
    let d = data_dir(dir).map_err(|e| fail(EXIT_OTHER, format!("{e:#}")))?;
    let path = d.root.join("agent.sock");
    let mut s = UnixStream::connect(&path).map_err(|e| {
        fail(
            EXIT_NO_SERVER,
            format!(
                "no server running on {} ({}: {e}); start it with `secrets-agent serve --data-dir {}`",
                d.root.display(),
                path.display(),
                d.root.display()
            ),
        )
    })?;
    let line = Zeroizing::new(format!("{request}\n"));
    // A refusal (e.g. of another uid) may arrive while we still write: a
    // failed write is reported only if no answer can be read.
    let written = s.write_all(line.as_bytes());
    let mut r = BufReader::new(s);
    loop {
        let mut answer = Zeroizing::new(String::new());
        match r.read_line(&mut answer) {
            Ok(0) | Err(_) => {
                return Err(match &written {
                    Err(e) => fail(EXIT_OTHER, format!("the server closed the socket: {e}")),
                    Ok(()) => fail(EXIT_OTHER, "the server closed the socket without an answer"),
                });
            }
            Ok(_) => {}
        }
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| fail(EXIT_OTHER, format!("bad answer from the server: {e}")))?;
        match v["type"].as_str() {
            Some("pending") => {
                let left = v["expires_at"]
                    .as_i64()
                    .map(|t| (t - secrets_agent::clock::system_now_ms()).max(0) / 1000)
                    .unwrap_or(0);
                eprintln!(
                    "waiting for approval on your phone: {} (approval {}, {left} s left; Ctrl-C withdraws it)",
                    v["summary"].as_str().unwrap_or(""),
                    v["approval_id"].as_str().unwrap_or("")
                );
            }
            Some("ok") => return Ok(answer),
            _ => {
                let code = v["code"].as_str().unwrap_or("internal");
                let msg = v["message"].as_str().unwrap_or("refused");
                return Err(fail(code_exit(code), format!("{msg} ({code})")));
            }
        }
    }
}

/// Turns terminal echo off while it lives (stdin is a terminal).
struct NoEcho(Option<libc::termios>);

impl NoEcho {
    fn new() -> NoEcho {
        if !std::io::stdin().is_terminal() {
            return NoEcho(None);
        }
        // SAFETY: plain termios calls on fd 0 with a zeroed struct.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return NoEcho(None);
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            NoEcho(Some(saved))
        }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the attributes read in `new`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, t);
            }
            eprintln!();
        }
    }
}

fn set(dir: &DirArg, name: &str, description: Option<String>) -> Result<(), Fail> {
    check_name(name)?;
    let mut raw = Zeroizing::new(Vec::new());
    {
        let _quiet = NoEcho::new();
        if std::io::stdin().is_terminal() {
            eprint!("value for {name} (not echoed; end with Ctrl-D): ");
        }
        std::io::stdin()
            .lock()
            .take(secrets_agent::secrets::MAX_VALUE_BYTES as u64 + 3)
            .read_to_end(&mut raw)
            .map_err(|e| fail(EXIT_OTHER, format!("cannot read standard input: {e}")))?;
    }
    let mut end = raw.len();
    if raw[..end].ends_with(b"\r\n") {
        end -= 2;
    } else if raw[..end].ends_with(b"\n") {
        end -= 1;
    }
    let value = std::str::from_utf8(&raw[..end])
        .map_err(|_| fail(EXIT_USAGE, "the value must be UTF-8 text"))?;
    if value.is_empty() || value.len() > secrets_agent::secrets::MAX_VALUE_BYTES {
        return Err(fail(EXIT_USAGE, "the value must hold 1 byte to 64 KiB"));
    }
    let mut req = json!({"op": "set", "name": name, "value": value});
    if let Some(d) = description {
        req["description"] = json!(d);
    }
    let out = call(dir, &req);
    if let Some(Value::Object(m)) = Some(&mut req)
        && let Some(Value::String(v)) = m.get_mut("value")
    {
        zeroize::Zeroize::zeroize(v);
    }
    let answer = out?;
    let v: Value = serde_json::from_str(&answer).unwrap_or_default();
    let word = if v["replaced"] == true {
        "replaced"
    } else {
        "created"
    };
    eprintln!("secret {name} {word}");
    Ok(())
}

fn release(
    dir: &DirArg,
    names: &[String],
    ReleaseArgs {
        reason,
        lease_secs,
        requester,
    }: ReleaseArgs,
) -> Result<serde_json::Map<String, Value>, Fail> {
    if requester.as_deref().is_some_and(|r| r.starts_with("task:")) {
        return Err(fail(EXIT_USAGE, "--requester may not start with \"task:\""));
    }
    let req = json!({"op": "release", "names": names, "reason": reason,
                     "lease_secs": lease_secs, "requester": requester});
    let answer = call(dir, &req)?;
    let mut v: Value = serde_json::from_str(&answer).unwrap_or_default();
    match v.get_mut("values").map(Value::take) {
        Some(Value::Object(m)) => Ok(m),
        _ => Err(fail(EXIT_OTHER, "the server sent no values")),
    }
}

fn get(dir: &DirArg, name: &str, args: ReleaseArgs) -> Result<(), Fail> {
    check_name(name)?;
    let mut values = release(dir, &[name.to_string()], args)?;
    let Some(Value::String(v)) = values.get_mut(name) else {
        return Err(fail(EXIT_OTHER, "the server did not send the value"));
    };
    let mut out = std::io::stdout().lock();
    let written = out.write_all(v.as_bytes()).and_then(|()| out.flush());
    zeroize::Zeroize::zeroize(v);
    written.map_err(|e| fail(EXIT_OTHER, format!("cannot write to stdout: {e}")))
}

fn exec(dir: &DirArg, args: ReleaseArgs, env: &[String], cmd: &[String]) -> Result<(), Fail> {
    use std::os::unix::process::CommandExt;
    let mut pairs = Vec::new();
    for e in env {
        let Some((var, name)) = e.split_once('=') else {
            return Err(fail(EXIT_USAGE, format!("--env {e:?}: use VAR=NAME")));
        };
        let ok_var = !var.is_empty()
            && !var.starts_with(|c: char| c.is_ascii_digit())
            && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok_var {
            return Err(fail(
                EXIT_USAGE,
                format!("--env {e:?}: {var:?} is not a variable name"),
            ));
        }
        check_name(name)?;
        pairs.push((var.to_string(), name.to_string()));
    }
    let mut names: Vec<String> = pairs.iter().map(|(_, n)| n.clone()).collect();
    names.sort();
    names.dedup();
    let mut values = release(dir, &names, args)?;
    let (prog, args) = cmd
        .split_first()
        .ok_or_else(|| fail(EXIT_USAGE, "name a command after --"))?;
    let mut c = std::process::Command::new(prog);
    c.args(args);
    for (var, name) in &pairs {
        let Some(Value::String(v)) = values.get(name) else {
            return Err(fail(EXIT_OTHER, format!("the server did not send {name}")));
        };
        c.env(var, v);
    }
    for v in values.values_mut() {
        if let Value::String(s) = v {
            zeroize::Zeroize::zeroize(s);
        }
    }
    // The process becomes CMD: signals reach it directly and its exit
    // status is ours.
    let e = c.exec();
    Err(fail(EXIT_OTHER, format!("cannot run {prog:?}: {e}")))
}

fn list(dir: &DirArg) -> Result<(), Fail> {
    let answer = call(dir, &json!({"op": "list"}))?;
    let v: Value = serde_json::from_str(&answer).unwrap_or_default();
    let list = v["secrets"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("No secrets stored. Add one with `secrets-agent secret set NAME`.");
    }
    for s in list {
        println!(
            "{:<32}  updated {}  released {} time(s){}  {}",
            s["name"].as_str().unwrap_or(""),
            s["updated_at"].as_str().unwrap_or(""),
            s["release_count"],
            s["last_released_at"]
                .as_str()
                .map(|t| format!(", last {t}"))
                .unwrap_or_default(),
            crate::escape(s["description"].as_str().unwrap_or("")),
        );
    }
    Ok(())
}

fn rm(dir: &DirArg, name: &str) -> Result<(), Fail> {
    check_name(name)?;
    call(dir, &json!({"op": "rm", "name": name}))?;
    eprintln!("secret {name} deleted");
    Ok(())
}
