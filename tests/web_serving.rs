//! The web companion's files over real HTTP (SPEC §11): `GET /` and its
//! hashed assets with the Content-Security-Policy and caching headers, 404
//! for every other path, `/ws` unchanged, and `pair --json`'s `web_url`.

mod common;

use std::collections::HashMap;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// One raw HTTP/1.1 request on its own connection (the server closes after
/// answering).
async fn http(s: &TestServer, method: &str, path: &str, extra: &str) -> Response {
    let addr = s.url.trim_start_matches("ws://").trim_end_matches("/ws");
    let port = addr.rsplit(':').next().unwrap();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\n{extra}\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut raw),
    )
    .await
    .expect("the server answers and closes")
    .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<HashMap<_, _>>();
    let body = raw[split + 4..].to_vec();
    if let Some(n) = headers.get("content-length") {
        assert_eq!(
            body.len(),
            n.parse::<usize>().unwrap(),
            "{path}: content-length"
        );
    }
    Response {
        status,
        headers,
        body,
    }
}

fn port(s: &TestServer) -> String {
    s.url
        .trim_end_matches("/ws")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string()
}

/// The security headers every page and asset carries.
#[track_caller]
fn assert_policy(r: &Response, web_origin: &str) {
    let csp = &r.headers["content-security-policy"];
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "CSP lacks {directive}: {csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    let ws = web_origin.replace("http://", "ws://");
    let connect = csp
        .split(';')
        .find(|d| d.trim().starts_with("connect-src"))
        .unwrap();
    assert!(
        connect.contains("'self'") && connect.contains(&ws),
        "{connect}"
    );
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["referrer-policy"], "no-referrer");
}

#[tokio::test]
async fn the_page_and_its_hashed_assets_are_served_with_a_strict_policy() {
    let s = TestServer::start().await;
    let web_origin = format!("http://localhost:{}", port(&s));
    assert_eq!(s.handle().state.web_origin, web_origin);

    let page = http(&s, "GET", "/", "").await;
    assert_eq!(page.status, 200);
    assert_policy(&page, &web_origin);
    assert_eq!(page.headers["cache-control"], "no-cache");
    assert!(page.headers["content-type"].starts_with("text/html"));
    let html = String::from_utf8(page.body).unwrap();

    // No inline script, style or handler: everything comes from files.
    for tag in html.split("<script").skip(1) {
        let open = tag.split('>').next().unwrap();
        assert!(open.contains("src="), "an inline script: <script{open}>");
        assert!(
            tag.split('>').nth(1).unwrap().starts_with("</script"),
            "a script with a body"
        );
    }
    assert!(
        !html.contains("<style") && !html.contains(" style="),
        "inline style"
    );
    assert!(
        !html.contains(" onclick=") && !html.contains(" onload="),
        "inline handler"
    );

    // Every asset the page names is under /assets/<hash>/, cached for good.
    let refs: Vec<String> = html
        .split(['"', '\''])
        .filter(|p| p.starts_with("/assets/"))
        .map(String::from)
        .collect();
    assert!(refs.iter().any(|r| r.ends_with("/app.js")), "{refs:?}");
    assert!(refs.iter().any(|r| r.ends_with("/style.css")), "{refs:?}");
    let dir = refs[0].rsplit_once('/').unwrap().0.to_string();
    let hash = dir.trim_start_matches("/assets/");
    assert!(
        hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "{dir}"
    );
    let mut modules = vec!["app.js".to_string()];
    let mut seen = Vec::new();
    while let Some(m) = modules.pop() {
        if seen.contains(&m) {
            continue;
        }
        let r = http(&s, "GET", &format!("{dir}/{m}"), "").await;
        assert_eq!(r.status, 200, "{m}");
        assert_policy(&r, &web_origin);
        assert_eq!(
            r.headers["cache-control"],
            "public, max-age=31536000, immutable"
        );
        assert!(
            r.headers["content-type"].starts_with("text/javascript"),
            "{m}"
        );
        let js = String::from_utf8(r.body).unwrap();
        assert!(
            js.starts_with("//"),
            "{m} opens with a comment saying what it is"
        );
        for banned in [
            "eval(",
            "new Function",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!js.contains(banned), "{m} uses {banned}");
        }
        for line in js.lines().filter(|l| l.starts_with("import ")) {
            let target = line.split('"').nth(1).unwrap();
            assert!(
                target.starts_with("./"),
                "{m} imports {target}: only this server's files"
            );
            modules.push(target.trim_start_matches("./").to_string());
        }
        seen.push(m);
    }
    assert!(seen.len() >= 5, "{seen:?}");
    let css = http(&s, "GET", &format!("{dir}/style.css"), "").await;
    assert_eq!(css.status, 200);
    assert!(css.headers["content-type"].starts_with("text/css"));
    assert!(
        !String::from_utf8(css.body).unwrap().contains("url(http"),
        "no remote fonts or images"
    );

    // An asset under another build's hash is not served.
    let stale = http(&s, "GET", "/assets/0123456789abcdef/app.js", "").await;
    assert_eq!(stale.status, 404);
    // A query string does not change what `/` is.
    assert_eq!(http(&s, "GET", "/?x=1", "").await.status, 200);
}

