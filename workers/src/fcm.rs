//! Push to Android and web devices: Firebase Cloud Messaging HTTP v1.
//!
//! Authentication is OAuth2 with the service account's key (`HERALD_FCM_CREDENTIALS`): an RS256
//! JWT signed with its `private_key` (issuer `client_email`, scope `firebase.messaging`,
//! audience the token endpoint, an hour long) is exchanged at the token endpoint
//! (`HERALD_FCM_TOKEN_URL`, else the key's `token_uri`) for an access token under the
//! `jwt-bearer` grant. The access token is kept until a minute before it expires and fetched
//! by one call at a time. A `401` from FCM drops it: the attempt is retried with a new one, and
//! only a refusal of that replacement counts as Herald's credentials being wrong (sends that
//! were in flight with the refused token are retried, not judged by it).
//!
//! One message is `POST {base}/v1/projects/{project}/messages:send` with
//! `{"message": {"token", "notification": {"title", "body"}, "data"}}`; FCM's `data` is a map of
//! strings, so other JSON values are sent as their JSON text. Errors are a `google.rpc.Status`
//! whose `details` carry an `FcmError` code, which decides the failure (see [`classify_error`]).

use std::time::{Duration, Instant};

use herald_shared::{Channel, Config, Intent, config::FcmSettings, state::FailureKind};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{StatusCode, header::RETRY_AFTER};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::{
    provider::{Provider, ProviderError, Receipt, Sending},
    webhook::{ERROR_BODY_BYTES, classify, describe, first_bytes, parse_retry_after},
};

/// The OAuth2 scope that lets a service account send messages.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The grant that exchanges a signed JWT for an access token (RFC 7523).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// How long each assertion is valid (Google accepts at most an hour).
const ASSERTION_LIFETIME: u64 = 3600;
/// An access token is replaced this long before it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// FCM HTTP v1, as the `fcm` provider.
pub struct FcmProvider {
    http: reqwest::Client,
    send_url: String,
    token_url: String,
    /// The service account: the JWT's issuer.
    client_email: String,
    /// The service account's RSA key.
    key: EncodingKey,
    /// The key's id, named in the JWT header so Google picks the right public key.
    key_id: Option<String>,
    /// The access token. The lock is held while fetching, so one call fetches and the others
    /// wait for its token.
    access: tokio::sync::Mutex<Access>,
    /// A token fetched to replace a refused one, until FCM takes it: if FCM refuses it too,
    /// the service account cannot send. Apart from `access` so a send never waits for a
    /// fetch to record its success.
    replacement: std::sync::Mutex<Option<String>>,
}

