//! A user's wishes about being notified, and the pure decision workers take from them.
//!
//! [`Preferences`] is what `PUT /v1/users/{id}/preferences` stores inside the user record.
//! [`decide`] answers, for one notification and one channel, whether to send now, to suppress
//! it (and which rule said so) or to wait until quiet hours end. It does no I/O and takes "now"
//! as an argument, so the whole table of cases is tested without clocks or NATS.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::intent::{Channel, Priority};

/// At most this many categories per user: preferences live in every copy of the user record.
pub const MAX_CATEGORIES: usize = 64;
/// A category name's longest form.
pub const MAX_CATEGORY_LEN: usize = 64;

/// What a user wants, per channel and per category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Preferences {
    /// Channels switched on or off as a whole; a channel not listed is on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub channels: BTreeMap<Channel, bool>,
    /// Per category (`marketing`, `orders`), channels switched on or off; unlisted means on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub categories: BTreeMap<String, BTreeMap<Channel, bool>>,
    /// When non-critical notifications wait, in the user's time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<QuietHours>,
    /// The order in which to try channels when a notification names none or one is not usable
    /// (for example `push`, then `email`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<Channel>,
}

/// A daily window of silence in the user's time zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuietHours {
    /// Local time the window opens (`HH:MM`).
    #[serde(with = "hh_mm")]
    pub start: NaiveTime,
    /// Local time it closes (`HH:MM`); earlier than `start` means the next morning.
    #[serde(with = "hh_mm")]
    pub end: NaiveTime,
    /// Days on which the window opens; empty means every day. A window opening on Friday at
    /// 22:00 and closing at 07:00 covers Saturday morning too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Day>,
}

/// A day of the week, as the API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Day {
    fn weekday(self) -> Weekday {
        match self {
            Day::Mon => Weekday::Mon,
            Day::Tue => Weekday::Tue,
            Day::Wed => Weekday::Wed,
            Day::Thu => Weekday::Thu,
            Day::Fri => Weekday::Fri,
            Day::Sat => Weekday::Sat,
            Day::Sun => Weekday::Sun,
        }
    }
}

/// `HH:MM` on the wire: people write quiet hours that way, and seconds would mean nothing.
pub mod hh_mm {
    use chrono::NaiveTime;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &NaiveTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.format("%H:%M").to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveTime, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Parses exactly `HH:MM` (24-hour clock).
    pub fn parse(text: &str) -> Result<NaiveTime, String> {
        let ok = text.len() == 5 && text.as_bytes()[2] == b':';
        ok.then(|| NaiveTime::parse_from_str(text, "%H:%M").ok())
            .flatten()
            .ok_or_else(|| format!("{text:?} is not a time of day like 22:00"))
    }
}

/// A field a validation refused, and why (the gateway answers 422 with both).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid { field: field.into(), message: message.into() }
    }
}

/// Category names become part of status records and logs: short, lowercase, no spaces.
pub fn is_valid_category(name: &str) -> bool {
    (1..=MAX_CATEGORY_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

impl Preferences {
    /// Checks limits and that no `required` category is muted. `field` prefixes every field
    /// named in an error (`preferences` inside a user, empty for the preferences resource).
    pub fn validate(&self, required: &[String], field: &str) -> Result<(), Invalid> {
        let at = |rest: &str| if field.is_empty() { rest.to_owned() } else { format!("{field}.{rest}") };
        if self.categories.len() > MAX_CATEGORIES {
            return Err(Invalid::new(at("categories"), format!("more than {MAX_CATEGORIES} categories")));
        }
        for (name, channels) in &self.categories {
            if !is_valid_category(name) {
                return Err(Invalid::new(
                    at(&format!("categories.{name}")),
                    format!("a category is 1 to {MAX_CATEGORY_LEN} characters of a-z, 0-9, '-', '_' and '.'"),
                ));
            }
            if required.iter().any(|r| r == name)
                && let Some((channel, _)) = channels.iter().find(|(_, on)| !**on)
            {
                return Err(Invalid::new(
                    at(&format!("categories.{name}.{channel}")),
                    format!("category {name:?} is required by the operator and cannot be muted"),
                ));
            }
        }
        for (i, c) in self.fallback.iter().enumerate() {
            if self.fallback[..i].contains(c) {
                return Err(Invalid::new(at(&format!("fallback[{i}]")), format!("{c} is listed twice")));
            }
        }
        if let Some(q) = &self.quiet_hours {
            if q.start == q.end {
                return Err(Invalid::new(at("quiet_hours.end"), "must differ from start"));
            }
            for (i, d) in q.days.iter().enumerate() {
                if q.days[..i].contains(d) {
                    return Err(Invalid::new(at(&format!("quiet_hours.days[{i}]")), "listed twice"));
                }
            }
        }
        Ok(())
    }
}

/// What to do with one notification on one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send it now.
    Allowed,
    /// Do not send it; the rule says why (recorded in the notification's status).
    Suppressed(Rule),
    /// Send it at this instant, when the user's quiet hours end.
    Deferred { until: DateTime<Utc> },
}

/// The preference that suppressed a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// The user switched the whole channel off.
    ChannelOff { channel: Channel },
    /// The user switched this category off on this channel.
    CategoryOff { category: String, channel: Channel },
}

