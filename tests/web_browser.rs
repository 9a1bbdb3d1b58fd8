//! The web companion in a real browser (SPEC §11): headless Chromium driven
//! over the DevTools protocol, with a virtual WebAuthn authenticator
//! (platform, user verification on), against a real server on
//! `localhost:PORT`. The page pairs, administers, and approves or denies
//! with its passkey; forged and replayed assertions are refused.
//!
//! Chromium comes from the Debian package `chromium` (`scripts/test.sh`
//! installs it when missing); without it every test here says SKIPPED and
//! passes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::{TestServer, approval_text, spawn_request};
use mobile_client_sim::Client;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A small DevTools-protocol client over one WebSocket (flattened sessions).
mod cdp {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use serde_json::{Value, json};
    use tokio::io::AsyncBufReadExt;
    use tokio::sync::{mpsc, oneshot};
    use tokio_tungstenite::tungstenite::Message;

    type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

    pub struct Browser {
        /// One browser at a time on this machine (see `browser_with`).
        _turn: tokio::sync::MutexGuard<'static, ()>,
        _child: tokio::process::Child,
        _profile: tempfile::TempDir,
        out: mpsc::UnboundedSender<String>,
        waiters: Waiters,
        next: AtomicU64,
        /// Page errors and console output, for failure messages.
        pub log: Arc<Mutex<Vec<String>>>,
    }

    /// The Chromium binary, if installed.
    pub fn chromium() -> Option<std::path::PathBuf> {
        // CHROMIUM names the binary; a path that does not exist skips the tests.
        if let Ok(p) = std::env::var("CHROMIUM") {
            let p = std::path::PathBuf::from(p);
            return p.is_file().then_some(p);
        }
        [
            "/usr/bin/chromium",
            "/usr/bin/chromium-browser",
            "/usr/bin/google-chrome",
        ]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
    }

    impl Browser {
        pub async fn launch(
            bin: &std::path::Path,
            extra: &[&str],
            turn: tokio::sync::MutexGuard<'static, ()>,
        ) -> Browser {
            let profile = tempfile::tempdir().unwrap();
            let mut child = tokio::process::Command::new(bin)
                .args([
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--remote-debugging-port=0",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--disable-dev-shm-usage",
                ])
                .args(extra)
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("start chromium");
            // Chromium says where its DevTools endpoint is on stderr.
            let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
            let url = tokio::time::timeout(Duration::from_secs(60), async {
                while let Some(l) = lines.next_line().await.unwrap() {
                    if let Some(u) = l.strip_prefix("DevTools listening on ") {
                        return u.trim().to_string();
                    }
                }
                panic!("chromium exited without a DevTools endpoint");
            })
            .await
            .expect("chromium starts within 60 s");
            // Keep draining stderr so Chromium never blocks on it.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .unwrap();
            let (mut sink, mut stream) = ws.split();
            let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
            tokio::spawn(async move {
                while let Some(m) = out_rx.recv().await {
                    if sink.send(Message::text(m)).await.is_err() {
                        break;
                    }
                }
            });
            let waiters: Waiters = Arc::default();
            let log: Arc<Mutex<Vec<String>>> = Arc::default();
            let (w2, log2) = (waiters.clone(), log.clone());
            tokio::spawn(async move {
                while let Some(Ok(m)) = stream.next().await {
                    let Message::Text(t) = m else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                        continue;
                    };
                    if let Some(id) = v["id"].as_u64() {
                        if let Some(w) = w2.lock().unwrap().remove(&id) {
                            let _ = w.send(v);
                        }
                    } else if v["method"] == "Runtime.exceptionThrown" {
                        log2.lock()
                            .unwrap()
                            .push(format!("exception: {}", v["params"]["exceptionDetails"]));
                    } else if v["method"] == "Runtime.consoleAPICalled" {
                        let args: Vec<String> = v["params"]["args"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|a| a["value"].to_string())
                            .collect();
                        log2.lock().unwrap().push(format!(
                            "console.{}: {}",
                            v["params"]["type"],
                            args.join(" ")
                        ));
                    }
                }
            });
            Browser {
                _turn: turn,
                _child: child,
                _profile: profile,
                out,
                waiters,
                next: AtomicU64::new(1),
                log,
            }
        }

        /// Sends a command (on a page session, if given) and waits for its result.
        pub async fn call(
            &self,
            session: Option<&str>,
            method: &str,
            params: Value,
        ) -> Result<Value, String> {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let mut msg = json!({"id": id, "method": method, "params": params});
            if let Some(s) = session {
                msg["sessionId"] = json!(s);
            }
            let (tx, rx) = oneshot::channel();
            self.waiters.lock().unwrap().insert(id, tx);
            self.out
                .send(msg.to_string())
                .map_err(|_| "browser gone".to_string())?;
            let v = tokio::time::timeout(Duration::from_secs(60), rx)
                .await
                .map_err(|_| format!("{method}: no answer in 60 s"))?
                .map_err(|_| "browser gone".to_string())?;
            if v.get("error").is_some() {
                return Err(format!("{method}: {}", v["error"]));
            }
            Ok(v["result"].clone())
        }

