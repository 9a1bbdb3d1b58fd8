//! Plugins and skills: discovery, toggles, reload (SPEC §3, §6).

mod common;

use common::{TestServer, assert_error, write_file};
use serde_json::json;

fn seed(dir: &std::path::Path) {
    write_file(
        dir,
        "plugins/hello/plugin.toml",
        "name = \"hello-plugin\"\nversion = 1.0\nplugin_type = \"tool\"\ncapabilities = [\"greet\"]\ndescription = \"Says hello\"\n",
    );
    write_file(
        dir,
        "plugins/nightly/plugin.toml",
        "name = \"nightly-report\"\nversion = \"2.1.0\"\nplugin_type = \"task_handler\"\ncapabilities = [\"report\"]\ncommand = [\"/bin/true\"]\n",
    );
    write_file(
        dir,
        "plugins/zz-broken/plugin.toml",
        "name = \"broken\"\nversion = \"1\nplugin_type = ",
    );
    write_file(
        dir,
        "skills/web-search/SKILL.md",
        "---\nname: Web search\ndescription: Looks things up on the web\nversion: 1.0\ntriggers:\n  - search\n  - look up\n---\n# Web search\nUse the browser tool.\n",
    );
    write_file(
        dir,
        "skills/notes/SKILL.md",
        "---\nname: Notes\ndescription: Keeps notes\n---\nBody\n",
    );
    write_file(dir, "skills/bad/SKILL.md", "---\nname: [unclosed\n---\n");
}

async fn seeded() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    TestServer::start_in_dir(dir).await
}

#[tokio::test]
async fn two_valid_plugins_one_broken() {
    let mut s = seeded().await;
    let (c, _) = s.phone("p").await;
    let list = c.request("list_plugins", json!({})).await.unwrap();
    assert_eq!(list["result"], "plugins", "{list}");
    assert_eq!(
        list["plugins"],
        json!([
            {"name": "hello-plugin", "version": "1.0", "plugin_type": "tool", "capabilities": ["greet"], "enabled": true},
            {"name": "nightly-report", "version": "2.1.0", "plugin_type": "task_handler", "capabilities": ["report"], "enabled": true},
        ])
    );
    let dash = c.request("get_dashboard", json!({})).await.unwrap();
    assert_eq!(dash["plugin_count"], 2);
    assert_eq!(dash["skill_count"], 2);

    let r = c.request("reload_plugins", json!({})).await.unwrap();
    assert_eq!(r["result"], "plugins_reloaded");
    assert_eq!(r["loaded"], 2);
    let failed = r["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["path"], "plugins/zz-broken/plugin.toml");
    assert!(!failed[0]["error"].as_str().unwrap().is_empty());

    let t = c
        .request(
            "toggle_plugin",
            json!({"name": "hello-plugin", "enabled": false}),
        )
        .await
        .unwrap();
    assert_eq!(
        t,
        json!({"result": "success", "message": "Plugin 'hello-plugin' disabled"})
    );
    assert_error(
        &c.request("toggle_plugin", json!({"name": "nope", "enabled": false}))
            .await
            .unwrap(),
        "not_found",
    );
    assert_error(
        &c.request("toggle_plugin", json!({"name": "hello-plugin"}))
            .await
            .unwrap(),
        "invalid_request",
    );
    assert_error(
        &c.request(
            "toggle_plugin",
            json!({"name": "hello-plugin", "enabled": "no"}),
        )
        .await
        .unwrap(),
        "invalid_request",
    );

    // A duplicate name and a newly fixed manifest, picked up by reload.
    write_file(
        s.path(),
        "plugins/hello2/plugin.toml",
        "name = \"hello-plugin\"\nversion = \"9\"\nplugin_type = \"tool\"\ncapabilities = []\n",
    );
    write_file(
        s.path(),
        "plugins/zz-broken/plugin.toml",
        "name = \"fixed\"\nversion = \"1\"\nplugin_type = \"tool\"\ncapabilities = []\n",
    );
    let r = c.request("reload_plugins", json!({})).await.unwrap();
    assert_eq!(r["loaded"], 3);
    assert_eq!(r["failed"][0]["path"], "plugins/hello2/plugin.toml");
    assert!(
        r["failed"][0]["error"]
            .as_str()
            .unwrap()
            .contains("duplicate")
    );

    s.restart().await;
    let (c, _) = s.phone("q").await;
    let list = c.request("list_plugins", json!({})).await.unwrap();
    let hello = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "hello-plugin")
        .unwrap()
        .clone();
    assert_eq!(hello["enabled"], false, "the toggle survived the restart");
    assert_eq!(hello["version"], "1.0", "the first folder wins");
}

#[tokio::test]
async fn skills_from_front_matter_and_a_broken_one_reported() {
    let mut s = seeded().await;
    let (c, _) = s.phone("p").await;
    let list = c.request("list_skills", json!({})).await.unwrap();
    assert_eq!(list["result"], "skills");
    assert_eq!(
        list["skills"],
        json!([
            {"id": "notes", "name": "Notes", "description": "Keeps notes", "version": null, "triggers": [], "enabled": true},
            {"id": "web-search", "name": "Web search", "description": "Looks things up on the web", "version": "1.0", "triggers": ["search", "look up"], "enabled": true},
        ])
    );
    assert_eq!(list["failed"][0]["path"], "skills/bad/SKILL.md");
    let t = c
        .request("toggle_skill", json!({"id": "notes", "enabled": false}))
        .await
        .unwrap();
    assert_eq!(t["result"], "success");
    assert_error(
        &c.request("toggle_skill", json!({"id": "ghost", "enabled": true}))
            .await
            .unwrap(),
        "not_found",
    );
    s.restart().await;
    let (c, _) = s.phone("q").await;
    let list = c.request("list_skills", json!({})).await.unwrap();
    assert_eq!(list["skills"][0]["enabled"], false);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn the_shipped_examples_load() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(examples.join("config.toml"), dir.path().join("config.toml")).unwrap();
    copy_dir(&examples.join("plugins"), &dir.path().join("plugins"));
    copy_dir(&examples.join("skills"), &dir.path().join("skills"));
    let s = TestServer::start_in_dir(dir).await;
    let (c, _) = s.phone("p").await;
    let r = c.request("reload_plugins", json!({})).await.unwrap();
    assert_eq!(r["loaded"], 2, "{r}");
    assert_eq!(r["failed"], json!([]));
    let skills = c.request("list_skills", json!({})).await.unwrap();
    assert_eq!(skills["skills"][0]["id"], "web-search");
    assert_eq!(skills["failed"], json!([]));
}
