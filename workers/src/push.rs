//! The push channel: one notification, every device of the recipient.
//!
//! `recipient.push_tokens` lists the devices. Each token names its platform ([`device`]):
//! `apns:<token>` is an Apple device, and so is a bare token of 64 hexadecimal characters (an
//! APNs token is 32 bytes, written in hex; FCM registration tokens never look like that);
//! anything else is an FCM token. The resolver writes a user's APNs devices in the `apns:` form,
//! so their platform survives the trip, and direct publishers may use it too.
//!
//! Every device gets its own provider call, through the chain of its platform (`fcm` or
//! `apns`), several devices at a time, each recorded as a `ProviderCall` with the device's
//! label. The attempt is delivered if any device took the notification; otherwise it is
//! retried if any device failed transiently, and dead-lettered if every failure was
//! permanent. A device the provider says is gone for good (FCM `UNREGISTERED`, APNs
//! `BadDeviceToken` or `Unregistered`) is removed from the user by a compare-and-set write
//! through [`Users`]; a failed removal is logged and changes nothing else.

use futures::StreamExt;
use herald_shared::{
    Intent,
    state::{FailureKind, ProviderCall},
    users::{Platform, Precondition, UserError, UserFields, Users},
};

use crate::{
    Deliver, Delivery, DeliveryError,
    provider::{Chain, ProviderError, Receipt, device_label},
};

/// Devices of one notification sent at once.
const DEVICES_IN_FLIGHT: usize = 8;

/// The push channel's sender.
pub struct PushSender {
    /// Android and web devices; `None` when FCM is not configured.
    pub fcm: Option<Chain>,
    /// Apple devices; `None` when APNs is not configured.
    pub apns: Option<Chain>,
    /// The users bucket, to remove devices the providers no longer know.
    pub users: Users,
}

/// The platform of a push token as the intent carries it, and the token the provider knows.
pub fn device(token: &str) -> (Platform, &str) {
    if let Some(apns) = token.strip_prefix("apns:") {
        return (Platform::Apns, apns);
    }
    if token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (Platform::Apns, token);
    }
    (Platform::Fcm, token)
}

/// How a user's device is written into `recipient.push_tokens`, so [`device`] finds its
/// platform again.
pub fn token_for(platform: Platform, token: &str) -> String {
    match platform {
        Platform::Apns => format!("apns:{token}"),
        Platform::Fcm => token.to_owned(),
    }
}

fn platform_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Fcm => "fcm",
        Platform::Apns => "apns",
    }
}

impl Deliver for PushSender {
    async fn deliver<'a>(&'a self, intent: &'a Intent) -> Delivery {
        let mut tokens: Vec<&str> = Vec::new();
        for t in &intent.recipient.push_tokens {
            if !tokens.contains(&t.as_str()) {
                tokens.push(t);
            }
        }
        if tokens.is_empty() {
            return Delivery::failed(DeliveryError::Permanent {
                message: "recipient has no push tokens".into(),
            });
        }
        // The futures are made first (they start only when polled) so the stream holds no
        // closure over borrowed tokens.
        let sends: Vec<_> = tokens.into_iter().map(|t| self.one(intent, t)).collect();
        let outcomes: Vec<(String, Result<Receipt, ProviderError>, Vec<ProviderCall>)> =
            futures::stream::iter(sends).buffered(DEVICES_IN_FLIGHT).collect().await;
        let mut calls = Vec::new();
        let mut delivered = false;
        let mut failures = Vec::new();
        for (label, result, device_calls) in outcomes {
            calls.extend(device_calls);
            match result {
                Ok(_) => delivered = true,
                Err(e) => failures.push((label, e)),
            }
        }
        Delivery { result: outcome(delivered, &failures), calls }
    }
}

/// The attempt's result from its devices': delivered if any took it, else a retry if any
/// failure may pass, else permanent.
fn outcome(delivered: bool, failures: &[(String, ProviderError)]) -> Result<(), DeliveryError> {
    if delivered {
        return Ok(());
    }
    let message = failures
        .iter()
        .map(|(label, e)| format!("device {label}: {}", e.message))
        .collect::<Vec<_>>()
        .join("; ");
    let transient: Vec<&ProviderError> =
        failures.iter().map(|(_, e)| e).filter(|e| e.kind.is_transient()).collect();
    if transient.is_empty() {
        Err(DeliveryError::Permanent { message })
    } else {
        Err(DeliveryError::Transient {
            message,
            retry_after: transient.iter().filter_map(|e| e.retry_after).max(),
        })
    }
}

