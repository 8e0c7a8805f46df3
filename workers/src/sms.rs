//! The SMS channel's provider: Twilio's Programmable Messaging API.
//!
//! One form POST to `{HERALD_TWILIO_BASE_URL}/2010-04-01/Accounts/{sid}/Messages.json` with
//! HTTP basic auth (account SID and auth token) and the fields `To`, `Body` and either `From`
//! (a number) or `MessagingServiceSid` (when `HERALD_TWILIO_FROM` is an `MG…` SID). Twilio
//! answers `201` with the message resource, whose `sid` is the provider's id.
//!
//! Twilio bills by segment, and how many a body takes depends on its encoding: GSM-7 when every
//! character is in the GSM 03.38 basic or extension table (160 septets alone, 153 per part of a
//! longer message, extension characters taking two), UCS-2 otherwise (70 UTF-16 units alone, 67
//! per part). Herald counts them itself ([`segments`]) and records the count in the call's
//! detail, so the record shows what a message cost without asking Twilio again.
//!
//! Errors are Twilio's JSON `{code, message, more_info, status}`; the code decides before the
//! HTTP status does (see [`classify_error`]). The auth token appears in no message.

use std::time::Duration;

use herald_shared::{Channel, Config, Intent, config::Secret, config::TwilioSettings, state::FailureKind};
use reqwest::{StatusCode, header::RETRY_AFTER};
use serde::Deserialize;

use crate::{
    provider::{Provider, ProviderError, Receipt, Sending},
    webhook::{ERROR_BODY_BYTES, classify, describe, first_bytes, parse_retry_after},
};

/// Twilio, as the `twilio` provider.
pub struct TwilioProvider {
    http: reqwest::Client,
    /// The account's Messages resource.
    messages_url: String,
    account_sid: String,
    auth_token: Secret,
    /// Which form field names the sender.
    sender: SenderField,
}

/// `From` a number, or through a Messaging Service (which picks the number itself).
#[derive(Debug, Clone, PartialEq)]
enum SenderField {
    From(String),
    MessagingService(String),
}

impl SenderField {
    fn new(from: &str) -> SenderField {
        if from.starts_with("MG") {
            SenderField::MessagingService(from.to_owned())
        } else {
            SenderField::From(from.to_owned())
        }
    }

    fn field(&self) -> (&'static str, &str) {
        match self {
            SenderField::From(n) => ("From", n),
            SenderField::MessagingService(s) => ("MessagingServiceSid", s),
        }
    }
}

impl TwilioProvider {
    pub fn new(settings: &TwilioSettings, config: &Config) -> anyhow::Result<TwilioProvider> {
        let timeout = config.send_timeout.for_channel(Channel::Sms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(config.send_concurrency.for_channel(Channel::Sms))
            .build()?;
        let base = settings.base_url.as_str().trim_end_matches('/');
        Ok(TwilioProvider {
            http,
            messages_url: format!("{base}/2010-04-01/Accounts/{}/Messages.json", settings.account_sid),
            account_sid: settings.account_sid.clone(),
            auth_token: settings.auth_token.clone(),
            sender: SenderField::new(&settings.from),
        })
    }

    async fn post(&self, intent: &Intent, to: &str) -> Result<Receipt, ProviderError> {
        let body = intent.content.body.as_deref().unwrap_or_default();
        if body.is_empty() {
            return Err(ProviderError::new(FailureKind::Rejected, "an SMS needs a body"));
        }
        let (sender_field, sender) = self.sender.field();
        let form = [("To", to), ("Body", body), (sender_field, sender)];
        let response = self
            .http
            .post(&self.messages_url)
            .basic_auth(&self.account_sid, Some(self.auth_token.expose()))
            .header("Accept", "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                let kind = if e.is_timeout() { FailureKind::Timeout } else { FailureKind::Connection };
                ProviderError::new(kind, format!("twilio: {}", describe(&e)))
            })?;
        let status = response.status();
        if status.is_success() {
            let text = first_bytes(response, CREATED_BODY_BYTES).await;
            let created: Created = serde_json::from_str(&text).map_err(|e| {
                ProviderError::new(
                    FailureKind::Unavailable,
                    format!("twilio: HTTP {status} with an unreadable message resource: {e}"),
                )
            })?;
            let count = segments(body);
            return Ok(Receipt { provider_message_id: Some(created.sid), detail: Some(count.to_string()) });
        }
        let retry_after =
            response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let text = first_bytes(response, ERROR_BODY_BYTES).await;
        Err(classify_error(status, &text, retry_after))
    }
}

