//! TLS for the one listener: rustls with the *ring* provider, TLS 1.2 and 1.3 only.
//!
//! Owns loading the certificate chain and key (PEM, via rustls' own `pki_types` parser) into
//! a `ServerConfig`, at start (a bad file ends the process with exit code 2, naming the
//! variable) and on SIGHUP (a bad file keeps the old pair and logs an error). The per-socket
//! TLS pump lives in `conn`; this module never touches a socket.
//!
//! *ring* rather than aws-lc-rs: it builds with a plain C compiler (also for musl, for the
//! static binary), with no cmake or Go, and adds less to the binary.

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Why the certificate and key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsError {
    /// The chain file: unreadable, not PEM, or no certificate in it.
    Cert(String),
    /// The key file: unreadable, not PEM, or no private key in it.
    Key(String),
    /// The key does not belong to the certificate, or rustls refused the pair.
    Pair(String),
}

impl TlsError {
    /// The variable to name in the one-line start-up error.
    pub fn var(&self) -> &'static str {
        match self {
            TlsError::Cert(_) => "FEDMCP_TLS_CERT",
            TlsError::Key(_) | TlsError::Pair(_) => "FEDMCP_TLS_KEY",
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Cert(m) => write!(f, "{}: {m}; expected a PEM certificate chain", self.var()),
            TlsError::Key(m) => write!(
                f,
                "{}: {m}; expected a PEM private key (PKCS#8, PKCS#1 or SEC1)",
                self.var()
            ),
            TlsError::Pair(m) => write!(
                f,
                "{}: {m}; expected the private key of FEDMCP_TLS_CERT's first certificate",
                self.var()
            ),
        }
    }
}

impl std::error::Error for TlsError {}

/// Loads the chain and key into a server configuration.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Cert(format!("cannot read {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert(format!("{} is not valid PEM: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Cert(format!(
            "{} holds no certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Key(format!("no usable private key in {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Pair(format!("the key does not fit the certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The TLS client configuration for dialled `wss://` servers: roots from
/// `FEDMCP_TRUSTED_CA_FILE` (PEM), else the bundled web roots (webpki-roots); host names
/// are verified.
pub fn client_config(trusted_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match trusted_ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                format!(
                    "FEDMCP_TRUSTED_CA_FILE: cannot read {}: {e}; expected PEM certificates",
                    path.display()
                )
            })?;
            for c in certs {
                let c = c.map_err(|e| format!("FEDMCP_TRUSTED_CA_FILE: {} is not valid PEM: {e}; expected PEM certificates", path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("FEDMCP_TRUSTED_CA_FILE: a certificate was refused: {e}; expected CA certificates"))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "FEDMCP_TRUSTED_CA_FILE: {} holds no certificate; expected PEM CA certificates",
                    path.display()
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("FEDMCP_TRUSTED_CA_FILE: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_name_their_variable() {
        let e = load(
            Path::new("/nonexistent/cert.pem"),
            Path::new("/nonexistent/key.pem"),
        )
        .unwrap_err();
        assert_eq!(e.var(), "FEDMCP_TLS_CERT");
        assert!(e.to_string().starts_with("FEDMCP_TLS_CERT: "));
        let dir = std::env::temp_dir().join(format!("fedmcp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not pem at all").unwrap();
        assert_eq!(load(&junk, &junk).unwrap_err().var(), "FEDMCP_TLS_CERT");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
