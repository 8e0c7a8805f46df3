//! `/v1/users`: users, their push devices and preferences, on `herald_shared::users`.
//!
//! Everything belongs to the token's tenant (its `tenant` claim, else its subject), exactly as
//! notifications do: keys carry the tenant, so another tenant's user with the same id is simply
//! not there (404). Every read answers an `ETag` (the KV revision, quoted); a write with
//! `If-Match` is a compare-and-set on that revision and answers 412, changing nothing, when the
//! user moved on. Single-user reads go to the bucket so a caller sees its own write at once;
//! the list is served from the gateway's local copy once it has caught up with the bucket.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use herald_shared::{
    Channel,
    auth::{Claims, SCOPE_USERS_READ, SCOPE_USERS_WRITE},
    preferences::{Day, Preferences, QuietHours, hh_mm},
    topology::USERS_BUCKET,
    users::{self, Device, Platform, User, UserFields, Versioned},
};
use poem::web::Data;
use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi,
    param::{Header, Path, Query},
    payload::Json,
};
use serde::Deserialize;
use serde_json::Value;

use super::{Tags, etag, notifications::ApiChannel, precondition};
use crate::{
    AppState,
    auth::BearerAuth,
    errors::{ApiError, ErrorResponse},
    payload::StrictJson,
};

pub struct UsersApi;

/// Default and largest page of `GET /v1/users`.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

/// A push provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename = "Platform", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ApiPlatform {
    Fcm,
    Apns,
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename = "Day", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ApiDay {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// A push device to register.
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "DeviceInput", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct DeviceInput {
    /// The provider's registration token (1 to 512 visible ASCII characters, no `/`).
    token: String,
    /// Which provider issued it.
    platform: ApiPlatform,
}

/// A registered push device.
#[derive(Debug, Object)]
#[oai(rename = "Device", skip_serializing_if_is_none)]
pub struct DeviceBody {
    /// The provider's registration token.
    token: String,
    /// Which provider issued it.
    platform: ApiPlatform,
    /// When it was first registered (kept when the device is listed again).
    added_at: DateTime<Utc>,
}

/// A daily window in which only `critical` notifications are sent; the rest wait for its end.
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "QuietHours", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct QuietHoursBody {
    /// Opens at this local time, `HH:MM` (24-hour) in the user's time zone.
    start: String,
    /// Closes at this local time, `HH:MM`; earlier than `start` means the next morning.
    end: String,
    /// Days the window opens on; empty or absent: every day.
    #[oai(default)]
    #[serde(default)]
    days: Vec<ApiDay>,
}

/// What a user wants to receive, where and when.
#[derive(Debug, Default, Object, Deserialize)]
#[oai(rename = "Preferences", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct PreferencesBody {
    /// Channels switched on (`true`) or off (`false`) as a whole; unlisted channels are on.
    #[oai(default)]
    #[serde(default)]
    channels: BTreeMap<String, bool>,
    /// Per category (`marketing`, `orders`), channels switched on or off. Categories the
    /// operator marks required (`HERALD_REQUIRED_CATEGORIES`) cannot be switched off.
    #[oai(default)]
    #[serde(default)]
    categories: BTreeMap<String, BTreeMap<String, bool>>,
    /// When non-critical notifications wait.
    quiet_hours: Option<QuietHoursBody>,
    /// Channels to try in order when one is not usable, e.g. `["push", "email"]`.
    #[oai(default)]
    #[serde(default)]
    fallback: Vec<ApiChannel>,
}