        /// A new tab with its own session.
        pub async fn page(self: &Arc<Self>) -> Page {
            let t = self
                .call(None, "Target.createTarget", json!({"url": "about:blank"}))
                .await
                .unwrap();
            let target = t["targetId"].as_str().unwrap().to_string();
            let a = self
                .call(
                    None,
                    "Target.attachToTarget",
                    json!({"targetId": target, "flatten": true}),
                )
                .await
                .unwrap();
            let page = Page {
                browser: self.clone(),
                session: a["sessionId"].as_str().unwrap().to_string(),
            };
            page.cmd("Page.enable", json!({})).await;
            page.cmd("Runtime.enable", json!({})).await;
            page
        }
    }

    pub struct Page {
        pub browser: Arc<Browser>,
        session: String,
    }

    impl Page {
        pub async fn try_cmd(&self, method: &str, params: Value) -> Result<Value, String> {
            self.browser.call(Some(&self.session), method, params).await
        }

        pub async fn cmd(&self, method: &str, params: Value) -> Value {
            self.try_cmd(method, params)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }

        /// Runs `js` in the page (promises awaited); its value, or the exception text.
        pub async fn try_eval(&self, js: &str) -> Result<Value, String> {
            let r = self
                .try_cmd(
                    "Runtime.evaluate",
                    json!({"expression": js, "awaitPromise": true, "returnByValue": true}),
                )
                .await?;
            if let Some(e) = r.get("exceptionDetails") {
                return Err(e["exception"]["description"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| e.to_string()));
            }
            Ok(r["result"]["value"].clone())
        }

        pub async fn eval(&self, js: &str) -> Value {
            self.try_eval(js).await.unwrap_or_else(|e| {
                panic!(
                    "{js}: {e}\npage log: {:?}",
                    self.browser.log.lock().unwrap()
                )
            })
        }

        /// Polls `js` until it is truthy (at most `secs` seconds).
        pub async fn wait_for(&self, what: &str, js: &str, secs: u64) -> Value {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
            loop {
                if let Ok(v) = self.try_eval(js).await
                    && !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0))
                {
                    return v;
                }
                if tokio::time::Instant::now() > deadline {
                    let text = self
                        .try_eval("document.body ? document.body.innerText : ''")
                        .await;
                    panic!(
                        "timed out waiting for {what}\npage text: {}\npage log: {:?}",
                        text.unwrap_or_default(),
                        self.browser.log.lock().unwrap()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        pub async fn goto(&self, url: &str) {
            self.cmd("Page.navigate", json!({"url": url})).await;
            self.wait_for("the page to load", "document.readyState === 'complete'", 60)
                .await;
        }

        pub async fn screenshot(&self) -> Vec<u8> {
            let r = self
                .cmd("Page.captureScreenshot", json!({"format": "png"}))
                .await;
            base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                r["data"].as_str().unwrap(),
            )
            .unwrap()
        }
    }
}

use cdp::{Browser, Page};

/// Chromium, or None after saying the test is skipped.
async fn browser(test: &str) -> Option<Arc<Browser>> {
    browser_with(test, &[]).await
}

/// The tests take turns: one Chromium at a time keeps them well inside
/// their timeouts on a small, shared machine.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn browser_with(test: &str, extra: &[&str]) -> Option<Arc<Browser>> {
    match cdp::chromium() {
        Some(bin) => Some(Arc::new(
            Browser::launch(&bin, extra, TURN.lock().await).await,
        )),
        None => {
            eprintln!(
                "SKIPPED {test}: Chromium is not installed (apt-get install -y chromium; scripts/test.sh does it)"
            );
            None
        }
    }
}

