//! `cargo bench --bench secrets`: the secret release round trip (a request
//! on `agent.sock` → `approval_request` to a simulated phone on loopback →
//! its signed approval → the value back on the socket), a lease hit (no
//! phone involved), and, next to them, the plain admin round trip
//! (`list_secrets` over the phone's WebSocket session), p50/p99.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mobile_client_sim::client::{self, Endpoint};
use mobile_client_sim::{ApprovalAlg, Identity};
use secrets_agent::secrets::SecretValue;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn pct(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((xs.len() as f64 - 1.0) * p).round() as usize]
}

async fn release(sock: &std::path::Path, requester: &str, lease: u64) -> Value {
    let s = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (rd, mut wr) = s.into_split();
    let req = json!({"op": "release", "names": ["BENCH"], "reason": "bench", "lease_secs": lease, "requester": requester});
    wr.write_all(format!("{req}\n").as_bytes()).await.unwrap();
    let mut lines = BufReader::new(rd).lines();
    loop {
        let v: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        if v["type"] != "pending" {
            return v;
        }
    }
}

fn report(name: &str, xs: &mut [f64]) {
    let (p50, p99) = (pct(xs, 0.5), pct(xs, 0.99));
    println!(
        "{name:<44} n={:<5} p50 {p50:>8.3} ms   p99 {p99:>8.3} ms",
        xs.len()
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let h = secrets_agent::start(secrets_agent::Options {
            data_dir: dir.path().to_path_buf(),
            listen: Some("127.0.0.1:0".into()),
            print_pairing_code: false,
        })
        .await
        .unwrap();
        let st = h.state.clone();
        let code = secrets_agent::auth::pairing::create_offer(
            &st.db,
            st.clock.now_ms(),
            300,
            &st.key,
            h.url.clone(),
        )
        .unwrap()
        .code;
        let mut id = Identity::generate("bench phone", ApprovalAlg::Ed25519);
        let (phone, _) = client::pair(
            &Endpoint::new(h.url.clone()),
            &mut id,
            &code,
            Some(st.key.public_b64()),
        )
        .await
        .unwrap();
        let phone = Arc::new(phone);
        st.secrets
            .set("BENCH", SecretValue::new("x".repeat(40)), None)
            .await
            .unwrap();
        // The phone approves every request as it arrives.
        let approver = {
            let (phone, id) = (phone.clone(), id.clone());
            tokio::spawn(async move {
                while let Ok(req) = phone
                    .wait_event(Duration::from_secs(3600), |f| {
                        f["type"] == "approval_request"
                    })
                    .await
                {
                    phone.answer_approval(&id, &req, "approve").await.unwrap();
                }
            })
        };
        let sock = dir.path().join("agent.sock");
        let n = 300;
        for _ in 0..20 {
            release(&sock, "warmup", 0).await;
        }
        let mut xs = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let v = release(&sock, "bench", 0).await;
            xs.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(v["type"], "ok", "{v}");
        }
        report("release round trip (phone approves)", &mut xs);

        release(&sock, "leased", 3600).await;
        let mut xs = Vec::with_capacity(n * 4);
        for _ in 0..n * 4 {
            let t = Instant::now();
            let v = release(&sock, "leased", 0).await;
            xs.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(v["lease_id"].is_string(), "{v}");
        }
        report("release under a lease (no prompt)", &mut xs);

        let mut xs = Vec::with_capacity(n * 4);
        for _ in 0..n * 4 {
            let t = Instant::now();
            let v = phone.request("list_secrets", json!({})).await.unwrap();
            xs.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(v["result"], "secrets");
        }
        report("plain admin round trip (list_secrets)", &mut xs);
        approver.abort();
        h.shutdown().await;
    });
}
