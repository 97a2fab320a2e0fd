//! The TLS certificate of the WebSocket listener: loading and checking the PEM pair,
//! the rustls server configuration, reloads (SIGHUP and file changes) and its status.

mod expiry;
pub mod pair;
pub mod selfsigned;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

pub use watch::spawn_watcher;

/// What `/metrics` and `/v1/status` show about TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsStatus {
    /// "off" or "rustls" (a later kTLS mode would be another value).
    pub mode: &'static str,
    /// The certificate in use: its file and its notAfter (Unix seconds).
    pub cert_file: Option<PathBuf>,
    pub cert_expiry_unix: Option<i64>,
}

/// The status without TLS.
pub fn off() -> TlsStatus {
    TlsStatus {
        mode: "off",
        ..TlsStatus::default()
    }
}

/// The current certificate: handshakes read it, reloads replace it; connections keep
/// the one they started with.
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    not_after: AtomicI64,
    provider: Arc<CryptoProvider>,
}

impl CertStore {
    /// Loads the pair; the error names the file and the reason.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<CertStore, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let pair = pair::load(&cert, &key, &provider)?;
        Ok(CertStore {
            cert,
            key,
            current: ArcSwap::new(pair.key),
            not_after: AtomicI64::new(pair.not_after),
            provider,
        })
    }

    /// Reads the files again; a pair that does not load stays unused and is logged.
    pub fn reload(&self, cause: &str) -> bool {
        match pair::load(&self.cert, &self.key, &self.provider) {
            Ok(pair) => {
                self.current.store(pair.key);
                self.not_after.store(pair.not_after, Ordering::Relaxed);
                tracing::info!(
                    cause,
                    cert = %self.cert.display(),
                    not_after = pair.not_after,
                    "TLS certificate reloaded"
                );
                true
            }
            Err(reason) => {
                tracing::error!(
                    cause,
                    %reason,
                    "TLS certificate reload refused; the current certificate stays"
                );
                false
            }
        }
    }

    /// The rustls configuration of the listener: TLS 1.2 and 1.3, ALPN `http/1.1` (a
    /// client offering only other protocols fails the handshake), this store's
    /// certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, String> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    pub fn status(&self) -> TlsStatus {
        TlsStatus {
            mode: "rustls",
            cert_file: Some(self.cert.clone()),
            cert_expiry_unix: Some(self.not_after.load(Ordering::Relaxed)),
        }
    }

    pub(crate) fn paths(&self) -> [&PathBuf; 2] {
        [&self.cert, &self.key]
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The status of an optional store (what `/v1/status` calls).
pub fn status(store: Option<&CertStore>) -> TlsStatus {
    store.map_or_else(off, CertStore::status)
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    #[test]
    fn expiry_of_a_generated_certificate_is_read() {
        let pair = super::selfsigned::generate(&["localhost"], 30).unwrap();
        let der = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let at = super::expiry::not_after(&der).unwrap();
        // Midnight UTC of the day 30 days from today.
        assert!(
            (now + 29 * 86_400..=now + 30 * 86_400).contains(&at),
            "{at}"
        );
        assert_eq!(at % 86_400, 0);
    }

    #[test]
    fn status_without_tls_says_off() {
        assert_eq!(super::status(None).mode, "off");
        assert_eq!(super::status(None).cert_expiry_unix, None);
    }
}
