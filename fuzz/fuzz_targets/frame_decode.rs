//! Fuzz target: decoding of every frame an authenticated session receives.
//! Any input must decode to a request or a reply frame, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secrets_agent::protocol::inbound::{Inbound, decode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match decode(text) {
        Inbound::Reply(frame) => {
            // Every reply is itself valid JSON.
            let _: serde_json::Value = serde_json::from_str(&frame).expect("reply frames are JSON");
        }
        Inbound::Admin { request_id, .. } => assert!(!request_id.is_empty() && request_id.chars().count() <= 128),
        _ => {}
    }
});
