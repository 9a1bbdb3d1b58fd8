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

use crate::endpoint::{ClientError, Endpoint};

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
    connect_ws_pinned(url, ca_pem, None, from).await
}

/// Like [`connect_ws_from`], for `wss://` with a pinned certificate key:
/// `tls_pin` is the lowercase hex SHA-256 of the server certificate's
/// SubjectPublicKeyInfo (`tls_spki_sha256` of `secrets-agent pair --json`).
/// With a pin, the certificate is accepted exactly when its key matches
/// (no CA needed, as for an SSH host key); the TLS handshake signature is
/// still verified with that key.
pub async fn connect_ws_pinned(
    url: &str,
    ca_pem: Option<&Path>,
    tls_pin: Option<&str>,
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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let cfg = match tls_pin {
            Some(pin) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedKey {
                    pin: pin.to_ascii_lowercase(),
                    algorithms: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth(),
            None => {
                let mut roots = rustls::RootCertStore::empty();
                let ca = ca_pem.ok_or_else(|| {
                    ClientError::Protocol(
                        "wss:// needs a CA certificate (--ca PEM) or a pinned key (--tls-pin)"
                            .into(),
                    )
                })?;
                let pem = std::fs::read(ca)?;
                use rustls::pki_types::pem::PemObject;
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| ClientError::Protocol(e.to_string()))?;
                    roots
                        .add(cert)
                        .map_err(|e| ClientError::Protocol(e.to_string()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
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

    /// Connects to what `ep` names (CA or pinned key for `wss://`, source address).
    pub async fn connect_endpoint(ep: &Endpoint) -> Result<RawConn, ClientError> {
        Ok(RawConn {
            ws: connect_ws_pinned(&ep.url, ep.ca.as_deref(), ep.tls_pin.as_deref(), ep.from)
                .await?,
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

/// Accepts the server certificate whose SubjectPublicKeyInfo hashes to the
/// pin, and verifies the handshake signatures with its key.
#[derive(Debug)]
struct PinnedKey {
    pin: String,
    algorithms: tokio_rustls::rustls::crypto::WebPkiSupportedAlgorithms,
}

/// Lowercase hex SHA-256 of a DER certificate's SubjectPublicKeyInfo.
pub fn spki_sha256(cert_der: &[u8]) -> Option<String> {
    use sha2::Digest;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(hex::encode(sha2::Sha256::digest(
        cert.tbs_certificate.subject_pki.raw,
    )))
}

mod pinned_impl {
    use super::PinnedKey;
    use tokio_rustls::rustls::client::danger::{
        HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
    };
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio_rustls::rustls::{DigitallySignedStruct, Error, SignatureScheme, crypto};

    impl ServerCertVerifier for PinnedKey {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match super::spki_sha256(end_entity) {
                Some(h) if h == self.pin => Ok(ServerCertVerified::assertion()),
                _ => Err(Error::General(
                    "the server's TLS key is not the pinned one".into(),
                )),
            }
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    }
}