/// The fields of a service-account key Herald uses.
#[derive(Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The cached access token, and what FCM thought of the last ones.
#[derive(Default)]
struct Access {
    /// The token and when to stop using it.
    current: Option<(String, Instant)>,
    /// FCM refused a token: the next one fetched replaces a refused one.
    refused: bool,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl FcmProvider {
    pub fn new(settings: &FcmSettings, config: &Config) -> anyhow::Result<FcmProvider> {
        // The key's own parse errors name no content, only positions.
        let account: ServiceAccount = serde_json::from_str(settings.credentials.expose())
            .map_err(|e| anyhow::anyhow!("HERALD_FCM_CREDENTIALS is not a service-account key: {e}"))?;
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(|_| {
            anyhow::anyhow!("the private_key of HERALD_FCM_CREDENTIALS is not an RSA key in PEM form")
        })?;
        let token_url = match (&settings.token_url, &account.token_uri) {
            (Some(url), _) => url.to_string(),
            (None, Some(uri)) => uri.clone(),
            (None, None) => {
                anyhow::bail!("HERALD_FCM_CREDENTIALS has no token_uri; set HERALD_FCM_TOKEN_URL")
            }
        };
        let timeout = config.send_timeout.for_channel(Channel::Push);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(config.send_concurrency.for_channel(Channel::Push))
            .build()?;
        let base = settings.base_url.as_str().trim_end_matches('/');
        Ok(FcmProvider {
            http,
            send_url: format!("{base}/v1/projects/{}/messages:send", settings.project_id),
            token_url,
            client_email: account.client_email,
            key,
            key_id: account.private_key_id,
            access: tokio::sync::Mutex::new(Access::default()),
            replacement: std::sync::Mutex::new(None),
        })
    }

    /// A current access token: the cached one, or a new one.
    async fn access_token(&self) -> Result<String, ProviderError> {
        let mut access = self.access.lock().await;
        if let Some((token, until)) = &access.current
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let (token, lifetime) = self.fetch_token().await?;
        let keep = lifetime.saturating_sub(EXPIRY_MARGIN).max(lifetime / 2);
        access.current = Some((token.clone(), Instant::now() + keep));
        if std::mem::take(&mut access.refused) {
            *self.replacement.lock().expect("never poisoned") = Some(token.clone());
        }
        Ok(token)
    }

    /// The JWT-bearer exchange at the token endpoint.
    async fn fetch_token(&self) -> Result<(String, Duration), ProviderError> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_url,
            iat: now,
            exp: now + ASSERTION_LIFETIME,
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let assertion = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| {
            ProviderError::new(FailureKind::Unauthorized, format!("fcm: signing the token request: {e}"))
        })?;
        let response = self
            .http
            .post(&self.token_url)
            .form(&[("grant_type", JWT_BEARER), ("assertion", assertion.as_str())])
            .send()
            .await
            .map_err(|e| connection_error("fcm: token endpoint", &e))?;
        let status = response.status();
        let text = first_bytes(response, ERROR_BODY_BYTES * 8).await;
        if !status.is_success() {
            #[derive(Deserialize, Default)]
            struct OAuthError {
                error: Option<String>,
                error_description: Option<String>,
            }
            let e: OAuthError = serde_json::from_str(&text).unwrap_or_default();
            let said = [e.error, e.error_description].into_iter().flatten().collect::<Vec<_>>().join(": ");
            let message = format!("fcm: token endpoint refused the service account (HTTP {status}): {said}");
            // A 4xx other than 429 refuses the key itself, not one message.
            if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
                return Err(ProviderError::new(FailureKind::Unauthorized, message));
            }
            return Err(classify(status, message, None));
        }
        let answer: TokenAnswer = serde_json::from_str(&text).map_err(|e| {
            ProviderError::new(
                FailureKind::Unavailable,
                format!("fcm: token endpoint answered without a token: {e}"),
            )
        })?;
        Ok((answer.access_token, Duration::from_secs(answer.expires_in.unwrap_or(ASSERTION_LIFETIME))))
    }

    async fn post(&self, intent: &Intent, token: &str) -> Result<Receipt, ProviderError> {
        let access = self.access_token().await?;
        let response = self
            .http
            .post(&self.send_url)
            .bearer_auth(&access)
            .json(&message(intent, token))
            .send()
            .await
            .map_err(|e| connection_error("fcm", &e))?;
        let status = response.status();
        if status.is_success() {
            {
                // FCM took the token: a later refusal of it is worth a new one again.
                let mut replacement = self.replacement.lock().expect("never poisoned");
                if replacement.as_deref() == Some(access.as_str()) {
                    *replacement = None;
                }
            }
            #[derive(Deserialize)]
            struct Sent {
                name: String,
            }
            let text = first_bytes(response, ERROR_BODY_BYTES).await;
            let sent: Sent = serde_json::from_str(&text).map_err(|e| {
                ProviderError::new(
                    FailureKind::Unavailable,
                    format!("fcm: HTTP {status} without a message name: {e}"),
                )
            })?;
            return Ok(Receipt { provider_message_id: Some(sent.name), detail: None });
        }
        let retry_after =
            response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let text = first_bytes(response, ERROR_BODY_BYTES).await;
        let error = classify_error(status, &text, retry_after);
        let third_party = error_code(&text).as_deref() == Some("THIRD_PARTY_AUTH_ERROR");
        if status == StatusCode::UNAUTHORIZED && !third_party {
            // Our access token was refused: drop it, and retry with a new one. A refusal of
            // the replacement itself means the service account cannot send. (Calls that were
            // in flight with the refused token are retried too: it is not theirs to judge.)
            let refused_replacement =
                self.replacement.lock().expect("never poisoned").as_deref() == Some(access.as_str());
            if !refused_replacement {
                let mut state = self.access.lock().await;
                if state.current.as_ref().is_some_and(|(current, _)| *current == access) {
                    state.current = None;
                    state.refused = true;
                }
                return Err(ProviderError::new(
                    FailureKind::Unavailable,
                    format!("{}; a new access token is fetched for the next attempt", error.message),
                ));
            }
        }
        Err(error)
    }
}

fn connection_error(what: &str, e: &reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() { FailureKind::Timeout } else { FailureKind::Connection };
    ProviderError::new(kind, format!("{what}: {}", describe(e)))
}

/// The `messages:send` body for one device.
pub fn message(intent: &Intent, token: &str) -> Value {
    let mut message = Map::new();
    message.insert("token".into(), json!(token));
    let mut notification = Map::new();
    if let Some(title) = &intent.content.title {
        notification.insert("title".into(), json!(title));
    }
    if let Some(body) = &intent.content.body {
        notification.insert("body".into(), json!(body));
    }
    if !notification.is_empty() {
        message.insert("notification".into(), Value::Object(notification));
    }
    if !intent.data.is_empty() {
        message.insert("data".into(), Value::Object(string_map(&intent.data)));
    }
    json!({ "message": message })
}