/// A user as written by `PUT` (every field optional; absent means unset).
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "UserInput", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct UserInput {
    /// How to address the user (at most 256 characters).
    name: Option<String>,
    /// Address for the email channel.
    email: Option<String>,
    /// Number for the sms channel, E.164: `+` and up to 15 digits.
    phone: Option<String>,
    /// Push devices (at most 100).
    devices: Option<Vec<DeviceInput>>,
    /// Receiver for the webhook channel (absolute http(s) URL).
    webhook_url: Option<String>,
    /// BCP 47 language tag, e.g. `fr-CA`.
    locale: Option<String>,
    /// IANA time zone, e.g. `Europe/Paris`; quiet hours are in it (UTC when absent).
    time_zone: Option<String>,
    /// What the user wants to receive.
    preferences: Option<PreferencesBody>,
    /// Your own data about the user, for templates (a JSON object, at most 8 levels deep and
    /// 8 KiB).
    attributes: Option<BTreeMap<String, Value>>,
}

/// A stored user.
#[derive(Debug, Object)]
#[oai(rename = "User", skip_serializing_if_is_none)]
pub struct UserBody {
    /// Your id for the user: 1 to 128 characters of `A-Z a-z 0-9 - _`.
    id: String,
    name: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    devices: Vec<DeviceBody>,
    webhook_url: Option<String>,
    locale: Option<String>,
    time_zone: Option<String>,
    preferences: PreferencesBody,
    attributes: BTreeMap<String, Value>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The revision this is, also the `ETag` (quoted there); send it as `If-Match` to write
    /// only if nobody changed the user since.
    revision: u64,
}

/// One page of users, ordered by id.
#[derive(Debug, Object)]
#[oai(rename = "UserPage", skip_serializing_if_is_none)]
pub struct UserPage {
    users: Vec<UserBody>,
    /// Pass as `cursor` for the next page; absent on the last page.
    next_cursor: Option<String>,
}

