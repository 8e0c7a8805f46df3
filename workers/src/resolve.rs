//! What a notification sent by reference becomes at send time: the user's address for the
//! channel, their wishes (suppress, defer until quiet hours end), and the template rendered in
//! their locale and time zone. Reads only the process's local copies of the users and
//! templates buckets (redb, see `herald_shared::mirror`), never the network, so a worker cut
//! off from its hub keeps rendering.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_shared::{
    Channel, Intent,
    intent::Content,
    mirror::Mirror,
    preferences::{self, Decision, Rule},
    template_store::{TemplateStore, Version},
    templates::{Audience, Renderer, canonical_locale, fallbacks},
    users::{User, parse_time_zone, user_key},
};

use crate::DeliveryError;

/// What to do with an intent.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    /// Send this (addresses filled in, content rendered).
    Send(Box<Intent>),
    /// The user opted out; the rule that decided.
    Suppress(String),
    /// The user's quiet hours: send at `until`.
    Defer { until: DateTime<Utc>, why: String },
    /// Nothing to send it to, or nothing to say on this channel.
    Skip(String),
    /// Over the recipient's limit (decided by the worker's [`herald_shared::throttle::Throttle`]
    /// after resolving, never by the resolver): the limit.
    Throttle(String),
}

/// Resolves intents from local copies of users and templates.
pub struct Resolver {
    users: Arc<Mirror>,
    templates: Arc<Mirror>,
    renderer: Renderer,
    default_locale: String,
    required: Vec<String>,
}

impl Resolver {
    pub fn new(
        users: Arc<Mirror>,
        templates: Arc<Mirror>,
        default_locale: String,
        required: Vec<String>,
    ) -> Resolver {
        Resolver { users, templates, renderer: Renderer::new(), default_locale, required }
    }

    /// What `intent` becomes now. Errors: transient when a copy may simply not have caught up
    /// (a user or template created a moment ago), permanent when the data cannot fit the
    /// template.
    pub fn resolve(&self, intent: &Intent, now: DateTime<Utc>) -> Result<Resolved, DeliveryError> {
        if intent.recipient.user_id.is_none() && intent.template.is_none() {
            return Ok(Resolved::Send(Box::new(intent.clone())));
        }
        let channel = intent.channel();
        let tenant = intent.tenant.as_deref().ok_or_else(|| DeliveryError::Permanent {
            message: "a notification by user or template needs a tenant".into(),
        })?;
        let user = match &intent.recipient.user_id {
            Some(id) => Some(self.user(tenant, id)?),
            None => None,
        };
        let time_zone = user
            .as_ref()
            .and_then(|u| u.fields.time_zone.as_deref())
            .and_then(parse_time_zone)
            .unwrap_or(chrono_tz::UTC);
        if let Some(u) = &user {
            let prefs = &u.fields.preferences;
            match preferences::decide(
                prefs,
                time_zone,
                &self.required,
                channel,
                intent.category.as_deref(),
                intent.priority,
                now,
            ) {
                Decision::Allowed => {}
                Decision::Suppressed(rule) => return Ok(Resolved::Suppress(describe(&rule))),
                Decision::Deferred { until } => {
                    return Ok(Resolved::Defer {
                        until,
                        why: format!(
                            "quiet hours of user {} until {}",
                            u.id,
                            until.with_timezone(&time_zone)
                        ),
                    });
                }
            }
        }
        let mut out = intent.clone();
        if let Some(u) = &user
            && let Err(why) = fill_address(&mut out, u)
        {
            return Ok(Resolved::Skip(why));
        }
        if let Some(t) = &intent.template {
            let wanted = t
                .locale
                .clone()
                .or_else(|| user.as_ref().and_then(|u| u.fields.locale.clone()))
                .unwrap_or_else(|| self.default_locale.clone());
            // Templates are stored under canonical tags (`fr-CA`); a user's `fr-ca` finds them.
            let wanted = canonical_locale(&wanted).unwrap_or(wanted);
            let version = self.template(tenant, &t.code, &wanted)?;
            if !version.parts.covers(channel) {
                return Ok(Resolved::Skip(format!(
                    "template {} ({}) has no {channel} part",
                    version.code, version.locale
                )));
            }
            let mut data = serde_json::Value::Object(intent.data.clone());
            if let (Some(u), Some(map)) = (&user, data.as_object_mut()) {
                // The user is there for the template unless the data says otherwise.
                map.entry("user").or_insert_with(|| {
                    serde_json::json!({"id": u.id, "name": u.fields.name, "attributes": u.fields.attributes})
                });
            }
            let audience = Audience { locale: wanted, time_zone };
            let rendered = self.renderer.render(&version.parts, &data, &audience).map_err(|e| {
                DeliveryError::Permanent {
                    message: format!("template {} v{}: {e}", version.code, version.version),
                }
            })?;
            if channel == Channel::Push {
                // What the device receives as the message's data (FCM's string map, APNs'
                // custom keys): the template's rendered `push_data`, never the variables the
                // template was filled with.
                out.data = rendered
                    .push_data
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect();
            }
            out.content = content_for(channel, rendered);
        }
        Ok(Resolved::Send(Box::new(out)))
    }