#[tokio::test]
async fn every_other_path_is_404_and_the_websocket_is_unchanged() {
    let s = TestServer::start().await;
    for path in [
        "/index.html",
        "/favicon.ico",
        "/assets/app.js",
        "/assets/",
        "/../etc/passwd",
        "/ws/x",
    ] {
        let r = http(&s, "GET", path, "").await;
        assert_eq!(r.status, 404, "{path}");
    }
    assert_eq!(
        http(&s, "POST", "/", "content-length: 0\r\n").await.status,
        404
    );
    assert_eq!(http(&s, "HEAD", "/", "").await.status, 404);
    // /ws without an upgrade is still 426, with one still the handshake.
    assert_eq!(http(&s, "GET", "/ws", "").await.status, 426);
    let mut raw = s.raw().await;
    assert_eq!(raw.recv_frame().await.unwrap()["type"], "challenge");
    // A phone pairs and works exactly as before.
    let (c, _) = s.phone("phone").await;
    let d = c
        .request("get_dashboard", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(d["result"], "dashboard");
}

#[tokio::test]
async fn the_page_origin_may_open_the_websocket_and_another_may_not() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s = TestServer::start().await;
    let origin = format!("http://localhost:{}", port(&s));
    for (o, ok) in [
        (origin.clone(), true),
        (
            format!("http://localhost:{}", port(&s).parse::<u16>().unwrap() + 1),
            false,
        ),
        (format!("http://127.0.0.1:{}", port(&s)), false),
    ] {
        let mut req = s.url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("origin", o.parse().unwrap());
        let r = tokio_tungstenite::connect_async(req).await;
        assert_eq!(r.is_ok(), ok, "origin {o}");
    }
}

#[tokio::test]
async fn pair_json_carries_the_web_url_and_qr_prints_it() {
    let s = TestServer::start().await;
    let out = std::process::Command::new(common::bin())
        .args(["pair", "--json", "--qr", "--data-dir"])
        .arg(s.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON line on stdout: {stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let code = v["code"].as_str().unwrap();
    assert_eq!(
        v["web_url"],
        format!("http://localhost:{}/#pair={code}", port(&s)),
        "{v}"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("Scan to open the web companion"),
        "{stderr}"
    );
    assert!(
        stderr.contains('▀') || stderr.contains('▄'),
        "a QR code in the terminal"
    );
    assert!(
        !stderr.contains(code),
        "the code is in the QR code only, not in log lines"
    );

    // A configured web origin is used as is.
    let s2 = TestServer::start_with_config(
        "[server]\nweb_origin = \"https://agent.example.net:7420\"\n",
    )
    .await;
    let v = common::pair_json(s2.path());
    assert!(
        v["web_url"]
            .as_str()
            .unwrap()
            .starts_with("https://agent.example.net:7420/#pair="),
        "{v}"
    );
}
