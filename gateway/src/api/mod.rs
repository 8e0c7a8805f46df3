//! The API, one struct per resource. [`Tags`] groups operations in the spec.

mod dlq;
mod inbox;
mod notifications;
mod system;
mod templates;
mod users;

pub use dlq::{DlqApi, Jobs};
pub use inbox::InboxApi;
pub use notifications::NotificationsApi;
pub use system::SystemApi;
pub use templates::TemplatesApi;
pub use users::UsersApi;

use herald_shared::users::Precondition;

use crate::errors::ApiError;

/// The `ETag` of a stored resource: its KV revision, quoted.
pub(crate) fn etag(revision: u64) -> String {
    format!("\"{revision}\"")
}

/// `If-Match`: absent, `*`, or one quoted (or bare) revision. Weak tags never match a strong
/// comparison, so they are refused rather than silently ignored.
pub(crate) fn precondition(raw: Option<&str>) -> Result<Precondition, ApiError> {
    let Some(raw) = raw.map(str::trim) else { return Ok(Precondition::None) };
    if raw == "*" {
        return Ok(Precondition::Exists);
    }
    let unquoted = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')).unwrap_or(raw);
    unquoted.parse::<u64>().map(Precondition::Revision).map_err(|_| {
        ApiError::malformed(
            Some("If-Match".into()),
            format!("If-Match must be `*` or one ETag this API gave (like \"12\"), not {raw:?}"),
        )
    })
}

#[derive(poem_openapi::Tags)]
pub enum Tags {
    /// Send notifications and follow their delivery.
    Notifications,
    /// Versioned, localized templates, checked when written (scopes `templates:read`,
    /// `templates:write`).
    Templates,
    /// Dead letters: list, read, replay and discard (scope `dlq:admin`).
    DeadLetters,
    /// Users, their push devices and their preferences (scopes `users:read`, `users:write`).
    Users,
    /// Users' in-app inboxes, live, and end users' tokens for them (scopes `inbox`,
    /// `tokens:write`).
    Inbox,
    /// Liveness, readiness and metrics.
    System,
}
