//! proto-schemas/ is kept true: every frame the server sends in a scenario
//! covering every action validates against its schema, every registered
//! action has a params and a result schema, and no schema names an action
//! the server does not have.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::{TestServer, auth_frame, pair_frame};
use jsonschema::{Registry, Resource, Validator};
use mobile_client_sim::client::approval_response;
use mobile_client_sim::{ApprovalAlg, Identity, RawConn};
use secrets_agent::secrets::{Requester, SecretValue};
use serde_json::{Value, json};

const BASE: &str = "https://secrets-agent.dev/proto/";

fn schema_files() -> Vec<(String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-schemas");
    let mut out = Vec::new();
    for dir in ["frames", "actions", "common"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let rel = format!("{dir}/{}", f.file_name().unwrap().to_string_lossy());
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
                .unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert_eq!(
                v["$id"],
                format!("{BASE}{rel}"),
                "{rel} has the $id of its path"
            );
            assert_eq!(
                v["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{rel}"
            );
            out.push((rel, v));
        }
    }
    out
}

struct Schemas {
    validators: HashMap<String, Validator>,
}

impl Schemas {
    fn load() -> Schemas {
        let files = schema_files();
        let registry = Registry::new()
            .extend(
                files
                    .iter()
                    .map(|(rel, v)| (format!("{BASE}{rel}"), Resource::from_contents(v.clone()))),
            )
            .unwrap()
            .prepare()
            .unwrap();
        let validators = files
            .iter()
            .map(|(rel, v)| {
                let val = jsonschema::options()
                    .with_registry(&registry)
                    .build(v)
                    .unwrap_or_else(|e| panic!("{rel}: {e}"));
                (rel.clone(), val)
            })
            .collect();
        Schemas { validators }
    }

    #[track_caller]
    fn check(&self, schema: &str, instance: &Value) {
        let v = self
            .validators
            .get(schema)
            .unwrap_or_else(|| panic!("no schema {schema} for {instance}"));
        let errors: Vec<String> = v
            .iter_errors(instance)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{instance}\ndoes not match {schema}:\n{}",
            errors.join("\n")
        );
    }

    /// Validates a server frame; for admin responses also the payload
    /// against the action's result schema.
    fn check_frame(&self, f: &Value, action_of: &HashMap<String, String>) {
        if f.get("jsonrpc").is_some() {
            self.check("frames/jsonrpc_response.json", f);
            if let (Some(r), Some(a)) =
                (f.get("result"), action_of.get(&format!("rpc:{}", f["id"])))
            {
                self.check(&format!("actions/{a}.result.json"), r);
            }
            return;
        }
        let t = f["type"]
            .as_str()
            .unwrap_or_else(|| panic!("frame without type: {f}"));
        self.check(&format!("frames/{t}.json"), f);
        if t == "admin_response" {
            let p = &f["payload"];
            if p["result"] == "error" {
                self.check("common/error_payload.json", p);
            } else {
                let a = &action_of[f["request_id"].as_str().unwrap()];
                self.check(&format!("actions/{a}.result.json"), p);
            }
        }
    }
}

/// Sample params for every action (success case). A new action without a
/// sample fails the test.
fn samples(
    device_to_revoke: &str,
    memory_to_delete: &str,
    lease_to_revoke: &str,
) -> HashMap<&'static str, Value> {
    HashMap::from([
        ("get_dashboard", json!({})),
        ("get_config", json!({})),
        ("list_devices", json!({})),
        ("list_approvals", json!({})),
        ("revoke_device", json!({"device_id": device_to_revoke})),
        ("delete_memory", json!({"id": memory_to_delete})),
        (
            "update_config",
            json!({"section": "llm", "value": {"model": "m2", "api_key": "sk-x"}}),
        ),
        ("list_plugins", json!({})),
        (
            "toggle_plugin",
            json!({"name": "hello-plugin", "enabled": false}),
        ),
        ("reload_plugins", json!({})),
        ("list_skills", json!({})),
        ("toggle_skill", json!({"id": "web", "enabled": false})),
        (
            "create_memory",
            json!({"content": "OAuth2 with PKCE", "tags": ["auth"], "confidence": "high"}),
        ),
        ("list_memories", json!({"page": 1, "per_page": 10})),
        ("list_scheduled_tasks", json!({})),
        ("toggle_task", json!({"name": "nightly", "enabled": true})),
        ("trigger_task", json!({"name": "nightly"})),
        (
            "list_task_executions",
            json!({"task_name": "nightly", "limit": 5}),
        ),
        (
            "search_memories",
            json!({"query": "authentication", "limit": 3}),
        ),
        ("list_secrets", json!({})),
        (
            "set_secret",
            json!({"name": "DEMO", "value": "s3cr3t ü", "description": "demo"}),
        ),
        ("delete_secret", json!({"name": "OLD"})),
        ("reveal_secret", json!({"name": "DEMO"})),
        ("list_secret_leases", json!({})),
        ("revoke_secret_lease", json!({"lease_id": lease_to_revoke})),
    ])
}

