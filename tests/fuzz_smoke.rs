//! A short, seeded fuzz run for CI (the long, coverage-guided runs use
//! `cargo fuzz`, see README): mutated frames through the session decoder and
//! random params through every action's params parsing. Nothing panics;
//! every reply is JSON; every params error is `invalid_request`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrets_agent::protocol::ErrorCode;
use secrets_agent::protocol::inbound::{Inbound, decode};
use serde_json::{Value, json};

const SEEDS: &[&str] = &[
    r#"{"type":"admin","request_id":"1","payload":{"action":"get_dashboard"}}"#,
    r#"{"type":"admin","request_id":"x","payload":{"action":"toggle_plugin","name":"a","enabled":true}}"#,
    r#"{"jsonrpc":"2.0","id":1,"method":"update_config","params":{"section":"llm","value":{"model":"m"}}}"#,
    r#"{"type":"approval_response","approval_id":"apr_1","device_id":"00","decision":"approve","signature":"AA"}"#,
    r#"[{"jsonrpc":"2.0","id":1,"method":"x"}]"#,
];

fn random_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.gen_range(0..if depth > 4 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.r#gen::<bool>()),
        2 => json!(rng.r#gen::<i64>()),
        3 => json!(rng.r#gen::<f64>() * 1e6),
        4 => {
            let n = rng.gen_range(0..40);
            json!(
                (0..n)
                    .map(|_| rng.gen_range(0x20u8..0x7f) as char)
                    .collect::<String>()
            )
        }
        5 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "name",
                "enabled",
                "id",
                "section",
                "value",
                "device_id",
                "page",
                "per_page",
                "query",
                "limit",
                "model",
                "x",
            ];
            let mut m = serde_json::Map::new();
            for _ in 0..rng.gen_range(0..5) {
                m.insert(
                    keys[rng.gen_range(0..keys.len())].to_string(),
                    random_value(rng, depth + 1),
                );
            }
            Value::Object(m)
        }
    }
}

fn mutate(rng: &mut StdRng, s: &str) -> String {
    let mut b = s.as_bytes().to_vec();
    for _ in 0..rng.gen_range(1..6) {
        if b.is_empty() {
            break;
        }
        let i = rng.gen_range(0..b.len());
        match rng.gen_range(0..4) {
            0 => b[i] = rng.r#gen(),
            1 => b.truncate(i),
            2 => b.insert(i, b"{}[]\",:\\"[rng.gen_range(0..8)]),
            _ => {
                b.remove(i);
            }
        }
    }
    String::from_utf8_lossy(&b).to_string()
}

#[test]
fn decoder_survives_mutated_frames() {
    let mut rng = StdRng::seed_from_u64(0x5ec7e75);
    let mut runs = 0;
    for round in 0..60_000 {
        let seed = SEEDS[round % SEEDS.len()];
        let input = if round % 3 == 0 {
            random_value(&mut rng, 0).to_string()
        } else {
            mutate(&mut rng, seed)
        };
        match decode(&input) {
            Inbound::Reply(frame) => {
                let v: Value = serde_json::from_str(&frame)
                    .unwrap_or_else(|e| panic!("reply to {input:?} is not JSON: {e}"));
                assert!(v.get("type").is_some() || v.get("jsonrpc").is_some());
            }
            Inbound::Admin { request_id, .. } => {
                assert!((1..=128).contains(&request_id.chars().count()))
            }
            _ => {}
        }
        runs += 1;
    }
    assert_eq!(runs, 60_000);
}

#[tokio::test]
async fn params_parsing_of_every_action_survives_random_params() {
    let dir = tempfile::tempdir().unwrap();
    let state = secrets_agent::server::test_state(dir.path());
    let registry = secrets_agent::handlers::registry(state);
    let names = registry.action_names();
    assert!(names.len() >= 10);
    let mut rng = StdRng::seed_from_u64(42);
    let mut accepted = 0;
    for i in 0..40_000 {
        let action = names[i % names.len()];
        let params = if rng.gen_range(0..4) == 0 {
            mutate(&mut rng, "{\"name\":\"x\",\"enabled\":true}")
        } else {
            random_value(&mut rng, 0).to_string()
        };
        match registry.check_params(action, Some(&params)) {
            Ok(()) => accepted += 1,
            Err(e) => assert_eq!(e.code, ErrorCode::InvalidRequest, "{action} {params}: {e}"),
        }
    }
    assert!(
        accepted > 0,
        "some random params are valid (e.g. {{}} for list actions)"
    );
    assert_eq!(
        registry
            .check_params("no_such_action", None)
            .unwrap_err()
            .code,
        ErrorCode::UnknownAction
    );
}
