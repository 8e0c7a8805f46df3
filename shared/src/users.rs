//! Users: who Herald notifies, kept in the `herald_users` bucket.
//!
//! One key per (tenant, user): `<tenant token>.<user id>` ([`user_key`]), holding a [`User`] as
//! JSON (readable with `nats kv get`). Every write is a compare-and-set on the revision it read,
//! so a caller's `If-Match` becomes the KV revision it expects, and two writers racing on the
//! same revision cannot both win. [`UserFields::validate`] is the one validation; the gateway
//! answers 422 with the field it names. Hot-path readers (workers) do not read this bucket: they
//! read the local copy kept by [`crate::mirror`].

use async_nats::jetstream::kv::{self, Operation};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    Channel,
    intent::{is_valid_id, validate_webhook_url},
    ledger::tenant_token,
    preferences::{Invalid, Preferences},
};

/// At most this many push devices per user: a record is read on every send and copied into
/// every process, so it stays small.
pub const MAX_DEVICES: usize = 100;
/// Longest device token accepted (APNs tokens are 64 hex digits, FCM tokens about 160
/// characters; this leaves room for longer ones).
pub const MAX_DEVICE_TOKEN: usize = 512;
/// Deepest nesting of custom attributes (an object directly inside `attributes` is depth 1).
pub const MAX_ATTRIBUTE_DEPTH: usize = 8;
/// Largest custom attributes, as compact JSON.
pub const MAX_ATTRIBUTES_BYTES: usize = 8 * 1024;
/// Longest name, locale or other short text.
pub const MAX_TEXT: usize = 256;

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// The caller's id for the user (unique within its tenant).
    pub id: String,
    /// Everything a caller may set.
    #[serde(flatten)]
    pub fields: UserFields,
    /// When the user was first stored; kept across replacements.
    pub created_at: DateTime<Utc>,
    /// When the user was last written.
    pub updated_at: DateTime<Utc>,
}

/// What a caller sets on a user (`PUT` replaces all of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserFields {
    /// How to address the user in a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The email channel's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The sms channel's number, E.164 (`+4915112345678`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// The push channel's devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
    /// The webhook channel's receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// BCP 47 language tag templates are rendered in (`fr-CA`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// IANA time zone for quiet hours and dates (`Europe/Paris`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// What the user wants to receive, where and when.
    #[serde(default)]
    pub preferences: Preferences,
    /// The caller's own data about the user, for templates.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub attributes: Map<String, Value>,
}

/// A push device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// The provider's registration token; unique per user.
    pub token: String,
    /// Which provider the token belongs to.
    pub platform: Platform,
    /// When the token was first registered, so stale ones can be pruned later.
    pub added_at: DateTime<Utc>,
}

/// A push provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Fcm,
    Apns,
}

/// The KV key of a user: `<tenant token>.<id>`. Ids are checked by [`is_valid_user_id`], so the
/// id is exactly one key token and no tenant's key can look like another's.
pub fn user_key(tenant: &str, id: &str) -> String {
    format!("{}.{id}", tenant_token(Some(tenant)))
}

/// The key prefix of one tenant's users (`<tenant token>.`), for listing the local copy.
pub fn tenant_prefix(tenant: &str) -> String {
    format!("{}.", tenant_token(Some(tenant)))
}

/// User ids are 1 to 128 characters of `A-Z a-z 0-9 - _`: they become one KV key token (NATS
/// keys allow `. / =` too, but `.` separates tokens) and one URL path segment, with no escaping
/// anywhere. Callers with other ids (emails, say) map them, e.g. to a hash.
pub fn is_valid_user_id(id: &str) -> bool {
    is_valid_id(id)
}

/// A mailbox an SMTP server takes in `RCPT TO` (RFC 5321): a dot-atom local part of at most 64
/// bytes (letters, digits, ``!#$%&'*+/=?^_`{|}~-``, UTF-8 letters per RFC 6531; dots only
/// between characters), `@`, and a domain of dot-separated labels (letters, digits, inner `-`)
/// or an address literal in brackets; 254 bytes at most. Quoted local parts are refused:
/// nobody sends notifications to them, and they are where header injection hides.
pub fn is_email_address(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else { return false };
    let atext = |c: char| {
        c.is_ascii_alphanumeric()
            || "!#$%&'*+/=?^_`{|}~-".contains(c)
            || (!c.is_ascii() && c.is_alphanumeric())
    };
    let dot_atom = |s: &str, allowed: &dyn Fn(char) -> bool| {
        !s.is_empty() && s.split('.').all(|part| !part.is_empty() && part.chars().all(allowed))
    };
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && c.is_alphanumeric()))
    };
    let domain_ok = match domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        Some(literal) => {
            literal.parse::<std::net::Ipv4Addr>().is_ok()
                || literal.strip_prefix("IPv6:").is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => domain.len() <= 253 && domain.split('.').all(label),
    };
    address.len() <= 254 && local.len() <= 64 && dot_atom(local, &atext) && domain_ok
}