#[derive(ApiResponse)]
enum PutUserResponse {
    /// The user did not exist and was created.
    #[oai(status = 201)]
    Created(Json<UserBody>, #[oai(header = "ETag")] String),
    /// The user was replaced.
    #[oai(status = 200)]
    Replaced(Json<UserBody>, #[oai(header = "ETag")] String),
}

#[derive(ApiResponse)]
enum UserResponse {
    /// The user.
    #[oai(status = 200)]
    Ok(Json<UserBody>, #[oai(header = "ETag")] String),
}

#[derive(ApiResponse)]
enum DeviceResponse {
    /// The device was registered; the user is answered.
    #[oai(status = 201)]
    Created(Json<UserBody>, #[oai(header = "ETag")] String),
    /// The device was registered already (its platform is updated); the user is answered.
    #[oai(status = 200)]
    Ok(Json<UserBody>, #[oai(header = "ETag")] String),
}

#[derive(ApiResponse)]
enum DeletedResponse {
    /// Deleted.
    #[oai(status = 204)]
    Deleted,
}

#[derive(ApiResponse)]
enum ListResponse {
    /// A page of users.
    #[oai(status = 200)]
    Ok(Json<UserPage>),
}

#[derive(ApiResponse)]
enum PreferencesResponse {
    /// The user's preferences; the `ETag` is the user's revision.
    #[oai(status = 200)]
    Ok(Json<PreferencesBody>, #[oai(header = "ETag")] String),
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if users::is_valid_user_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid("id", "a user id is 1 to 128 characters of A-Z, a-z, 0-9, '-' and '_'"))
    }
}

/// Bounds a bucket operation, so a client never hangs on an unreachable NATS.
async fn bounded<T>(
    state: &AppState,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    // A write reads and writes, and may retry once or twice after a lost race.
    state.within(3, work).await
}

fn channel(name: &str, field: &str) -> Result<Channel, ApiError> {
    name.parse::<Channel>().map_err(|_| {
        ApiError::invalid(field, format!("{name:?} is not a channel (email, sms, push, webhook, inapp)"))
    })
}

fn into_preferences(body: PreferencesBody, at: &str) -> Result<Preferences, ApiError> {
    let field = |rest: String| if at.is_empty() { rest } else { format!("{at}.{rest}") };
    let channels = |map: BTreeMap<String, bool>, base: String| {
        map.into_iter()
            .map(|(name, on)| Ok((channel(&name, &format!("{base}.{name}"))?, on)))
            .collect::<Result<BTreeMap<_, _>, ApiError>>()
    };
    let quiet_hours = body
        .quiet_hours
        .map(|q| {
            let time = |text: &str, name: &str| {
                hh_mm::parse(text).map_err(|m| ApiError::invalid(field(format!("quiet_hours.{name}")), m))
            };
            Ok::<_, ApiError>(QuietHours {
                start: time(&q.start, "start")?,
                end: time(&q.end, "end")?,
                days: q.days.into_iter().map(day).collect(),
            })
        })
        .transpose()?;
    Ok(Preferences {
        channels: channels(body.channels, field("channels".into()))?,
        categories: body
            .categories
            .into_iter()
            .map(|(name, map)| {
                let base = field(format!("categories.{name}"));
                Ok((name, channels(map, base)?))
            })
            .collect::<Result<_, ApiError>>()?,
        quiet_hours,
        fallback: body.fallback.into_iter().map(Channel::from).collect(),
    })
}

fn day(d: ApiDay) -> Day {
    match d {
        ApiDay::Mon => Day::Mon,
        ApiDay::Tue => Day::Tue,
        ApiDay::Wed => Day::Wed,
        ApiDay::Thu => Day::Thu,
        ApiDay::Fri => Day::Fri,
        ApiDay::Sat => Day::Sat,
        ApiDay::Sun => Day::Sun,
    }
}

fn api_day(d: Day) -> ApiDay {
    match d {
        Day::Mon => ApiDay::Mon,
        Day::Tue => ApiDay::Tue,
        Day::Wed => ApiDay::Wed,
        Day::Thu => ApiDay::Thu,
        Day::Fri => ApiDay::Fri,
        Day::Sat => ApiDay::Sat,
        Day::Sun => ApiDay::Sun,
    }
}

fn platform(p: ApiPlatform) -> Platform {
    match p {
        ApiPlatform::Fcm => Platform::Fcm,
        ApiPlatform::Apns => Platform::Apns,
    }
}

fn api_platform(p: Platform) -> ApiPlatform {
    match p {
        Platform::Fcm => ApiPlatform::Fcm,
        Platform::Apns => ApiPlatform::Apns,
    }
}

/// A `PUT` body as the fields to store. New devices are stamped `now`; devices the user had
/// keep their first `added_at` (the store sees to that).
fn into_fields(input: UserInput, now: DateTime<Utc>) -> Result<UserFields, ApiError> {
    Ok(UserFields {
        name: input.name,
        email: input.email,
        phone: input.phone,
        devices: input
            .devices
            .unwrap_or_default()
            .into_iter()
            .map(|d| Device { token: d.token, platform: platform(d.platform), added_at: now })
            .collect(),
        webhook_url: input.webhook_url,
        locale: input.locale,
        time_zone: input.time_zone,
        preferences: input
            .preferences
            .map(|p| into_preferences(p, "preferences"))
            .transpose()?
            .unwrap_or_default(),
        attributes: input.attributes.unwrap_or_default().into_iter().collect(),
    })
}

fn preferences_body(p: &Preferences) -> PreferencesBody {
    let names = |m: &BTreeMap<Channel, bool>| m.iter().map(|(c, on)| (c.to_string(), *on)).collect();
    PreferencesBody {
        channels: names(&p.channels),
        categories: p.categories.iter().map(|(name, m)| (name.clone(), names(m))).collect(),
        quiet_hours: p.quiet_hours.as_ref().map(|q| QuietHoursBody {
            start: q.start.format("%H:%M").to_string(),
            end: q.end.format("%H:%M").to_string(),
            days: q.days.iter().copied().map(api_day).collect(),
        }),
        fallback: p.fallback.iter().copied().map(ApiChannel::from).collect(),
    }
}

fn user_body(v: Versioned<User>) -> UserBody {
    let Versioned { value: u, revision } = v;
    let f = u.fields;
    UserBody {
        id: u.id,
        preferences: preferences_body(&f.preferences),
        name: f.name,
        email: f.email,
        phone: f.phone,
        devices: f
            .devices
            .into_iter()
            .map(|d| DeviceBody { token: d.token, platform: api_platform(d.platform), added_at: d.added_at })
            .collect(),
        webhook_url: f.webhook_url,
        locale: f.locale,
        time_zone: f.time_zone,
        attributes: f.attributes.into_iter().collect(),
        created_at: u.created_at,
        updated_at: u.updated_at,
        revision,
    }
}

/// The stored user in the shape a `PUT` body has, for a merge patch to apply to: without the
/// read-only members (`id`, timestamps, devices' `added_at`).
fn as_input(user: &User) -> Value {
    let mut doc = serde_json::to_value(&user.fields).expect("users serialize");
    if let Some(devices) = doc.get_mut("devices").and_then(Value::as_array_mut) {
        for d in devices.iter_mut().filter_map(Value::as_object_mut) {
            d.remove("added_at");
        }
    }
    doc
}

/// Reads a patched document as a `PUT` body, naming the field that does not fit.
fn parse_input(doc: Value) -> Result<UserInput, ApiError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != "." && path != "?").then_some(path);
        let message = match &field {
            Some(f) => format!("{f}: {}", e.inner()),
            None => e.inner().to_string(),
        };
        ApiError::malformed(field, message)
    })
}

