//! Passkey approval keys on the wire, without a browser (SPEC §11): a
//! software WebAuthn authenticator pairs with `approval_key_alg:
//! "webauthn-es256"` and answers approvals with assertion objects; frames
//! are checked against `proto-schemas/`, and each WebAuthn rule is shown to
//! refuse (and change nothing) when broken.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{TestServer, approval_text, recv_until, spawn_request};
use mobile_client_sim::passkey::{
    FLAG_UP as UP, FLAG_UV as UV, SoftPasskey as Passkey, client_data,
};
use mobile_client_sim::{ApprovalAlg, Identity, RawConn, proto};
use serde_json::{Value, json};

fn origin(s: &TestServer) -> String {
    s.handle().state.web_origin.clone()
}

/// The `proto-schemas/` validators (every file in one registry).
fn schema(name: &str) -> jsonschema::Validator {
    const BASE: &str = "https://secrets-agent.dev/proto/";
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-schemas");
    let mut all = Vec::new();
    for dir in ["frames", "actions", "common"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let rel = format!("{dir}/{}", p.file_name().unwrap().to_string_lossy());
            all.push((rel, v));
        }
    }
    let registry = jsonschema::Registry::new()
        .extend(all.iter().map(|(rel, v)| {
            (
                format!("{BASE}{rel}"),
                jsonschema::Resource::from_contents(v.clone()),
            )
        }))
        .unwrap()
        .prepare()
        .unwrap();
    let doc = &all.iter().find(|(r, _)| r == name).unwrap().1;
    jsonschema::options()
        .with_registry(&registry)
        .build(doc)
        .unwrap()
}

#[track_caller]
fn assert_valid(v: &jsonschema::Validator, instance: &Value) {
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{instance}: {errors:?}");
}

/// Sends a `pair` frame with a passkey approval key; `tamper` may change
/// the frame before it is sent. Returns the connection and the answer.
async fn pair(
    s: &TestServer,
    id: &Identity,
    pk: &mut Passkey,
    code: &str,
    assertion_origin: &str,
    tamper: impl FnOnce(&mut Value),
) -> (RawConn, Value) {
    let mut r = s.raw().await;
    let ch = r.recv_frame().await.unwrap();
    let cn = proto::nonce32();
    let msg = proto::pair_string(
        ch["server_key"].as_str().unwrap(),
        ch["nonce"].as_str().unwrap(),
        code,
        &id.public_key_b64(),
        &pk.spki_b64(),
        &cn,
    );
    let mut frame = json!({"type": "pair", "protocol": 1, "code": code, "device_name": "Web browser",
        "device_public_key": id.public_key_b64(), "approval_public_key": pk.spki_b64(),
        "approval_key_alg": "webauthn-es256",
        "webauthn_credential_id": URL_SAFE_NO_PAD.encode(&pk.credential_id),
        "client_nonce": cn, "signature": id.sign_device(&msg),
        "approval_signature": pk.assert(assertion_origin, msg.as_bytes())});
    tamper(&mut frame);
    r.send_json(&frame).await.unwrap();
    let answer = r.recv_frame().await.unwrap();
    (r, answer)
}

/// Sends an approval_response for `req` from the passkey device over `r`;
/// "decided" or the error code.
async fn respond(
    r: &mut RawConn,
    device_id: &str,
    req: &Value,
    decision: &str,
    sig: Value,
) -> String {
    let id = req["approval_id"].as_str().unwrap();
    let frame = json!({"type": "approval_response", "approval_id": id, "device_id": device_id,
                       "decision": decision, "signature": sig});
    r.send_json(&frame).await.unwrap();
    let f = recv_until(r, |f| {
        (f["type"] == "error" || f["type"] == "approval_result") && f["approval_id"] == id
    })
    .await;
    if f["type"] == "error" {
        f["code"].as_str().unwrap().to_string()
    } else {
        "decided".into()
    }
}

/// Waits for the next `approval_request` on a raw connection.
async fn next_request(r: &mut RawConn) -> Value {
    recv_until(r, |f| f["type"] == "approval_request").await
}

