//! JWT verification (jsonwebtoken, keys built once) into an `Identity`, and token minting.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Who a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    User,
    Service,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::User => "user",
            Role::Service => "service",
        }
    }

    /// The role named by a token's `role` claim.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "agent" => Some(Role::Agent),
            "user" => Some(Role::User),
            "service" => Some(Role::Service),
            _ => None,
        }
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    /// Machine id, user id or service name.
    pub sub: Box<str>,
    /// An agent's cluster.
    pub cluster: Option<Box<str>>,
    /// The clusters a user may see (empty for agents and services).
    pub clusters: Vec<Box<str>>,
    /// A user's allowed command types (`None`: all; `"*"` in the list: all).
    pub perms: Option<Vec<Box<str>>>,
    /// `exp`, Unix seconds.
    pub exp: u64,
    /// `iat`, Unix seconds, when present.
    pub iat: Option<u64>,
}

impl Identity {
    /// Whether events of `cluster` reach this identity (services see every cluster).
    pub fn sees_cluster(&self, cluster: &str) -> bool {
        match self.role {
            Role::Service => true,
            Role::User => self.clusters.iter().any(|c| &**c == cluster),
            Role::Agent => self.cluster.as_deref() == Some(cluster),
        }
    }

    /// Whether this identity may issue a command of type `kind` (ignoring clusters).
    pub fn may_command(&self, kind: &str) -> bool {
        match self.role {
            Role::Service => true,
            Role::User => match &self.perms {
                None => true,
                Some(perms) => perms.iter().any(|p| &**p == "*" || &**p == kind),
            },
            Role::Agent => false,
        }
    }

    /// Same role, subject and cluster(s): a token refresh, not a new identity.
    /// The order of `clusters` does not matter.
    pub fn same_identity(&self, other: &Identity) -> bool {
        self.role == other.role
            && self.sub == other.sub
            && self.cluster == other.cluster
            && same_set(&self.clusters, &other.clusters)
    }
}

fn same_set(a: &[Box<str>], b: &[Box<str>]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x)) && b.iter().all(|x| a.contains(x))
}

/// The verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// HS256 shared secret.
    Secret(String),
    /// PEM public key (RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA).
    PublicKeyPem(Vec<u8>),
}

/// Why authentication failed, as counted (`arcgate_auth_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    BadSignature,
    Expired,
    NotYetValid,
    Revoked,
    WrongAlgorithm,
    WrongIssuer,
    WrongAudience,
    /// A claim missing, of the wrong type, or an unknown role.
    BadClaims,
    MalformedToken,
    /// A token of another role than the endpoint's.
    WrongRole,
    /// An agent's `machineId` missing or not its token's `sub`.
    MachineId,
    /// Something else than `auth` came first.
    NotAuth,
    /// A re-auth with a token of another identity.
    IdentityChanged,
    /// No `auth` in time.
    Timeout,
    Other,
}

impl AuthFailure {
    /// The metric labels, in variant order.
    pub const LABELS: [&'static str; 15] = [
        "bad_signature",
        "expired",
        "not_yet_valid",
        "revoked",
        "wrong_algorithm",
        "wrong_issuer",
        "wrong_audience",
        "bad_claims",
        "malformed_token",
        "wrong_role",
        "machine_id",
        "not_auth",
        "identity_changed",
        "timeout",
        "other",
    ];

    pub fn label(self) -> &'static str {
        Self::LABELS[self as usize]
    }
}

/// Why a token was refused: the reason, and the text that goes into `AUTH_FAILED`'s
/// message ("bad signature", "token expired", "missing claim: sub", …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub reason: AuthFailure,
    pub message: String,
}

impl AuthError {
    pub fn new(reason: AuthFailure, message: impl Into<String>) -> AuthError {
        AuthError {
            reason,
            message: message.into(),
        }
    }
}

/// What the PEM loader accepts, for error messages.
const ACCEPTED_KEYS: &str =
    "accepted: a PEM public key (BEGIN PUBLIC KEY) of type RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA)";

/// Subjects whose tokens issued before a given time are refused (`POST /v1/revocations`).
/// Read at authentication only; kept in memory for the life of the process.
#[derive(Debug, Default)]
pub struct Revocations {
    before: DashMap<Box<str>, u64>,
    len: AtomicUsize,
}

/// The revocation list holds `Revocations::MAX` subjects already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the revocation list is full ({} subjects)", Revocations::MAX)]
pub struct RevocationsFull;

