//! `/v1/users/{id}/inbox`: a user's in-app inbox (`herald_shared::inbox`), its live stream, and
//! tokens that let one end user's browser use it.
//!
//! Scope `inbox`. An application's backend token reaches every user of its tenant; an end
//! user's token (`user` claim, minted with `POST /v1/users/{id}/tokens` or `herald token
//! --user`) reaches that one user's inbox and nothing else (403).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use herald_shared::{
    auth::{self, Claims, SCOPE_INBOX, SCOPE_TOKENS_WRITE},
    inbox::{Change, Counts, Filter, Inbox, Mark, MarkChange, Owner, Stored},
    users::is_valid_user_id,
};
use poem::web::{Data, sse::Event};
use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi, SecurityScheme,
    auth::ApiKey,
    param::{Header, Path, Query},
    payload::{EventStream, Json},
    types::ToJSON,
};
use serde::Deserialize;

use super::Tags;
use crate::{
    AppState,
    auth::{BearerAuth, verify_token},
    errors::{ApiError, ErrorResponse},
    payload::StrictJson,
};

pub struct InboxApi;

/// Default and largest page of `GET /v1/users/{id}/inbox`.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 200;
/// How long an end user's token lives unless asked otherwise.
const DEFAULT_USER_TOKEN_TTL: u64 = 3600;

/// One item of an inbox.
#[derive(Debug, Object)]
#[oai(rename = "InboxItem", skip_serializing_if_is_none)]
pub struct InboxItem {
    /// The notification's id (one item per notification).
    id: String,
    /// The rendered title (the template's `inapp_title`, or the request's `content.title`).
    #[oai(skip_serializing_if_is_none)]
    title: Option<String>,
    /// The rendered body.
    #[oai(skip_serializing_if_is_none)]
    body: Option<String>,
    /// The notification's data, for the page to act on (a link, an order number).
    data: serde_json::Value,
    #[oai(skip_serializing_if_is_none)]
    category: Option<String>,
    created_at: DateTime<Utc>,
    read: bool,
    #[oai(skip_serializing_if_is_none)]
    read_at: Option<DateTime<Utc>>,
    archived: bool,
    #[oai(skip_serializing_if_is_none)]
    archived_at: Option<DateTime<Utc>>,
}

fn item_body(s: Stored) -> InboxItem {
    InboxItem {
        read: s.read(),
        archived: s.archived(),
        read_at: s.read_at,
        archived_at: s.archived_at,
        id: s.item.id,
        title: s.item.title,
        body: s.item.body,
        data: serde_json::Value::Object(s.item.data),
        category: s.item.category,
        created_at: s.item.created_at,
    }
}

/// A page of an inbox, newest first.
#[derive(Debug, Object)]
#[oai(rename = "InboxPage", skip_serializing_if_is_none)]
pub struct InboxPage {
    items: Vec<InboxItem>,
    /// Pass as `cursor` for the next (older) page; absent on the last page. Items that arrive
    /// meanwhile never shift a page: they are newer than every cursor.
    #[oai(skip_serializing_if_is_none)]
    next_cursor: Option<String>,
}

/// Unread and total items, archived ones left out.
#[derive(Debug, Clone, Copy, Object)]
#[oai(rename = "InboxCount", skip_serializing_if_is_none)]
pub struct InboxCount {
    unread: u64,
    total: u64,
}

impl From<Counts> for InboxCount {
    fn from(c: Counts) -> InboxCount {
        InboxCount { unread: c.unread, total: c.total }
    }
}

/// What `read-all` did.
#[derive(Debug, Object)]
#[oai(rename = "ReadAll", skip_serializing_if_is_none)]
pub struct ReadAllBody {
    /// Items that were unread and are now read.
    marked: u64,
    /// The counts after.
    count: InboxCount,
}

/// A mark that changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "InboxMark", rename_all = "lowercase")]
pub enum ApiMark {
    Read,
    Archived,
}