impl PushSender {
    /// One device: its label, the outcome and the calls made.
    async fn one(
        &self,
        intent: &Intent,
        raw: &str,
    ) -> (String, Result<Receipt, ProviderError>, Vec<ProviderCall>) {
        let (platform, token) = device(raw);
        let label = device_label(token);
        let chain = match platform {
            Platform::Fcm => self.fcm.as_ref(),
            Platform::Apns => self.apns.as_ref(),
        };
        let Some(chain) = chain else {
            let message = match platform {
                Platform::Fcm => "an FCM device, but FCM is not configured (HERALD_FCM_PROJECT_ID)",
                Platform::Apns => "an APNs device, but APNs is not configured (HERALD_APNS_KEY)",
            };
            let call = ProviderCall {
                provider: platform_name(platform).to_owned(),
                provider_message_id: None,
                latency_ms: 0,
                failure: Some(FailureKind::Rejected),
                error: Some(message.to_owned()),
                device: Some(label.clone()),
                detail: None,
            };
            return (label, Err(ProviderError::new(FailureKind::Rejected, message)), vec![call]);
        };
        let (result, mut calls) = chain.send(intent, token, Some(token)).await;
        if let Err(e) = &result
            && e.device_gone
        {
            let note = self.remove(intent, token).await;
            if let Some(call) = calls.last_mut() {
                call.detail = Some(note);
            }
        }
        (label, result, calls)
    }

    /// Removes a device the provider no longer knows from the intent's user; says what came
    /// of it, for the call's record.
    async fn remove(&self, intent: &Intent, token: &str) -> String {
        let label = device_label(token);
        let (Some(tenant), Some(user)) = (intent.tenant.as_deref(), intent.recipient.user_id.as_deref())
        else {
            return "device unregistered (no user to remove it from)".into();
        };
        let change = |u: &herald_shared::users::User| -> Result<UserFields, Removal> {
            if !u.fields.devices.iter().any(|d| d.token == token) {
                return Err(Removal::Absent);
            }
            let mut fields = u.fields.clone();
            fields.devices.retain(|d| d.token != token);
            Ok(fields)
        };
        // A compare-and-set on the revision read; `modify` re-reads and retries on a conflict.
        match self.users.modify(tenant, user, Precondition::Exists, change).await {
            Ok(_) => {
                tracing::info!(user, device = %label, notification_id = %intent.id, "removed an unregistered push device");
                "device removed".into()
            }
            Err(Removal::Absent) => "device unregistered (already gone from the user)".into(),
            Err(Removal::User(UserError::Missing(_) | UserError::NotFound(_))) => {
                "device unregistered (the user no longer exists)".into()
            }
            Err(Removal::User(e)) => {
                tracing::warn!(user, device = %label, error = %e, "could not remove an unregistered push device");
                format!("device unregistered; removing it failed: {e}")
            }
        }
    }
}

/// Why a device was not removed.
#[derive(Debug)]
enum Removal {
    /// The user no longer lists it.
    Absent,
    User(UserError),
}

impl From<UserError> for Removal {
    fn from(e: UserError) -> Removal {
        Removal::User(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_platform() {
        let hex64 = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
        let fcm = "fGx1:APA91bH-example_token-with:colon";
        assert_eq!(device(&format!("apns:{hex64}")), (Platform::Apns, hex64));
        assert_eq!(device("apns:short"), (Platform::Apns, "short"));
        assert_eq!(device(hex64), (Platform::Apns, hex64));
        assert_eq!(device(&hex64.to_uppercase()).0, Platform::Apns);
        assert_eq!(device(&hex64[..63]).0, Platform::Fcm, "63 hex characters are not an APNs token");
        assert_eq!(device(&format!("{hex64}0")).0, Platform::Fcm);
        assert_eq!(device(fcm), (Platform::Fcm, fcm));
        for (platform, token) in [(Platform::Apns, hex64), (Platform::Fcm, fcm)] {
            assert_eq!(device(&token_for(platform, token)), (platform, token));
        }
    }

    #[test]
    fn any_device_delivers_else_any_transient_retries() {
        let e = |kind, secs: Option<u64>| {
            (
                "…x".to_owned(),
                ProviderError::new(kind, "no").with_retry_after(secs.map(std::time::Duration::from_secs)),
            )
        };
        assert_eq!(outcome(true, &[e(FailureKind::InvalidRecipient, None)]), Ok(()));
        assert!(matches!(
            outcome(false, &[e(FailureKind::InvalidRecipient, None), e(FailureKind::Rejected, None)]),
            Err(DeliveryError::Permanent { .. })
        ));
        let retry = outcome(
            false,
            &[
                e(FailureKind::InvalidRecipient, None),
                e(FailureKind::Unavailable, Some(3)),
                e(FailureKind::RateLimited, Some(7)),
            ],
        );
        match retry {
            Err(DeliveryError::Transient { retry_after, message }) => {
                assert_eq!(retry_after, Some(std::time::Duration::from_secs(7)));
                assert_eq!(message.matches("device …x").count(), 3, "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
