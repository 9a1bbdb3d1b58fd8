//! TLS: the acceptor built from `server.tls_cert` / `server.tls_key` (PEM),
//! and the certificate pin a phone keeps (`tls_spki_sha256`, SPEC §2).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::config::Config;
use crate::state::DataDir;

/// A TLS file that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

fn read(p: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError(format!("cannot read {}: {e}", p.display())))
}

fn cert_chain(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// The acceptor, or None when TLS is not configured.
pub fn acceptor(dir: &DataDir, config: &Config) -> Result<Option<TlsAcceptor>, TlsError> {
    let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) else {
        return Ok(None);
    };
    let (cert, key) = (dir.resolve(cert), dir.resolve(key));
    let certs = cert_chain(&cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&key)?)
        .map_err(|e| TlsError(format!("{}: no usable private key: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(e.to_string()))?;
    Ok(Some(TlsAcceptor::from(Arc::new(cfg))))
}

/// Lowercase hex SHA-256 of the server certificate's SubjectPublicKeyInfo
/// (the first certificate of `server.tls_cert`), or None without TLS. A
/// phone pins it at pairing: it survives certificate renewal with the same
/// key, and fails closed when the key changes.
pub fn spki_sha256(dir: &DataDir, config: &Config) -> Result<Option<String>, TlsError> {
    let (Some(cert), Some(_)) = (&config.server.tls_cert, &config.server.tls_key) else {
        return Ok(None);
    };
    let path = dir.resolve(cert);
    let chain = cert_chain(&path)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(chain[0].as_ref())
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    Ok(Some(crate::auth::keys::sha256_hex(
        parsed.tbs_certificate.subject_pki.raw,
    )))
}