/// A change of one item's mark, as the live stream tells it.
#[derive(Debug, Object)]
#[oai(rename = "InboxMarkChange", skip_serializing_if_is_none)]
pub struct MarkBody {
    /// The item.
    id: String,
    mark: ApiMark,
    /// Set (`true`) or cleared.
    on: bool,
    at: DateTime<Utc>,
}

/// What an event of the live stream is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "InboxEventKind", rename_all = "lowercase")]
pub enum EventKind {
    /// A new item (`item`).
    Item,
    /// An item was marked read, unread, archived or unarchived (`mark`).
    Mark,
    /// The counts now (`count`): first on every connection, then after every change.
    Count,
}

/// One event of `GET /v1/users/{id}/inbox/stream`. The SSE `event` field is `kind`, its `id`
/// the position to resume from (`Last-Event-ID`), its `data` this object.
#[derive(Debug, Object)]
#[oai(rename = "InboxEvent", skip_serializing_if_is_none)]
pub struct InboxEvent {
    kind: EventKind,
    /// The stream position after this event.
    position: String,
    #[oai(skip_serializing_if_is_none)]
    item: Option<InboxItem>,
    #[oai(skip_serializing_if_is_none)]
    mark: Option<MarkBody>,
    #[oai(skip_serializing_if_is_none)]
    count: Option<InboxCount>,
}

/// Asks for an end user's token.
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "UserTokenInput", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct UserTokenInput {
    /// Lifetime in seconds: 60 to 604800 (7 days); default 3600.
    #[oai(default)]
    ttl_seconds: Option<u64>,
}

/// An end user's token: scope `inbox`, that user only.
#[derive(Debug, Object)]
#[oai(rename = "UserToken", skip_serializing_if_is_none)]
pub struct UserTokenBody {
    token: String,
    user_id: String,
    expires_at: DateTime<Utc>,
}

#[derive(ApiResponse)]
enum PageResponse {
    /// A page of the inbox.
    #[oai(status = 200)]
    Ok(Json<InboxPage>),
}

#[derive(ApiResponse)]
enum CountResponse {
    /// The inbox's counts.
    #[oai(status = 200)]
    Ok(Json<InboxCount>),
}

#[derive(ApiResponse)]
enum ItemResponse {
    /// The item as it is now.
    #[oai(status = 200)]
    Ok(Json<InboxItem>),
}

#[derive(ApiResponse)]
enum ReadAllResponse {
    /// Every item is read.
    #[oai(status = 200)]
    Ok(Json<ReadAllBody>),
}

#[derive(ApiResponse)]
enum TokenResponse {
    /// The token.
    #[oai(status = 201)]
    Created(Json<UserTokenBody>),
}

/// A token in the `access_token` query parameter, for the live stream only: a browser's
/// `EventSource` cannot send an `Authorization` header.
#[derive(SecurityScheme)]
#[oai(ty = "api_key", key_name = "access_token", key_in = "query", checker = "check_query_token")]
pub struct QueryToken(Claims);

async fn check_query_token(req: &poem::Request, key: ApiKey) -> poem::Result<Claims> {
    verify_token(req, &key.key)
}

/// The live stream takes the token from the header or, for `EventSource`, the query.
#[derive(SecurityScheme)]
pub enum StreamAuth {
    Bearer(BearerAuth),
    Query(QueryToken),
}

impl StreamAuth {
    fn claims(&self) -> &Claims {
        match self {
            StreamAuth::Bearer(b) => &b.0,
            StreamAuth::Query(q) => &q.0,
        }
    }
}

/// The inbox `claims` may use: scope `inbox`, and an end user's token only its own user's.
fn owner<'a>(claims: &'a Claims, user: &'a str) -> Result<Owner<'a>, ApiError> {
    if !claims.allows(SCOPE_INBOX) {
        return Err(ApiError::MissingScope(SCOPE_INBOX));
    }
    if let Some(own) = &claims.user
        && own != user
    {
        return Err(ApiError::Forbidden(format!("this token is for user {own:?}'s inbox only")));
    }
    if !is_valid_user_id(user) {
        return Err(ApiError::NotFound(format!("no user {user:?}")));
    }
    Ok(Owner { tenant: Some(claims.tenant_or_sub()), user })
}