/// The message resource may be long (it repeats the body); read enough of it to find `sid`.
const CREATED_BODY_BYTES: usize = 64 * 1024;

/// The part of Twilio's message resource Herald reads.
#[derive(Debug, Deserialize)]
struct Created {
    sid: String,
}

/// Twilio's error document.
#[derive(Debug, Default, Deserialize)]
struct TwilioError {
    code: Option<u32>,
    message: Option<String>,
    more_info: Option<String>,
}

/// Twilio's error: the code first (21211 invalid `To`, 21614 not a mobile number: the address;
/// 20429: slow down; 20003: credentials), then the HTTP status as for any provider.
pub fn classify_error(status: StatusCode, body: &str, retry_after: Option<Duration>) -> ProviderError {
    let error: TwilioError = serde_json::from_str(body).unwrap_or_default();
    let said =
        error.message.clone().unwrap_or_else(|| body.chars().take(200).collect::<String>().trim().to_owned());
    let message = match (error.code, &error.more_info) {
        (Some(code), Some(info)) => format!("twilio error {code} (HTTP {status}): {said} ({info})"),
        (Some(code), None) => format!("twilio error {code} (HTTP {status}): {said}"),
        (None, _) => format!("twilio: HTTP {status}: {said}"),
    };
    let kind = match error.code {
        Some(21211 | 21614) => Some(FailureKind::InvalidRecipient),
        Some(20429) => Some(FailureKind::RateLimited),
        Some(20003) => Some(FailureKind::Unauthorized),
        _ => None,
    };
    match kind {
        Some(kind) => ProviderError::new(kind, message).with_retry_after(retry_after),
        None => classify(status, message, retry_after),
    }
}

impl Provider for TwilioProvider {
    fn name(&self) -> &str {
        "twilio"
    }

    fn send<'a>(&'a self, intent: &'a Intent, to: &'a str) -> Sending<'a> {
        Box::pin(self.post(intent, to))
    }
}

/// How an SMS body is encoded on the air.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

/// How many segments a body takes, and in which encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    pub count: usize,
    pub encoding: Encoding,
}

impl std::fmt::Display for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let noun = if self.count == 1 { "segment" } else { "segments" };
        let encoding = match self.encoding {
            Encoding::Gsm7 => "GSM-7",
            Encoding::Ucs2 => "UCS-2",
        };
        write!(f, "{} {noun}, {encoding}", self.count)
    }
}

/// The GSM 03.38 basic character set, as it maps to Unicode (one septet each; the escape
/// code itself is left out since no text contains it).
const GSM_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The GSM 03.38 extension table: two septets each (the escape, then the character).
const GSM_EXTENSION: &str = "\u{c}^{}\\[~]|€";