/// A tab with a virtual platform authenticator (user verification on);
/// returns the page and the authenticator id.
async fn page_with_passkey(b: &Arc<Browser>) -> (Page, String) {
    let p = b.page().await;
    p.cmd(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1000, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    p.cmd("WebAuthn.enable", json!({})).await;
    let a = p
        .cmd(
            "WebAuthn.addVirtualAuthenticator",
            json!({"options": {"protocol": "ctap2", "transport": "internal", "hasResidentKey": true,
                   "hasUserVerification": true, "isUserVerified": true, "automaticPresenceSimulation": true}}),
        )
        .await;
    (p, a["authenticatorId"].as_str().unwrap().to_string())
}

fn web_origin(s: &TestServer) -> String {
    s.handle().state.web_origin.clone()
}

/// Pairs the page through its own form, from `/#pair=CODE`; returns the
/// browser's device id.
async fn pair_page(p: &Page, s: &TestServer, name: &str) -> String {
    p.goto(&format!("{}/#pair={}", web_origin(s), s.code()))
        .await;
    p.wait_for(
        "the pairing form",
        "document.getElementById('pair-code')?.value",
        60,
    )
    .await;
    assert_eq!(
        p.eval("location.hash").await,
        "",
        "the code leaves the address bar at once"
    );
    p.eval(&format!(
        "document.getElementById('pair-name').value = {}; document.getElementById('pair-submit').click(); true",
        json!(name)
    ))
    .await;
    p.wait_for(
        "the session after pairing",
        "document.getElementById('conn')?.dataset.state === 'connected' && document.getElementById('view')?.dataset.loaded",
        60,
    )
    .await;
    let id = p
        .wait_for(
            "the device id in IndexedDB",
            "new Promise(r => { const q = indexedDB.open('secrets-agent'); q.onsuccess = () => { const g = q.result.transaction('identity').objectStore('identity').get('device'); g.onsuccess = () => r(g.result && g.result.deviceId); }; })",
            60,
        )
        .await;
    id.as_str().unwrap().to_string()
}

/// Shows a view and waits until it has loaded.
async fn show(p: &Page, view: &str) {
    p.eval(&format!(
        "document.getElementById('view').dataset.loaded = ''; location.hash = '#{view}'; true"
    ))
    .await;
    p.wait_for(
        &format!("view {view}"),
        &format!("document.getElementById('view').dataset.loaded === '{view}'"),
        60,
    )
    .await;
}

fn shots_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn screenshot(p: &Page, name: &str) {
    let png = p.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(shots_dir().join(name), png).unwrap();
}

/// Waits for the approval card of `action` and returns its approval id.
async fn card_for(p: &Page, action: &str) -> String {
    let js = format!(
        "[...document.querySelectorAll('article.approval')].filter(a => a.querySelector('code.action').textContent === '{action}' && !a.querySelector('button.approve').disabled).map(a => a.dataset.approval)[0]"
    );
    p.wait_for(&format!("an approval card for {action}"), &js, 60)
        .await
        .as_str()
        .unwrap()
        .to_string()
}

async fn click_card(p: &Page, approval_id: &str, button: &str) {
    p.eval(&format!(
        "document.querySelector('article[data-approval=\"{approval_id}\"] button.{button}').click(); true"
    ))
    .await;
}

async fn card_gone(p: &Page, approval_id: &str) {
    p.wait_for(
        "the approval card to go",
        &format!("!document.querySelector('article[data-approval=\"{approval_id}\"]')"),
        60,
    )
    .await;
}

fn plugin_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let w = |rel: &str, text: &str| {
        let p = d.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    w(
        "plugins/hello/plugin.toml",
        "name = \"hello-plugin\"\nversion = \"1.0\"\nplugin_type = \"tool\"\ncapabilities = [\"greet\"]\ndescription = \"Says hello\"\n",
    );
    w(
        "plugins/nightly/plugin.toml",
        "name = \"nightly-report\"\nversion = \"2.1.0\"\nplugin_type = \"task_handler\"\ncapabilities = [\"report\"]\ncommand = [\"/bin/true\"]\n",
    );
    w(
        "skills/notes/SKILL.md",
        "---\nname: Notes\ndescription: Keeps notes tidy\nversion: 1.0\ntriggers:\n  - note\n---\n# Notes\n",
    );
    w(
        "config.toml",
        &format!(
            "{}\n[[tasks]]\nname = \"nightly-backup\"\ncron = \"0 3 * * *\"\nhandler = \"command\"\ncommand = [\"/bin/true\"]\n",
            common::model_config()
        ),
    );
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_pairs_administers_and_deletes_a_memory_with_the_passkey() {
    let Some(b) =
        browser("the_owner_pairs_administers_and_deletes_a_memory_with_the_passkey").await
    else {
        return;
    };
    let s = TestServer::start_in_dir(plugin_dir()).await;
    let (phone, _) = s.phone("Pixel 9").await;
    let (p, _) = page_with_passkey(&b).await;
    let device_id = pair_page(&p, &s, "Laptop browser").await;

    // The server holds a passkey for it.
    let devices = phone.request("list_devices", json!({})).await.unwrap();
    let me = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device_id)
        .expect("the browser is paired");
    assert_eq!(me["approval_key_alg"], "webauthn-es256");
    assert_eq!(me["device_name"], "Laptop browser");

    // Plugins: listed, and one toggled off from the page.
    show(&p, "extensions").await;
    assert_eq!(
        p.eval("document.querySelectorAll('tr[data-plugin]').length")
            .await,
        2
    );
    p.eval("document.querySelector('tr[data-plugin=\"hello-plugin\"] input[type=checkbox]').click(); true")
        .await;
    p.wait_for(
        "the toggle's confirmation",
        "document.getElementById('notice').textContent.includes(\"Plugin 'hello-plugin' disabled\")",
        60,
    )
    .await;
    let plugins = phone.request("list_plugins", json!({})).await.unwrap();
    let hello = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "hello-plugin")
        .unwrap();
    assert_eq!(hello["enabled"], false, "the server has it disabled");

    // Memories: created from the form, then found by meaning.
    show(&p, "memory").await;
    let notes = [
        (
            "OAuth2 with PKCE is preferred for public clients",
            "security",
            "auth, oauth",
        ),
        (
            "The staging database is rebuilt every Sunday night",
            "ops",
            "db",
        ),
        ("Team lunch is on Thursdays at noon", "note", ""),
    ];
    for (i, (content, category, tags)) in notes.iter().enumerate() {
        p.eval(&format!(
            "document.getElementById('memory-content').value = {}; document.getElementById('memory-category').value = {}; document.getElementById('memory-tags').value = {}; document.getElementById('memory-create').click(); true",
            json!(content), json!(category), json!(tags)
        ))
        .await;
        p.wait_for(
            "the new memory in the list",
            &format!(
                "document.querySelectorAll('#memory-list li.memory').length === {}",
                i + 1
            ),
            60,
        )
        .await;
    }
    assert_eq!(
        p.eval("document.getElementById('memory-page').textContent")
            .await,
        "Page 1 of 1 · 3 memories"
    );
    p.eval("document.getElementById('memory-query').value = 'API authentication patterns'; document.getElementById('memory-search').click(); true").await;
    let first = p
        .wait_for(
            "search results",
            "document.querySelector('#search-results li.memory .memory-content')?.textContent",
            60,
        )
        .await;
    assert_eq!(first, notes[0].0, "the best match comes first");
    screenshot(&p, "web-memory-search.png").await;

    // Deleting it waits for an approval, shown on a card, approved with the passkey.
    let id = p
        .eval("document.querySelector('#search-results li.memory').dataset.memory")
        .await;
    let id = id.as_str().unwrap().to_string();
    p.eval("document.querySelector('#search-results li.memory button.danger').click(); true")
        .await;
    let approval = card_for(&p, "delete_memory").await;
    let card = p
        .eval(&format!(
            "document.querySelector('article[data-approval=\"{approval}\"]').innerText"
        ))
        .await;
    let card = card.as_str().unwrap();
    assert!(
        card.contains(&id) && card.contains("delete_memory"),
        "{card}"
    );
    assert!(
        card.contains("Laptop browser") && card.contains("this browser"),
        "the requester: {card}"
    );
    assert!(card.contains("The digest matches"), "{card}");
    assert!(
        card.contains("exactly the parameters this browser sent"),
        "its own request: {card}"
    );
    screenshot(&p, "web-approval-card.png").await;
    click_card(&p, &approval, "approve").await;
    card_gone(&p, &approval).await;
    p.wait_for(
        "the list without the memory",
        "document.getElementById('memory-page')?.textContent === 'Page 1 of 1 · 2 memories'",
        60,
    )
    .await;
    let left = phone
        .request("list_memories", json!({"page": 1, "per_page": 20}))
        .await
        .unwrap();
    assert_eq!(left["total"], 2);
    assert!(
        left["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"] != id.as_str())
    );

    // Scheduler: the task is listed, runs now, and its history shows it.
    show(&p, "scheduler").await;
    p.eval("document.querySelector('tr[data-task=\"nightly-backup\"] td.buttons button').click(); true")
        .await;
    p.wait_for(
        "the run in the task's history",
        "document.querySelector('#task-history tbody')?.innerText.includes('ok')",
        60,
    )
    .await;

    // The dashboard, with live numbers.
    show(&p, "dashboard").await;
    let stats = p.eval("document.querySelector('.stats').innerText").await;
    assert!(stats.as_str().unwrap().contains("2\nmemories"), "{stats}");
    let runs = p
        .eval("document.querySelector('#view table').innerText")
        .await;
    assert!(
        runs.as_str().unwrap().contains("nightly-backup"),
        "recent runs: {runs}"
    );
    screenshot(&p, "web-dashboard.png").await;

    // A config change with a secret, asked from the page: its card checks
    // the commitment against the value this page sent; then denied.
    show(&p, "config").await;
    p.eval("document.getElementById('config-value').value = '{\"model\": \"m3\", \"api_key\": \"sk-from-the-page\"}'; document.getElementById('config-submit').click(); true").await;
    let approval = card_for(&p, "update_config").await;
    p.wait_for(
        "the own-request check",
        &format!("document.querySelector('article[data-approval=\"{approval}\"] p.own')?.textContent.includes('exactly the parameters')"),
        60,
    )
    .await;
    click_card(&p, &approval, "danger").await;
    card_gone(&p, &approval).await;
    p.wait_for(
        "the denial message",
        "document.getElementById('notice').textContent.includes('approval_denied')",
        60,
    )
    .await;

    // Paging: 20 more memories (from the phone) make a second page.
    for i in 0..20 {
        phone
            .request(
                "create_memory",
                json!({"content": format!("bulk note {i}")}),
            )
            .await
            .unwrap();
    }
    show(&p, "memory").await;
    assert_eq!(
        p.eval("document.getElementById('memory-page').textContent")
            .await,
        "Page 1 of 2 · 22 memories"
    );
    p.eval("[...document.querySelectorAll('nav.pager button')].find(b => b.textContent.startsWith('Older')).click(); true").await;
    p.wait_for(
        "page 2",
        "document.getElementById('memory-page').textContent === 'Page 2 of 2 · 22 memories' && document.querySelectorAll('#memory-list li.memory').length === 2",
        60,
    )
    .await;

    // The other views, for a look (not committed); every control has a label.
    for view in [
        "extensions",
        "memory",
        "scheduler",
        "config",
        "devices",
        "dashboard",
    ] {
        show(&p, view).await;
        let unlabelled = p
            .eval("[...document.querySelectorAll('input, select, textarea, button')].filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()).map(e => e.outerHTML)")
            .await;
        assert_eq!(unlabelled, json!([]), "controls without a label in {view}");
        if view != "dashboard" {
            screenshot(&p, &format!("web-{view}.png")).await;
        }
    }

    // Secrets: the view asks the server and shows its answer.
    show(&p, "secrets").await;
    let secrets = p.eval("document.getElementById('view').innerText").await;
    let secrets = secrets.as_str().unwrap().to_string();
    assert!(
        secrets.contains("unknown_action") || secrets.contains("Set a secret"),
        "the secrets view shows the server's answer: {secrets}"
    );
    screenshot(&p, "web-secrets.png").await;

    // A phone-sized screen.
    p.cmd(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    )
    .await;
    show(&p, "dashboard").await;
    let overflow = p
        .eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
        .await;
    assert_eq!(overflow, true, "no horizontal scrolling on a phone");
    screenshot(&p, "web-phone-dashboard.png").await;
    assert!(
        b.log
            .lock()
            .unwrap()
            .iter()
            .all(|l| !l.starts_with("exception")),
        "no uncaught exception: {:?}",
        b.log.lock().unwrap()
    );
}