const GATED: &[&str] = &[
    "revoke_device",
    "update_config",
    "delete_memory",
    "set_secret",
    "delete_secret",
    "reveal_secret",
];

#[tokio::test]
async fn schemas_cover_exactly_the_registered_actions() {
    let s = TestServer::start().await;
    let registered: BTreeSet<String> = s.handle().actions.iter().map(|a| a.to_string()).collect();
    let mut with_params = BTreeSet::new();
    let mut with_result = BTreeSet::new();
    for (rel, _) in schema_files() {
        if let Some(name) = rel.strip_prefix("actions/") {
            if let Some(a) = name.strip_suffix(".params.json") {
                with_params.insert(a.to_string());
            } else if let Some(a) = name.strip_suffix(".result.json") {
                with_result.insert(a.to_string());
            } else {
                panic!("unexpected file {rel}");
            }
        }
    }
    assert_eq!(
        with_params, registered,
        "params schemas vs registered actions"
    );
    assert_eq!(
        with_result, registered,
        "result schemas vs registered actions"
    );
}

#[tokio::test]
async fn every_frame_in_a_full_scenario_matches_its_schema() {
    let schemas = Schemas::load();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins/hello")).unwrap();
    std::fs::write(dir.path().join("plugins/hello/plugin.toml"), "name = \"hello-plugin\"\nversion = \"1.0\"\nplugin_type = \"tool\"\ncapabilities = [\"greet\"]\n").unwrap();
    std::fs::create_dir_all(dir.path().join("skills/web")).unwrap();
    std::fs::write(
        dir.path().join("skills/web/SKILL.md"),
        "---\nname: Web\ndescription: d\nversion: 1.0\n---\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("plugins/broken")).unwrap();
    std::fs::write(dir.path().join("plugins/broken/plugin.toml"), "name = ").unwrap();
    let tasks = "[[tasks]]\nname = \"nightly\"\ncron = \"0 3 * * *\"\nhandler = \"builtin\"\nbuiltin = \"prune-executions\"\n";
    std::fs::write(
        dir.path().join("config.toml"),
        format!("{}\n{tasks}", common::model_config()),
    )
    .unwrap();
    let s = TestServer::start_in_dir(dir).await;
    let (victim, vid) = s.phone("victim").await;
    let mem = victim
        .request("create_memory", json!({"content": "to be deleted"}))
        .await
        .unwrap();
    let mem_id = mem["entry"]["id"].as_str().unwrap().to_string();

    // Pair over a raw connection so every frame is seen.
    let id = Identity::generate("schema phone", ApprovalAlg::Es256);
    let mut r = s.raw().await;
    let ch = r.recv_frame().await.unwrap();
    schemas.check("frames/challenge.json", &ch);
    let (key, nonce) = (
        ch["server_key"].as_str().unwrap(),
        ch["nonce"].as_str().unwrap(),
    );
    let pair = pair_frame(&id, key, nonce, &s.code());
    assert_eq!(pair["approval_key_alg"], "es256");
    schemas.check("frames/pair.json", &pair);
    r.send_json(&pair).await.unwrap();
    let ok = r.recv_frame().await.unwrap();
    schemas.check("frames/pair_ok.json", &ok);

    let mut action_of: HashMap<String, String> = HashMap::new();
    let mut n = 0;
    let registered: Vec<&str> = s.handle().actions.clone();
    // Secrets for delete/reveal, and a lease to revoke.
    let st = &s.handle().state;
    for name in ["DEMO", "OLD"] {
        st.secrets
            .set(name, SecretValue::new("v1".into()), None)
            .await
            .unwrap();
    }
    let lease = st
        .secrets
        .open_lease(
            &["DEMO".to_string()],
            &Requester::task("nightly"),
            "schema sample",
            60,
            "apr_sample",
            None,
        )
        .await
        .unwrap();
    let samples = samples(&vid.device_id(), &mem_id, &lease);
    for action in &registered {
        let params = samples
            .get(action)
            .unwrap_or_else(|| panic!("add a sample for action {action}"))
            .clone();
        schemas.check(&format!("actions/{action}.params.json"), &params);
        n += 1;
        let rid = format!("q{n}");
        action_of.insert(rid.clone(), action.to_string());
        let mut payload = params.as_object().unwrap().clone();
        payload.insert("action".into(), json!(action));
        let frame = json!({"type": "admin", "request_id": rid, "payload": payload});
        schemas.check("frames/admin.json", &frame);
        r.send_json(&frame).await.unwrap();
        loop {
            let f = r.recv_frame().await.unwrap();
            schemas.check_frame(&f, &action_of);
            if f["type"] == "approval_request" {
                assert!(GATED.contains(action), "{action} asked for approval");
                let resp = approval_response(&id, &f, "approve");
                schemas.check("frames/approval_response.json", &resp);
                r.send_json(&resp).await.unwrap();
            }
            if f["type"] == "admin_response" {
                assert_eq!(f["request_id"], rid);
                assert_ne!(
                    f["payload"]["result"], "error",
                    "{action} with its sample params: {f}"
                );
                break;
            }
        }
        // JSON-RPC codec too, for read-only actions.
        if !GATED.contains(action) {
            let req = json!({"jsonrpc": "2.0", "id": n, "method": action, "params": params});
            schemas.check("frames/jsonrpc_request.json", &req);
            action_of.insert(format!("rpc:{n}"), action.to_string());
            r.send_json(&req).await.unwrap();
            let f = r.recv_frame().await.unwrap();
            schemas.check_frame(&f, &action_of);
        }
    }
    // Error shapes.
    r.send_text("{bad").await.unwrap();
    schemas.check_frame(&r.recv_frame().await.unwrap(), &action_of);
    r.send_json(&json!({"type": "admin", "request_id": "e1", "payload": {"action": "nope"}}))
        .await
        .unwrap();
    schemas.check_frame(&r.recv_frame().await.unwrap(), &action_of);
    r.send_json(&json!({"jsonrpc": "2.0", "id": "e2", "method": "nope"}))
        .await
        .unwrap();
    schemas.check_frame(&r.recv_frame().await.unwrap(), &action_of);
    r.send_json(&json!({"type": "approval_response", "approval_id": "x", "device_id": id.device_id(), "decision": "approve", "signature": "AA"})).await.unwrap();
    schemas.check_frame(&r.recv_frame().await.unwrap(), &action_of);

    // Handshake failures.
    let mut bad = RawConn::connect(&s.url).await.unwrap();
    let _ = bad.recv_frame().await.unwrap();
    bad.send_text("{}").await.unwrap();
    schemas.check_frame(&bad.recv_frame().await.unwrap(), &action_of);
    // auth + auth_ok
    let mut a = RawConn::connect(&s.url).await.unwrap();
    let ch = a.recv_frame().await.unwrap();
    let auth = auth_frame(
        &id,
        ch["server_key"].as_str().unwrap(),
        ch["nonce"].as_str().unwrap(),
        ch["ts"].as_i64().unwrap(),
    );
    schemas.check("frames/auth.json", &auth);
    a.send_json(&auth).await.unwrap();
    schemas.check("frames/auth_ok.json", &a.recv_frame().await.unwrap());
}
