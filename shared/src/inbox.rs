//! In-app inboxes: what the `inapp` channel delivers, kept per user, with read and archived
//! marks.
//!
//! Storage, chosen by the queries the API answers:
//! - **Items** live in the stream HERALD_INBOX, one subject per (tenant, user):
//!   `herald.inbox.<tenant token>.<user>`. Listing a user's inbox reads that one subject; newest
//!   first is the reverse of stream order, and an item's stream sequence is a cursor no later
//!   insert can move. The per-user count (`HERALD_INBOX_MAX_ITEMS`, the stream's limit per
//!   subject) and each item's age (its tenant's `HERALD_INBOX_RETENTION`, carried as the
//!   message's `Nats-TTL`) are JetStream limits: nothing sweeps. Items never change once stored.
//! - **Marks** live in the bucket `herald_inbox_state`, one key per item and mark:
//!   `<tenant token>.<user>.<item>.read` and `….archived`, each `{on, at}`. Two devices marking
//!   the same item write the same value (marking is idempotent), and marking read never touches
//!   the archived key, so no mark can overwrite another. A key's revision is its sequence in
//!   the bucket's stream, which the live stream resumes from.
//!
//! The live view ([`Inbox::changes`]) is two ordered consumers over both streams from "now",
//! one per gateway, fanned out to connected clients by subject; a client that reconnects catches
//! up with [`Inbox::items_after`] and [`Inbox::marks_after`] from the positions it last saw.

use std::{collections::HashMap, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
    kv,
    message::PublishMessage,
    stream,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{
    config::InboxRetention,
    ledger::tenant_token,
    topology::{INBOX_STATE_BUCKET, INBOX_STREAM},
};

/// One in-app notification as a user's inbox keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The notification's id: one item per notification and user.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub data: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// An item with where it is stored and its marks.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Its sequence in HERALD_INBOX: the cursor and the live stream's event id.
    pub sequence: u64,
    pub item: Item,
    pub read_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
}

impl Stored {
    pub fn read(&self) -> bool {
        self.read_at.is_some()
    }
    pub fn archived(&self) -> bool {
        self.archived_at.is_some()
    }
}

/// The marks an item can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    Read,
    Archived,
}

impl Mark {
    fn token(self) -> &'static str {
        match self {
            Mark::Read => "read",
            Mark::Archived => "archived",
        }
    }
    fn parse(token: &str) -> Option<Mark> {
        match token {
            "read" => Some(Mark::Read),
            "archived" => Some(Mark::Archived),
            _ => None,
        }
    }
}

/// A mark as stored: set or cleared, and when.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MarkValue {
    pub on: bool,
    pub at: DateTime<Utc>,
}

/// A change of one mark, as the live stream and catch-up see it.
#[derive(Debug, Clone, PartialEq)]
pub struct MarkChange {
    /// The key's revision (its sequence in the bucket's stream).
    pub sequence: u64,
    pub item: String,
    pub mark: Mark,
    pub value: MarkValue,
}

/// What the filters of a listing keep.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Only unread items.
    pub unread: bool,
    /// Only items of this category.
    pub category: Option<String>,
    /// Archived items instead of the others.
    pub archived: bool,
}

impl Filter {
    fn keeps(&self, s: &Stored) -> bool {
        s.archived() == self.archived
            && (!self.unread || !s.read())
            && self.category.as_ref().is_none_or(|c| s.item.category.as_ref() == Some(c))
    }
}

/// A page of a listing, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub items: Vec<Stored>,
    /// The cursor of the next (older) page, if there is one.
    pub next: Option<u64>,
}

/// Unread and total items of an inbox, archived ones left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub unread: u64,
    pub total: u64,
}

/// Whose inbox: a tenant (none for intents published without one) and a user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner<'a> {
    pub tenant: Option<&'a str>,
    pub user: &'a str,
}

impl Owner<'_> {
    /// `<tenant token>.<user>`: the tail of both the item subject and every mark key.
    pub fn token(&self) -> String {
        format!("{}.{}", tenant_token(self.tenant), self.user)
    }
}