/// Starts `update_config` from the phone (it waits for the approval) and
/// returns the pending request's handle.
fn request_config_change(phone: &Arc<Client>, secs: u64) -> tokio::task::JoinHandle<Value> {
    let params = json!({"section": "approvals", "value": {"timeout_secs": secs}});
    spawn_request(phone, "update_config", params)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_approves_a_config_change_sent_by_mobile_sim() {
    let Some(b) = browser("the_page_approves_a_config_change_sent_by_mobile_sim").await else {
        return;
    };
    let s = TestServer::start().await;
    let (p, _) = page_with_passkey(&b).await;
    pair_page(&p, &s, "Desk browser").await;
    let (phone, _) = s.phone("Pixel 9").await;
    let phone = Arc::new(phone);
    let pending = request_config_change(&phone, 77);
    let approval = card_for(&p, "update_config").await;
    // A device paired after the page loaded: the page learns its name with
    // one more `list_devices` and fills it in.
    p.wait_for(
        "the requesting device's name on the card",
        &format!(
            "document.querySelector('article[data-approval=\"{approval}\"] .requester').innerText.includes('Pixel 9')"
        ),
        30,
    )
    .await;
    let card = p
        .eval(&format!(
            "document.querySelector('article[data-approval=\"{approval}\"]').innerText"
        ))
        .await;
    let card = card.as_str().unwrap();
    assert!(
        card.contains("Pixel 9"),
        "the requesting device is named: {card}"
    );
    assert!(
        card.contains("\"timeout_secs\": 77"),
        "the params are shown: {card}"
    );
    click_card(&p, &approval, "approve").await;
    let r = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r["result"], "success", "{r}");
    card_gone(&p, &approval).await;
    let text = s.config_text();
    assert!(text.contains("timeout_secs = 77"), "{text}");

    // The connection indicator notices a stopped server and retries; an
    // approval pending at the stop is expired by the restart, and its card
    // goes when the page is back.
    let pending = request_config_change(&phone, 79);
    let stale = card_for(&p, "update_config").await;
    let mut s = s;
    s.stop().await;
    let answer = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer["code"], "unavailable", "{answer}");
    let state = p
        .wait_for(
            "the offline indicator",
            "document.getElementById('conn').dataset.state === 'offline' && document.getElementById('conn').innerText",
            60,
        )
        .await;
    assert!(state.as_str().unwrap().contains("retrying in"), "{state}");
    let port = web_origin_port(&web_origin_of_url(&s.url));
    let again = secrets_agent::start(secrets_agent::Options {
        data_dir: s.path().to_path_buf(),
        listen: Some(format!("127.0.0.1:{port}")),
        print_pairing_code: false,
    })
    .await
    .unwrap();
    p.wait_for(
        "the page back online",
        "document.getElementById('conn').dataset.state === 'connected'",
        60,
    )
    .await;
    card_gone(&p, &stale).await;
    again.shutdown().await;
}

