//! The status events of the last few minutes, folded into what the screens show: per-second
//! counts for the sparklines, the notifications whose latest attempt asked for a retry, and a
//! short memory of events for the lookup screen. Pure state: the feed fills it, drawing reads it.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};
use herald_shared::{Channel, StatusEvent, state::Outcome};

use crate::source::HISTORY;

/// Most events kept for the lookup screen; older ones are forgotten first.
const RECENT: usize = 20_000;

/// Events counted per second and per outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub delivered: u32,
    pub retrying: u32,
    pub dead_lettered: u32,
    /// Decided without a send: suppressed, deferred or skipped.
    pub not_sent: u32,
}

impl Counts {
    pub fn get(&self, outcome: Outcome) -> u32 {
        match outcome {
            Outcome::Delivered => self.delivered,
            Outcome::Retrying => self.retrying,
            Outcome::DeadLettered => self.dead_lettered,
            Outcome::Suppressed | Outcome::Deferred | Outcome::Skipped | Outcome::Throttled => self.not_sent,
        }
    }

    fn bump(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Delivered => self.delivered += 1,
            Outcome::Retrying => self.retrying += 1,
            Outcome::DeadLettered => self.dead_lettered += 1,
            Outcome::Suppressed | Outcome::Deferred | Outcome::Skipped | Outcome::Throttled => {
                self.not_sent += 1
            }
        }
    }
}

/// What the status events of the last [`HISTORY`] say.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Unix second → channel → counts; seconds older than the window are dropped on insert.
    per_second: BTreeMap<i64, BTreeMap<Channel, Counts>>,
    /// The latest event of every (notification, channel) whose latest outcome is `retrying`:
    /// that is what "being retried now" means. A later outcome removes it.
    pub retrying: BTreeMap<(String, Channel), StatusEvent>,
    /// Recent events in arrival order, for a notification's history on the lookup screen.
    pub recent: VecDeque<StatusEvent>,
    /// Events taken in since the console started, to tell "no events" from "not read yet".
    pub seen: u64,
}

impl History {
    pub fn record(&mut self, event: StatusEvent) {
        self.seen += 1;
        let second = event.at.timestamp();
        self.per_second.entry(second).or_default().entry(event.channel).or_default().bump(event.outcome);
        let horizon = second.max(Utc::now().timestamp()) - HISTORY.as_secs() as i64;
        while self.per_second.first_key_value().is_some_and(|(s, _)| *s < horizon) {
            self.per_second.pop_first();
        }
        let key = (event.notification_id.clone(), event.channel);
        match event.outcome {
            Outcome::Retrying => {
                // Events can arrive out of order across workers; keep the latest attempt.
                let newer = self.retrying.get(&key).is_none_or(|old| old.attempt <= event.attempt);
                if newer {
                    self.retrying.insert(key, event.clone());
                }
            }
            _ => {
                self.retrying.remove(&key);
            }
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }

    /// `buckets` counts of `outcome` on `channel`, oldest first, covering the window that ends at
    /// `now`; with `collapse` every count goes into the newest bucket (stable pictures in tests,
    /// where the exact second of each event varies).
    pub fn series(
        &self,
        channel: Channel,
        outcome: Outcome,
        now: DateTime<Utc>,
        buckets: usize,
        collapse: bool,
    ) -> Vec<u64> {
        let buckets = buckets.max(1);
        let window = HISTORY.as_secs() as i64;
        let end = now.timestamp();
        let start = end - window;
        let width = (window as f64 / buckets as f64).max(1.0);
        let mut out = vec![0u64; buckets];
        for (&second, channels) in self.per_second.range(start + 1..=end) {
            let n = channels.get(&channel).map_or(0, |c| c.get(outcome));
            let i = if collapse { buckets - 1 } else { (((second - start - 1) as f64) / width) as usize };
            out[i.min(buckets - 1)] += u64::from(n);
        }
        out
    }

    /// Events of `outcome` on `channel` in the window ending at `now`.
    pub fn total(&self, channel: Channel, outcome: Outcome, now: DateTime<Utc>) -> u64 {
        let end = now.timestamp();
        self.per_second
            .range(end - HISTORY.as_secs() as i64 + 1..=end)
            .map(|(_, c)| u64::from(c.get(&channel).map_or(0, |c| c.get(outcome))))
            .sum()
    }

    /// Per second over the last ten seconds: the "now" of a sparkline.
    pub fn rate(&self, channel: Channel, outcome: Outcome, now: DateTime<Utc>) -> f64 {
        let end = now.timestamp();
        let n: u64 = self
            .per_second
            .range(end - 9..=end)
            .map(|(_, c)| u64::from(c.get(&channel).map_or(0, |c| c.get(outcome))))
            .sum();
        n as f64 / 10.0
    }

    /// The remembered events of one notification, oldest first.
    pub fn of(&self, id: &str) -> Vec<&StatusEvent> {
        self.recent.iter().filter(|e| e.notification_id == id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, outcome: Outcome, attempt: u32, at: DateTime<Utc>) -> StatusEvent {
        StatusEvent {
            notification_id: id.into(),
            channel: Channel::Webhook,
            outcome,
            attempt,
            error: None,
            note: None,
            correlation_id: None,
            tenant: None,
            retry_at: None,
            calls: Vec::new(),
            at,
        }
    }

    #[test]
    fn the_latest_outcome_decides_whether_a_notification_is_retrying() {
        let now = Utc::now();
        let mut h = History::default();
        h.record(event("a", Outcome::Retrying, 1, now));
        h.record(event("b", Outcome::Retrying, 1, now));
        h.record(event("a", Outcome::Retrying, 2, now));
        h.record(event("b", Outcome::Delivered, 2, now));
        // A late copy of an older attempt does not move it back.
        h.record(event("a", Outcome::Retrying, 1, now));
        let retrying: Vec<_> = h.retrying.values().map(|e| (e.notification_id.as_str(), e.attempt)).collect();
        assert_eq!(retrying, [("a", 2)]);
        assert_eq!(h.total(Channel::Webhook, Outcome::Retrying, now), 4);
        assert_eq!(h.of("b").len(), 2);
    }

    #[test]
    fn series_spread_events_over_the_window_or_collapse_them() {
        let now = Utc::now();
        let mut h = History::default();
        h.record(event("a", Outcome::Delivered, 1, now));
        h.record(event("b", Outcome::Delivered, 1, now - chrono::Duration::seconds(299)));
        h.record(event("c", Outcome::Delivered, 1, now - chrono::Duration::seconds(400)));
        let s = h.series(Channel::Webhook, Outcome::Delivered, now, 10, false);
        assert_eq!(s, [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let s = h.series(Channel::Webhook, Outcome::Delivered, now, 10, true);
        assert_eq!(s, [0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    }
}