/// `herald.inbox.<tenant token>.<user>`.
pub fn item_subject(owner: Owner<'_>) -> String {
    format!("herald.inbox.{}", owner.token())
}

fn mark_key(owner: Owner<'_>, item: &str, mark: Mark) -> String {
    format!("{}.{item}.{}", owner.token(), mark.token())
}

/// The stream behind the marks bucket.
fn marks_stream() -> String {
    format!("KV_{INBOX_STATE_BUCKET}")
}

fn marks_prefix(owner: Owner<'_>) -> String {
    format!("$KV.{INBOX_STATE_BUCKET}.{}.", owner.token())
}

/// Why an inbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// NATS refused or did not answer.
    #[error("inbox store: {0}")]
    Store(String),
    /// No such item in this user's inbox.
    #[error("no item {0} in this inbox")]
    NotFound(String),
}

fn store(e: impl std::fmt::Display) -> InboxError {
    InboxError::Store(e.to_string())
}

/// A change to any inbox, from [`Inbox::changes`], with the owner token it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Item { owner: String, stored: Stored },
    Mark { owner: String, change: MarkChange },
}

/// The in-app inboxes: HERALD_INBOX and `herald_inbox_state`.
#[derive(Clone)]
pub struct Inbox {
    js: jetstream::Context,
    items: stream::Stream,
    marks: kv::Store,
    retention: InboxRetention,
}

impl Inbox {
    pub fn new(
        js: jetstream::Context,
        items: stream::Stream,
        marks: kv::Store,
        retention: InboxRetention,
    ) -> Inbox {
        Inbox { js, items, marks, retention }
    }

    /// Stores `item` in `owner`'s inbox, kept for the tenant's retention. Storing the same
    /// notification again within the stream's duplicate window stores nothing new. Returns the
    /// item's sequence.
    pub async fn store(&self, owner: Owner<'_>, item: &Item) -> Result<u64, InboxError> {
        let payload = serde_json::to_vec(item).map_err(store)?;
        let message = PublishMessage::build()
            .payload(Bytes::from(payload))
            .message_id(format!("{}.{}", owner.token(), item.id))
            .ttl(self.retention.for_tenant(owner.tenant));
        let ack = self.js.send_publish(item_subject(owner), message).await.map_err(store)?;
        Ok(ack.await.map_err(store)?.sequence)
    }

    /// Every item of `owner`'s inbox with its marks, oldest first.
    pub async fn all(&self, owner: Owner<'_>) -> Result<Vec<Stored>, InboxError> {
        let (items, marks) = futures::try_join!(self.items_after(owner, 0), self.current_marks(owner))?;
        Ok(items
            .into_iter()
            .map(|mut s| {
                apply(&mut s, &marks);
                s
            })
            .collect())
    }

