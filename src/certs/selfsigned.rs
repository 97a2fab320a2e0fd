//! Generates a self-signed certificate and key (rcgen) for trying `wss://` locally.

use std::path::{Path, PathBuf};

/// A generated pair, PEM encoded.
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A self-signed ECDSA P-256 certificate for `names` (DNS names or IP addresses), valid
/// from a day ago for `days` days.
pub fn generate(names: &[&str], days: u32) -> Result<SelfSigned, String> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "arcgate self-signed");
    let today = time::OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT);
    params.not_before = today - time::Duration::days(1);
    params.not_after = today + time::Duration::days(days.into());
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok(SelfSigned {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes a pair for localhost to `dir/cert.pem` and `dir/key.pem` (the key readable by
/// the owner only) and returns their paths.
pub fn write_localhost(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let pair = generate(&["localhost", "127.0.0.1", "::1"], 90)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &pair.cert_pem)
        .map_err(|e| format!("{}: cannot write: {e}", cert.display()))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key)
        .and_then(|mut f| f.write_all(pair.key_pem.as_bytes()))
        .map_err(|e| format!("{}: cannot write: {e}", key.display()))?;
    Ok((cert, key))
}
