//! The API, one struct per resource. [`Tags`] groups operations in the spec.

mod notifications;
mod system;

pub use notifications::NotificationsApi;
pub use system::SystemApi;

#[derive(poem_openapi::Tags)]
pub enum Tags {
    /// Send notifications and follow their delivery.
    Notifications,
    /// Liveness, readiness and metrics.
    System,
}
