//! JWT verification (jsonwebtoken, keys built once) into an `Identity`, and token minting.

use std::time::Duration;

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
        let _ = cluster;
        unimplemented!()
    }

    /// Whether this identity may issue a command of type `kind` (ignoring clusters).
    pub fn may_command(&self, kind: &str) -> bool {
        let _ = kind;
        unimplemented!()
    }

    /// Same role, subject and cluster(s): a token refresh, not a new identity.
    pub fn same_identity(&self, other: &Identity) -> bool {
        let _ = other;
        unimplemented!()
    }
}

/// The verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// HS256 shared secret.
    Secret(String),
    /// PEM public key (RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA).
    PublicKeyPem(Vec<u8>),
}

/// Why a token was refused; the text goes into `AUTH_FAILED`'s message
/// ("bad signature", "token expired", "missing claim: sub", …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// Verifies tokens with keys and validation rules built once.
pub struct Verifier {}

impl Verifier {
    pub fn new(
        key: &KeySource,
        issuer: Option<&str>,
        audience: Option<&str>,
        leeway: Duration,
    ) -> Result<Verifier, String> {
        let _ = (key, issuer, audience, leeway);
        unimplemented!()
    }

    /// Checks signature, `exp` (required), `nbf`, `iss`, `aud`, `sub` (required), `role` and
    /// the role's claims, against `now` (Unix seconds) with the configured leeway.
    pub fn verify(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let _ = (token, now);
        unimplemented!()
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

/// An HS256 token for `spec`, issued at `now` (Unix seconds), expiring at `now + ttl`.
pub fn mint_hs256(secret: &str, spec: &TokenSpec, now: u64) -> String {
    let _ = (secret, spec, now);
    unimplemented!()
}
