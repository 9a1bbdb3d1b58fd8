//! The web companion's files (SPEC §11): `GET /` and its assets, embedded in
//! the binary at build time from `web/`, served with a strict
//! Content-Security-Policy.
//!
//! Assets live under `/assets/<build>/NAME`, where `<build>` is a hash of
//! every embedded file: any change to any file gives every asset a new URL,
//! so assets are cached for a year (`immutable`) and modules import each
//! other by relative name. `/` itself is `no-cache`. Any other path is not
//! ours (the caller answers 404).

use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// The embedded files: (name, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("app.js", JS, include_bytes!("../web/app.js")),
    ("api.js", JS, include_bytes!("../web/api.js")),
    ("keys.js", JS, include_bytes!("../web/keys.js")),
    ("jcs.js", JS, include_bytes!("../web/jcs.js")),
    ("views.js", JS, include_bytes!("../web/views.js")),
    ("dom.js", JS, include_bytes!("../web/dom.js")),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../web/style.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("../web/icon.svg"),
    ),
];
const JS: &str = "text/javascript; charset=utf-8";
const INDEX: &str = include_str!("../web/index.html");
/// What `index.html` writes where the asset directory goes.
const ASSET_DIR_MARK: &str = "{{ASSETS}}";

/// The build hash over every embedded file (16 hex characters).
pub fn build_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let mut h = Sha256::new();
        for (name, _, bytes) in ASSETS {
            h.update(name.as_bytes());
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        }
        h.update(INDEX.as_bytes());
        hex::encode(&h.finalize()[..8])
    })
}

/// The asset directory's path, e.g. `/assets/0123456789abcdef`.
pub fn asset_dir() -> String {
    format!("/assets/{}", build_hash())
}

fn index_html() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| INDEX.replace(ASSET_DIR_MARK, &asset_dir()))
}

/// What a page path serves, if it is ours.
enum Page {
    Index,
    Asset(&'static str, &'static [u8]),
}

fn lookup(path: &str) -> Option<Page> {
    if path == "/" {
        return Some(Page::Index);
    }
    let name = path.strip_prefix(&asset_dir())?.strip_prefix('/')?;
    ASSETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, ty, bytes)| Page::Asset(ty, bytes))
}

/// Whether a GET for `path` (without its query) is the web companion's.
pub fn is_page(path: &str) -> bool {
    lookup(path).is_some()
}

/// The Content-Security-Policy of every response (SPEC §11): scripts,
/// styles and images only from this server, no inline script or `eval`, no
/// plugins, no `<base>`, no framing; the WebSocket only to this origin
/// (`'self'`, and the ws(s) form of the web origin for browsers that do not
/// map `'self'` to WebSocket schemes).
pub fn content_security_policy(web_origin: &str) -> String {
    let ws = web_origin
        .strip_prefix("https://")
        .map(|h| format!(" wss://{h}"))
        .or_else(|| {
            web_origin
                .strip_prefix("http://")
                .map(|h| format!(" ws://{h}"))
        })
        .unwrap_or_default();
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{ws}; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; \
         form-action 'none'"
    )
}

/// Writes the response for a GET of `path` (a path [`is_page`] accepted)
/// and closes the stream (one request per connection).
pub async fn serve<W: AsyncWrite + Unpin + ?Sized>(
    io: &mut W,
    path: &str,
    web_origin: &str,
) -> std::io::Result<()> {
    let (ty, body, cache): (&str, &[u8], &str) = match lookup(path) {
        Some(Page::Index) => (
            "text/html; charset=utf-8",
            index_html().as_bytes(),
            "no-cache",
        ),
        Some(Page::Asset(ty, bytes)) => (ty, bytes, "public, max-age=31536000, immutable"),
        None => return Err(std::io::ErrorKind::NotFound.into()),
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\n\
         content-type: {ty}\r\n\
         content-length: {}\r\n\
         cache-control: {cache}\r\n\
         content-security-policy: {}\r\n\
         x-content-type-options: nosniff\r\n\
         referrer-policy: no-referrer\r\n\
         x-frame-options: DENY\r\n\
         cross-origin-opener-policy: same-origin\r\n\
         cross-origin-resource-policy: same-origin\r\n\
         connection: close\r\n\r\n",
        body.len(),
        content_security_policy(web_origin),
    );
    io.write_all(head.as_bytes()).await?;
    io.write_all(body).await?;
    io.flush().await?;
    io.shutdown().await
}

/// The web companion's address with a pairing code in its fragment
/// (`pair --json`'s `web_url`, SPEC §11): the fragment never reaches a
/// server or a log.
pub fn pairing_url(web_origin: &str, code: &str) -> String {
    format!("{web_origin}/#pair={code}")
}

/// The web origin a server on a data dir uses, seen from the CLI:
/// `server.web_origin` if set, else `http(s)://localhost:PORT` when the
/// recorded listen URL (`ws(s)://ADDR/ws`) is on a loopback address, else
/// none (a server on another address needs `server.web_origin`).
pub fn web_origin_for(configured: Option<&str>, listen_url: &str) -> Option<String> {
    if let Some(o) = configured {
        return Some(o.to_string());
    }
    let (scheme, rest) = if let Some(r) = listen_url.strip_prefix("wss://") {
        ("https", r)
    } else {
        ("http", listen_url.strip_prefix("ws://")?)
    };
    let addr: std::net::SocketAddr = rest.split('/').next()?.parse().ok()?;
    addr.ip()
        .is_loopback()
        .then(|| format!("{scheme}://localhost:{}", addr.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_served() {
        let page = index_html();
        assert!(!page.contains(ASSET_DIR_MARK));
        for (name, _, _) in ASSETS {
            assert!(is_page(&format!("{}/{name}", asset_dir())), "{name}");
        }
        assert!(is_page("/"));
        for other in [
            "/index.html",
            "/assets/app.js",
            "/assets/0000000000000000/app.js",
            "/ws",
            "/x",
        ] {
            assert!(!is_page(other), "{other}");
        }
        // Every module the app imports is embedded.
        for (name, _, bytes) in ASSETS.iter().filter(|(n, _, _)| n.ends_with(".js")) {
            let text = std::str::from_utf8(bytes).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let target = line.split('"').nth(1).unwrap().trim_start_matches("./");
                assert!(
                    ASSETS.iter().any(|(n, _, _)| *n == target),
                    "{name} imports {target}"
                );
            }
        }
    }

    #[test]
    fn web_origin_seen_from_the_cli() {
        assert_eq!(
            web_origin_for(None, "ws://127.0.0.1:7420/ws").as_deref(),
            Some("http://localhost:7420")
        );
        assert_eq!(
            web_origin_for(None, "wss://[::1]:9000/ws").as_deref(),
            Some("https://localhost:9000")
        );
        assert_eq!(web_origin_for(None, "ws://0.0.0.0:7420/ws"), None);
        assert_eq!(
            web_origin_for(Some("https://a.example:1"), "ws://127.0.0.1:7420/ws").as_deref(),
            Some("https://a.example:1")
        );
        assert_eq!(
            pairing_url("http://localhost:1", "ABCD-EFGH"),
            "http://localhost:1/#pair=ABCD-EFGH"
        );
    }

    #[test]
    fn the_policy_allows_only_this_origin() {
        let csp = content_security_policy("http://localhost:7420");
        assert!(csp.contains("connect-src 'self' ws://localhost:7420;"));
        assert!(!csp.contains("unsafe"));
        assert!(content_security_policy("https://a.example").contains("wss://a.example;"));
    }
}