fn sign_count(s: &TestServer, device_id: &str) -> i64 {
    let c = rusqlite::Connection::open(s.path().join("agent.db")).unwrap();
    c.query_row(
        "SELECT sign_count FROM devices WHERE device_id = ?1",
        [device_id],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test]
async fn a_passkey_pairs_and_approves_with_schema_valid_frames() {
    let s = TestServer::start().await;
    let id = Identity::generate("web", ApprovalAlg::Ed25519);
    let mut pk = Passkey::new();
    let pair_schema = schema("frames/pair.json");
    let mut sent = Value::Null;
    let code = s.code();
    let (mut r, ok) = pair(&s, &id, &mut pk, &code, &origin(&s), |f| {
        sent = f.clone();
    })
    .await;
    assert_valid(&pair_schema, &sent);
    assert_eq!(ok["type"], "pair_ok", "{ok}");
    assert_eq!(
        sign_count(&s, &id.device_id()),
        1,
        "the pairing assertion's count is kept"
    );

    let (phone, _) = s.phone("Pixel").await;
    let devices = phone.request("list_devices", json!({})).await.unwrap();
    assert_valid(&schema("actions/list_devices.result.json"), &devices);
    assert!(devices.to_string().contains("webauthn-es256"));

    let phone = std::sync::Arc::new(phone);
    let wait = spawn_request(
        &phone,
        "update_config",
        json!({"section": "approvals", "value": {"timeout_secs": 90}}),
    );
    let req = next_request(&mut r).await;
    let sig = pk.assert(&origin(&s), approval_text(&req, "approve").as_bytes());
    let frame = json!({"type": "approval_response", "approval_id": req["approval_id"],
        "device_id": id.device_id(), "decision": "approve", "signature": sig});
    assert_valid(&schema("frames/approval_response.json"), &frame);
    assert_eq!(
        respond(&mut r, &id.device_id(), &req, "approve", sig).await,
        "decided"
    );
    assert_eq!(wait.await.unwrap()["result"], "success");
    assert_eq!(
        sign_count(&s, &id.device_id()),
        2,
        "stored with the decision"
    );
}

#[tokio::test]
async fn each_webauthn_rule_refuses_and_changes_nothing() {
    let s = TestServer::start_with_config("[server]\nallowed_origins = [\"http://localhost:1\"]\n")
        .await;
    let o = origin(&s);
    let id = Identity::generate("web", ApprovalAlg::Ed25519);
    let mut pk = Passkey::new();
    let code = s.code();
    let (mut r, ok) = pair(&s, &id, &mut pk, &code, &o, |_| {}).await;
    assert_eq!(ok["type"], "pair_ok");
    let (phone, _) = s.phone("Pixel").await;
    let phone = std::sync::Arc::new(phone);
    let wait = spawn_request(
        &phone,
        "update_config",
        json!({"section": "approvals", "value": {"timeout_secs": 91}}),
    );
    let req = next_request(&mut r).await;
    let text = approval_text(&req, "approve");
    let dev = id.device_id();
    let before = sign_count(&s, &dev);
    let n = pk.count + 1;
    let good_cd = client_data("webauthn.get", text.as_bytes(), &o);
    let cases = [
        (
            "webauthn.create",
            pk.assert_with(
                &client_data("webauthn.create", text.as_bytes(), &o),
                "localhost",
                UP | UV,
                n,
            ),
        ),
        (
            "another challenge",
            pk.assert_with(
                &client_data("webauthn.get", b"other bytes", &o),
                "localhost",
                UP | UV,
                n,
            ),
        ),
        (
            "an allowed_origins origin",
            pk.assert_with(
                &client_data("webauthn.get", text.as_bytes(), "http://localhost:1"),
                "localhost",
                UP | UV,
                n,
            ),
        ),
        (
            "another rp id",
            pk.assert_with(&good_cd, "example.com", UP | UV, n),
        ),
        ("UV clear", pk.assert_with(&good_cd, "localhost", UP, n)),
        ("UP clear", pk.assert_with(&good_cd, "localhost", UV, n)),
        (
            "crossOrigin true",
            pk.assert_with(
                &{
                    let mut c = good_cd.clone();
                    c["crossOrigin"] = json!(true);
                    c
                },
                "localhost",
                UP | UV,
                n,
            ),
        ),
        (
            "the stored signCount again",
            pk.assert_with(&good_cd, "localhost", UP | UV, before as u32),
        ),
        (
            "another key",
            Passkey::new().assert_with(&good_cd, "localhost", UP | UV, n),
        ),
    ];
    for (what, sig) in cases {
        assert_eq!(
            respond(&mut r, &dev, &req, "approve", sig).await,
            "bad_signature",
            "{what}"
        );
        assert_eq!(
            sign_count(&s, &dev),
            before,
            "{what} changed the stored count"
        );
    }
    // Wrong shapes: invalid_request.
    let mut missing = pk.assert_with(&good_cd, "localhost", UP | UV, n);
    missing.as_object_mut().unwrap().remove("client_data_json");
    assert_eq!(
        respond(&mut r, &dev, &req, "approve", missing).await,
        "invalid_request"
    );
    let raw_bytes = json!(URL_SAFE_NO_PAD.encode([1u8; 64]));
    assert_eq!(
        respond(&mut r, &dev, &req, "approve", raw_bytes).await,
        "invalid_request"
    );
    assert!(!wait.is_finished(), "nothing was decided");

    // A counter-less authenticator (0 every time) is accepted only while
    // the stored count is 0 too: here it is not.
    assert_eq!(
        respond(
            &mut r,
            &dev,
            &req,
            "approve",
            pk.assert_with(&good_cd, "localhost", UP | UV, 0)
        )
        .await,
        "bad_signature"
    );
    // The real thing still decides it.
    let sig = pk.assert(&o, text.as_bytes());
    assert_eq!(respond(&mut r, &dev, &req, "approve", sig).await, "decided");
    assert_eq!(wait.await.unwrap()["result"], "success");
}

#[tokio::test]
async fn a_pairing_assertion_must_verify_and_have_the_right_shape() {
    let s = TestServer::start().await;
    let o = origin(&s);
    let id = Identity::generate("web", ApprovalAlg::Ed25519);
    let mut pk = Passkey::new();
    // Made on another port of localhost: bad_signature.
    let code = s.code();
    let (_, a) = pair(&s, &id, &mut pk, &code, "http://localhost:1", |_| {}).await;
    assert_eq!(
        (a["type"].as_str(), a["code"].as_str()),
        (Some("auth_error"), Some("bad_signature")),
        "{a}"
    );
    // A string where the object belongs, or no credential id: invalid_request.
    let code = s.code();
    let (_, a) = pair(&s, &id, &mut pk, &code, &o, |f| {
        f["approval_signature"] = json!("AAAA")
    })
    .await;
    assert_eq!(a["code"], "invalid_request", "{a}");
    let (_, a) = pair(&s, &id, &mut pk, &code, &o, |f| {
        f.as_object_mut().unwrap().remove("webauthn_credential_id");
    })
    .await;
    assert_eq!(a["code"], "invalid_request", "{a}");
    // A raw P-256 point is not an SPKI.
    let (_, a) = pair(&s, &id, &mut pk, &code, &o, |f| {
        f["approval_public_key"] = json!(URL_SAFE_NO_PAD.encode([4u8; 65]))
    })
    .await;
    assert_eq!(a["code"], "invalid_request", "{a}");
    let (phone, _) = s.phone("Pixel").await;
    let d = phone.request("list_devices", json!({})).await.unwrap();
    assert_eq!(
        d["devices"].as_array().unwrap().len(),
        1,
        "nothing paired: {d}"
    );
    // The real thing pairs with the code still live.
    let (_, ok) = pair(&s, &id, &mut pk, &code, &o, |_| {}).await;
    assert_eq!(ok["type"], "pair_ok", "{ok}");
}