/// FCM's `data` holds only strings: strings stay, anything else becomes its JSON text.
pub fn string_map(data: &Map<String, Value>) -> Map<String, Value> {
    data.iter()
        .map(|(k, v)| {
            let s = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), Value::String(s))
        })
        .collect()
}

/// The error's code: the `FcmError` code in `details`, else the status's canonical name.
fn error_code(body: &str) -> Option<String> {
    let doc: Value = serde_json::from_str(body).ok()?;
    let error = &doc["error"];
    let fcm_code = error["details"].as_array().and_then(|details| {
        details.iter().find_map(|d| {
            let fcm = d["@type"].as_str().is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError"));
            if fcm { d["errorCode"].as_str() } else { None }
        })
    });
    fcm_code.or_else(|| error["status"].as_str()).map(str::to_owned)
}

/// FCM's error: the `FcmError` code in `details` first, then the status's canonical name,
/// then the HTTP status as for any provider.
pub fn classify_error(status: StatusCode, body: &str, retry_after: Option<Duration>) -> ProviderError {
    let doc: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let error = &doc["error"];
    let code = error_code(body);
    let code = code.as_deref();
    let said = error["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.chars().take(200).collect::<String>().trim().to_owned());
    let message = match code {
        Some(code) => format!("fcm {code} (HTTP {status}): {said}"),
        None => format!("fcm: HTTP {status}: {said}"),
    };
    let e = |kind| ProviderError::new(kind, message.clone()).with_retry_after(retry_after);
    match code {
        Some("UNREGISTERED") => e(FailureKind::InvalidRecipient).device_gone(),
        Some("SENDER_ID_MISMATCH") => e(FailureKind::InvalidRecipient),
        Some("INVALID_ARGUMENT") => e(FailureKind::Rejected),
        Some("QUOTA_EXCEEDED") => e(FailureKind::RateLimited),
        Some("UNAVAILABLE" | "INTERNAL") => e(FailureKind::Unavailable),
        Some("THIRD_PARTY_AUTH_ERROR") => e(FailureKind::Unauthorized),
        _ => classify(status, message, retry_after),
    }
}

impl Provider for FcmProvider {
    fn name(&self) -> &str {
        "fcm"
    }

    fn send<'a>(&'a self, intent: &'a Intent, token: &'a str) -> Sending<'a> {
        Box::pin(self.post(intent, token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fcm_error(status: u16, code: &str) -> String {
        json!({"error": {"code": status, "message": "m", "status": "X", "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]}})
        .to_string()
    }

    #[test]
    fn fcm_errors_are_classified_by_their_code() {
        for (status, code, kind, gone) in [
            (404, "UNREGISTERED", FailureKind::InvalidRecipient, true),
            (403, "SENDER_ID_MISMATCH", FailureKind::InvalidRecipient, false),
            (400, "INVALID_ARGUMENT", FailureKind::Rejected, false),
            (429, "QUOTA_EXCEEDED", FailureKind::RateLimited, false),
            (503, "UNAVAILABLE", FailureKind::Unavailable, false),
            (500, "INTERNAL", FailureKind::Unavailable, false),
            (401, "THIRD_PARTY_AUTH_ERROR", FailureKind::Unauthorized, false),
        ] {
            let e = classify_error(StatusCode::from_u16(status).unwrap(), &fcm_error(status, code), None);
            assert_eq!((e.kind, e.device_gone), (kind, gone), "{code}");
            assert!(e.message.starts_with(&format!("fcm {code} (HTTP {status}")), "{}", e.message);
        }
        let e = classify_error(StatusCode::SERVICE_UNAVAILABLE, "<html>", Some(Duration::from_secs(9)));
        assert_eq!((e.kind, e.retry_after), (FailureKind::Unavailable, Some(Duration::from_secs(9))));
        let e = classify_error(
            StatusCode::UNAUTHORIZED,
            r#"{"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "bad"}}"#,
            None,
        );
        assert_eq!(e.kind, FailureKind::Unauthorized);
    }

    #[test]
    fn data_becomes_a_string_map() {
        let data = json!({"url": "/o/42", "n": 3, "flag": true, "obj": {"a": 1}});
        let map = string_map(data.as_object().unwrap());
        assert_eq!(Value::Object(map), json!({"url": "/o/42", "n": "3", "flag": "true", "obj": "{\"a\":1}"}));
    }
}