fn inbox(state: &AppState) -> Result<&Inbox, ApiError> {
    Ok(&state.topology()?.inbox)
}

fn check_item(id: &str) -> Result<(), ApiError> {
    if herald_shared::intent::is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("no item {id:?} in this inbox")))
    }
}

/// `<item position>-<mark position>`: where a live stream has got to in both streams.
fn position(items: u64, marks: u64) -> String {
    format!("{items}-{marks}")
}

fn parse_position(raw: &str) -> Option<(u64, u64)> {
    let (a, b) = raw.trim().split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[OpenApi(tag = "Tags::Inbox")]
impl InboxApi {
    /// List a user's inbox
    ///
    /// Newest first, a page at a time. Without filters: every item not archived.
    #[oai(path = "/v1/users/:id/inbox", method = "get", operation_id = "list_inbox")]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// The user's id.
        id: Path<String>,
        /// Only unread items.
        #[oai(default)]
        unread: Query<bool>,
        /// Only items of this category.
        category: Query<Option<String>>,
        /// Archived items instead of the others.
        #[oai(default)]
        archived: Query<bool>,
        /// The `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Items per page, 1 to 200 (default 50).
        limit: Query<Option<u32>>,
    ) -> Result<PageResponse, ErrorResponse> {
        let owner = owner(&auth.0, &id.0)?;
        let limit = match limit.0 {
            None => DEFAULT_LIMIT,
            Some(n @ 1..=MAX_LIMIT) => n,
            Some(_) => return Err(ApiError::invalid("limit", format!("from 1 to {MAX_LIMIT}")).into()),
        };
        let before = match cursor.0.as_deref() {
            None => None,
            Some(c) => Some(c.parse::<u64>().map_err(|_| {
                ApiError::invalid("cursor", "not a cursor this API gave (the `next_cursor` of a page)")
            })?),
        };
        let filter = Filter { unread: unread.0, category: category.0.clone(), archived: archived.0 };
        let inbox = inbox(&state)?;
        let page = state.within(2, inbox.list(owner, &filter, before, limit as usize)).await?;
        Ok(PageResponse::Ok(Json(InboxPage {
            items: page.items.into_iter().map(item_body).collect(),
            next_cursor: page.next.map(|n| n.to_string()),
        })))
    }

    /// Count a user's unread items
    #[oai(path = "/v1/users/:id/inbox/count", method = "get", operation_id = "count_inbox")]
    async fn count(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
    ) -> Result<CountResponse, ErrorResponse> {
        let owner = owner(&auth.0, &id.0)?;
        let counts = state.within(2, inbox(&state)?.counts(owner)).await?;
        Ok(CountResponse::Ok(Json(counts.into())))
    }

    /// Mark an item read
    ///
    /// Idempotent: marking what is read already changes nothing and answers the item.
    #[oai(path = "/v1/users/:id/inbox/:item/read", method = "post", operation_id = "mark_inbox_item_read")]
    async fn read(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        /// The item's id (the notification's).
        item: Path<String>,
    ) -> Result<ItemResponse, ErrorResponse> {
        mark(&state, &auth.0, &id.0, &item.0, Mark::Read, true).await
    }

    /// Mark an item unread
    #[oai(
        path = "/v1/users/:id/inbox/:item/unread",
        method = "post",
        operation_id = "mark_inbox_item_unread"
    )]
    async fn unread(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        item: Path<String>,
    ) -> Result<ItemResponse, ErrorResponse> {
        mark(&state, &auth.0, &id.0, &item.0, Mark::Read, false).await
    }

    /// Archive an item
    ///
    /// Archived items leave the default listing and the counts; `archived=true` lists them.
    #[oai(path = "/v1/users/:id/inbox/:item/archive", method = "post", operation_id = "archive_inbox_item")]
    async fn archive(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        item: Path<String>,
    ) -> Result<ItemResponse, ErrorResponse> {
        mark(&state, &auth.0, &id.0, &item.0, Mark::Archived, true).await
    }

    /// Unarchive an item
    #[oai(
        path = "/v1/users/:id/inbox/:item/unarchive",
        method = "post",
        operation_id = "unarchive_inbox_item"
    )]
    async fn unarchive(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        item: Path<String>,
    ) -> Result<ItemResponse, ErrorResponse> {
        mark(&state, &auth.0, &id.0, &item.0, Mark::Archived, false).await
    }

    /// Mark every item read
    #[oai(path = "/v1/users/:id/inbox/read-all", method = "post", operation_id = "mark_all_inbox_read")]
    async fn read_all(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
    ) -> Result<ReadAllResponse, ErrorResponse> {
        let owner = owner(&auth.0, &id.0)?;
        let inbox = inbox(&state)?;
        let marked = state.within(4, inbox.read_all(owner)).await?;
        let count = state.within(2, inbox.counts(owner)).await?;
        Ok(ReadAllResponse::Ok(Json(ReadAllBody { marked: marked as u64, count: count.into() })))
    }

    /// Follow a user's inbox live
    ///
    /// Server-sent events: `count` first, then `item` for each new item and `mark` for each
    /// mark changed (each followed by a `count`). A resumed stream starts with what it missed,
    /// then the `count`. Every event's `id` is a position; a client
    /// that reconnects with it as `Last-Event-ID` (a browser's `EventSource` does so itself)
    /// gets every item and mark it missed, once. Idle streams get a comment line every
    /// `HERALD_SSE_HEARTBEAT`. Browsers pass the token as `access_token`.
    #[oai(path = "/v1/users/:id/inbox/stream", method = "get", operation_id = "stream_inbox")]
    async fn stream(
        &self,
        auth: StreamAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        /// The `id` of the last event received, to resume after it.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<EventStream<futures::stream::BoxStream<'static, InboxEvent>>, ErrorResponse> {
        let claims = auth.claims();
        let owner = owner(claims, &id.0)?;
        let inbox = inbox(&state)?;
        // Listening starts before the catch-up is read, so nothing falls between the two.
        let listening = state.live.listen(owner.token());
        let mut pending = VecDeque::new();
        let (items_at, marks_at) = match last_event_id.0.as_deref().and_then(parse_position) {
            Some((a, b)) => {
                let (items, marks) = state
                    .within(2, async {
                        futures::try_join!(inbox.items_after(owner, a), inbox.marks_after(owner, b))
                    })
                    .await?;
                pending.extend(items.into_iter().map(|stored| Change::Item { owner: String::new(), stored }));
                pending.extend(marks.into_iter().map(|change| Change::Mark { owner: String::new(), change }));
                (a, b)
            }
            None => state.within(1, inbox.positions()).await?,
        };
        // A fresh connection, or one that missed nothing, starts with the counts; a catch-up
        // ends with them.
        let mut out = VecDeque::new();
        if pending.is_empty() {
            let counts = state.within(2, inbox.counts(owner)).await?;
            out.push_back(count_event(items_at, marks_at, counts));
        }
        let live = Live {
            state: state.0.clone(),
            tenant: owner.tenant.map(str::to_owned),
            user: owner.user.to_owned(),
            items_at,
            marks_at,
            caught_up: pending,
            out,
            listening,
        };
        let stream = futures::stream::unfold(live, Live::next).boxed();
        Ok(EventStream::new(stream).keep_alive(state.config.sse_heartbeat).to_event(|e: InboxEvent| {
            let kind = match e.kind {
                EventKind::Item => "item",
                EventKind::Mark => "mark",
                EventKind::Count => "count",
            };
            Event::message(e.to_json_string()).event_type(kind).id(e.position.clone())
        }))
    }

    /// Mint a token for one end user
    ///
    /// For a browser: scope `inbox`, bound to this user, so the page can read and mark that
    /// user's inbox and nothing else (it cannot send notifications). Needs scope
    /// `tokens:write`; the token acts for the caller's tenant.
    #[oai(path = "/v1/users/:id/tokens", method = "post", operation_id = "create_user_token")]
    async fn token(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        body: StrictJson<UserTokenInput>,
    ) -> Result<TokenResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_TOKENS_WRITE)?;
        if !is_valid_user_id(&id.0) {
            return Err(ApiError::invalid("id", "a user id is 1 to 128 characters of A-Z a-z 0-9 - _").into());
        }
        let ttl = body.0.ttl_seconds.unwrap_or(DEFAULT_USER_TOKEN_TTL);
        if !(60..=auth::MAX_USER_TOKEN_TTL.as_secs()).contains(&ttl) {
            return Err(ApiError::invalid("ttl_seconds", "from 60 to 604800 (7 days)").into());
        }
        let (token, minted) = auth::mint_for_user(
            &state.config.jwt_secret,
            Some(claims.tenant_or_sub()),
            &id.0,
            Duration::from_secs(ttl),
        );
        Ok(TokenResponse::Created(Json(UserTokenBody {
            token,
            user_id: id.0.clone(),
            expires_at: DateTime::from_timestamp(minted.exp as i64, 0).unwrap_or_default(),
        })))
    }
}

