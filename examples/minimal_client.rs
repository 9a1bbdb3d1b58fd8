//! A minimal phone in Rust, using the simulator's client library: pair with
//! a code, then ask for the dashboard.
//!
//! ```sh
//! secrets-agent pair --json        # gives code, server_key and url
//! cargo run --example minimal_client -- ws://127.0.0.1:7420/ws CODE SERVER_KEY
//! ```

use mobile_client_sim::client::{self, Endpoint};
use mobile_client_sim::{ApprovalAlg, Identity};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, code, server_key] = args.as_slice() else {
        anyhow::bail!(
            "usage: minimal_client URL CODE SERVER_KEY (from `secrets-agent pair --json`)"
        );
    };
    // A new phone: an Ed25519 device key and an approval key.
    let mut phone = Identity::generate("minimal client", ApprovalAlg::Ed25519);
    // Pairing checks that the server's key is the one the owner was shown,
    // and verifies the server's signature (mutual authentication).
    let (session, connected) = client::pair(
        &Endpoint::new(url.as_str()),
        &mut phone,
        code,
        Some(server_key),
    )
    .await?;
    println!("paired as {}", connected.device_id);
    let dashboard = session.request("get_dashboard", json!({})).await?;
    println!("{}", serde_json::to_string_pretty(&dashboard)?);
    Ok(())
}
