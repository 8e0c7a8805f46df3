//! The API, one struct per resource. [`Tags`] groups operations in the spec.

mod dlq;
mod notifications;
mod system;
mod templates;
mod users;

pub use dlq::{DlqApi, Jobs};
pub use notifications::NotificationsApi;
pub use system::SystemApi;
pub use templates::TemplatesApi;
pub use users::UsersApi;

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
    /// Liveness, readiness and metrics.
    System,
}