    /// One page of `owner`'s inbox, newest first: the items `filter` keeps with a sequence below
    /// `before` (the previous page's `next`), at most `limit`.
    pub async fn list(
        &self,
        owner: Owner<'_>,
        filter: &Filter,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, InboxError> {
        let all = self.all(owner).await?;
        let mut kept = all
            .into_iter()
            .rev()
            .filter(|s| before.is_none_or(|b| s.sequence < b))
            .filter(|s| filter.keeps(s));
        let items: Vec<Stored> = kept.by_ref().take(limit).collect();
        let next = match kept.next() {
            Some(_) => items.last().map(|s| s.sequence),
            None => None,
        };
        Ok(Page { items, next })
    }

    /// Unread and total items of `owner`'s inbox, archived ones left out.
    pub async fn counts(&self, owner: Owner<'_>) -> Result<Counts, InboxError> {
        Ok(counts(&self.all(owner).await?))
    }

    /// One item with its marks.
    pub async fn get(&self, owner: Owner<'_>, id: &str) -> Result<Stored, InboxError> {
        self.all(owner)
            .await?
            .into_iter()
            .find(|s| s.item.id == id)
            .ok_or_else(|| InboxError::NotFound(id.to_owned()))
    }

    /// Sets (`on`) or clears a mark of one item. Setting what is already set keeps its first
    /// time and writes nothing.
    pub async fn mark(&self, owner: Owner<'_>, id: &str, mark: Mark, on: bool) -> Result<Stored, InboxError> {
        let mut stored = self.get(owner, id).await?;
        let current = match mark {
            Mark::Read => stored.read_at,
            Mark::Archived => stored.archived_at,
        };
        if current.is_some() == on {
            return Ok(stored);
        }
        let now = Utc::now();
        self.put_mark(owner, id, mark, MarkValue { on, at: now }).await?;
        let at = on.then_some(now);
        match mark {
            Mark::Read => stored.read_at = at,
            Mark::Archived => stored.archived_at = at,
        }
        Ok(stored)
    }

    /// Marks every unread item read (archived ones too). Returns how many were unread.
    pub async fn read_all(&self, owner: Owner<'_>) -> Result<usize, InboxError> {
        let unread: Vec<Stored> = self.all(owner).await?.into_iter().filter(|s| !s.read()).collect();
        let now = Utc::now();
        for chunk in unread.chunks(64) {
            let writes = chunk
                .iter()
                .map(|s| self.put_mark(owner, &s.item.id, Mark::Read, MarkValue { on: true, at: now }));
            futures::future::try_join_all(writes).await?;
        }
        Ok(unread.len())
    }

    async fn put_mark(
        &self,
        owner: Owner<'_>,
        id: &str,
        mark: Mark,
        value: MarkValue,
    ) -> Result<u64, InboxError> {
        let bytes = serde_json::to_vec(&value).map_err(store)?;
        self.marks.put(mark_key(owner, id, mark), bytes.into()).await.map_err(store)
    }

    /// `owner`'s items stored after sequence `after`, oldest first, without their marks.
    pub async fn items_after(&self, owner: Owner<'_>, after: u64) -> Result<Vec<Stored>, InboxError> {
        let messages = read_subject(&self.js, INBOX_STREAM, &item_subject(owner), after + 1).await?;
        Ok(messages
            .into_iter()
            .filter_map(|(sequence, _, payload)| decode_item(sequence, &payload))
            .collect())
    }

    /// Changes of `owner`'s marks after bucket sequence `after`, in order.
    pub async fn marks_after(&self, owner: Owner<'_>, after: u64) -> Result<Vec<MarkChange>, InboxError> {
        let prefix = marks_prefix(owner);
        let messages = read_subject(&self.js, &marks_stream(), &format!("{prefix}>"), after + 1).await?;
        Ok(messages
            .into_iter()
            .filter_map(|(sequence, subject, payload)| {
                decode_mark(sequence, subject.strip_prefix(&prefix)?, &payload)
            })
            .collect())
    }

    /// The last sequences of both streams: where a new live client starts.
    pub async fn positions(&self) -> Result<(u64, u64), InboxError> {
        let mut items = self.items.clone();
        let mut marks = self.marks.stream.clone();
        let (a, b) = futures::try_join!(items.info(), marks.info()).map_err(store)?;
        Ok((a.state.last_sequence, b.state.last_sequence))
    }

    async fn current_marks(
        &self,
        owner: Owner<'_>,
    ) -> Result<HashMap<(String, Mark), MarkValue>, InboxError> {
        let prefix = marks_prefix(owner);
        // The bucket keeps one message per key (history 1): reading them all reads the latest.
        let messages = read_subject(&self.js, &marks_stream(), &format!("{prefix}>"), 1).await?;
        Ok(messages
            .into_iter()
            .filter_map(|(sequence, subject, payload)| {
                decode_mark(sequence, subject.strip_prefix(&prefix)?, &payload)
            })
            .map(|c| ((c.item, c.mark), c.value))
            .collect())
    }

    /// Every change to any inbox from now on: new items and mark changes, each with its owner
    /// token. Ordered consumers recreate themselves after a disconnect; the stream ends only if
    /// NATS refuses to recreate them.
    pub async fn changes(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Change, InboxError>> + Send + 'static, InboxError> {
        let items = from_now(&self.items, "herald.inbox.>".into()).await?;
        let prefix = format!("$KV.{INBOX_STATE_BUCKET}.");
        let marks = from_now(&self.marks.stream, format!("{prefix}>")).await?;
        let items = items.filter_map(|m| async move {
            let m = match m {
                Ok(m) => m,
                Err(e) => return Some(Err(store(e))),
            };
            let sequence = m.info().ok()?.stream_sequence;
            let owner = m.subject.as_str().strip_prefix("herald.inbox.")?.to_owned();
            let stored = decode_item(sequence, &m.payload)?;
            Some(Ok(Change::Item { owner, stored }))
        });
        let marks = marks.filter_map(move |m| {
            let prefix = prefix.clone();
            async move {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => return Some(Err(store(e))),
                };
                let sequence = m.info().ok()?.stream_sequence;
                let key = m.subject.as_str().strip_prefix(&prefix)?;
                // `<tenant token>.<user>.<item>.<mark>`: the owner is the first two tokens.
                let mut parts = key.splitn(3, '.');
                let owner = format!("{}.{}", parts.next()?, parts.next()?);
                let change = decode_mark(sequence, parts.next()?, &m.payload)?;
                Some(Ok(Change::Mark { owner, change }))
            }
        });
        Ok(futures::stream::select(items, marks))
    }
}

