//! Per-recipient limits: at most N notifications per user, category and channel in a window
//! (`HERALD_RECIPIENT_LIMIT=20/1h,marketing=3/1d`).
//!
//! Counts live in HERALD_THROTTLE, a JetStream counter stream (`allow_msg_counter`): one subject
//! per (tenant, user, category, channel, window), incremented with `Nats-Incr: 1`, whose
//! acknowledgement carries the new total. Every worker process shares the counts, one publish
//! per counted notification, and old windows age out with the stream's `max_age`. Windows are
//! fixed (they start at multiples of their length since the Unix epoch).
//!
//! Only notifications addressed to a user are counted, never `critical` ones, and only on their
//! first attempt of a round (a retry is the same notification). What is over the limit is
//! settled `throttled`, with the limit in its note: visible, never silently dropped.

use std::{collections::BTreeMap, fmt, time::Duration};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::{
    intent::{Intent, Priority},
    ledger::tenant_token,
};

/// The subjects of HERALD_THROTTLE.
pub const SUBJECT_PREFIX: &str = "herald.throttle";
/// The longest window a limit may have.
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// N notifications per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub count: u64,
    pub window: Duration,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {}s", self.count, self.window.as_secs())
    }
}

/// `HERALD_RECIPIENT_LIMIT`: a limit for every category, and limits of named categories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecipientLimits {
    pub default: Option<Limit>,
    pub categories: BTreeMap<String, Limit>,
}

impl RecipientLimits {
    /// Parses `20/1h,marketing=3/1d`: an optional limit for every category, then
    /// `<category>=<n>/<window>` for named ones. Empty: no limits.
    pub fn parse(
        s: &str,
        duration: impl Fn(&str) -> Result<Duration, String>,
    ) -> Result<RecipientLimits, String> {
        let mut limits = RecipientLimits::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (category, limit) = match part.split_once('=') {
                Some((c, l)) => (Some(c.trim()), l.trim()),
                None => (None, part),
            };
            let (count, window) = limit
                .split_once('/')
                .ok_or_else(|| format!("{part:?}: expected <n>/<window>, e.g. 20/1h"))?;
            let count = match count.trim().parse::<u64>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(format!("{part:?}: the count must be a whole number of at least 1")),
            };
            let window = duration(window.trim())?;
            if window < Duration::from_secs(1) || window > MAX_WINDOW {
                return Err(format!("{part:?}: the window must be 1s to 7d"));
            }
            let limit = Limit { count, window };
            match category {
                None if limits.default.is_some() => return Err("two limits for every category".into()),
                None => limits.default = Some(limit),
                Some("") => return Err(format!("{part:?}: empty category")),
                Some(c) => {
                    if limits.categories.insert(c.to_owned(), limit).is_some() {
                        return Err(format!("two limits for category {c:?}"));
                    }
                }
            }
        }
        Ok(limits)
    }

    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.categories.is_empty()
    }

    /// The limit a notification of `category` has.
    pub fn for_category(&self, category: Option<&str>) -> Option<Limit> {
        category.and_then(|c| self.categories.get(c)).copied().or(self.default)
    }
}

/// Counts notifications against their recipients' limits.
#[derive(Clone)]
pub struct Throttle {
    js: jetstream::Context,
    limits: RecipientLimits,
}

impl Throttle {
    pub fn new(js: jetstream::Context, limits: RecipientLimits) -> Throttle {
        Throttle { js, limits }
    }

    /// Counts `intent` if a limit applies to it; answers the limit it goes over, if it does.
    pub async fn over(
        &self,
        intent: &Intent,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, async_nats::Error> {
        let Some(user) = intent.recipient.user_id.as_deref() else { return Ok(None) };
        if intent.priority == Priority::Critical {
            return Ok(None);
        }
        let category = intent.category.as_deref();
        let Some(limit) = self.limits.for_category(category) else { return Ok(None) };
        let subject = counter_subject(intent, user, limit, now);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Incr", "1");
        let ack = self.js.publish_with_headers(subject, headers, bytes::Bytes::new()).await?.await?;
        let total: u64 = ack.value.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok((total > limit.count).then(|| {
            format!(
                "user {user} already got {} {} on {} within {}s (HERALD_RECIPIENT_LIMIT: {limit})",
                limit.count,
                match category {
                    Some(c) => format!("{c:?} notifications"),
                    None => "notifications without a category".to_owned(),
                },
                intent.channel(),
                limit.window.as_secs(),
            )
        }))
    }
}

/// `herald.throttle.<tenant>.<user>.<category>.<channel>.<window start>`; user and category
/// hashed into one token each.
fn counter_subject(intent: &Intent, user: &str, limit: Limit, now: DateTime<Utc>) -> String {
    let token = |s: &str| hex::encode(&Sha256::digest(s.as_bytes())[..12]);
    let window = limit.window.as_secs().max(1) as i64;
    let start = now.timestamp().div_euclid(window) * window;
    format!(
        "{SUBJECT_PREFIX}.{}.{}.{}.{}.{start}",
        tenant_token(intent.tenant.as_deref()),
        token(user),
        token(intent.category.as_deref().unwrap_or("")),
        intent.channel(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> Result<Duration, String> {
        let (n, unit) = s.split_at(s.len() - 1);
        let n: u64 = n.parse().map_err(|_| format!("bad duration {s}"))?;
        Ok(Duration::from_secs(
            n * if unit == "h" {
                3600
            } else if unit == "d" {
                86400
            } else {
                1
            },
        ))
    }

    #[test]
    fn limits_parse_with_category_overrides_and_refuse_nonsense() {
        let l = RecipientLimits::parse("20/1h, marketing=3/1d", secs).unwrap();
        assert_eq!(l.default, Some(Limit { count: 20, window: Duration::from_secs(3600) }));
        assert_eq!(l.for_category(Some("marketing")).unwrap().count, 3);
        assert_eq!(l.for_category(Some("billing")).unwrap().count, 20);
        assert_eq!(l.for_category(None).unwrap().count, 20);
        let only = RecipientLimits::parse("marketing=3/1d", secs).unwrap();
        assert_eq!(only.for_category(Some("billing")), None);
        assert!(RecipientLimits::parse("", secs).unwrap().is_empty());
        for bad in ["0/1h", "x/1h", "20", "20/8d", "=3/1h", "1/1h,2/1h", "a=1/1h,a=2/1h", "20/0s"] {
            assert!(RecipientLimits::parse(bad, secs).is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_are_kept_per_window_user_category_and_channel() {
        let mut intent = Intent::new(crate::Channel::Webhook, Default::default());
        intent.tenant = Some("acme".into());
        intent.category = Some("promo".into());
        let hour = Limit { count: 1, window: Duration::from_secs(3600) };
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        let a = counter_subject(&intent, "u1", hour, at(7200));
        assert_eq!(a, counter_subject(&intent, "u1", hour, at(10_799)));
        assert_ne!(a, counter_subject(&intent, "u1", hour, at(10_800)));
        assert_ne!(a, counter_subject(&intent, "u2", hour, at(7200)));
        assert!(a.starts_with("herald.throttle.t_acme.") && a.ends_with(".webhook.7200"), "{a}");
        intent.category = Some("other".into());
        assert_ne!(a, counter_subject(&intent, "u1", hour, at(7200)));
    }
}
