//! The one registry of channels: what each channel this build delivers on is made of. The
//! gateway accepts the channels of `HERALD_CHANNELS` (by default webhook and every channel
//! whose provider is configured, see `Providers::configured`), and this is where each gets its
//! providers.
//!
//! | channel | address | providers, in order |
//! |---|---|---|
//! | email | `recipient.email` | `smtp`, `smtp-2`, … (`HERALD_SMTP_URLS`) |
//! | sms | `recipient.phone` | `twilio` |
//! | push | each device token | `fcm` or `apns`, by the device's platform |
//! | webhook | `recipient.webhook_url` | `webhook` (a breaker per receiving host) |
//! | inapp | `recipient.user_id` | none: the item is stored in the user's inbox (HERALD_INBOX) |

use std::sync::Arc;

use herald_shared::{Channel, Config, Intent, topology::Topology};

use crate::{
    Deliver, Delivery, DeliveryError,
    apns::ApnsProvider,
    email::SmtpProvider,
    fcm::FcmProvider,
    metrics::WorkerMetrics,
    provider::{Chain, Provider},
    push::PushSender,
    sms::TwilioProvider,
    webhook::WebhookSender,
};

/// A channel's sender.
pub enum Sender {
    /// One address per intent, sent through a chain of providers.
    Addressed(Addressed),
    /// Every device of the recipient, each through its platform's chain.
    Push(Box<PushSender>),
    /// The recipient's in-app inbox.
    Inbox(Box<InboxSender>),
}

impl Deliver for Sender {
    async fn deliver<'a>(&'a self, intent: &'a Intent) -> Delivery {
        match self {
            Sender::Addressed(a) => a.deliver(intent).await,
            Sender::Push(p) => p.deliver(intent).await,
            Sender::Inbox(i) => i.deliver(intent).await,
        }
    }
}

/// Builds the sender of `channel` from the configuration.
pub fn build(
    channel: Channel,
    config: &Config,
    topology: &Topology,
    metrics: Arc<WorkerMetrics>,
) -> anyhow::Result<Sender> {
    let chain = |providers: Vec<Arc<dyn Provider>>| {
        for p in &providers {
            metrics.declare(channel, p.name());
        }
        Chain::new(channel, providers, config, metrics.clone())
    };
    match channel {
        Channel::Webhook => {
            let webhook: Arc<dyn Provider> = Arc::new(WebhookSender::new(config)?);
            Ok(Sender::Addressed(Addressed { chain: chain(vec![webhook]), channel }))
        }
        Channel::Sms => {
            let settings = config.providers.twilio.as_ref().ok_or_else(|| {
                anyhow::anyhow!("the sms channel needs Twilio: set HERALD_TWILIO_ACCOUNT_SID and the other HERALD_TWILIO_* variables")
            })?;
            let twilio: Arc<dyn Provider> = Arc::new(TwilioProvider::new(settings, config)?);
            Ok(Sender::Addressed(Addressed { chain: chain(vec![twilio]), channel }))
        }
        Channel::Push => {
            let fcm = match &config.providers.fcm {
                Some(settings) => {
                    let fcm: Arc<dyn Provider> = Arc::new(FcmProvider::new(settings, config)?);
                    Some(chain(vec![fcm]))
                }
                None => None,
            };
            let apns = match &config.providers.apns {
                Some(settings) => {
                    let apns: Arc<dyn Provider> = Arc::new(ApnsProvider::new(settings, config)?);
                    Some(chain(vec![apns]))
                }
                None => None,
            };
            if fcm.is_none() && apns.is_none() {
                anyhow::bail!(
                    "the push channel needs FCM or APNs: set HERALD_FCM_PROJECT_ID or HERALD_APNS_KEY and their companions"
                );
            }
            Ok(Sender::Push(Box::new(PushSender { fcm, apns, users: topology.users.clone() })))
        }
        Channel::Email => {
            let settings = config
                .providers
                .smtp
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("email needs HERALD_SMTP_URLS and HERALD_EMAIL_FROM"))?;
            let providers = SmtpProvider::all(settings, config)?
                .into_iter()
                .map(|p| Arc::new(p) as Arc<dyn Provider>)
                .collect();
            Ok(Sender::Addressed(Addressed { chain: chain(providers), channel }))
        }
        Channel::Inapp => Ok(Sender::Inbox(Box::new(InboxSender { inbox: topology.inbox.clone() }))),
    }
}

/// The in-app channel: delivering is storing the rendered item in the user's inbox, where the
/// inbox API and its live stream serve it. The call is recorded like a provider's, as `inbox`,
/// with the item's sequence as its id.
pub struct InboxSender {
    inbox: herald_shared::inbox::Inbox,
}

impl Deliver for InboxSender {
    async fn deliver<'a>(&'a self, intent: &'a Intent) -> Delivery {
        use herald_shared::inbox::{Item, Owner};
        let Some(user) = intent.recipient.user_id.as_deref() else {
            return Delivery::failed(DeliveryError::Permanent {
                message: "the inapp channel needs recipient.user_id".into(),
            });
        };
        let item = Item {
            id: intent.id.clone(),
            title: intent.content.title.clone(),
            body: intent.content.body.clone(),
            data: intent.data.clone(),
            category: intent.category.clone(),
            created_at: intent.created_at.unwrap_or_else(chrono::Utc::now),
        };
        let started = std::time::Instant::now();
        let result = self.inbox.store(Owner { tenant: intent.tenant.as_deref(), user }, &item).await;
        let mut call = herald_shared::state::ProviderCall {
            provider: "inbox".into(),
            provider_message_id: None,
            latency_ms: started.elapsed().as_millis() as u64,
            failure: None,
            error: None,
            device: None,
            detail: None,
        };
        let result = match result {
            Ok(sequence) => {
                call.provider_message_id = Some(sequence.to_string());
                Ok(())
            }
            Err(e) => {
                call.failure = Some(herald_shared::state::FailureKind::Unavailable);
                call.error = Some(e.to_string());
                Err(DeliveryError::Transient { message: e.to_string(), retry_after: None })
            }
        };
        Delivery { result, calls: vec![call] }
    }
}

/// A channel with one address per intent.
pub struct Addressed {
    chain: Chain,
    channel: Channel,
}

/// The address `intent` has for `channel`, if any.
pub fn address(intent: &Intent, channel: Channel) -> Option<&str> {
    let r = &intent.recipient;
    match channel {
        Channel::Email => r.email.as_deref(),
        Channel::Sms => r.phone.as_deref(),
        Channel::Webhook => r.webhook_url.as_deref(),
        Channel::Push | Channel::Inapp => None,
    }
}

impl Deliver for Addressed {
    async fn deliver<'a>(&'a self, intent: &'a Intent) -> Delivery {
        let Some(to) = address(intent, self.channel) else {
            return Delivery::failed(DeliveryError::Permanent {
                message: format!("recipient has no address for {}", self.channel),
            });
        };
        let (result, calls) = self.chain.send(intent, to, None).await;
        Delivery { result: result.map(|_| ()).map_err(DeliveryError::from), calls }
    }
}
