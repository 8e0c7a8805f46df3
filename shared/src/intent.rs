//! The intent: one notification for one channel, as stored in HERALD_INTENTS.
//!
//! On the wire an intent is MessagePack with named fields (`rmp_serde::to_vec_named`), so fields
//! can be added without breaking older readers: unknown fields are ignored and new optional
//! fields default. Direct publishers may send the same shape as JSON (header
//! `Content-Type: application/json`, or a payload that starts with `{`); `id` and `channel` may
//! then be left out and are taken from `Nats-Msg-Id` and the subject.

use std::{collections::BTreeMap, fmt, str::FromStr};

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The schema version this build writes; readers accept this one and older ones.
pub const SCHEMA_VERSION: u16 = 1;

/// Header names Herald puts on intents (besides `Nats-Msg-Id` and `Content-Type`).
pub mod headers {
    pub const CORRELATION_ID: &str = "Herald-Correlation-Id";
    pub const TENANT: &str = "Herald-Tenant";
    pub const SCHEMA_VERSION: &str = "Herald-Schema-Version";
    pub const NOTIFICATION_ID: &str = "Herald-Notification-Id";
    /// On a scheduled copy: the instant (RFC 3339, milliseconds) it is due. Schedules fire on
    /// whole seconds, so the copy may arrive up to a second early and waits out the rest.
    pub const DUE: &str = "Herald-Due";
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const MSGPACK: &str = "application/msgpack";
    pub const JSON: &str = "application/json";
}

/// Largest encoded intent a worker accepts; anything larger is dead-lettered as invalid.
pub const MAX_INTENT_BYTES: usize = 256 * 1024;
/// Most metadata entries an intent may carry.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest category, tenant, metadata key (and a quarter of the longest metadata value).
pub const MAX_SHORT_TEXT: usize = 256;
/// Most device tokens one push intent may name.
pub const MAX_PUSH_TOKENS: usize = 100;
/// Longest title or subject, in characters.
pub const MAX_TITLE: usize = 1024;

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Sms,
    Push,
    Webhook,
    Inapp,
}

impl Channel {
    pub const ALL: [Channel; 5] =
        [Channel::Email, Channel::Sms, Channel::Push, Channel::Webhook, Channel::Inapp];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Push => "push",
            Channel::Webhook => "webhook",
            Channel::Inapp => "inapp",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Channel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Channel::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown channel {s:?} (known: email, sms, push, webhook, inapp)"))
    }
}

/// How urgent a notification is. `critical` will bypass quiet hours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

/// Where a notification goes: direct addresses, or a user of the tenant whose addresses the
/// worker looks up at send time (a direct address given beside a user wins).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recipient {
    /// A user of the sender's tenant (`/v1/users/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push_tokens: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// A template to render at send time, in the recipient's locale unless one is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRef {
    pub code: String,
    /// Overrides the user's locale (BCP 47).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
}

/// Inline content.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Content {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Email only: the From mailbox a template chose (its `email_from` part), instead of
    /// `HERALD_EMAIL_FROM`. Filled in by the worker's resolver, never by API callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Email only: the Reply-To mailbox a template chose (`email_reply_to`), instead of
    /// `HERALD_EMAIL_REPLY_TO`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// One notification for one channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    /// Schema version of the writer.
    #[serde(default = "default_version")]
    pub version: u16,
    /// Notification id, shared by the intents of every channel of one request.
    #[serde(default)]
    pub id: String,
    /// The channel; must match the subject the intent was published on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    /// Tenant that sent it (from the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Correlation id carried into every log line and status event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub recipient: Recipient,
    #[serde(default)]
    pub content: Content,
    /// Rendered at send time into the content; the data fills its variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRef>,
    /// Free-form data for the receiver and the template's variables.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub data: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Deliver no earlier than this (the gateway schedules the message; workers see it on time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<DateTime<Utc>>,
    /// Not worth delivering after this: dead-lettered as `expired` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// When the gateway accepted it (for direct publishes without it, when JetStream stored it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// The user's fallback channels after this one, in order: if this channel cannot deliver
    /// (the provider refuses the address for good, or the user has none), the next takes over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<Channel>,
}

fn default_version() -> u16 {
    SCHEMA_VERSION
}