async fn mark(
    state: &AppState,
    claims: &Claims,
    user: &str,
    item: &str,
    mark: Mark,
    on: bool,
) -> Result<ItemResponse, ErrorResponse> {
    let owner = owner(claims, user)?;
    check_item(item)?;
    let stored = state.within(3, inbox(state)?.mark(owner, item, mark, on)).await?;
    Ok(ItemResponse::Ok(Json(item_body(stored))))
}

fn count_event(items: u64, marks: u64, counts: Counts) -> InboxEvent {
    InboxEvent {
        kind: EventKind::Count,
        position: position(items, marks),
        item: None,
        mark: None,
        count: Some(counts.into()),
    }
}

/// One connection's live stream: the caught-up changes first, then the hub's.
struct Live {
    /// The gateway's state, for its inbox (shared, not a copy per connection).
    state: Arc<AppState>,
    tenant: Option<String>,
    user: String,
    items_at: u64,
    marks_at: u64,
    caught_up: VecDeque<Change>,
    out: VecDeque<InboxEvent>,
    listening: crate::live::Listening,
}

impl Live {
    async fn next(mut self) -> Option<(InboxEvent, Live)> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Some((event, self));
            }
            let change = match self.caught_up.pop_front() {
                Some(c) => c,
                // The hub closed this connection (too slow, or its reader restarted): end the
                // stream; the client resumes from its last position.
                None => Arc::unwrap_or_clone(self.listening.changes.recv().await?),
            };
            let event = match change {
                Change::Item { stored, .. } if stored.sequence > self.items_at => {
                    self.items_at = stored.sequence;
                    InboxEvent {
                        kind: EventKind::Item,
                        position: position(self.items_at, self.marks_at),
                        item: Some(item_body(stored)),
                        mark: None,
                        count: None,
                    }
                }
                Change::Mark { change, .. } if change.sequence > self.marks_at => {
                    self.marks_at = change.sequence;
                    InboxEvent {
                        kind: EventKind::Mark,
                        position: position(self.items_at, self.marks_at),
                        item: None,
                        mark: Some(mark_body(change)),
                        count: None,
                    }
                }
                // Seen in the catch-up already.
                _ => continue,
            };
            self.out.push_back(event);
            if !self.caught_up.is_empty() {
                continue; // one count at the end of the catch-up
            }
            let owner = Owner { tenant: self.tenant.as_deref(), user: &self.user };
            // The counts after the change; if they cannot be read now the next change brings
            // them (the item or mark itself is not held back).
            let Ok(inbox) = inbox(&self.state) else { continue };
            match tokio::time::timeout(Duration::from_secs(5), inbox.counts(owner)).await {
                Ok(Ok(counts)) => self.out.push_back(count_event(self.items_at, self.marks_at, counts)),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot count an inbox for its live stream"),
                Err(_) => tracing::warn!("counting an inbox for its live stream timed out"),
            }
        }
    }
}

fn mark_body(c: MarkChange) -> MarkBody {
    MarkBody {
        id: c.item,
        mark: match c.mark {
            Mark::Read => ApiMark::Read,
            Mark::Archived => ApiMark::Archived,
        },
        on: c.value.on,
        at: c.value.at,
    }
}
