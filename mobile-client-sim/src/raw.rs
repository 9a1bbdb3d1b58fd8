//! A raw WebSocket connection to the server: frames in, frames out, no
//! protocol logic. Tests use it to send exactly the bytes they mean.

use std::path::Path;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::client::ClientError;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type BoxIo = Box<dyn Io>;
pub type Ws = WebSocketStream<BoxIo>;

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A JSON text frame.
    Frame(Value),
    /// A text frame that is not JSON (never expected from the server).
    Text(String),
    /// The connection closed: the close code and reason, if a close frame came.
    Closed(Option<(u16, String)>),
}

pub struct RawConn {
    pub ws: Ws,
}

/// Opens a TCP (or TLS, for `wss://`) stream and upgrades it.
pub async fn connect_ws(url: &str, ca_pem: Option<&Path>) -> Result<Ws, ClientError> {
    connect_ws_from(url, ca_pem, None).await
}

/// Like [`connect_ws`], from the local address `from` (e.g. 127.0.0.2, to
/// test per-address limits on one machine).
pub async fn connect_ws_from(
    url: &str,
    ca_pem: Option<&Path>,
    from: Option<std::net::IpAddr>,
) -> Result<Ws, ClientError> {
    let rest = url
        .strip_prefix("ws://")
        .map(|r| (false, r))
        .or_else(|| url.strip_prefix("wss://").map(|r| (true, r)));
    let Some((tls, rest)) = rest else {
        return Err(ClientError::Protocol(format!(
            "not a ws:// or wss:// URL: {url}"
        )));
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let tcp = match from {
        None => TcpStream::connect(authority).await?,
        Some(ip) => {
            let target = tokio::net::lookup_host(authority)
                .await?
                .next()
                .ok_or_else(|| ClientError::Protocol(format!("cannot resolve {authority}")))?;
            let sock = if ip.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            sock.bind(std::net::SocketAddr::new(ip, 0))?;
            sock.connect(target).await?
        }
    };
    tcp.set_nodelay(true)?;
    let io: BoxIo = if tls {
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        let ca = ca_pem.ok_or_else(|| {
            ClientError::Protocol("wss:// needs a CA certificate (--ca PEM)".into())
        })?;
        let pem = std::fs::read(ca)?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots
                .add(cert?)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let host = authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
            .trim_matches(['[', ']']);
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Box::new(
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await?,
        )
    } else {
        Box::new(tcp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(256 << 20))
        .max_frame_size(Some(256 << 20));
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, io, Some(config)).await?;
    Ok(ws)
}

impl RawConn {
    pub async fn connect(url: &str) -> Result<RawConn, ClientError> {
        Ok(RawConn {
            ws: connect_ws(url, None).await?,
        })
    }

    pub async fn connect_tls(url: &str, ca_pem: Option<&Path>) -> Result<RawConn, ClientError> {
        Ok(RawConn {
            ws: connect_ws(url, ca_pem).await?,
        })
    }

    pub async fn connect_from(
        url: &str,
        ca_pem: Option<&Path>,
        from: Option<std::net::IpAddr>,
    ) -> Result<RawConn, ClientError> {
        Ok(RawConn {
            ws: connect_ws_from(url, ca_pem, from).await?,
        })
    }

    pub async fn send_text(&mut self, s: impl Into<String>) -> Result<(), ClientError> {
        Ok(self.ws.send(Message::text(s.into())).await?)
    }

    pub async fn send_json(&mut self, v: &Value) -> Result<(), ClientError> {
        self.send_text(v.to_string()).await
    }

    pub async fn send_binary(&mut self, b: Vec<u8>) -> Result<(), ClientError> {
        Ok(self.ws.send(Message::binary(b)).await?)
    }

    /// The next frame, skipping pings and pongs.
    pub async fn recv(&mut self) -> Incoming {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return match serde_json::from_str(t.as_str()) {
                        Ok(v) => Incoming::Frame(v),
                        Err(_) => Incoming::Text(t.to_string()),
                    };
                }
                Some(Ok(Message::Close(c))) => {
                    return Incoming::Closed(c.map(|c| (u16::from(c.code), c.reason.to_string())));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Incoming::Closed(None),
            }
        }
    }

    /// The next JSON frame; an error if the connection closed instead.
    pub async fn recv_frame(&mut self) -> Result<Value, ClientError> {
        match self.recv().await {
            Incoming::Frame(v) => Ok(v),
            Incoming::Text(t) => Err(ClientError::Protocol(format!("non-JSON frame: {t}"))),
            Incoming::Closed(c) => Err(ClientError::Closed(c)),
        }
    }

    /// Reads until the connection closes; returns the close code.
    pub async fn closed(&mut self) -> Option<(u16, String)> {
        loop {
            if let Incoming::Closed(c) = self.recv().await {
                return c;
            }
        }
    }
}
