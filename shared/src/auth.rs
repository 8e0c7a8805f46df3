//! Bearer tokens: HS256 JWTs signed with `HERALD_JWT_SECRET`, `exp` required.
//!
//! A token's `scope` claim (space separated, as in OAuth 2) decides what it may do.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// May create notifications.
pub const SCOPE_SEND: &str = "notifications:write";
/// May read notifications' status.
pub const SCOPE_READ: &str = "notifications:read";
/// May list, replay and discard dead letters (`/v1/dlq`).
pub const SCOPE_DLQ_ADMIN: &str = "dlq:admin";
/// May read and preview templates.
pub const SCOPE_TEMPLATES_READ: &str = "templates:read";
/// May write, roll back and delete templates.
pub const SCOPE_TEMPLATES_WRITE: &str = "templates:write";
/// May read users, their devices and preferences.
pub const SCOPE_USERS_READ: &str = "users:read";
/// May create, change and delete users, their devices and preferences.
pub const SCOPE_USERS_WRITE: &str = "users:write";
/// May read and mark in-app inboxes: every user's of its tenant, or with a `user` claim that
/// user's only.
pub const SCOPE_INBOX: &str = "inbox";
/// May mint tokens for end users (`POST /v1/users/{id}/tokens`).
pub const SCOPE_TOKENS_WRITE: &str = "tokens:write";
/// The only scopes a token for one end user may carry.
pub const USER_SCOPES: &[&str] = &[SCOPE_INBOX];
/// The longest an end user's token may live.
pub const MAX_USER_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Scopes a development token gets by default.
pub const DEFAULT_SCOPES: &[&str] = &[SCOPE_SEND, SCOPE_READ];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the caller is (a service name, say).
    pub sub: String,
    /// Tenant the caller acts for; notifications and users are stored under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Space-separated scopes.
    #[serde(default)]
    pub scope: String,
    /// Set on an end user's token (a browser's): the one user whose inbox it may use. Such a
    /// token is refused everything else, whatever its scopes say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Expiry, seconds since the epoch (required).
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
}

impl Claims {
    /// The tenant the token acts for: its `tenant` claim, else its subject. Notifications,
    /// users, templates and inboxes are stored under it.
    pub fn tenant_or_sub(&self) -> &str {
        self.tenant.as_deref().unwrap_or(&self.sub)
    }

    pub fn allows(&self, scope: &str) -> bool {
        if self.user.is_some() && !USER_SCOPES.contains(&scope) {
            return false;
        }
        self.scope.split_whitespace().any(|s| s == scope)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("token has expired")]
    Expired,
    #[error("token is not valid: {0}")]
    Invalid(String),
}

/// Mints a token valid for `ttl`.
pub fn mint(secret: &str, sub: &str, tenant: Option<&str>, scopes: &[&str], ttl: Duration) -> String {
    let now = now_secs();
    let claims = Claims {
        sub: sub.to_owned(),
        tenant: tenant.map(str::to_owned),
        scope: scopes.join(" "),
        user: None,
        exp: now + ttl.as_secs(),
        iat: now,
    };
    encode(secret, &claims)
}

/// Mints a token for end user `user` of `tenant`: `inbox` scope only, bound to that user.
pub fn mint_for_user(secret: &str, tenant: Option<&str>, user: &str, ttl: Duration) -> (String, Claims) {
    let now = now_secs();
    let claims = Claims {
        sub: format!("user:{user}"),
        tenant: tenant.map(str::to_owned),
        scope: USER_SCOPES.join(" "),
        user: Some(user.to_owned()),
        exp: now + ttl.as_secs(),
        iat: now,
    };
    (encode(secret, &claims), claims)
}

/// Signs arbitrary claims (tests use it for tokens that are already expired).
pub fn encode(secret: &str, claims: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("HS256 signing cannot fail")
}

/// Checks signature, algorithm and expiry (no leeway: an expired token is expired).
pub fn verify(secret: &str, token: &str) -> Result<Claims, AuthError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &validation)
        .map(|data| data.claims)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_carry_scopes() {
        let t = mint("s3cret", "svc", Some("acme"), DEFAULT_SCOPES, Duration::from_secs(60));
        let c = verify("s3cret", &t).unwrap();
        assert_eq!(c.sub, "svc");
        assert_eq!(c.tenant.as_deref(), Some("acme"));
        assert!(c.allows(SCOPE_SEND) && c.allows(SCOPE_READ) && !c.allows("admin"));
    }

    #[test]
    fn forged_expired_and_garbage_tokens_fail() {
        let t = mint("s3cret", "svc", None, DEFAULT_SCOPES, Duration::from_secs(60));
        assert!(matches!(verify("other", &t), Err(AuthError::Invalid(_))));
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "svc".into(),
                tenant: None,
                scope: String::new(),
                user: None,
                exp: now_secs() - 10,
                iat: 0,
            },
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(verify("s3cret", &expired), Err(AuthError::Expired));
        assert!(matches!(verify("s3cret", "not.a.jwt"), Err(AuthError::Invalid(_))));
        // `alg: none` must never be accepted.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJzdmMiLCJleHAiOjk5OTk5OTk5OTl9"
        );
        assert!(matches!(verify("s3cret", &none), Err(AuthError::Invalid(_))));
        // A token without `exp` is refused.
        #[derive(Serialize)]
        struct NoExp {
            sub: String,
        }
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &NoExp { sub: "svc".into() },
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(matches!(verify("s3cret", &no_exp), Err(AuthError::Invalid(_))));
    }
}