/// `http://localhost:PORT` of a `ws://127.0.0.1:PORT/ws` URL.
fn web_origin_of_url(url: &str) -> String {
    let port = url.trim_end_matches("/ws").rsplit(':').next().unwrap();
    format!("http://localhost:{port}")
}

fn web_origin_port(origin: &str) -> u16 {
    origin.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_denies_with_the_passkey() {
    let Some(b) = browser("the_page_denies_with_the_passkey").await else {
        return;
    };
    let s = TestServer::start().await;
    let (p, _) = page_with_passkey(&b).await;
    pair_page(&p, &s, "Desk browser").await;
    let (phone, _) = s.phone("Pixel 9").await;
    let phone = Arc::new(phone);
    // A change carrying a secret: the card shows its commitment, never the value.
    let pending = spawn_request(
        &phone,
        "update_config",
        json!({"section": "llm", "value": {"model": "m2", "api_key": "sk-very-secret-value"}}),
    );
    let approval = card_for(&p, "update_config").await;
    let card = format!("article[data-approval=\"{approval}\"]");
    let mark = p
        .eval(&format!(
            "document.querySelector('{card} mark.redacted')?.textContent"
        ))
        .await;
    let mark = mark.as_str().expect("the redaction tag is marked");
    assert!(
        mark.starts_with("[redacted:") && mark.len() == "[redacted:]".len() + 16,
        "{mark}"
    );
    let text = p
        .eval("document.documentElement.outerHTML.includes('sk-very-secret-value')")
        .await;
    assert_eq!(text, false, "the secret is nowhere in the page");
    click_card(&p, &approval, "danger").await;
    let r = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r["result"], "error");
    assert_eq!(r["code"], "approval_denied", "{r}");
    card_gone(&p, &approval).await;
    let text = std::fs::read_to_string(s.path().join("config.toml")).unwrap_or_default();
    assert!(
        !text.contains("m2") && !text.contains("sk-very"),
        "nothing changed"
    );
}