/// Decides one channel for a notification of `category` and `priority` at `now`.
///
/// Order: a channel switched off suppresses; then a category muted on that channel suppresses,
/// unless the operator marks the category `required` (a mute stored before it became required
/// no longer counts); then quiet hours defer anything but `critical` until they end.
pub fn decide(
    preferences: &Preferences,
    time_zone: Tz,
    required: &[String],
    channel: Channel,
    category: Option<&str>,
    priority: Priority,
    now: DateTime<Utc>,
) -> Decision {
    if preferences.channels.get(&channel) == Some(&false) {
        return Decision::Suppressed(Rule::ChannelOff { channel });
    }
    if let Some(category) = category
        && !required.iter().any(|r| r == category)
        && preferences.categories.get(category).and_then(|c| c.get(&channel)) == Some(&false)
    {
        return Decision::Suppressed(Rule::CategoryOff { category: category.to_owned(), channel });
    }
    if priority != Priority::Critical
        && let Some(until) = preferences.quiet_hours.as_ref().and_then(|q| quiet_until(q, time_zone, now))
    {
        return Decision::Deferred { until };
    }
    Decision::Allowed
}

/// When the quiet window containing `now` ends, if `now` is inside one.
pub fn quiet_until(quiet: &QuietHours, tz: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&tz);
    let today = local.date_naive();
    let opens_on =
        |date: NaiveDate| quiet.days.is_empty() || quiet.days.iter().any(|d| d.weekday() == date.weekday());
    let overnight = quiet.start > quiet.end;
    // A window opens on day D at `start` and closes at `end` on D (or D + 1 when overnight).
    // Only windows opening today or yesterday can contain `now`.
    for opened in [today.checked_sub_days(Days::new(1)), Some(today)].into_iter().flatten() {
        if !opens_on(opened) {
            continue;
        }
        let closes_on = if overnight { opened.checked_add_days(Days::new(1))? } else { opened };
        let open = local_instant(tz, opened.and_time(quiet.start));
        let close = local_instant(tz, closes_on.and_time(quiet.end));
        if open <= now && now < close {
            return Some(close);
        }
    }
    None
}