/// Why a message on an intent subject cannot be delivered. Never retried.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// Not MessagePack or JSON of the intent's shape.
    #[error("undecodable: {0}")]
    Undecodable(String),
    /// Decoded, but a field is wrong.
    #[error("invalid: {field}: {message}")]
    Invalid { field: String, message: String },
}

impl Rejection {
    /// The reason recorded in the dead-letter queue.
    pub fn reason(&self) -> crate::deadletter::Reason {
        match self {
            Rejection::Undecodable(_) => crate::deadletter::Reason::Undecodable,
            Rejection::Invalid { .. } => crate::deadletter::Reason::Invalid,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Rejection {
        Rejection::Invalid { field: field.into(), message: message.into() }
    }
}

impl Intent {
    /// A new intent with a fresh id and the current schema version.
    pub fn new(channel: Channel, recipient: Recipient) -> Intent {
        Intent {
            version: SCHEMA_VERSION,
            id: new_id(),
            channel: Some(channel),
            tenant: None,
            correlation_id: None,
            recipient,
            content: Content::default(),
            template: None,
            data: Default::default(),
            priority: Priority::Normal,
            category: None,
            send_at: None,
            expires_at: None,
            metadata: BTreeMap::new(),
            created_at: Some(Utc::now()),
            fallback: Vec::new(),
        }
    }

    /// The channel, which every intent built by [`Intent::new`] or returned by
    /// [`Intent::from_message`] has.
    pub fn channel(&self) -> Channel {
        self.channel.expect("intents are built or decoded with a channel")
    }

    /// MessagePack with named fields.
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("an intent always serializes")
    }

    /// Headers that travel with the intent.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, headers::MSGPACK);
        h.insert(headers::SCHEMA_VERSION, self.version.to_string().as_str());
        h.insert(headers::NOTIFICATION_ID, self.id.as_str());
        if let Some(c) = &self.correlation_id {
            h.insert(headers::CORRELATION_ID, c.as_str());
        }
        if let Some(t) = &self.tenant {
            h.insert(headers::TENANT, t.as_str());
        }
        h
    }

    /// Decodes and validates a message taken from `herald.intent.<channel>`.
    ///
    /// `subject_channel` is the channel named by the subject; `fallback_id` (the message's
    /// `Nats-Msg-Id`) names intents published without an `id`.
    pub fn from_message(
        payload: &[u8],
        headers: Option<&HeaderMap>,
        subject_channel: Channel,
        fallback_id: Option<&str>,
    ) -> Result<Intent, Rejection> {
        if payload.len() > MAX_INTENT_BYTES {
            return Err(Rejection::invalid(
                "payload",
                format!("{} bytes is over the limit of {MAX_INTENT_BYTES}", payload.len()),
            ));
        }
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
        let json = header(headers::CONTENT_TYPE).is_some_and(|ct| ct.starts_with(headers::JSON))
            || payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let mut intent: Intent = if json {
            serde_json::from_slice(payload).map_err(|e| Rejection::Undecodable(format!("json: {e}")))?
        } else {
            rmp_serde::from_slice(payload).map_err(|e| Rejection::Undecodable(format!("msgpack: {e}")))?
        };
        if intent.id.is_empty() {
            intent.id = fallback_id.unwrap_or_default().to_owned();
        }
        match intent.channel {
            None => intent.channel = Some(subject_channel),
            Some(c) if c != subject_channel => {
                return Err(Rejection::invalid(
                    "channel",
                    format!("{c} intent published on the {subject_channel} subject"),
                ));
            }
            Some(_) => {}
        }
        if intent.correlation_id.is_none() {
            intent.correlation_id = header(headers::CORRELATION_ID);
        }
        if intent.tenant.is_none() {
            intent.tenant = header(headers::TENANT);
        }
        intent.validate()?;
        Ok(intent)
    }

