//! Token verification per algorithm, with the keys in tests/keys/.

use std::hint::black_box;
use std::time::Duration;

use arcgate::auth::{KeySource, Role, Verifier};
use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: u64 = 1_700_000_000;
const SECRET: &str = "a-benchmark-secret-of-32-bytes!!";

#[derive(Serialize)]
struct Claims<'a> {
    role: &'a str,
    sub: &'a str,
    clusters: &'a [&'a str],
    iat: u64,
    exp: u64,
}

fn key(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A user token, as a panel backend would mint it.
fn token(alg: Algorithm, key: &EncodingKey) -> String {
    let claims = Claims {
        role: "user",
        sub: "usr_42",
        clusters: &["clu_abc", "clu_def"],
        iat: NOW,
        exp: NOW + 3600,
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("signing")
}

fn verify(c: &mut Criterion) {
    let cases = [
        (
            "HS256",
            KeySource::Secret(SECRET.into()),
            token(
                Algorithm::HS256,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            ),
        ),
        (
            "RS256",
            KeySource::PublicKeyPem(key("rsa_public.pem")),
            token(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(&key("rsa_private.pem")).expect("RSA key"),
            ),
        ),
        (
            "ES256",
            KeySource::PublicKeyPem(key("ec_p256_public.pem")),
            token(
                Algorithm::ES256,
                &EncodingKey::from_ec_pem(&key("ec_p256_private.pem")).expect("EC key"),
            ),
        ),
        (
            "EdDSA",
            KeySource::PublicKeyPem(key("ed25519_public.pem")),
            token(
                Algorithm::EdDSA,
                &EncodingKey::from_ed_pem(&key("ed25519_private.pem")).expect("Ed25519 key"),
            ),
        ),
    ];
    let mut g = c.benchmark_group("verify");
    for (name, source, token) in &cases {
        let verifier = Verifier::new(source, None, None, Duration::ZERO).expect("verifier");
        assert_eq!(verifier.algorithm(), *name);
        let id = verifier.verify(token, NOW).expect("valid token");
        assert_eq!((id.role, id.clusters.len()), (Role::User, 2));
        g.bench_function(*name, |b| b.iter(|| verifier.verify(black_box(token), NOW)));
    }
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