impl Revocations {
    /// Most subjects listed at once.
    pub const MAX: usize = 1_000_000;

    /// Refuses tokens of `sub` issued before `before` (Unix seconds) from now on; a later
    /// time replaces an earlier one, never the other way round.
    pub fn revoke(&self, sub: &str, before: u64) -> Result<(), RevocationsFull> {
        if let Some(mut t) = self.before.get_mut(sub) {
            *t = (*t).max(before);
            return Ok(());
        }
        if self.len.load(Ordering::Relaxed) >= Self::MAX {
            return Err(RevocationsFull);
        }
        if self.before.insert(sub.into(), before).is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether `who`'s token is revoked: its subject is listed and the token was issued
    /// (`iat`) before the listed time, or says nothing about when it was issued.
    pub fn is_revoked(&self, who: &Identity) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        match self.before.get(&who.sub) {
            Some(before) => who.iat.is_none_or(|iat| iat < *before),
            None => false,
        }
    }

    /// Subjects listed.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Verifies tokens with keys and validation rules built once.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    algorithm: Algorithm,
    leeway: u64,
    revocations: Option<Arc<Revocations>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds the key and the validation rules once. A secret means HS256; a PEM public key
    /// selects RS256, ES256 or EdDSA from its type. `leeway` counts in whole seconds.
    pub fn new(
        key: &KeySource,
        issuer: Option<&str>,
        audience: Option<&str>,
        leeway: Duration,
    ) -> Result<Verifier, String> {
        let (key, algorithm) = match key {
            KeySource::Secret(secret) if secret.is_empty() => {
                return Err("empty secret".to_string())
            }
            KeySource::Secret(secret) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            KeySource::PublicKeyPem(pem) => decoding_key_from_pem(pem)?,
        };
        Ok(Verifier {
            key,
            validation: validation(algorithm, issuer, audience),
            algorithm,
            leeway: leeway.as_secs(),
            revocations: None,
        })
    }

    /// Also refuses tokens on `revocations` ("token revoked").
    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> Verifier {
        self.revocations = Some(revocations);
        self
    }

    /// The one algorithm tokens must be signed with: "HS256", "RS256", "ES256" or "EdDSA".
    pub fn algorithm(&self) -> &'static str {
        algorithm_name(self.algorithm)
    }

    /// Checks signature, `exp` (required), `nbf`, `iss`, `aud`, `sub` (required), `role` and
    /// the role's claims, against `now` (Unix seconds) with the configured leeway.
    pub fn verify(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| decode_error(e.kind()))?
            .claims;
        let exp = required_time(claims.exp, "exp")?;
        let sub = required_text(claims.sub, "sub")?;
        self.check_times(exp, claims.nbf, now)?;
        let iat = optional_time(claims.iat, "iat")?;
        let role = match claims.role {
            Claim::Absent => return Err(missing("role")),
            Claim::Present(r) => Role::parse(&r).ok_or_else(unknown_role)?,
            Claim::Invalid => return Err(unknown_role()),
        };
        let mut id = Identity {
            role,
            sub: sub.into(),
            cluster: None,
            clusters: Vec::new(),
            perms: None,
            exp,
            iat,
        };
        match role {
            Role::Agent => id.cluster = Some(required_text(claims.cluster, "cluster")?.into()),
            Role::User => {
                id.clusters = required_list(claims.clusters, "clusters")?;
                id.perms = optional_list(claims.perms, "perms")?;
            }
            Role::Service => {}
        }
        if self.revocations.as_ref().is_some_and(|r| r.is_revoked(&id)) {
            return Err(AuthError::new(AuthFailure::Revoked, "token revoked"));
        }
        Ok(id)
    }

    /// `exp + leeway > now` and, when present, `nbf - leeway <= now`.
    fn check_times(&self, exp: u64, nbf: Claim<f64>, now: u64) -> Result<(), AuthError> {
        if exp.saturating_add(self.leeway) <= now {
            return Err(AuthError::new(AuthFailure::Expired, "token expired"));
        }
        if let Some(nbf) = optional_time(nbf, "nbf")? {
            if nbf.saturating_sub(self.leeway) > now {
                let reason = AuthFailure::NotYetValid;
                return Err(AuthError::new(reason, "token not yet valid"));
            }
        }
        Ok(())
    }
}