    fn user(&self, tenant: &str, id: &str) -> Result<User, DeliveryError> {
        let found = self.users.get(&user_key(tenant, id)).map_err(|e| DeliveryError::Transient {
            message: format!("reading the users copy: {e}"),
            retry_after: None,
        })?;
        let (_, bytes) = found.ok_or_else(|| DeliveryError::Transient {
            // The copy may not have caught up with a user created a moment ago.
            message: format!("no user {id:?} (yet) in the local copy"),
            retry_after: None,
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| DeliveryError::Permanent { message: format!("user {id:?} is unreadable: {e}") })
    }

    fn template(&self, tenant: &str, code: &str, locale: &str) -> Result<Version, DeliveryError> {
        for candidate in fallbacks(locale, &self.default_locale) {
            let found = self.templates.get(&TemplateStore::key(tenant, code, &candidate)).map_err(|e| {
                DeliveryError::Transient {
                    message: format!("reading the templates copy: {e}"),
                    retry_after: None,
                }
            })?;
            if let Some((_, bytes)) = found {
                return serde_json::from_slice(&bytes).map_err(|e| DeliveryError::Permanent {
                    message: format!("template {code:?} is unreadable: {e}"),
                });
            }
        }
        Err(DeliveryError::Transient {
            message: format!("no template {code:?} for {locale:?} or its fallbacks (yet) in the local copy"),
            retry_after: None,
        })
    }
}

/// A preference rule in words, for the notification's record.
fn describe(rule: &Rule) -> String {
    match rule {
        Rule::ChannelOff { channel } => format!("the user switched {channel} off"),
        Rule::CategoryOff { category, channel } => format!("the user muted {category} on {channel}"),
    }
}

/// Fills in the channel's address from the user unless the intent carries one; or says why
/// there is none.
fn fill_address(intent: &mut Intent, user: &User) -> Result<(), String> {
    let channel = intent.channel();
    let r = &mut intent.recipient;
    let f = &user.fields;
    let missing = |what: &str| format!("user {} has no {what}", user.id);
    match channel {
        Channel::Webhook => {
            if r.webhook_url.is_none() {
                r.webhook_url = Some(f.webhook_url.clone().ok_or_else(|| missing("webhook_url"))?);
            }
        }
        Channel::Email => {
            if r.email.is_none() {
                r.email = Some(f.email.clone().ok_or_else(|| missing("email"))?);
            }
        }
        Channel::Sms => {
            if r.phone.is_none() {
                r.phone = Some(f.phone.clone().ok_or_else(|| missing("phone"))?);
            }
        }
        Channel::Push => {
            if r.push_tokens.is_empty() {
                // APNs devices as `apns:<token>`, so the push sender knows their platform.
                r.push_tokens =
                    f.devices.iter().map(|d| crate::push::token_for(d.platform, &d.token)).collect();
                if r.push_tokens.is_empty() {
                    return Err(missing("push device"));
                }
            }
        }
        // The in-app inbox needs only the user.
        Channel::Inapp => {}
    }
    Ok(())
}

/// The rendered parts a channel's provider receives, as the intent's content.
fn content_for(channel: Channel, r: herald_shared::templates::Rendered) -> Content {
    match channel {
        Channel::Email => Content {
            subject: r.email_subject,
            body: r.email_text,
            html: r.email_html,
            from: r.email_from,
            reply_to: r.email_reply_to,
            title: None,
        },
        Channel::Sms => Content { body: r.sms_text, ..Content::default() },
        Channel::Push => Content { title: r.push_title, body: r.push_body, ..Content::default() },
        Channel::Webhook => Content { title: r.webhook_title, body: r.webhook_body, ..Content::default() },
        Channel::Inapp => Content { title: r.inapp_title, body: r.inapp_body, ..Content::default() },
    }
}