    /// The checks every entry point shares: the gateway answers 422 with the same field, a
    /// worker dead-letters a direct publish that fails them as `invalid`.
    pub fn validate(&self) -> Result<(), Rejection> {
        if self.version > SCHEMA_VERSION {
            return Err(Rejection::invalid(
                "version",
                format!("schema version {} is newer than this build's {SCHEMA_VERSION}", self.version),
            ));
        }
        if !is_valid_id(&self.id) {
            return Err(Rejection::invalid(
                "id",
                "must be 1 to 128 characters of A-Z, a-z, 0-9, '-' and '_'",
            ));
        }
        let channel = self.channel.ok_or_else(|| Rejection::invalid("channel", "missing"))?;
        // Each channel needs its address, unless the user's is looked up at send time.
        let by_user = self.recipient.user_id.is_some();
        let r = &self.recipient;
        match channel {
            Channel::Webhook => match r.webhook_url.as_deref() {
                Some(url) => {
                    validate_webhook_url(url).map_err(|m| Rejection::invalid("recipient.webhook_url", m))?;
                }
                None if by_user => {}
                None => {
                    return Err(Rejection::invalid(
                        "recipient.webhook_url",
                        "required for the webhook channel (or a recipient.user_id)",
                    ));
                }
            },
            Channel::Email => match r.email.as_deref() {
                Some(e) if !crate::users::is_email_address(e) => {
                    return Err(Rejection::invalid(
                        "recipient.email",
                        format!("{e:?} is not an email address"),
                    ));
                }
                Some(_) => {}
                None if by_user => {}
                None => {
                    return Err(Rejection::invalid(
                        "recipient.email",
                        "required for the email channel (or a recipient.user_id)",
                    ));
                }
            },
            Channel::Sms => match r.phone.as_deref() {
                Some(p) if !crate::users::is_e164(p) => {
                    return Err(Rejection::invalid(
                        "recipient.phone",
                        format!("{p:?} is not an E.164 number (`+` and 2 to 15 digits, e.g. +4915112345678)"),
                    ));
                }
                Some(_) => {}
                None if by_user => {}
                None => {
                    return Err(Rejection::invalid(
                        "recipient.phone",
                        "required for the sms channel (or a recipient.user_id)",
                    ));
                }
            },
            Channel::Push => {
                if r.push_tokens.len() > MAX_PUSH_TOKENS {
                    return Err(Rejection::invalid(
                        "recipient.push_tokens",
                        format!("more than {MAX_PUSH_TOKENS} tokens"),
                    ));
                }
                if let Some(t) = r.push_tokens.iter().find(|t| !crate::users::is_valid_device_token(t)) {
                    return Err(Rejection::invalid(
                        "recipient.push_tokens",
                        format!("{:?} is not a device token", t.chars().take(40).collect::<String>()),
                    ));
                }
                if r.push_tokens.is_empty() && !by_user {
                    return Err(Rejection::invalid(
                        "recipient.push_tokens",
                        "required for the push channel (or a recipient.user_id)",
                    ));
                }
            }
            Channel::Inapp => {
                if !by_user {
                    return Err(Rejection::invalid("recipient.user_id", "required for the inapp channel"));
                }
            }
        }
        if self.fallback.contains(&channel) || self.fallback.len() > Channel::ALL.len() {
            return Err(Rejection::invalid(
                "fallback",
                "lists each later channel once, never the intent's own",
            ));
        }
        if let Some(t) = &self.tenant
            && !is_valid_tenant(t)
        {
            return Err(Rejection::invalid("tenant", "must be 1 to 256 visible ASCII characters"));
        }
        if let Some(user) = &self.recipient.user_id
            && !is_valid_id(user)
        {
            return Err(Rejection::invalid(
                "recipient.user_id",
                "must be 1 to 128 characters of A-Z, a-z, 0-9, '-' and '_'",
            ));
        }
        if let Some(t) = &self.template {
            if !crate::templates::valid_code(&t.code) {
                return Err(Rejection::invalid("template", "1 to 64 letters, digits, `_` or `-`"));
            }
            if let Some(l) = &t.locale {
                crate::templates::canonical_locale(l).map_err(|m| Rejection::invalid("locale", m))?;
            }
            if self.content != Content::default() {
                return Err(Rejection::invalid("content", "give a template or inline content, not both"));
            }
        } else if self.content == Content::default() && self.data.is_empty() {
            return Err(Rejection::invalid(
                "content",
                "give content (title, subject, body or html), a template, or data",
            ));
        }
        for (field, value, max) in [
            ("content.title", &self.content.title, MAX_TITLE),
            ("content.subject", &self.content.subject, MAX_TITLE),
            ("category", &self.category, MAX_SHORT_TEXT),
            ("correlation_id", &self.correlation_id, 128),
        ] {
            if value.as_ref().is_some_and(|v| v.chars().count() > max) {
                return Err(Rejection::invalid(field, format!("longer than {max} characters")));
            }
        }
        if self.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(Rejection::invalid("metadata", format!("more than {MAX_METADATA_ENTRIES} entries")));
        }
        if let Some((k, _)) = self
            .metadata
            .iter()
            .find(|(k, v)| k.is_empty() || k.len() > MAX_SHORT_TEXT || v.len() > MAX_SHORT_TEXT * 4)
        {
            return Err(Rejection::invalid(
                format!("metadata.{k}"),
                "keys are 1 to 256 bytes and values at most 1024",
            ));
        }
        if let Some(at) = self.send_at {
            let furthest = Utc::now()
                + chrono::Duration::from_std(crate::topology::MAX_SCHEDULE_AHEAD).expect("days fit");
            if at > furthest {
                return Err(Rejection::invalid(
                    "send_at",
                    format!(
                        "is more than {} days ahead",
                        crate::topology::MAX_SCHEDULE_AHEAD.as_secs() / 86_400
                    ),
                ));
            }
        }
        if let (Some(send), Some(expires)) = (self.send_at, self.expires_at)
            && expires <= send
        {
            return Err(Rejection::invalid("expires_at", "must be later than send_at"));
        }
        Ok(())
    }
}