/// jsonwebtoken checks the signature, the algorithm and (when configured) `iss`/`aud`;
/// times are checked against the caller's `now` instead of the system clock.
fn validation(algorithm: Algorithm, issuer: Option<&str>, audience: Option<&str>) -> Validation {
    let mut v = Validation::new(algorithm);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.leeway = 0;
    v.required_spec_claims.clear();
    if let Some(iss) = issuer {
        v.set_issuer(&[iss]);
        v.required_spec_claims.insert("iss".to_string());
    }
    match audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            v.required_spec_claims.insert("aud".to_string());
        }
        None => v.validate_aud = false,
    }
    v
}

fn decode_error(kind: &ErrorKind) -> AuthError {
    use AuthFailure as F;
    let (reason, message) = match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => (F::BadSignature, "bad signature"),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => (F::WrongAlgorithm, "wrong algorithm"),
        ErrorKind::InvalidIssuer => (F::WrongIssuer, "wrong issuer"),
        ErrorKind::InvalidAudience => (F::WrongAudience, "wrong audience"),
        ErrorKind::MissingRequiredClaim(claim) => return missing(claim),
        ErrorKind::InvalidClaimFormat(claim) => return invalid(claim),
        ErrorKind::ExpiredSignature => (F::Expired, "token expired"),
        ErrorKind::ImmatureSignature => (F::NotYetValid, "token not yet valid"),
        _ => (F::MalformedToken, "malformed token"),
    };
    AuthError::new(reason, message)
}

fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => "unsupported",
    }
}

/// Detects the key type of a PEM public key; refuses private keys and certificates
/// with a message saying what to pass instead.
fn decoding_key_from_pem(pem: &[u8]) -> Result<(DecodingKey, Algorithm), String> {
    let label = pem_label(pem).ok_or_else(|| format!("not a PEM file; {ACCEPTED_KEYS}"))?;
    if label.contains("PRIVATE KEY") {
        return Err(format!(
            "holds a private key ({label}); give the public key instead \
             (openssl pkey -in KEY -pubout); {ACCEPTED_KEYS}"
        ));
    }
    if label != "PUBLIC KEY" && label != "RSA PUBLIC KEY" {
        return Err(format!(
            "holds a {label}, not a public key; {ACCEPTED_KEYS}"
        ));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        check_rsa_size(&key)?;
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        check_p256(&key)?;
        return Ok((key, Algorithm::ES256));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    Err(format!(
        "unsupported or unreadable public key; {ACCEPTED_KEYS}"
    ))
}

/// The label of the first `-----BEGIN …-----` line.
fn pem_label(pem: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let len = text[start..].find("-----")?;
    Some(text[start..start + len].trim())
}

fn key_der(key: &DecodingKey) -> &[u8] {
    match key.kind() {
        DecodingKeyKind::SecretOrDer(der) => der,
        DecodingKeyKind::RsaModulusExponent { n, .. } => n,
    }
}

/// aws-lc verifies RS256 only with 2048- to 8192-bit keys: refuse others at start
/// rather than reject every token as "bad signature".
fn check_rsa_size(key: &DecodingKey) -> Result<(), String> {
    // PKCS#1 DER of the public key: the modulus dominates its length.
    let len = key_der(key).len();
    if len < 256 {
        return Err(format!("RSA key shorter than 2048 bits; {ACCEPTED_KEYS}"));
    }
    if len > 8192 / 8 + 64 {
        return Err(format!("RSA key longer than 8192 bits; {ACCEPTED_KEYS}"));
    }
    Ok(())
}

/// A P-256 point is 65 bytes uncompressed or 33 compressed; other curves are longer.
fn check_p256(key: &DecodingKey) -> Result<(), String> {
    match key_der(key).len() {
        33 | 65 => Ok(()),
        _ => Err(format!("EC key is not on curve P-256; {ACCEPTED_KEYS}")),
    }
}

/// A claim as found in the token: absent (or null), of the expected type, or not.
#[derive(Debug, Default)]
enum Claim<T> {
    #[default]
    Absent,
    Present(T),
    Invalid,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Lenient<T> {
    Valid(Option<T>),
    Other(serde::de::IgnoredAny),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Claim<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Lenient::<T>::deserialize(d)? {
            Lenient::Valid(Some(v)) => Claim::Present(v),
            Lenient::Valid(None) => Claim::Absent,
            Lenient::Other(_) => Claim::Invalid,
        })
    }
}