/// Septets `c` takes in GSM-7, or `None` when GSM-7 cannot carry it.
fn gsm_septets(c: char) -> Option<usize> {
    if GSM_BASIC.contains(c) {
        Some(1)
    } else if GSM_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Counts the segments of `text`: a single part holds 160 septets (GSM-7) or 70 UTF-16 units
/// (UCS-2); longer messages lose room to the concatenation header, 153 or 67 per part. Parts
/// are filled in order and a character never straddles two (an escape pair or a surrogate pair
/// stays whole), as handsets reassemble them.
pub fn segments(text: &str) -> Segments {
    let gsm: Option<Vec<usize>> = text.chars().map(gsm_septets).collect();
    let (units, single, part, encoding) = match gsm {
        Some(units) => (units, 160, 153, Encoding::Gsm7),
        None => (text.chars().map(char::len_utf16).collect(), 70, 67, Encoding::Ucs2),
    };
    if units.iter().sum::<usize>() <= single {
        return Segments { count: 1, encoding };
    }
    let mut count = 1;
    let mut used = 0;
    for u in units {
        if used + u > part {
            count += 1;
            used = 0;
        }
        used += u;
    }
    Segments { count, encoding }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, count: usize, encoding: Encoding) {
        assert_eq!(segments(text), Segments { count, encoding }, "{} chars: {text:?}", text.chars().count());
    }

    #[test]
    fn gsm7_bodies_take_160_alone_and_153_per_part() {
        let a = |n: usize| "a".repeat(n);
        check("", 1, Encoding::Gsm7);
        check("Your code is 123456", 1, Encoding::Gsm7);
        check(&a(160), 1, Encoding::Gsm7);
        check(&a(161), 2, Encoding::Gsm7);
        check(&a(306), 2, Encoding::Gsm7);
        check(&a(307), 3, Encoding::Gsm7);
        check(&a(459), 3, Encoding::Gsm7);
        check(&a(460), 4, Encoding::Gsm7);
        check("Ça coute 5€? Ñandù @ £3 {ok} [x] ~ |y| \\ ^", 1, Encoding::Gsm7);
    }

    #[test]
    fn extension_characters_take_two_septets_and_stay_whole() {
        check(&"€".repeat(80), 1, Encoding::Gsm7);
        check(&"€".repeat(81), 2, Encoding::Gsm7);
        // 76 of them fill a part to 152 septets; the 77th would straddle.
        check(&"€".repeat(152), 2, Encoding::Gsm7);
        check(&"€".repeat(153), 3, Encoding::Gsm7);
        check(&format!("{}€", "a".repeat(158)), 1, Encoding::Gsm7);
        check(&format!("{}€", "a".repeat(159)), 2, Encoding::Gsm7);
        // 152 + 2 would be 154 in the first part: the euro moves to the second.
        check(&format!("{}€{}", "a".repeat(152), "a".repeat(151)), 2, Encoding::Gsm7);
        check(&format!("{}€{}", "a".repeat(152), "a".repeat(152)), 3, Encoding::Gsm7);
    }

    #[test]
    fn anything_else_is_ucs2_counted_in_utf16_units() {
        check("Привет", 1, Encoding::Ucs2);
        check(&"ж".repeat(70), 1, Encoding::Ucs2);
        check(&"ж".repeat(71), 2, Encoding::Ucs2);
        check(&"ж".repeat(134), 2, Encoding::Ucs2);
        check(&"ж".repeat(135), 3, Encoding::Ucs2);
        // One character outside GSM-7 makes the whole body UCS-2.
        check(&format!("{}ç", "a".repeat(69)), 1, Encoding::Ucs2);
        check(&format!("{}ç", "a".repeat(70)), 2, Encoding::Ucs2);
        // An emoji is a surrogate pair: two units, never split.
        check(&"😀".repeat(35), 1, Encoding::Ucs2);
        check(&"😀".repeat(36), 2, Encoding::Ucs2);
        check(&"😀".repeat(66), 2, Encoding::Ucs2);
        check(&"😀".repeat(67), 3, Encoding::Ucs2);
    }

    #[test]
    fn segments_read_as_a_detail() {
        assert_eq!(segments("hi").to_string(), "1 segment, GSM-7");
        assert_eq!(segments(&"ж".repeat(71)).to_string(), "2 segments, UCS-2");
    }

    #[test]
    fn twilio_errors_are_classified_by_code_then_status() {
        let body = |code: u32| {
            format!(
                r#"{{"code": {code}, "message": "m", "more_info": "https://www.twilio.com/docs/errors/{code}", "status": 400}}"#
            )
        };
        for (status, text, kind) in [
            (400, body(21211), FailureKind::InvalidRecipient),
            (400, body(21614), FailureKind::InvalidRecipient),
            (429, body(20429), FailureKind::RateLimited),
            (401, body(20003), FailureKind::Unauthorized),
            (400, body(21602), FailureKind::Rejected),
            (503, "upstream down".to_owned(), FailureKind::Unavailable),
            (500, body(20500), FailureKind::Unavailable),
            (429, String::new(), FailureKind::RateLimited),
            (401, String::new(), FailureKind::Unauthorized),
            (404, body(20404), FailureKind::Rejected),
        ] {
            let e = classify_error(StatusCode::from_u16(status).unwrap(), &text, None);
            assert_eq!(e.kind, kind, "{status} {text}");
        }
        let e = classify_error(StatusCode::BAD_REQUEST, &body(21211), Some(Duration::from_secs(3)));
        assert_eq!(
            e.message,
            "twilio error 21211 (HTTP 400 Bad Request): m (https://www.twilio.com/docs/errors/21211)"
        );
    }

    #[test]
    fn a_messaging_service_sid_is_sent_as_such() {
        assert_eq!(SenderField::new("MG0123").field(), ("MessagingServiceSid", "MG0123"));
        assert_eq!(SenderField::new("+15005550006").field(), ("From", "+15005550006"));
    }
}