/// An assertion made in the page for `signed`, as the test (not the app)
/// asks for it: `uv` is WebAuthn's userVerification preference.
async fn assertion(p: &Page, credential_id: &str, signed: &str, uv: &str) -> Value {
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(signed.as_bytes()));
    let js = format!(
        r#"(async () => {{
  const d = (s) => Uint8Array.from(atob(s.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
  const e = (b) => btoa(String.fromCharCode(...new Uint8Array(b))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  const c = await navigator.credentials.get({{ publicKey: {{ challenge: d("{challenge}"), rpId: location.hostname,
    allowCredentials: [{{ type: "public-key", id: d("{credential_id}") }}], userVerification: "{uv}" }} }});
  return {{ authenticator_data: e(c.response.authenticatorData), client_data_json: e(c.response.clientDataJSON), signature: e(c.response.signature) }};
}})()"#
    );
    p.eval(&js).await
}

/// The signCount inside an assertion's authenticatorData.
fn count_of(a: &Value) -> u32 {
    let ad = URL_SAFE_NO_PAD
        .decode(a["authenticator_data"].as_str().unwrap())
        .unwrap();
    u32::from_be_bytes([ad[33], ad[34], ad[35], ad[36]])
}

/// Sends an `approval_response` carrying `signature` over the phone's
/// session, for the browser's device; returns the error code, or "decided".
async fn answer(
    phone: &Client,
    device_id: &str,
    req: &Value,
    decision: &str,
    signature: &Value,
) -> String {
    let id = req["approval_id"].as_str().unwrap();
    phone
        .send_raw(
            json!({"type": "approval_response", "approval_id": id, "device_id": device_id,
                   "decision": decision, "signature": signature})
            .to_string(),
        )
        .await
        .unwrap();
    let ev = phone
        .wait_event(Duration::from_secs(60), |v| {
            (v["type"] == "error" || v["type"] == "approval_result") && v["approval_id"] == id
        })
        .await
        .unwrap();
    if ev["type"] == "error" {
        ev["code"].as_str().unwrap().to_string()
    } else {
        "decided".to_string()
    }
}