/// The claims arcgate reads; a claim of the wrong type is reported by name, not as a
/// parse failure of the whole token.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    role: Claim<String>,
    #[serde(default)]
    sub: Claim<String>,
    #[serde(default)]
    cluster: Claim<String>,
    #[serde(default)]
    clusters: Claim<Vec<String>>,
    #[serde(default)]
    perms: Claim<Vec<String>>,
    // NumericDate may be fractional (RFC 7519 §2).
    #[serde(default)]
    exp: Claim<f64>,
    #[serde(default)]
    nbf: Claim<f64>,
    #[serde(default)]
    iat: Claim<f64>,
}

fn invalid(name: &str) -> AuthError {
    AuthError::new(AuthFailure::BadClaims, format!("invalid claim: {name}"))
}

fn unknown_role() -> AuthError {
    AuthError::new(AuthFailure::BadClaims, "unknown role")
}

fn missing(name: &str) -> AuthError {
    AuthError::new(AuthFailure::BadClaims, format!("missing claim: {name}"))
}

fn optional_time(claim: Claim<f64>, name: &str) -> Result<Option<u64>, AuthError> {
    match claim {
        Claim::Absent => Ok(None),
        // Whole seconds; out-of-range values are refused rather than saturated.
        Claim::Present(t) if t.is_finite() && (0.0..1e15).contains(&t) => Ok(Some(t as u64)),
        _ => Err(invalid(name)),
    }
}

fn required_time(claim: Claim<f64>, name: &str) -> Result<u64, AuthError> {
    optional_time(claim, name)?.ok_or_else(|| missing(name))
}

fn required_text(claim: Claim<String>, name: &str) -> Result<String, AuthError> {
    match claim {
        Claim::Absent => Err(missing(name)),
        Claim::Present(s) if !s.is_empty() => Ok(s),
        _ => Err(invalid(name)),
    }
}

fn required_list(claim: Claim<Vec<String>>, name: &str) -> Result<Vec<Box<str>>, AuthError> {
    optional_list(claim, name)?.ok_or_else(|| missing(name))
}

fn optional_list(
    claim: Claim<Vec<String>>,
    name: &str,
) -> Result<Option<Vec<Box<str>>>, AuthError> {
    match claim {
        Claim::Absent => Ok(None),
        Claim::Present(list) => Ok(Some(list.into_iter().map(String::into_boxed_str).collect())),
        Claim::Invalid => Err(invalid(name)),
    }
}

/// What to put in a minted token.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    pub role: String,
    pub sub: String,
    pub cluster: Option<String>,
    pub clusters: Option<Vec<String>>,
    pub perms: Option<Vec<String>>,
    pub ttl: Duration,
}

#[derive(Serialize)]
struct MintClaims<'a> {
    role: &'a str,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clusters: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    perms: Option<&'a [String]>,
    iat: u64,
    exp: u64,
}