#[OpenApi(tag = "Tags::Users")]
impl UsersApi {
    /// Create or replace a user
    ///
    /// Stores every field given and unsets the others. `If-Match` (an `ETag` from a read)
    /// replaces only that revision; a stale one answers 412 and changes nothing.
    #[oai(path = "/v1/users/:id", method = "put", operation_id = "put_user")]
    async fn put(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// The user's id: 1 to 128 characters of `A-Z a-z 0-9 - _`.
        id: Path<String>,
        /// Write only if the user is at this revision (`"12"`), or exists at all (`*`).
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
        body: StrictJson<UserInput>,
    ) -> Result<PutUserResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_USERS_WRITE)?;
        check_id(&id.0)?;
        let precondition = precondition(if_match.0.as_deref())?;
        let fields = into_fields(body.0, Utc::now())?;
        let users = &state.topology()?.users;
        let (user, created) = bounded(&state, async {
            Ok(users.put(claims.tenant_or_sub(), &id.0, fields, precondition).await?)
        })
        .await?;
        let tag = etag(user.revision);
        Ok(if created {
            PutUserResponse::Created(Json(user_body(user)), tag)
        } else {
            PutUserResponse::Replaced(Json(user_body(user)), tag)
        })
    }

    /// Get a user
    ///
    /// Read from the bucket, so it reflects every write answered before it.
    #[oai(path = "/v1/users/:id", method = "get", operation_id = "get_user")]
    async fn get(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
    ) -> Result<UserResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_USERS_READ)?;
        let user = read(&state, claims, &id.0).await?;
        let tag = etag(user.revision);
        Ok(UserResponse::Ok(Json(user_body(user)), tag))
    }

    /// Change a user with a JSON merge patch
    ///
    /// RFC 7396: members given replace the stored ones, `null` removes one, objects
    /// (`preferences`, `attributes`) merge member by member, arrays (`devices`) replace whole.
    /// Send `Content-Type: application/merge-patch+json` (or `application/json`).
    #[oai(path = "/v1/users/:id", method = "patch", operation_id = "update_user")]
    async fn patch(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        /// Change only if the user is at this revision (`"12"`).
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
        body: StrictJson<Value>,
    ) -> Result<UserResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_USERS_WRITE)?;
        check_id(&id.0)?;
        let precondition = precondition(if_match.0.as_deref())?;
        let patch = body.0;
        let users = &state.topology()?.users;
        let user = bounded(&state, async {
            users
                .modify(claims.tenant_or_sub(), &id.0, precondition, |current| {
                    let mut doc = as_input(current);
                    users::merge_patch(&mut doc, &patch);
                    into_fields(parse_input(doc)?, Utc::now())
                })
                .await
        })
        .await?;
        let tag = etag(user.revision);
        Ok(UserResponse::Ok(Json(user_body(user)), tag))
    }

    /// Delete a user
    #[oai(path = "/v1/users/:id", method = "delete", operation_id = "delete_user")]
    async fn delete(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        /// Delete only if the user is at this revision (`"12"`).
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
    ) -> Result<DeletedResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_USERS_WRITE)?;
        let precondition = precondition(if_match.0.as_deref())?;
        if !users::is_valid_user_id(&id.0) {
            return Err(ApiError::NotFound(format!("no user {:?}", id.0)).into());
        }
        let users = &state.topology()?.users;
        bounded(&state, async { Ok(users.delete(claims.tenant_or_sub(), &id.0, precondition).await?) })
            .await?;
        Ok(DeletedResponse::Deleted)
    }

    /// List users
    ///
    /// Ordered by id. The cursor is the last id of the previous page, so users that exist
    /// throughout are listed exactly once however many are written meanwhile. Served from the
    /// gateway's local copy after it caught up with the bucket (at most `HERALD_NATS_TIMEOUT`
    /// of waiting); while NATS is unreachable the copy answers with what it holds.
    #[oai(path = "/v1/users", method = "get", operation_id = "list_users")]
    async fn list(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Users per page, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<ListResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_USERS_READ)?;
        let limit = limit.0.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT) as usize;
        if let Some(c) = &cursor.0
            && !users::is_valid_user_id(c)
        {
            return Err(ApiError::malformed(Some("cursor".into()), "not a cursor this API gave").into());
        }
        catch_up(&state).await;
        let prefix = users::tenant_prefix(claims.tenant_or_sub());
        let copy = state.users_copy.clone();
        let after = cursor.0.clone();
        let rows = tokio::task::spawn_blocking(move || copy.list(&prefix, after.as_deref(), limit + 1))
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let more = rows.len() > limit;
        let mut page = Vec::with_capacity(limit);
        for (key, revision, bytes) in rows.into_iter().take(limit) {
            match users::decode(&key, &bytes) {
                Ok(user) => page.push(user_body(Versioned { value: user, revision })),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable user in the local copy"),
            }
        }
        let next_cursor = if more { page.last().map(|u| u.id.clone()) } else { None };
        Ok(ListResponse::Ok(Json(UserPage { users: page, next_cursor })))
    }

    /// Register a push device
    ///
    /// Adds the device, or updates the platform of a token the user has already. A user has
    /// at most 100 devices.
    #[oai(path = "/v1/users/:id/devices", method = "post", operation_id = "add_device")]
    async fn add_device(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        /// Change only if the user is at this revision (`"12"`).
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
        body: StrictJson<DeviceInput>,
    ) -> Result<DeviceResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_USERS_WRITE)?;
        check_id(&id.0)?;
        let precondition = precondition(if_match.0.as_deref())?;
        let device = body.0;
        let users = &state.topology()?.users;
        let mut added = false;
        let user = bounded(&state, async {
            users
                .modify(claims.tenant_or_sub(), &id.0, precondition, |current| {
                    let mut fields = current.fields.clone();
                    match fields.devices.iter_mut().find(|d| d.token == device.token) {
                        Some(d) => {
                            d.platform = platform(device.platform);
                            added = false;
                        }
                        None => {
                            fields.devices.push(Device {
                                token: device.token.clone(),
                                platform: platform(device.platform),
                                added_at: Utc::now(),
                            });
                            added = true;
                        }
                    }
                    Ok::<_, ApiError>(fields)
                })
                .await
        })
        .await?;
        let tag = etag(user.revision);
        Ok(if added {
            DeviceResponse::Created(Json(user_body(user)), tag)
        } else {
            DeviceResponse::Ok(Json(user_body(user)), tag)
        })
    }

    /// Remove a push device
    #[oai(path = "/v1/users/:id/devices/:token", method = "delete", operation_id = "remove_device")]
    async fn remove_device(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        /// The device's token (URL-encoded).
        token: Path<String>,
        /// Change only if the user is at this revision (`"12"`).
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
    ) -> Result<DeletedResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_USERS_WRITE)?;
        let precondition = precondition(if_match.0.as_deref())?;
        if !users::is_valid_user_id(&id.0) {
            return Err(ApiError::NotFound(format!("no user {:?}", id.0)).into());
        }
        let users = &state.topology()?.users;
        bounded(&state, async {
            users
                .modify(claims.tenant_or_sub(), &id.0, precondition, |current| {
                    let mut fields = current.fields.clone();
                    let before = fields.devices.len();
                    fields.devices.retain(|d| d.token != token.0);
                    if fields.devices.len() == before {
                        return Err(ApiError::NotFound(format!(
                            "user {:?} has no device {:?}",
                            id.0, token.0
                        )));
                    }
                    Ok(fields)
                })
                .await
        })
        .await?;
        Ok(DeletedResponse::Deleted)
    }

    /// Get a user's preferences
    #[oai(path = "/v1/users/:id/preferences", method = "get", operation_id = "get_preferences")]
    async fn get_preferences(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
    ) -> Result<PreferencesResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_USERS_READ)?;
        let user = read(&state, claims, &id.0).await?;
        Ok(PreferencesResponse::Ok(
            Json(preferences_body(&user.value.fields.preferences)),
            etag(user.revision),
        ))
    }

    /// Replace a user's preferences
    ///
    /// A category the operator marks required cannot be switched off (422 naming it).
    #[oai(path = "/v1/users/:id/preferences", method = "put", operation_id = "put_preferences")]
    async fn put_preferences(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        /// Change only if the user is at this revision (`"12"`).
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
        body: StrictJson<PreferencesBody>,
    ) -> Result<PreferencesResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_USERS_WRITE)?;
        check_id(&id.0)?;
        let precondition = precondition(if_match.0.as_deref())?;
        let preferences = into_preferences(body.0, "")?;
        let users = &state.topology()?.users;
        // Checked here too so errors name the body's fields, not the user record's.
        preferences.validate(users.required(), "").map_err(|i| ApiError::invalid(i.field, i.message))?;
        let user = bounded(&state, async {
            users
                .modify(claims.tenant_or_sub(), &id.0, precondition, |current| {
                    Ok::<_, ApiError>(UserFields {
                        preferences: preferences.clone(),
                        ..current.fields.clone()
                    })
                })
                .await
        })
        .await?;
        Ok(PreferencesResponse::Ok(
            Json(preferences_body(&user.value.fields.preferences)),
            etag(user.revision),
        ))
    }
}

/// One user of the caller's tenant, from the bucket, or 404.
async fn read(state: &AppState, claims: &Claims, id: &str) -> Result<Versioned<User>, ApiError> {
    let users = &state.topology()?.users;
    bounded(state, async { Ok(users.get(claims.tenant_or_sub(), id).await?) })
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user {id:?}")))
}

/// Waits (bounded) until the local copy holds every change the bucket had when the request
/// came, so a list reflects writes answered before it. Without NATS it serves what it holds.
async fn catch_up(state: &AppState) {
    let Ok(topology) = state.topology() else { return };
    let wait = state.config.nats_timeout;
    let info = tokio::time::timeout(wait, topology.js.get_stream(format!("KV_{USERS_BUCKET}"))).await;
    if let Ok(Ok(stream)) = info {
        let last = stream.cached_info().state.last_sequence;
        if !state.users_copy.wait_for(last, wait).await {
            tracing::warn!(last, status = ?state.users_copy.status(), "listing users from a copy that is behind");
        }
    }
}