/// A local wall-clock time as an instant. A time skipped by a daylight-saving jump counts as
/// the first instant after the jump; a repeated one as its first occurrence.
fn local_instant(tz: Tz, local: chrono::NaiveDateTime) -> DateTime<Utc> {
    let mut probe = local;
    for _ in 0..4 {
        if let Some(t) = tz.from_local_datetime(&probe).earliest() {
            return t.with_timezone(&Utc);
        }
        probe += chrono::Duration::minutes(30);
    }
    Utc.from_utc_datetime(&local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn quiet(start: &str, end: &str, days: &[Day]) -> Option<QuietHours> {
        Some(QuietHours {
            start: hh_mm::parse(start).unwrap(),
            end: hh_mm::parse(end).unwrap(),
            days: days.to_vec(),
        })
    }

    #[test]
    fn the_decision_table() {
        use Channel::*;
        let off = |c: Channel| BTreeMap::from([(c, false)]);
        let prefs = Preferences {
            channels: off(Sms),
            categories: BTreeMap::from([
                ("marketing".to_owned(), off(Email)),
                ("security".into(), off(Email)),
            ]),
            // 22:00 to 07:00 in Paris, opening Monday to Friday.
            quiet_hours: quiet("22:00", "07:00", &[Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri]),
            fallback: vec![Push, Email],
        };
        let paris: Tz = "Europe/Paris".parse().unwrap();
        let required = vec!["security".to_owned()];
        let suppressed_channel = |channel| Decision::Suppressed(Rule::ChannelOff { channel });
        let suppressed_category =
            |channel| Decision::Suppressed(Rule::CategoryOff { category: "marketing".into(), channel });
        // 2025-01-15 is a Wednesday; Paris is UTC+1 in January.
        let noon = "2025-01-15T11:00:00Z";
        let wed_night = "2025-01-15T22:30:00Z"; // 23:30 in Paris
        let thu_morning_close = at("2025-01-16T06:00:00Z"); // 07:00 in Paris
        let sat_night = "2025-01-18T22:30:00Z"; // windows open Mon-Fri only
        let sat_morning = "2025-01-18T05:00:00Z"; // 06:00 Saturday: the Friday window
        let sat_close = at("2025-01-18T06:00:00Z");
        use Priority::*;
        for (channel, category, priority, now, expected) in [
            (Email, None, Normal, noon, Decision::Allowed),
            (Sms, None, Normal, noon, suppressed_channel(Sms)),
            (Sms, None, Critical, noon, suppressed_channel(Sms)),
            (Sms, Some("security"), Normal, noon, suppressed_channel(Sms)),
            (Email, Some("marketing"), Normal, noon, suppressed_category(Email)),
            (Push, Some("marketing"), Normal, noon, Decision::Allowed),
            (Email, Some("orders"), Normal, noon, Decision::Allowed),
            // Required categories ignore a mute stored before they became required.
            (Email, Some("security"), Normal, noon, Decision::Allowed),
            (Push, None, Normal, wed_night, Decision::Deferred { until: thu_morning_close }),
            (Push, None, High, wed_night, Decision::Deferred { until: thu_morning_close }),
            (Push, None, Critical, wed_night, Decision::Allowed),
            (Email, Some("marketing"), Critical, wed_night, suppressed_category(Email)),
            (Push, None, Normal, sat_night, Decision::Allowed),
            (Push, None, Low, sat_morning, Decision::Deferred { until: sat_close }),
        ] {
            let got = decide(&prefs, paris, &required, channel, category, priority, at(now));
            assert_eq!(got, expected, "{channel} {category:?} {priority:?} at {now}");
        }
    }

    #[test]
    fn quiet_hours_windows() {
        let utc: Tz = "UTC".parse().unwrap();
        let ny: Tz = "America/New_York".parse().unwrap();
        for (q, tz, now, expected) in [
            // Same-day window.
            (quiet("13:00", "14:00", &[]), utc, "2025-01-15T13:30:00Z", Some("2025-01-15T14:00:00Z")),
            (quiet("13:00", "14:00", &[]), utc, "2025-01-15T14:00:00Z", None),
            (quiet("13:00", "14:00", &[]), utc, "2025-01-15T12:59:59Z", None),
            // Overnight, before and after midnight.
            (quiet("22:00", "07:00", &[]), utc, "2025-01-15T23:00:00Z", Some("2025-01-16T07:00:00Z")),
            (quiet("22:00", "07:00", &[]), utc, "2025-01-16T06:59:00Z", Some("2025-01-16T07:00:00Z")),
            (quiet("22:00", "07:00", &[]), utc, "2025-01-16T07:00:00Z", None),
            // The day lists when the window opens: Sunday night's window covers Monday morning.
            (quiet("22:00", "07:00", &[Day::Sun]), utc, "2025-01-13T06:00:00Z", Some("2025-01-13T07:00:00Z")),
            (quiet("22:00", "07:00", &[Day::Sun]), utc, "2025-01-14T06:00:00Z", None),
            // New York in summer is UTC-4: 23:00 local is 03:00 UTC.
            (quiet("22:00", "07:00", &[]), ny, "2025-07-10T03:00:00Z", Some("2025-07-10T11:00:00Z")),
            // Across the spring-forward night (2025-03-09, 02:00 -> 03:00): closes at 07:00 EDT.
            (quiet("22:00", "07:00", &[]), ny, "2025-03-09T08:00:00Z", Some("2025-03-09T11:00:00Z")),
            // A window closing at a skipped time (02:30) closes at the jump.
            (quiet("01:00", "02:30", &[]), ny, "2025-03-09T06:45:00Z", Some("2025-03-09T07:00:00Z")),
        ] {
            let got = quiet_until(q.as_ref().unwrap(), tz, at(now));
            assert_eq!(got, expected.map(at), "{q:?} in {tz} at {now}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let required = vec!["security".to_owned()];
        let mut p = Preferences::default();
        assert_eq!(p.validate(&required, "preferences"), Ok(()));
        p.categories.insert("security".into(), BTreeMap::from([(Channel::Email, false)]));
        let e = p.validate(&required, "preferences").unwrap_err();
        assert_eq!(e.field, "preferences.categories.security.email");
        assert!(e.message.contains("required"), "{e}");
        p.categories = BTreeMap::from([("Bad Name".into(), BTreeMap::new())]);
        assert_eq!(p.validate(&required, "").unwrap_err().field, "categories.Bad Name");
        p.categories.clear();
        p.fallback = vec![Channel::Push, Channel::Email, Channel::Push];
        assert_eq!(p.validate(&required, "").unwrap_err().field, "fallback[2]");
        p.fallback.clear();
        p.quiet_hours = quiet("07:00", "07:00", &[]);
        assert_eq!(p.validate(&required, "").unwrap_err().field, "quiet_hours.end");
        p.quiet_hours = quiet("22:00", "07:00", &[Day::Mon, Day::Mon]);
        assert_eq!(p.validate(&required, "").unwrap_err().field, "quiet_hours.days[1]");
        p.quiet_hours = None;
        p.categories = (0..=MAX_CATEGORIES).map(|i| (format!("c{i}"), BTreeMap::new())).collect();
        assert_eq!(p.validate(&required, "").unwrap_err().field, "categories");
    }

    #[test]
    fn times_of_day_are_hh_mm() {
        for ok in ["00:00", "07:30", "23:59"] {
            assert!(hh_mm::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["7:30", "24:00", "07:60", "07:30:00", "", "noon"] {
            assert!(hh_mm::parse(bad).is_err(), "{bad}");
        }
    }
}