/// Tenants become message headers and ledger keys: visible ASCII, bounded.
pub fn is_valid_tenant(tenant: &str) -> bool {
    (1..=MAX_SHORT_TEXT).contains(&tenant.len()) && tenant.bytes().all(|b| b.is_ascii_graphic())
}

/// A fresh notification id: a UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Ids become KV keys and subject tokens, so they keep to a safe alphabet.
pub fn is_valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A webhook URL must be absolute http(s) with a host, and carry no credentials.
pub fn validate_webhook_url(raw: &str) -> Result<url::Url, String> {
    if raw.len() > 2048 {
        return Err("longer than 2048 characters".into());
    }
    let url = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    if url.host().is_none() {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook_intent() -> Intent {
        let mut i = Intent::new(
            Channel::Webhook,
            Recipient { webhook_url: Some("https://example.com/hook".into()), ..Default::default() },
        );
        i.content.title = Some("Shipped".into());
        i.data.insert("order".into(), serde_json::json!({"id": 42, "items": ["a", "b"]}));
        i.metadata.insert("source".into(), "test".into());
        i.correlation_id = Some("corr-1".into());
        i
    }

    fn check(payload: &[u8], headers: Option<&HeaderMap>, expected: Result<(), &str>) {
        let got = Intent::from_message(payload, headers, Channel::Webhook, Some("msg-id-1"));
        match (got, expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(want)) => assert!(e.to_string().starts_with(want), "{e} vs {want}"),
            (got, want) => panic!("got {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn msgpack_round_trip_keeps_every_field() {
        let i = webhook_intent();
        let back = Intent::from_message(&i.encode(), Some(&i.headers()), Channel::Webhook, None).unwrap();
        assert_eq!(back, i);
    }

    #[test]
    fn msgpack_uses_named_fields() {
        let bytes = webhook_intent().encode();
        let as_value: rmpv_probe::Map = rmp_serde::from_slice(&bytes).unwrap();
        assert!(as_value.contains_key("recipient"));
        assert!(as_value.contains_key("id"));
    }

    mod rmpv_probe {
        pub type Map = std::collections::BTreeMap<String, serde::de::IgnoredAny>;
    }

    #[test]
    fn unknown_fields_from_newer_writers_are_ignored() {
        #[derive(Serialize)]
        struct Newer<'a> {
            #[serde(flatten)]
            base: &'a Intent,
            shiny_new_field: u32,
        }
        let i = webhook_intent();
        let bytes = rmp_serde::to_vec_named(&Newer { base: &i, shiny_new_field: 7 }).unwrap();
        assert_eq!(Intent::from_message(&bytes, None, Channel::Webhook, None).unwrap(), i);
    }

    #[test]
    fn json_from_the_nats_cli_is_accepted() {
        let json = br#" {"recipient":{"webhook_url":"http://127.0.0.1:9/x"},"content":{"body":"hi"}}"#;
        let i = Intent::from_message(json, None, Channel::Webhook, Some("order-42")).unwrap();
        assert_eq!(i.id, "order-42");
        assert_eq!(i.channel, Some(Channel::Webhook));
        assert_eq!(i.content.body.as_deref(), Some("hi"));
        let mut h = HeaderMap::new();
        h.insert("Content-Type", "application/json");
        h.insert(headers::CORRELATION_ID, "c-9");
        let i = Intent::from_message(
            br#"{"id":"x1","recipient":{"webhook_url":"http://h/"},"data":{"a":1}}"#,
            Some(&h),
            Channel::Webhook,
            None,
        )
        .unwrap();
        assert_eq!(i.correlation_id.as_deref(), Some("c-9"));
    }

    #[test]
    fn bad_messages_are_rejected_with_a_reason() {
        let ok_url = r#""recipient":{"webhook_url":"http://h/"}"#;
        check(b"\xc1\xff\x00garbage", None, Err("undecodable: msgpack"));
        check(b"", None, Err("undecodable"));
        check(b"{not json", None, Err("undecodable: json"));
        check(br#"{"recipient":"not an object"}"#, None, Err("undecodable: json"));
        check(br#"{"id":"a"}"#, None, Err("undecodable: json"));
        check(format!(r#"{{"id":"a b",{ok_url}}}"#).as_bytes(), None, Err("invalid: id"));
        check(br#"{"recipient":{},"data":{"a":1}}"#, None, Err("invalid: recipient.webhook_url"));
        check(
            br#"{"recipient":{"webhook_url":"ftp://h/"},"data":{"a":1}}"#,
            None,
            Err("invalid: recipient.webhook_url"),
        );
        check(
            br#"{"recipient":{"webhook_url":"http://u:p@h/"},"data":{"a":1}}"#,
            None,
            Err("invalid: recipient.webhook_url"),
        );
        check(format!(r#"{{"channel":"email",{ok_url}}}"#).as_bytes(), None, Err("invalid: channel"));
        check(format!(r#"{{"version":99,{ok_url}}}"#).as_bytes(), None, Err("invalid: version"));
        check(
            format!(r#"{{"send_at":"2020-01-02T00:00:00Z","expires_at":"2020-01-01T00:00:00Z","data":{{"a":1}},{ok_url}}}"#)
                .as_bytes(),
            None,
            Err("invalid: expires_at"),
        );
        check(&vec![b' '; MAX_INTENT_BYTES + 1], None, Err("invalid: payload"));
        // The gateway's limits hold for direct publishes too.
        let body = r#""content":{"body":"b"}"#;
        check(format!(r#"{{{ok_url}}}"#).as_bytes(), None, Err("invalid: content"));
        let long = "t".repeat(MAX_TITLE + 1);
        check(
            format!(r#"{{{ok_url},"content":{{"title":"{long}"}}}}"#).as_bytes(),
            None,
            Err("invalid: content.title"),
        );
        let many: Vec<String> = (0..=MAX_METADATA_ENTRIES).map(|i| format!(r#""k{i}":"v""#)).collect();
        check(
            format!(r#"{{{ok_url},{body},"metadata":{{{}}}}}"#, many.join(",")).as_bytes(),
            None,
            Err("invalid: metadata"),
        );
        check(
            format!(r#"{{{ok_url},{body},"send_at":"2999-01-01T00:00:00Z"}}"#).as_bytes(),
            None,
            Err("invalid: send_at"),
        );
        check(format!(r#"{{{ok_url},{body},"tenant":"a b"}}"#).as_bytes(), None, Err("invalid: tenant"));
        check(format!(r#"{{{ok_url},{body}}}"#).as_bytes(), None, Ok(()));
    }

    #[test]
    fn channels_parse() {
        assert_eq!("webhook".parse::<Channel>(), Ok(Channel::Webhook));
        assert!("pigeon".parse::<Channel>().unwrap_err().contains("pigeon"));
    }
}