/// An HS256 token for `spec`, issued at `now` (Unix seconds), expiring at `now + ttl`.
pub fn mint_hs256(secret: &str, spec: &TokenSpec, now: u64) -> String {
    let claims = MintClaims {
        role: &spec.role,
        sub: &spec.sub,
        cluster: spec.cluster.as_deref(),
        clusters: spec.clusters.as_deref(),
        perms: spec.perms.as_deref(),
        iat: now,
        exp: now.saturating_add(spec.ttl.as_secs()),
    };
    let key = EncodingKey::from_secret(secret.as_bytes());
    // HMAC accepts any key and these claims always serialize.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .expect("HS256 signing of plain claims cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const SECRET: &str = "test-secret-of-thirty-two-bytes!";
    const NOW: u64 = 1_700_000_000;
    const LEEWAY: u64 = 5;

    const RSA_PRIVATE: &[u8] = include_bytes!("../tests/keys/rsa_private.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../tests/keys/rsa_public.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../tests/keys/ec_p256_private.pem");
    const EC_PUBLIC: &[u8] = include_bytes!("../tests/keys/ec_p256_public.pem");
    const EC_P384_PUBLIC: &[u8] = include_bytes!("../tests/keys/ec_p384_public.pem");
    const ED_PRIVATE: &[u8] = include_bytes!("../tests/keys/ed25519_private.pem");
    const ED_PUBLIC: &[u8] = include_bytes!("../tests/keys/ed25519_public.pem");

    fn hs_verifier(iss: Option<&str>, aud: Option<&str>) -> Verifier {
        let key = KeySource::Secret(SECRET.to_string());
        Verifier::new(&key, iss, aud, Duration::from_secs(LEEWAY)).unwrap()
    }

    fn pem_verifier(pem: &[u8]) -> Verifier {
        let key = KeySource::PublicKeyPem(pem.to_vec());
        Verifier::new(&key, None, None, Duration::from_secs(LEEWAY)).unwrap()
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
    }

    fn hs(claims: Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            &claims,
        )
    }

    fn agent_claims() -> Value {
        json!({"role": "agent", "sub": "mch_1", "cluster": "clu_a", "exp": NOW + 60, "iat": NOW})
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        claims[key] = value;
        claims
    }

    fn without(mut claims: Value, key: &str) -> Value {
        claims.as_object_mut().unwrap().remove(key);
        claims
    }

    /// The refusal's message, after checking that its reason is the one the message
    /// stands for.
    fn refused(verifier: &Verifier, token: &str) -> String {
        let e = verifier.verify(token, NOW).unwrap_err();
        assert_eq!(e.reason, reason_of(&e.message), "{}", e.message);
        e.message
    }

    fn reason_of(message: &str) -> AuthFailure {
        use AuthFailure as F;
        match message {
            "bad signature" => F::BadSignature,
            "token expired" => F::Expired,
            "token not yet valid" => F::NotYetValid,
            "token revoked" => F::Revoked,
            "wrong algorithm" => F::WrongAlgorithm,
            "wrong issuer" => F::WrongIssuer,
            "wrong audience" => F::WrongAudience,
            "malformed token" => F::MalformedToken,
            "unknown role" => F::BadClaims,
            m if m.starts_with("missing claim: ") || m.starts_with("invalid claim: ") => {
                F::BadClaims
            }
            m => panic!("unexpected message {m:?}"),
        }
    }

    #[test]
    fn verifier_is_shared_across_threads() {
        fn shareable<T: Send + Sync>(_: &T) {}
        shareable(&hs_verifier(None, None));
    }

    #[test]
    fn hs256_agent_token_verifies() {
        let id = hs_verifier(None, None)
            .verify(&hs(agent_claims()), NOW)
            .unwrap();
        assert_eq!(id.role, Role::Agent);
        assert_eq!(&*id.sub, "mch_1");
        assert_eq!(id.cluster.as_deref(), Some("clu_a"));
        assert!(id.clusters.is_empty());
        assert_eq!(id.perms, None);
        assert_eq!(id.exp, NOW + 60);
        assert_eq!(id.iat, Some(NOW));
    }

    #[test]
    fn hs256_user_and_service_tokens_verify() {
        let v = hs_verifier(None, None);
        let user = hs(
            json!({"role": "user", "sub": "usr_1", "clusters": ["clu_a", "clu_b"],
            "perms": ["server:start"], "exp": NOW + 60}),
        );
        let id = v.verify(&user, NOW).unwrap();
        assert_eq!(id.role, Role::User);
        assert_eq!(
            id.clusters,
            vec!["clu_a".into(), "clu_b".into()] as Vec<Box<str>>
        );
        assert_eq!(id.perms, Some(vec!["server:start".into()]));
        assert_eq!(id.cluster, None);
        assert_eq!(id.iat, None);

        let svc = hs(json!({"role": "service", "sub": "panel", "exp": NOW + 60}));
        let id = v.verify(&svc, NOW).unwrap();
        assert_eq!(id.role, Role::Service);
        assert_eq!(&*id.sub, "panel");
    }

    #[test]
    fn rs256_es256_and_eddsa_public_keys_verify() {
        let cases = [
            (
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
                RSA_PUBLIC,
                "RS256",
            ),
            (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
                EC_PUBLIC,
                "ES256",
            ),
            (
                Algorithm::EdDSA,
                EncodingKey::from_ed_pem(ED_PRIVATE).unwrap(),
                ED_PUBLIC,
                "EdDSA",
            ),
        ];
        for (alg, private, public, name) in cases {
            let v = pem_verifier(public);
            assert_eq!(v.algorithm(), name);
            let id = v
                .verify(&sign(alg, &private, &agent_claims()), NOW)
                .unwrap();
            assert_eq!(&*id.sub, "mch_1", "{name}");
        }
        assert_eq!(hs_verifier(None, None).algorithm(), "HS256");
    }

    #[test]
    fn tampered_payload_is_a_bad_signature() {
        let v = pem_verifier(EC_PUBLIC);
        let key = EncodingKey::from_ec_pem(EC_PRIVATE).unwrap();
        let good = sign(Algorithm::ES256, &key, &agent_claims());
        let other = sign(
            Algorithm::ES256,
            &key,
            &with(agent_claims(), "sub", json!("mch_2")),
        );
        let parts: Vec<&str> = good.split('.').collect();
        let other_payload = other.split('.').nth(1).unwrap();
        let forged = format!("{}.{}.{}", parts[0], other_payload, parts[2]);
        assert_eq!(refused(&v, &forged), "bad signature");
    }

    #[test]
    fn other_secret_is_a_bad_signature() {
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another"),
            &agent_claims(),
        );
        assert_eq!(refused(&hs_verifier(None, None), &token), "bad signature");
    }

    #[test]
    fn algorithm_other_than_the_key_is_refused() {
        // HS256 signed with the public key as secret: the classic key-confusion attack.
        let confused = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(RSA_PUBLIC),
            &agent_claims(),
        );
        assert_eq!(
            refused(&pem_verifier(RSA_PUBLIC), &confused),
            "wrong algorithm"
        );
        let es = sign(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
            &agent_claims(),
        );
        assert_eq!(refused(&hs_verifier(None, None), &es), "wrong algorithm");
        let hs384 = sign(
            Algorithm::HS384,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            &agent_claims(),
        );
        assert_eq!(refused(&hs_verifier(None, None), &hs384), "wrong algorithm");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let v = hs_verifier(None, None);
        for token in ["", "abc", "a.b.c", "a.b", "....", "!!!.e30.sig"] {
            assert_eq!(refused(&v, token), "malformed token", "{token:?}");
        }
        // An unsigned token ("alg": "none") names no algorithm jsonwebtoken knows.
        let payload = hs(agent_claims()).split('.').nth(1).unwrap().to_string();
        let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert_eq!(refused(&v, &unsigned), "malformed token");
        // Signed correctly, but the payload is not a JSON object.
        assert_eq!(refused(&v, &hs(json!([1]))), "malformed token");
        // The signature is checked before the payload is read.
        let good = hs(agent_claims());
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.!!!.{}", parts[0], parts[2]);
        assert_eq!(refused(&v, &forged), "bad signature");
    }

    #[test]
    fn expiry_honours_the_leeway_to_the_second() {
        let v = hs_verifier(None, None);
        let at = |exp: u64| hs(with(agent_claims(), "exp", json!(exp)));
        // Valid while exp + leeway > now.
        assert!(v.verify(&at(NOW - LEEWAY + 1), NOW).is_ok());
        assert_eq!(refused(&v, &at(NOW - LEEWAY)), "token expired");
        assert_eq!(refused(&v, &at(0)), "token expired");
        assert!(v.verify(&at(NOW + 60), NOW + 60 + LEEWAY - 1).is_ok());
        assert_eq!(
            v.verify(&at(NOW + 60), NOW + 60 + LEEWAY)
                .unwrap_err()
                .message,
            "token expired"
        );
    }

    #[test]
    fn not_before_honours_the_leeway_to_the_second() {
        let v = hs_verifier(None, None);
        let at = |nbf: u64| hs(with(agent_claims(), "nbf", json!(nbf)));
        assert!(v.verify(&at(NOW + LEEWAY), NOW).is_ok());
        assert!(v.verify(&at(NOW - 100), NOW).is_ok());
        assert_eq!(refused(&v, &at(NOW + LEEWAY + 1)), "token not yet valid");
        assert_eq!(
            refused(&v, &hs(with(agent_claims(), "nbf", json!("soon")))),
            "invalid claim: nbf"
        );
    }

    #[test]
    fn fractional_times_are_accepted() {
        let v = hs_verifier(None, None);
        let token = hs(with(agent_claims(), "exp", json!((NOW + 60) as f64 + 0.5)));
        assert_eq!(v.verify(&token, NOW).unwrap().exp, NOW + 60);
    }

    #[test]
    fn missing_and_invalid_claims_are_named() {
        let v = hs_verifier(None, None);
        let user = json!({"role": "user", "sub": "usr_1", "clusters": ["clu_a"], "exp": NOW + 60});
        let cases = [
            (without(agent_claims(), "exp"), "missing claim: exp"),
            (without(agent_claims(), "sub"), "missing claim: sub"),
            (without(agent_claims(), "role"), "missing claim: role"),
            (without(agent_claims(), "cluster"), "missing claim: cluster"),
            (
                with(agent_claims(), "cluster", Value::Null),
                "missing claim: cluster",
            ),
            (without(user.clone(), "clusters"), "missing claim: clusters"),
            (with(agent_claims(), "role", json!("admin")), "unknown role"),
            (with(agent_claims(), "role", json!(7)), "unknown role"),
            (
                with(agent_claims(), "exp", json!("tomorrow")),
                "invalid claim: exp",
            ),
            (with(agent_claims(), "exp", json!(-5)), "invalid claim: exp"),
            (with(agent_claims(), "sub", json!("")), "invalid claim: sub"),
            (with(agent_claims(), "sub", json!(12)), "invalid claim: sub"),
            (
                with(agent_claims(), "cluster", json!(["clu_a"])),
                "invalid claim: cluster",
            ),
            (
                with(agent_claims(), "iat", json!("now")),
                "invalid claim: iat",
            ),
            (
                with(user.clone(), "clusters", json!("clu_a")),
                "invalid claim: clusters",
            ),
            (
                with(user.clone(), "clusters", json!([1, 2])),
                "invalid claim: clusters",
            ),
            (with(user, "perms", json!("*")), "invalid claim: perms"),
        ];
        for (claims, expected) in cases {
            assert_eq!(refused(&v, &hs(claims.clone())), expected, "{claims}");
        }
    }

    #[test]
    fn issuer_is_checked_only_when_configured() {
        let with_iss = hs(with(agent_claims(), "iss", json!("panel")));
        let other_iss = hs(with(agent_claims(), "iss", json!("evil")));
        let v = hs_verifier(Some("panel"), None);
        assert!(v.verify(&with_iss, NOW).is_ok());
        assert_eq!(refused(&v, &other_iss), "wrong issuer");
        assert_eq!(refused(&v, &hs(agent_claims())), "missing claim: iss");
        let open = hs_verifier(None, None);
        assert!(open.verify(&other_iss, NOW).is_ok());
    }

    #[test]
    fn audience_is_checked_only_when_configured() {
        let v = hs_verifier(None, Some("arcgate"));
        assert!(v
            .verify(&hs(with(agent_claims(), "aud", json!("arcgate"))), NOW)
            .is_ok());
        assert!(v
            .verify(
                &hs(with(agent_claims(), "aud", json!(["x", "arcgate"]))),
                NOW
            )
            .is_ok());
        assert_eq!(
            refused(&v, &hs(with(agent_claims(), "aud", json!("other")))),
            "wrong audience"
        );
        assert_eq!(refused(&v, &hs(agent_claims())), "missing claim: aud");
        let open = hs_verifier(None, None);
        assert!(open
            .verify(&hs(with(agent_claims(), "aud", json!("other"))), NOW)
            .is_ok());
    }

    #[test]
    fn unusable_keys_are_refused_with_what_is_accepted() {
        let leeway = Duration::from_secs(5);
        let err = |key: KeySource| Verifier::new(&key, None, None, leeway).unwrap_err();
        assert_eq!(err(KeySource::Secret(String::new())), "empty secret");
        let private = err(KeySource::PublicKeyPem(EC_PRIVATE.to_vec()));
        assert!(
            private.contains("private key") && private.contains("-pubout"),
            "{private}"
        );
        let p384 = err(KeySource::PublicKeyPem(EC_P384_PUBLIC.to_vec()));
        assert!(p384.contains("not on curve P-256"), "{p384}");
        let garbage = err(KeySource::PublicKeyPem(b"hello".to_vec()));
        assert!(
            garbage.starts_with("not a PEM file") && garbage.contains("Ed25519 (EdDSA)"),
            "{garbage}"
        );
        let cert = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec();
        let cert = err(KeySource::PublicKeyPem(cert));
        assert!(cert.starts_with("holds a CERTIFICATE"), "{cert}");
        let junk = b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec();
        let junk = err(KeySource::PublicKeyPem(junk));
        assert!(
            junk.contains("RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA)"),
            "{junk}"
        );
    }

    #[test]
    fn minted_tokens_carry_the_spec() {
        let spec = TokenSpec {
            role: "user".into(),
            sub: "usr_9".into(),
            clusters: Some(vec!["clu_a".into()]),
            perms: Some(vec![]),
            ttl: Duration::from_secs(3600),
            ..TokenSpec::default()
        };
        let token = mint_hs256(SECRET, &spec, NOW);
        let id = hs_verifier(None, None).verify(&token, NOW).unwrap();
        assert_eq!((id.role, &*id.sub), (Role::User, "usr_9"));
        assert_eq!(id.clusters, vec![Box::<str>::from("clu_a")]);
        assert_eq!(id.perms, Some(vec![]));
        assert_eq!((id.iat, id.exp), (Some(NOW), NOW + 3600));
        let agent = TokenSpec {
            role: "agent".into(),
            sub: "mch_1".into(),
            cluster: Some("clu_a".into()),
            ttl: Duration::from_secs(60),
            ..TokenSpec::default()
        };
        let id = hs_verifier(None, None)
            .verify(&mint_hs256(SECRET, &agent, NOW), NOW)
            .unwrap();
        assert_eq!(id.cluster.as_deref(), Some("clu_a"));
        assert_eq!(id.perms, None);
    }

    fn identity(
        role: Role,
        cluster: Option<&str>,
        clusters: &[&str],
        perms: Option<&[&str]>,
    ) -> Identity {
        Identity {
            role,
            sub: "x".into(),
            cluster: cluster.map(Into::into),
            clusters: clusters.iter().map(|&c| c.into()).collect(),
            perms: perms.map(|p| p.iter().map(|&c| c.into()).collect()),
            exp: NOW,
            iat: None,
        }
    }

    #[test]
    fn who_sees_which_cluster() {
        assert!(identity(Role::Service, None, &[], None).sees_cluster("clu_z"));
        let user = identity(Role::User, None, &["clu_a", "clu_b"], None);
        assert!(user.sees_cluster("clu_b"));
        assert!(!user.sees_cluster("clu_c"));
        let agent = identity(Role::Agent, Some("clu_a"), &[], None);
        assert!(agent.sees_cluster("clu_a"));
        assert!(!agent.sees_cluster("clu_b"));
    }

    #[test]
    fn who_may_command() {
        assert!(identity(Role::Service, None, &[], None).may_command("server:start"));
        assert!(identity(Role::User, None, &["c"], None).may_command("server:start"));
        assert!(identity(Role::User, None, &["c"], Some(&["*"])).may_command("server:kill"));
        let limited = identity(Role::User, None, &["c"], Some(&["server:start"]));
        assert!(limited.may_command("server:start"));
        assert!(!limited.may_command("server:stop"));
        assert!(!identity(Role::User, None, &["c"], Some(&[])).may_command("server:start"));
        assert!(!identity(Role::Agent, Some("c"), &[], None).may_command("server:start"));
    }

    #[test]
    fn same_identity_ignores_expiry_perms_and_cluster_order() {
        let a = identity(Role::User, None, &["clu_a", "clu_b"], None);
        let mut b = identity(Role::User, None, &["clu_b", "clu_a"], Some(&["*"]));
        b.exp = NOW + 999;
        assert!(a.same_identity(&b));
        assert!(!a.same_identity(&identity(Role::User, None, &["clu_a"], None)));
        assert!(!a.same_identity(&identity(Role::User, None, &["clu_a", "clu_a"], None)));
        assert!(!a.same_identity(&identity(Role::Service, None, &[], None)));
        let mut other_sub = a.clone();
        other_sub.sub = "y".into();
        assert!(!a.same_identity(&other_sub));
        let agent = identity(Role::Agent, Some("clu_a"), &[], None);
        assert!(!agent.same_identity(&identity(Role::Agent, Some("clu_b"), &[], None)));
    }

    #[test]
    fn revoked_subjects_are_refused_by_issue_time() {
        let revocations = Arc::new(Revocations::default());
        let v = hs_verifier(None, None).with_revocations(revocations.clone());
        let old = hs(agent_claims());
        assert!(v.verify(&old, NOW).is_ok());
        revocations.revoke("mch_1", NOW + 1).unwrap();
        assert_eq!(revocations.len(), 1);
        assert_eq!(v.verify(&old, NOW).unwrap_err().message, "token revoked");
        // Issued at the revocation time or later: accepted.
        let fresh = hs(with(agent_claims(), "iat", json!(NOW + 1)));
        assert!(v.verify(&fresh, NOW + 1).is_ok());
        // No iat: nothing proves it is newer.
        let undated = hs(without(agent_claims(), "iat"));
        assert_eq!(
            v.verify(&undated, NOW).unwrap_err().message,
            "token revoked"
        );
        // An earlier time never shortens a revocation.
        revocations.revoke("mch_1", NOW - 100).unwrap();
        assert_eq!(v.verify(&old, NOW).unwrap_err().message, "token revoked");
        assert_eq!(revocations.len(), 1);
        // Other subjects are unaffected.
        let other = hs(with(agent_claims(), "sub", json!("mch_2")));
        assert!(v.verify(&other, NOW).is_ok());
    }
}