async fn pending_ids(phone: &Client) -> Vec<String> {
    let l = phone.request("list_approvals", json!({})).await.unwrap();
    l["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["approval_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_unverified_assertions_are_refused() {
    let Some(b) = browser("forged_replayed_and_unverified_assertions_are_refused").await else {
        return;
    };
    let s = TestServer::start().await;
    let (p, authenticator) = page_with_passkey(&b).await;
    let browser_device = pair_page(&p, &s, "Desk browser").await;
    let creds = p
        .cmd(
            "WebAuthn.getCredentials",
            json!({"authenticatorId": authenticator}),
        )
        .await;
    let cred = STANDARD
        .decode(creds["credentials"][0]["credentialId"].as_str().unwrap())
        .unwrap();
    let cred = URL_SAFE_NO_PAD.encode(cred);
    let (phone, _) = s.phone("Pixel 9").await;
    let phone = Arc::new(phone);

    // Three pending approvals: A, B and C.
    let mut reqs = Vec::new();
    let mut waits = Vec::new();
    for secs in [61, 62, 63] {
        waits.push(request_config_change(&phone, secs));
        let r = phone
            .wait_event(Duration::from_secs(60), |v| v["type"] == "approval_request")
            .await
            .unwrap();
        reqs.push(r);
    }
    let (a, bb, c) = (&reqs[0], &reqs[1], &reqs[2]);
    let a_id = a["approval_id"].as_str().unwrap().to_string();

    // User verification off: the authenticator signs without UV, the server refuses.
    p.cmd(
        "WebAuthn.setUserVerified",
        json!({"authenticatorId": authenticator, "isUserVerified": false}),
    )
    .await;
    let no_uv = assertion(&p, &cred, &approval_text(a, "approve"), "discouraged").await;
    let flags = URL_SAFE_NO_PAD
        .decode(no_uv["authenticator_data"].as_str().unwrap())
        .unwrap()[32];
    assert_eq!(flags & 0x04, 0, "the assertion has UV clear");
    assert_eq!(
        answer(&phone, &browser_device, a, "approve", &no_uv).await,
        "bad_signature"
    );
    // The app itself asks for UV "required": the browser refuses to sign at all.
    let err = p
        .try_eval(&format!(
            "(async () => {{ await navigator.credentials.get({{publicKey: {{challenge: new Uint8Array(32), rpId: location.hostname, allowCredentials: [{{type: 'public-key', id: Uint8Array.from(atob('{}'), c => c.charCodeAt(0))}}], userVerification: 'required'}}}}); return 'signed'; }})()",
            STANDARD.encode(URL_SAFE_NO_PAD.decode(&cred).unwrap())
        ))
        .await;
    assert!(
        err.as_ref().is_err_and(|e| e.contains("NotAllowedError")),
        "{err:?}"
    );
    p.cmd(
        "WebAuthn.setUserVerified",
        json!({"authenticatorId": authenticator, "isUserVerified": true}),
    )
    .await;

    // Two good assertions: x for A (count n), y for B (count n + 1).
    let x = assertion(&p, &cred, &approval_text(a, "approve"), "required").await;
    let y = assertion(&p, &cred, &approval_text(bb, "approve"), "required").await;
    assert!(count_of(&y) > count_of(&x));
    assert_eq!(
        answer(&phone, &browser_device, bb, "approve", &y).await,
        "decided"
    );
    let b_result = tokio::time::timeout(Duration::from_secs(60), waits.remove(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b_result["result"], "success", "B was approved: {b_result}");

    // x is genuine and for A, but its signCount is not above the stored one.
    assert_eq!(
        answer(&phone, &browser_device, a, "approve", &x).await,
        "bad_signature"
    );
    // y replayed: for B again (decided), and for A (another challenge).
    assert_eq!(
        answer(&phone, &browser_device, bb, "approve", &y).await,
        "not_found"
    );
    assert_eq!(
        answer(&phone, &browser_device, a, "approve", &y).await,
        "bad_signature"
    );
    // A fresh assertion made for C, sent for A.
    let for_c = assertion(&p, &cred, &approval_text(c, "approve"), "required").await;
    assert_eq!(
        answer(&phone, &browser_device, a, "approve", &for_c).await,
        "bad_signature"
    );
    // A signature for "deny" sent as "approve".
    let deny = assertion(&p, &cred, &approval_text(a, "deny"), "required").await;
    assert_eq!(
        answer(&phone, &browser_device, a, "approve", &deny).await,
        "bad_signature"
    );

    // From another origin: another localhost port shares the rp id, not the origin.
    let other = TestServer::start().await;
    p.goto(&format!("{}/", web_origin(&other))).await;
    let foreign = assertion(&p, &cred, &approval_text(a, "approve"), "required").await;
    let cd: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(foreign["client_data_json"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(cd["origin"], web_origin(&other), "made on the other origin");
    assert_eq!(
        answer(&phone, &browser_device, a, "approve", &foreign).await,
        "bad_signature"
    );

    // A malformed object is invalid_request.
    let mut shape = x.clone();
    shape.as_object_mut().unwrap().remove("signature");
    assert_eq!(
        answer(&phone, &browser_device, a, "approve", &shape).await,
        "invalid_request"
    );
    assert_eq!(
        answer(&phone, &browser_device, a, "approve", &json!("AAAA")).await,
        "invalid_request"
    );

    // Nothing was decided: A and C still pend, and A's requester still waits.
    let pend = pending_ids(&phone).await;
    assert!(
        pend.contains(&a_id) && pend.contains(&c["approval_id"].as_str().unwrap().to_string()),
        "{pend:?}"
    );
    assert!(!waits[0].is_finished());
    let audit = common::audit_now(&s).await;
    let refused = audit
        .iter()
        .filter(|r| r["action"] == "approval.response" && r["outcome"] == "bad_signature")
        .count();
    assert_eq!(refused, 6, "each refusal is audited");

    // And A can still be approved properly, back on the web origin.
    p.goto(&format!("{}/", web_origin(&s))).await;
    let good = assertion(&p, &cred, &approval_text(a, "approve"), "required").await;
    assert_eq!(
        answer(&phone, &browser_device, a, "approve", &good).await,
        "decided"
    );
    let r = tokio::time::timeout(Duration::from_secs(60), waits.remove(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r["result"], "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_without_user_verification_is_refused() {
    let Some(b) = browser("pairing_without_user_verification_is_refused").await else {
        return;
    };
    let s = TestServer::start().await;
    let (p, authenticator) = page_with_passkey(&b).await;
    p.cmd(
        "WebAuthn.setUserVerified",
        json!({"authenticatorId": authenticator, "isUserVerified": false}),
    )
    .await;
    p.goto(&format!("{}/#pair={}", web_origin(&s), s.code()))
        .await;
    p.wait_for(
        "the pairing form",
        "document.getElementById('pair-code')?.value",
        60,
    )
    .await;
    p.eval("document.getElementById('pair-submit').click(); true")
        .await;
    let status = p
        .wait_for(
            "the pairing to fail",
            "document.getElementById('pair-status').textContent.includes('failed') && document.getElementById('pair-status').textContent",
            60,
        )
        .await;
    assert!(
        status.as_str().unwrap().contains("user verification"),
        "the page says why: {status}"
    );
    let (phone, _) = s.phone("Pixel 9").await;
    let d = phone.request("list_devices", json!({})).await.unwrap();
    assert_eq!(
        d["devices"].as_array().unwrap().len(),
        1,
        "only the phone is paired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_host_name_or_an_ip_explains_what_is_needed() {
    // `agent.test` resolves to the server, but over plain http it is not a
    // secure context: no WebCrypto keys, no passkeys.
    let Some(b) = browser_with(
        "plain_http_to_a_host_name_or_an_ip_explains_what_is_needed",
        &["--host-resolver-rules=MAP agent.test 127.0.0.1"],
    )
    .await
    else {
        return;
    };
    let s = TestServer::start().await;
    let port = web_origin(&s).rsplit(':').next().unwrap().to_string();
    let p = b.page().await;
    p.goto(&format!("http://agent.test:{port}/#pair={}", s.code()))
        .await;
    let text = p
        .wait_for(
            "the secure-context explanation",
            "document.getElementById('secure-context')?.innerText",
            60,
        )
        .await;
    let text = text.as_str().unwrap();
    assert!(
        text.contains("not a secure context") && text.contains("https://"),
        "{text}"
    );
    assert_eq!(
        p.eval("!!document.getElementById('pair-code')").await,
        false,
        "no pairing form"
    );
    // By IP address: a secure context on loopback, but no rp id.
    p.goto(&format!("http://127.0.0.1:{port}/")).await;
    let text = p
        .wait_for(
            "the host-name explanation",
            "document.getElementById('secure-context')?.innerText",
            60,
        )
        .await;
    assert!(
        text.as_str().unwrap().contains("http://localhost:"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_jcs_digest_matches_the_servers() {
    let Some(b) = browser("the_pages_jcs_digest_matches_the_servers").await else {
        return;
    };
    let s = TestServer::start().await;
    let p = b.page().await;
    p.goto(&format!("{}/", web_origin(&s))).await;
    let dir = secrets_agent::web::asset_dir();
    // Values where canonical JSON is easy to get wrong: key order by UTF-16
    // code units, escapes, non-ASCII, number forms, nesting, empties.
    let cases = [
        json!({"b": 1, "a": 2, "\u{e9}": 3, "\u{1f600}": 4, "\u{ff61}": 5, "A": 6, "": 7}),
        json!({"s": "quote \" backslash \\ tab \t nl \n ctl \u{1} del \u{7f} \u{2028} é 😀 </script>"}),
        json!({"n": [0, -0.0, 1, -1, 0.5, 1e21, 1e-7, 123456789012345u64, 1.5e300, 100, 0.1, 2.5e-5]}),
        json!({"nested": {"z": [], "y": {}, "x": [null, true, false, {"b": [1, {"a": 0}]}]}}),
        json!({"section": "llm", "value": {"model": "m2", "api_key": "[redacted:0123456789abcdef]"}}),
    ];
    for params in cases {
        let want = secrets_agent::storage::audit::jcs_digest(
            &json!({"action": "update_config", "params": params}),
        );
        let got = p
            .eval(&format!(
                "import('{dir}/jcs.js').then(m => m.actionDigest('update_config', {params}))"
            ))
            .await;
        assert_eq!(got, want, "digest of {params}");
    }
}
