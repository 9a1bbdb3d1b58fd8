//! A load-shaped attack by unauthenticated peers (issue 10): 6,000 failing
//! handshakes from 6,000 loopback addresses while the owner authenticates
//! every 200 ms. The owner is never refused; the latencies it saw are
//! printed (for the README's numbers run it in release:
//! `cargo test --release --test attack_flood -- --nocapture`).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::TestServer;
use mobile_client_sim::client;
use mobile_client_sim::{ApprovalAlg, Identity, RawConn, proto};
use serde_json::json;

const ATTACKERS: u32 = 6_000;
const CONCURRENCY: u32 = 8;

/// The `i`th attacking address: 127.10.x.y.
fn attacker(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 10, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// One failing handshake: an `auth` frame for a device that is not paired.
async fn fail_once(url: &str, from: IpAddr, stranger: &Identity) -> Option<String> {
    let mut c = RawConn::connect_from(url, None, Some(from)).await.ok()?;
    let ch = c.recv_frame().await.ok()?;
    let (key, nonce, ts) = (
        ch["server_key"].as_str()?.to_string(),
        ch["nonce"].as_str()?.to_string(),
        ch["ts"].as_i64()?,
    );
    let cn = proto::nonce32();
    let msg = proto::auth_string(&key, &nonce, &stranger.device_id(), &cn, ts);
    c.send_json(
        &json!({"type": "auth", "protocol": 1, "device_id": stranger.device_id(), "nonce": nonce,
                        "client_nonce": cn, "ts": ts, "signature": stranger.sign_device(&msg)}),
    )
    .await
    .ok()?;
    let f = c.recv_frame().await.ok()?;
    f["code"].as_str().map(String::from)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_thousand_failing_addresses_never_keep_the_owner_out() {
    let s = TestServer::start().await;
    let (_c, owner) = s.phone("owner").await;
    let url = s.url.clone();
    let next = Arc::new(AtomicUsize::new(0));
    let refused_as_expected = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (url, next, ok) = (url.clone(), next.clone(), refused_as_expected.clone());
        workers.push(tokio::spawn(async move {
            let stranger = Identity::generate("stranger", ApprovalAlg::Ed25519);
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst) as u32;
                if i >= ATTACKERS {
                    return;
                }
                if fail_once(&url, attacker(i), &stranger).await.as_deref()
                    == Some("unknown_device")
                {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // The owner, from its own address, every 200 ms until the flood ends.
    let owner_task = {
        let (ep, done) = (s.endpoint(), done.clone());
        tokio::spawn(async move {
            let mut times = Vec::new();
            let mut refusals = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let t = Instant::now();
                match client::auth(&ep, &owner).await {
                    Ok((c, _)) => {
                        times.push(t.elapsed());
                        c.close().await;
                    }
                    Err(e) => refusals.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (times, refusals)
        })
    };
    for w in workers {
        w.await.unwrap();
    }
    let flood = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let (mut times, refusals) = owner_task.await.unwrap();
    assert!(refusals.is_empty(), "the owner was refused: {refusals:?}");
    assert!(times.len() >= 3, "the owner authenticated during the flood");
    assert_eq!(
        refused_as_expected.load(Ordering::SeqCst),
        ATTACKERS as usize,
        "every attacker got its refusal"
    );
    times.sort();
    eprintln!(
        "flood: {ATTACKERS} failing handshakes from {ATTACKERS} addresses in {flood:.2?} ({:.0}/s); \
         owner: {} authentications, p50 {:.1?}, p90 {:.1?}, max {:.1?}",
        ATTACKERS as f64 / flood.as_secs_f64(),
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        times.last().unwrap(),
    );
    assert!(
        s.handle().state.limiter.tracked() <= secrets_agent::auth::ratelimit::MAX_TRACKED,
        "the limiter stays bounded"
    );
}
