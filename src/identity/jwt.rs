//! JSON Web Tokens as identity: HS256 with a shared secret, RS256 with the issuer's public key.

use std::fmt;

use http::{HeaderMap, Uri};
use hybrid_cluster_core::UserId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{Identify, Unauthorized, bearer_token};

/// Identifies a request by the JWT it carries ([`bearer_token`]): its signature checked, its
/// `exp` (required) and `nbf` in force, with 60 s of leeway for clocks, and its `sub` the
/// [`UserId`]. Neither the token nor the key is ever logged or printed.
#[derive(Clone)]
pub struct Jwt {
    key: DecodingKey,
    validation: Validation,
}

/// A key that cannot verify tokens.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct JwtKeyError {
    reason: &'static str,
    #[source]
    source: jsonwebtoken::errors::Error,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
}

impl Jwt {
    /// Tokens of `algorithm` verified with `key`, or `reason` when there is no key.
    fn with(
        key: jsonwebtoken::errors::Result<DecodingKey>,
        algorithm: Algorithm,
        reason: &'static str,
    ) -> Result<Self, JwtKeyError> {
        let key = key.map_err(|source| JwtKeyError { reason, source })?;
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        // A token's `aud` is checked only against an audience this side named: most issuers
        // set one, and a token is not refused for it unless asked.
        validation.validate_aud = false;
        Ok(Self { key, validation })
    }

    /// Tokens signed with HMAC-SHA256 and `secret`, which the issuer shares. Fails on an
    /// empty secret.
    pub fn hs256(secret: &[u8]) -> Result<Self, JwtKeyError> {
        let key = DecodingKey::from_secret(secret);
        Self::with(key, Algorithm::HS256, "the secret is empty")
    }

    /// Tokens signed with RSA-SHA256 by the holder of the private half of `public_key_pem`
    /// (`-----BEGIN PUBLIC KEY-----` or `-----BEGIN RSA PUBLIC KEY-----`).
    pub fn rs256_pem(public_key_pem: &[u8]) -> Result<Self, JwtKeyError> {
        let key = DecodingKey::from_rsa_pem(public_key_pem);
        let reason = "the key is not a PEM-encoded RSA public key";
        Self::with(key, Algorithm::RS256, reason)
    }

    /// Accepts only tokens whose `aud` names one of `audience`.
    pub fn with_audience(mut self, audience: &[&str]) -> Self {
        self.validation.set_audience(audience);
        self.validation.validate_aud = true;
        self
    }

    /// Accepts only tokens whose `iss` is one of `issuers`.
    pub fn with_issuer(mut self, issuers: &[&str]) -> Self {
        self.validation.set_issuer(issuers);
        self
    }

    /// The leeway, in seconds, allowed on `exp` and `nbf` for clocks that differ (default 60).
    pub fn with_leeway(mut self, seconds: u64) -> Self {
        self.validation.leeway = seconds;
        self
    }

    /// The user of `token`, or why it does not hold.
    pub fn verify(&self, token: &str) -> Result<UserId, Unauthorized> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| Unauthorized::new(refusal(error.kind())))?
            .claims;
        let sub = claims.sub.ok_or_else(|| {
            Unauthorized::new(refusal(&ErrorKind::MissingRequiredClaim("sub".into())))
        })?;
        UserId::new(&sub).map_err(|error| {
            Unauthorized::new(format!(
                "the token's `sub` is not a user id: {}",
                error.reason()
            ))
        })
    }
}

/// What a client is told of a token that does not hold: never the token, nor the key.
fn refusal(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (`nbf`)".to_owned(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
        ErrorKind::InvalidAlgorithm => {
            "the token is not signed with the expected algorithm".to_owned()
        }
        ErrorKind::InvalidAudience => "the token is not for this audience (`aud`)".to_owned(),
        ErrorKind::InvalidIssuer => "the token is not from an accepted issuer (`iss`)".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no `{claim}` claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("the token's `{claim}` claim is malformed"),
        _ => "the token is not a valid JWT".to_owned(),
    }
}

