//! Reads a certificate chain and its private key from PEM files and checks that they
//! belong together; every refusal names the file and the reason.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A loaded pair, ready for handshakes.
pub struct Pair {
    pub key: Arc<CertifiedKey>,
    /// The end-entity certificate's notAfter, Unix seconds.
    pub not_after: i64,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// Loads `cert` (PEM chain, end entity first) and `key` (PEM PKCS#8, RSA or SEC1).
pub fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Pair, String> {
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")",
            cert.display()
        ));
    }
    let not_after = super::expiry::not_after(&chain[0]).ok_or_else(|| {
        format!(
            "{}: the first certificate is not a valid X.509 certificate",
            cert.display()
        )
    })?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "{}: no PEM private key in it (expected PKCS#8, RSA or SEC1): {e}",
            key.display()
        )
    })?;
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| format!("{}: unusable private key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "{}: the key does not match the certificate in {} ({e})",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Pair {
        key: Arc::new(certified),
        not_after,
    })
}