/// Messages on `filter` stored from now on, through an ordered consumer.
async fn from_now(
    stream: &stream::Stream,
    filter: String,
) -> Result<jetstream::consumer::pull::Ordered, InboxError> {
    stream
        .create_consumer(OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(store)?
        .messages()
        .await
        .map_err(store)
}

/// The counts of a whole inbox.
pub fn counts(all: &[Stored]) -> Counts {
    let shown = all.iter().filter(|s| !s.archived());
    let (mut unread, mut total) = (0, 0);
    for s in shown {
        total += 1;
        if !s.read() {
            unread += 1;
        }
    }
    Counts { unread, total }
}

fn apply(s: &mut Stored, marks: &HashMap<(String, Mark), MarkValue>) {
    let at = |mark| marks.get(&(s.item.id.clone(), mark)).filter(|v| v.on).map(|v| v.at);
    s.read_at = at(Mark::Read);
    s.archived_at = at(Mark::Archived);
}

fn decode_item(sequence: u64, payload: &[u8]) -> Option<Stored> {
    match serde_json::from_slice::<Item>(payload) {
        Ok(item) => Some(Stored { sequence, item, read_at: None, archived_at: None }),
        Err(e) => {
            tracing::warn!(sequence, error = %e, "an inbox item is unreadable; leaving it out");
            None
        }
    }
}

/// A mark from the rest of its key (`<item>.<mark>`) and its value. A key deleted or purged by
/// hand (no payload) reads as cleared.
fn decode_mark(sequence: u64, rest: &str, payload: &[u8]) -> Option<MarkChange> {
    let (item, mark) = rest.rsplit_once('.')?;
    let mark = Mark::parse(mark)?;
    let value = if payload.is_empty() {
        MarkValue { on: false, at: Utc::now() }
    } else {
        serde_json::from_slice(payload).ok()?
    };
    Some(MarkChange { sequence, item: item.to_owned(), mark, value })
}

/// Messages asked for per batch direct get.
const BATCH: usize = 1000;

/// Every message on `filter` (wildcards allowed) from sequence `from`, in order: (sequence,
/// subject, payload). Read with JetStream's batch direct get (nats-server 2.11+), which needs
/// no consumer: a listing costs requests, never a consumer the server keeps for a while after.
pub(crate) async fn read_subject(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    from: u64,
) -> Result<Vec<(u64, String, Bytes)>, InboxError> {
    use async_nats::header::{NATS_SEQUENCE, NATS_SUBJECT};
    let client = js.client();
    let api = format!("$JS.API.DIRECT.GET.{stream}");
    let mut out = Vec::new();
    let mut next = from.max(1);
    loop {
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(inbox.clone()).await.map_err(store)?;
        let request = serde_json::json!({"seq": next, "next_by_subj": filter, "batch": BATCH});
        client
            .publish_with_reply(api.clone(), inbox, serde_json::to_vec(&request).map_err(store)?.into())
            .await
            .map_err(store)?;
        let mut got = 0;
        let more = loop {
            let reply = match tokio::time::timeout(Duration::from_secs(5), replies.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(InboxError::Store("the direct get subscription closed".into())),
                Err(_) => return Err(InboxError::Store(format!("no answer from {api}"))),
            };
            let headers = reply.headers.clone().unwrap_or_default();
            match reply.status.map(|s| s.as_u16()) {
                // The end of a batch: more may match past it.
                Some(204) => {
                    let pending = headers
                        .get("Nats-Num-Pending")
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    break pending > 0 && got > 0;
                }
                // Nothing (more) matches.
                Some(404) => break false,
                Some(code) if code >= 300 => {
                    return Err(InboxError::Store(format!(
                        "{api}: {code} {}",
                        reply.description.unwrap_or_default()
                    )));
                }
                _ => {}
            }
            let sequence = headers.get(NATS_SEQUENCE).and_then(|v| v.as_str().parse::<u64>().ok());
            let subject = headers.get(NATS_SUBJECT).map(|v| v.as_str().to_owned());
            let (Some(sequence), Some(subject)) = (sequence, subject) else { continue };
            got += 1;
            next = sequence + 1;
            out.push((sequence, subject, reply.payload));
        };
        if !more {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(sequence: u64, id: &str, category: Option<&str>, read: bool, archived: bool) -> Stored {
        Stored {
            sequence,
            item: Item {
                id: id.into(),
                title: None,
                body: None,
                data: Default::default(),
                category: category.map(str::to_owned),
                created_at: Utc::now(),
            },
            read_at: read.then(Utc::now),
            archived_at: archived.then(Utc::now),
        }
    }

    #[test]
    fn filters_keep_what_they_say() {
        let unread = stored(1, "a", Some("billing"), false, false);
        let read = stored(2, "b", None, true, false);
        let archived = stored(3, "c", Some("billing"), false, true);
        let all = Filter::default();
        assert!(all.keeps(&unread) && all.keeps(&read) && !all.keeps(&archived));
        let only_unread = Filter { unread: true, ..Filter::default() };
        assert!(only_unread.keeps(&unread) && !only_unread.keeps(&read));
        let billing = Filter { category: Some("billing".into()), ..Filter::default() };
        assert!(billing.keeps(&unread) && !billing.keeps(&read));
        let archive = Filter { archived: true, ..Filter::default() };
        assert!(archive.keeps(&archived) && !archive.keeps(&unread));
        assert_eq!(counts(&[unread, read, archived]), Counts { unread: 1, total: 2 });
    }

    #[test]
    fn owners_and_keys_are_tokens_apart() {
        let owner = Owner { tenant: Some("acme"), user: "42" };
        assert_eq!(item_subject(owner), "herald.inbox.t_acme.42");
        assert_eq!(mark_key(owner, "n1", Mark::Read), "t_acme.42.n1.read");
        assert_eq!(Owner { tenant: Some("a.b"), user: "42" }.token(), "x_612e62.42");
        let change = decode_mark(7, "n1.archived", br#"{"on":true,"at":"2026-11-22T10:00:00Z"}"#).unwrap();
        assert_eq!((change.item.as_str(), change.mark, change.value.on), ("n1", Mark::Archived, true));
        assert!(!decode_mark(8, "n1.read", b"").unwrap().value.on);
        assert!(decode_mark(9, "n1.unknown", b"{}").is_none());
    }
}