/// One mailbox as a From or Reply-To header holds it: `address` or `Display Name <address>`
/// (the name may be quoted), with no control characters anywhere, so it can never add a header.
pub fn is_mailbox(mailbox: &str) -> bool {
    let m = mailbox.trim();
    if m.is_empty() || m.len() > 320 || m.chars().any(char::is_control) {
        return false;
    }
    let Some(rest) = m.strip_suffix('>') else { return is_email_address(m) };
    let Some((name, address)) = rest.rsplit_once('<') else { return false };
    let name = name.trim();
    let name_ok = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        // A quoted name may hold anything printable but an unescaped quote or backslash.
        Some(quoted) => !quoted.contains(['"', '\\']),
        None => !name.contains(['<', '>', '"', '@', ',', ';', ':', '\\', '(', ')', '[', ']']),
    };
    name_ok && is_email_address(address)
}

/// `+` and 2 to 15 digits, the first not 0 (ITU-T E.164).
pub fn is_e164(phone: &str) -> bool {
    let Some(digits) = phone.strip_prefix('+') else { return false };
    (2..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0')
}

/// A well-formed BCP 47 (RFC 5646) tag: a 2-3 letter language (or 4-8, or `x-` private use),
/// then an optional script (4 letters), region (2 letters or 3 digits), variants (5-8
/// alphanumerics, or a digit and 3), extensions (a singleton and 2-8 alphanumerics) and a
/// private-use part. Whether a subtag is registered is not checked.
pub fn is_bcp47(tag: &str) -> bool {
    if tag.is_empty() || tag.len() > 64 {
        return false;
    }
    let parts: Vec<&str> = tag.split('-').collect();
    let alpha = |s: &str| s.bytes().all(|b| b.is_ascii_alphabetic());
    let digit = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let alnum = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
    if parts.iter().any(|p| p.is_empty() || p.len() > 8 || !alnum(p)) {
        return false;
    }
    let private = |rest: &[&str]| !rest.is_empty();
    if parts[0].eq_ignore_ascii_case("x") {
        return private(&parts[1..]);
    }
    if !(alpha(parts[0]) && (2..=8).contains(&parts[0].len()) && parts[0].len() != 4) {
        return false;
    }
    let mut i = 1;
    // Up to three extended-language subtags after a 2-3 letter language.
    while i < parts.len() && i <= 3 && parts[0].len() <= 3 && parts[i].len() == 3 && alpha(parts[i]) {
        i += 1;
    }
    if i < parts.len() && parts[i].len() == 4 && alpha(parts[i]) {
        i += 1;
    }
    if i < parts.len()
        && ((parts[i].len() == 2 && alpha(parts[i])) || (parts[i].len() == 3 && digit(parts[i])))
    {
        i += 1;
    }
    while i < parts.len()
        && ((5..=8).contains(&parts[i].len())
            || (parts[i].len() == 4 && parts[i].as_bytes()[0].is_ascii_digit()))
    {
        i += 1;
    }
    while i < parts.len() && parts[i].len() == 1 {
        if parts[i].eq_ignore_ascii_case("x") {
            return private(&parts[i + 1..]);
        }
        let start = i + 1;
        i = start;
        while i < parts.len() && (2..=8).contains(&parts[i].len()) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    i == parts.len()
}

/// An IANA time zone name chrono-tz knows (`Europe/Paris`, `UTC`).
pub fn parse_time_zone(name: &str) -> Option<chrono_tz::Tz> {
    name.parse().ok()
}

/// How deep a JSON value nests (a scalar is 0, `{}` is 1).
fn depth(value: &Value) -> usize {
    match value {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

impl UserFields {
    /// Every check on a user; `required` are the operator's required categories.
    pub fn validate(&self, required: &[String]) -> Result<(), Invalid> {
        for (field, value) in [("name", &self.name), ("locale", &self.locale), ("time_zone", &self.time_zone)]
        {
            if value.as_ref().is_some_and(|v| v.chars().count() > MAX_TEXT) {
                return Err(Invalid::new(field, format!("longer than {MAX_TEXT} characters")));
            }
        }
        if let Some(email) = &self.email
            && !is_email_address(email)
        {
            return Err(Invalid::new("email", format!("{email:?} is not an email address")));
        }
        if let Some(phone) = &self.phone
            && !is_e164(phone)
        {
            return Err(Invalid::new(
                "phone",
                format!("{phone:?} is not an E.164 number: '+', then 2 to 15 digits, the first not 0"),
            ));
        }
        if let Some(url) = &self.webhook_url {
            validate_webhook_url(url).map_err(|m| Invalid::new("webhook_url", m))?;
        }
        if let Some(locale) = &self.locale
            && !is_bcp47(locale)
        {
            return Err(Invalid::new(
                "locale",
                format!("{locale:?} is not a BCP 47 language tag like fr-CA"),
            ));
        }
        if let Some(tz) = &self.time_zone
            && parse_time_zone(tz).is_none()
        {
            return Err(Invalid::new(
                "time_zone",
                format!("{tz:?} is not an IANA time zone like Europe/Paris"),
            ));
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(Invalid::new(
                "devices",
                format!("{} devices; a user may have at most {MAX_DEVICES}", self.devices.len()),
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if !is_valid_device_token(&d.token) {
                return Err(Invalid::new(
                    format!("devices[{i}].token"),
                    format!("a device token is 1 to {MAX_DEVICE_TOKEN} visible ASCII characters"),
                ));
            }
            if self.devices[..i].iter().any(|o| o.token == d.token) {
                return Err(Invalid::new(format!("devices[{i}].token"), "listed twice"));
            }
        }
        for (key, value) in &self.attributes {
            if depth(value) >= MAX_ATTRIBUTE_DEPTH {
                return Err(Invalid::new(
                    format!("attributes.{key}"),
                    format!("nested deeper than {MAX_ATTRIBUTE_DEPTH} levels"),
                ));
            }
        }
        let size = serde_json::to_vec(&self.attributes).map_or(usize::MAX, |v| v.len());
        if size > MAX_ATTRIBUTES_BYTES {
            return Err(Invalid::new(
                "attributes",
                format!("{size} bytes as JSON; at most {MAX_ATTRIBUTES_BYTES}"),
            ));
        }
        self.preferences.validate(required, "preferences")
    }

    /// Keeps the `added_at` of devices `old` already had, so a replacement that lists a device
    /// again does not make it look new.
    fn keep_added_at(&mut self, old: &UserFields) {
        for d in &mut self.devices {
            if let Some(o) = old.devices.iter().find(|o| o.token == d.token) {
                d.added_at = o.added_at;
            }
        }
    }
}

/// Device tokens appear in URLs (`DELETE …/devices/{token}`) and provider requests.
pub fn is_valid_device_token(token: &str) -> bool {
    (1..=MAX_DEVICE_TOKEN).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

/// RFC 7396 JSON merge patch: members of `patch` replace those of `target`, `null` removes one,
/// objects merge recursively, anything else (arrays included) replaces whole.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(object) = target {
        for (name, value) in members {
            if value.is_null() {
                object.remove(name);
            } else {
                merge_patch(object.entry(name.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// A value with the KV revision it was read at (the `ETag`).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Nothing: create or replace whatever is there.
    None,
    /// The user exists at exactly this revision (`If-Match: "<revision>"`).
    Revision(u64),
    /// The user exists, at any revision (`If-Match: *`).
    Exists,
}

/// Why a user operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no user {0:?}")]
    NotFound(String),
    /// The user is not at the revision the caller expected; nothing was written.
    #[error("user {id:?} is at revision {current}, not the expected one")]
    Stale { id: String, current: u64 },
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The caller expected the user to exist (`If-Match`) but it does not; nothing was written.
    #[error("no user {0:?} to match If-Match")]
    Missing(String),
    /// Too many concurrent writers kept changing the user between read and write.
    #[error("user {0:?} kept changing under concurrent writes; try again")]
    Contended(String),
    #[error("the users bucket refused the write: it is full")]
    Full,
    /// NATS failed or did not answer: worth retrying.
    #[error("users bucket: {0}")]
    Nats(String),
    #[error("stored user {0:?} is unreadable: {1}")]
    Corrupt(String, String),
}

/// How many times a write without a precondition re-reads and retries after losing a race.
const RETRIES: usize = 8;

/// The users bucket.
#[derive(Clone)]
pub struct Users {
    kv: kv::Store,
    /// Categories the operator marks required (`HERALD_REQUIRED_CATEGORIES`).
    required: Vec<String>,
}

fn nats_error(e: impl std::fmt::Display) -> UserError {
    if crate::topology::is_storage_full(&e) { UserError::Full } else { UserError::Nats(e.to_string()) }
}

impl Users {
    pub fn new(kv: kv::Store, required: Vec<String>) -> Users {
        Users { kv, required }
    }

    /// The bucket, for the local copy's watch.
    pub fn store(&self) -> &kv::Store {
        &self.kv
    }

    /// The operator's required categories.
    pub fn required(&self) -> &[String] {
        &self.required
    }

    /// The user straight from the bucket (not the local copy): what a caller just wrote.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<Versioned<User>>, UserError> {
        if !is_valid_user_id(id) {
            return Ok(None);
        }
        let entry = self.kv.entry(user_key(tenant, id)).await.map_err(nats_error)?;
        match entry {
            Some(e) if e.operation == Operation::Put => {
                let user = decode(id, &e.value)?;
                Ok(Some(Versioned { value: user, revision: e.revision }))
            }
            _ => Ok(None),
        }
    }

    /// Creates or replaces a user. Answers the stored user and whether it was created.
    pub async fn put(
        &self,
        tenant: &str,
        id: &str,
        fields: UserFields,
        precondition: Precondition,
    ) -> Result<(Versioned<User>, bool), UserError> {
        self.write(tenant, id, precondition, true, |_| Ok::<_, UserError>(fields.clone())).await
    }

    /// Changes an existing user with `change` (given the stored user, it returns the new fields),
    /// re-reading and retrying if another writer got there first, unless the caller named the
    /// revision it expects: then a lost race is [`UserError::Stale`].
    pub async fn modify<E: From<UserError>>(
        &self,
        tenant: &str,
        id: &str,
        precondition: Precondition,
        change: impl FnMut(&User) -> Result<UserFields, E>,
    ) -> Result<Versioned<User>, E> {
        Ok(self.write(tenant, id, precondition, false, change).await?.0)
    }

    async fn write<E: From<UserError>>(
        &self,
        tenant: &str,
        id: &str,
        precondition: Precondition,
        may_create: bool,
        mut change: impl FnMut(&User) -> Result<UserFields, E>,
    ) -> Result<(Versioned<User>, bool), E> {
        if !is_valid_user_id(id) {
            return Err(UserError::Invalid(Invalid::new(
                "id",
                "a user id is 1 to 128 characters of A-Z, a-z, 0-9, '-' and '_'",
            ))
            .into());
        }
        let key = user_key(tenant, id);
        for _ in 0..RETRIES {
            let current = self.get(tenant, id).await?;
            let now = Utc::now();
            let (user, created) = match (&current, precondition) {
                (None, Precondition::None) if may_create => {
                    let empty = User {
                        id: id.to_owned(),
                        fields: UserFields::default(),
                        created_at: now,
                        updated_at: now,
                    };
                    (User { fields: change(&empty)?, ..empty }, true)
                }
                (None, Precondition::None) => return Err(UserError::NotFound(id.to_owned()).into()),
                (None, _) => return Err(UserError::Missing(id.to_owned()).into()),
                (Some(c), Precondition::Revision(r)) if c.revision != r => {
                    return Err(UserError::Stale { id: id.to_owned(), current: c.revision }.into());
                }
                (Some(c), _) => {
                    let mut fields = change(&c.value)?;
                    fields.keep_added_at(&c.value.fields);
                    (
                        User { id: id.to_owned(), fields, created_at: c.value.created_at, updated_at: now },
                        false,
                    )
                }
            };
            user.fields.validate(&self.required).map_err(UserError::from)?;
            let bytes: bytes::Bytes = serde_json::to_vec(&user).expect("users serialize").into();
            let written = match &current {
                None => self.kv.create(&key, bytes).await.map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => None,
                    _ => Some(nats_error(e)),
                }),
                Some(c) => self.kv.update(&key, bytes, c.revision).await.map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => None,
                    _ => Some(nats_error(e)),
                }),
            };
            match written {
                Ok(revision) => return Ok((Versioned { value: user, revision }, created)),
                Err(Some(e)) => return Err(e.into()),
                // Lost a race: someone wrote in between.
                Err(None) if precondition == Precondition::None || precondition == Precondition::Exists => {
                    continue;
                }
                Err(None) => {
                    let current = self.get(tenant, id).await?.map_or(0, |c| c.revision);
                    return Err(UserError::Stale { id: id.to_owned(), current }.into());
                }
            }
        }
        Err(UserError::Contended(id.to_owned()).into())
    }

    /// Deletes a user (a KV delete marker, which the local copies see and apply).
    pub async fn delete(&self, tenant: &str, id: &str, precondition: Precondition) -> Result<(), UserError> {
        let key = user_key(tenant, id);
        for _ in 0..RETRIES {
            let Some(current) = self.get(tenant, id).await? else {
                return Err(match precondition {
                    Precondition::None => UserError::NotFound(id.to_owned()),
                    _ => UserError::Missing(id.to_owned()),
                });
            };
            if let Precondition::Revision(r) = precondition
                && r != current.revision
            {
                return Err(UserError::Stale { id: id.to_owned(), current: current.revision });
            }
            match self.kv.delete_expect_revision(&key, Some(current.revision)).await {
                Ok(()) => return Ok(()),
                Err(e) if e.to_string().contains("wrong last sequence") => {
                    if let Precondition::Revision(_) = precondition {
                        let now = self.get(tenant, id).await?.map_or(0, |c| c.revision);
                        return Err(UserError::Stale { id: id.to_owned(), current: now });
                    }
                }
                Err(e) => return Err(nats_error(e)),
            }
        }
        Err(UserError::Contended(id.to_owned()))
    }
}

/// Decodes a stored user.
pub fn decode(id: &str, bytes: &[u8]) -> Result<User, UserError> {
    serde_json::from_slice(bytes).map_err(|e| UserError::Corrupt(id.to_owned(), e.to_string()))
}

/// The channels a notification to `user` goes on when the request names none, the channels
/// passed over with why, and (with a fallback order) the channels after the chosen one, which
/// take over at send time if it cannot deliver. Candidates are the user's fallback order if they gave one
/// (then only the first usable channel is used: "push, else email"), else every channel in
/// Herald's order. A channel is usable when `available` (it has a worker), the user did not
/// switch it off, and there is an address for it (the user's, or `direct` from the request).
pub fn channels_for(
    user: &User,
    direct: &crate::intent::Recipient,
    available: impl Fn(Channel) -> bool,
) -> (Vec<Channel>, Vec<(Channel, String)>, Vec<Channel>) {
    let f = &user.fields;
    let ordered = !f.preferences.fallback.is_empty();
    let candidates: Vec<Channel> =
        if ordered { f.preferences.fallback.clone() } else { Channel::ALL.to_vec() };
    let mut chosen = Vec::new();
    let mut passed = Vec::new();
    let mut rest = candidates.clone();
    for channel in candidates {
        rest.remove(0);
        let address = match channel {
            Channel::Email => f.email.is_some() || direct.email.is_some(),
            Channel::Sms => f.phone.is_some() || direct.phone.is_some(),
            Channel::Push => !f.devices.is_empty() || !direct.push_tokens.is_empty(),
            Channel::Webhook => f.webhook_url.is_some() || direct.webhook_url.is_some(),
            Channel::Inapp => true,
        };
        let why = if !available(channel) {
            Some(format!("{channel} is not available in this Herald"))
        } else if f.preferences.channels.get(&channel) == Some(&false) {
            Some(format!("user {} switched {channel} off", user.id))
        } else if !address {
            Some(format!("user {} has no {channel} address", user.id))
        } else {
            None
        };
        match why {
            None => {
                chosen.push(channel);
                if ordered {
                    break;
                }
            }
            // Without a fallback order, channels the user has no address for are simply not
            // theirs; with one, each channel passed over is recorded.
            Some(why) if ordered => passed.push((channel, why)),
            Some(_) => {}
        }
    }
    rest.retain(|c| available(*c));
    if !ordered {
        rest.clear();
    }
    (chosen, passed, rest)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn phone_numbers_are_e164() {
        for ok in ["+4915112345678", "+12", "+123456789012345"] {
            assert!(is_e164(ok), "{ok}");
        }
        for bad in ["4915112345678", "+0123", "+1", "+1234567890123456", "+49 151", "+49-151", "", "+"] {
            assert!(!is_e164(bad), "{bad}");
        }
    }

    #[test]
    fn locales_are_bcp47() {
        for ok in [
            "en",
            "fr-CA",
            "zh-Hant-TW",
            "es-419",
            "de-CH-1901",
            "sl-rozaj-biske",
            "en-US-x-twain",
            "x-whatever",
            "zh-yue-HK",
            "en-a-bbb-x-a-ccc",
            "haw",
        ] {
            assert!(is_bcp47(ok), "{ok}");
        }
        for bad in [
            "",
            "e",
            "en_US",
            "fr-",
            "-fr",
            "en--US",
            "123",
            "en-US-x",
            "en-a",
            "en-US-u",
            "toolonglanguage",
            "fr CA",
            "en-ü",
        ] {
            assert!(!is_bcp47(bad), "{bad}");
        }
    }

    fn check(fields: UserFields, field: Option<&str>) {
        let got = fields.validate(&["security".to_owned()]);
        assert_eq!(got.as_ref().err().map(|e| e.field.as_str()), field, "{got:?}");
    }

    #[test]
    fn validation_names_the_field() {
        let base = UserFields::default;
        let device = |t: &str| Device { token: t.into(), platform: Platform::Fcm, added_at: Utc::now() };
        check(
            UserFields {
                name: Some("Ada".into()),
                email: Some("ada@example.com".into()),
                phone: Some("+4915112345678".into()),
                devices: vec![device("tok-1")],
                webhook_url: Some("https://example.com/hook".into()),
                locale: Some("en-GB".into()),
                time_zone: Some("Europe/London".into()),
                attributes: json!({"plan": {"tier": "gold"}}).as_object().unwrap().clone(),
                ..base()
            },
            None,
        );
        check(UserFields { email: Some("not-an-address".into()), ..base() }, Some("email"));
        check(UserFields { email: Some("a b@c".into()), ..base() }, Some("email"));
        check(UserFields { phone: Some("0151 123".into()), ..base() }, Some("phone"));
        check(UserFields { locale: Some("en_US".into()), ..base() }, Some("locale"));
        check(UserFields { time_zone: Some("Mars/Olympus".into()), ..base() }, Some("time_zone"));
        check(UserFields { webhook_url: Some("ftp://x".into()), ..base() }, Some("webhook_url"));
        check(UserFields { name: Some("n".repeat(300)), ..base() }, Some("name"));
        check(
            UserFields { devices: (0..=MAX_DEVICES).map(|i| device(&format!("t{i}"))).collect(), ..base() },
            Some("devices"),
        );
        check(UserFields { devices: vec![device("a"), device("a")], ..base() }, Some("devices[1].token"));
        check(UserFields { devices: vec![device("with/slash")], ..base() }, Some("devices[0].token"));
        let mut deep = json!(1);
        for _ in 0..MAX_ATTRIBUTE_DEPTH {
            deep = json!({ "d": deep });
        }
        check(
            UserFields { attributes: json!({"x": deep}).as_object().unwrap().clone(), ..base() },
            Some("attributes.x"),
        );
        let big = json!({"blob": "b".repeat(MAX_ATTRIBUTES_BYTES)});
        check(UserFields { attributes: big.as_object().unwrap().clone(), ..base() }, Some("attributes"));
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The examples of RFC 7396, appendix A.
        for (target, patch, expected) in [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (json!({"a":"b","b":"c"}), json!({"a":null}), json!({"b":"c"})),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (json!({"a":{"b":"c"}}), json!({"a":{"b":"d","c":null}}), json!({"a":{"b":"d"}})),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (json!({}), json!({"a":{"bb":{"ccc":null}}}), json!({"a":{"bb":{}}})),
        ] {
            let mut got = target.clone();
            merge_patch(&mut got, &patch);
            assert_eq!(got, expected, "{target} + {patch}");
        }
    }

    #[test]
    fn keys_carry_the_tenant_and_one_id_token() {
        assert_eq!(user_key("acme", "u-1"), "t_acme.u-1");
        assert_eq!(user_key("a.b", "u-1"), format!("x_{}.u-1", hex::encode("a.b")));
        assert!(user_key("acme", "u-1").starts_with(&tenant_prefix("acme")));
        assert!(!is_valid_user_id("a.b") && !is_valid_user_id("") && !is_valid_user_id(&"a".repeat(129)));
    }

    #[test]
    fn users_round_trip_as_json() {
        let user = User {
            id: "u1".into(),
            fields: UserFields { name: Some("Ada".into()), ..Default::default() },
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let bytes = serde_json::to_vec(&user).unwrap();
        assert_eq!(decode("u1", &bytes).unwrap(), user);
    }
}