impl Identify for Jwt {
    fn identify(&self, headers: &HeaderMap, uri: &Uri) -> Result<Option<UserId>, Unauthorized> {
        match bearer_token(headers, uri) {
            None => Ok(None),
            Some(token) => self.verify(&token).map(Some),
        }
    }
}

impl fmt::Debug for Jwt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwt")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs256(claims: serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn hs256_tokens_name_their_subject_and_bad_ones_say_why() {
        let jwt = Jwt::hs256(b"secret").unwrap();
        assert!(Jwt::hs256(b"").is_err());
        let good = hs256(json!({"sub": "alice", "exp": now() + 60}), b"secret");
        assert_eq!(jwt.verify(&good).unwrap().as_str(), "alice");
        let expired = hs256(json!({"sub": "alice", "exp": now() - 120}), b"secret");
        assert_eq!(
            jwt.verify(&expired).unwrap_err().message(),
            "the token has expired"
        );
        let forged = hs256(json!({"sub": "alice", "exp": now() + 60}), b"other");
        assert!(
            jwt.verify(&forged)
                .unwrap_err()
                .message()
                .contains("signature")
        );
        let no_sub = hs256(json!({"exp": now() + 60}), b"secret");
        assert!(jwt.verify(&no_sub).unwrap_err().message().contains("`sub`"));
        let no_exp = hs256(json!({"sub": "alice"}), b"secret");
        assert!(jwt.verify(&no_exp).unwrap_err().message().contains("`exp`"));
        let early = hs256(
            json!({"sub": "a", "exp": now() + 900, "nbf": now() + 600}),
            b"secret",
        );
        assert!(jwt.verify(&early).unwrap_err().message().contains("nbf"));
        assert!(
            jwt.verify("garbage")
                .unwrap_err()
                .message()
                .contains("not a valid JWT")
        );
        let too_long = hs256(
            json!({"sub": "u".repeat(200), "exp": now() + 60}),
            b"secret",
        );
        assert!(
            jwt.verify(&too_long)
                .unwrap_err()
                .message()
                .contains("user id")
        );
        // An RS256 key does not take an HS256 token (no algorithm confusion).
        let message = Jwt::rs256_pem(TEST_PUBLIC_KEY)
            .unwrap()
            .verify(&good)
            .unwrap_err();
        assert!(message.message().contains("algorithm"), "{message:?}");
    }

    #[test]
    fn rs256_tokens_verify_with_the_public_key_and_audience_is_checked() {
        let token = |aud: &str| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::RS256),
                &json!({"sub": "bob", "exp": now() + 60, "aud": aud}),
                &EncodingKey::from_rsa_pem(TEST_PRIVATE_KEY).unwrap(),
            )
            .unwrap()
        };
        // Without an audience named, a token's `aud` is not held against it.
        let open = Jwt::rs256_pem(TEST_PUBLIC_KEY).unwrap();
        assert_eq!(open.verify(&token("admin")).unwrap().as_str(), "bob");
        let jwt = Jwt::rs256_pem(TEST_PUBLIC_KEY)
            .unwrap()
            .with_audience(&["chat"]);
        assert_eq!(jwt.verify(&token("chat")).unwrap().as_str(), "bob");
        assert!(
            jwt.verify(&token("admin"))
                .unwrap_err()
                .message()
                .contains("aud")
        );
        assert!(Jwt::rs256_pem(b"not a key").is_err());
        assert!(!format!("{jwt:?}").contains("BEGIN"));
    }

    /// A 2048-bit RSA key pair made for these tests only.
    const TEST_PRIVATE_KEY: &[u8] = include_bytes!("testdata/rsa-private.pem");
    const TEST_PUBLIC_KEY: &[u8] = include_bytes!("testdata/rsa-public.pem");
}
