//! `herald seed` (and `herald up --seed`): example users and templates, so that a newcomer's
//! first notification by `user_id` and `template` works. Writing them again replaces the users
//! and adds a template version only where the parts changed.

use herald_shared::{
    templates::Parts,
    topology::Topology,
    users::{Precondition, UserFields},
};
use serde_json::json;

/// The tenant `herald token` and `herald up` tokens act for by default (their `sub`).
pub const TENANT: &str = "dev";

/// What was written.
#[derive(Debug, Default)]
pub struct Seeded {
    pub users: Vec<String>,
    pub templates: Vec<String>,
}

/// Writes the example users and templates of `tenant`.
pub async fn seed(topology: &Topology, tenant: &str) -> anyhow::Result<Seeded> {
    let mut seeded = Seeded::default();
    for (id, user) in users() {
        let fields: UserFields = serde_json::from_value(user)?;
        topology.users.put(tenant, id, fields, Precondition::None).await?;
        seeded.users.push(id.to_owned());
    }
    for (code, locale, parts) in templates() {
        let parts: Parts = serde_json::from_value(parts)?;
        parts.check()?;
        let latest = topology.templates.latest(tenant, code, locale).await?;
        if latest.is_none_or(|(v, _)| v.parts != parts) {
            topology.templates.put(tenant, code, locale, parts, "herald seed", None, None).await?;
        }
        seeded.templates.push(format!("{code}/{locale}"));
    }
    Ok(seeded)
}

fn users() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "42",
            json!({
                "name": "Ada Lovelace",
                "email": "ada@example.com",
                "phone": "+441632960042",
                "webhook_url": "https://example.com/hooks/ada",
                "locale": "en-GB",
                "time_zone": "Europe/London",
                "preferences": {
                    "categories": {"marketing": {"email": false, "webhook": false}},
                    "fallback": ["push", "webhook", "email"]
                },
                "attributes": {"plan": "pro"}
            }),
        ),
        (
            "43",
            json!({
                "name": "Zoé Tremblay",
                "email": "zoe@example.com",
                "webhook_url": "https://example.com/hooks/zoe",
                "locale": "fr-CA",
                "time_zone": "America/Montreal",
                "preferences": {"quiet_hours": {"start": "22:00", "end": "07:00"}}
            }),
        ),
    ]
}

fn templates() -> Vec<(&'static str, &'static str, serde_json::Value)> {
    vec![
        (
            "order_shipped",
            "en",
            json!({
                "email_subject": "Your order {{order}} has shipped",
                "email_text": "Hi {{default user.name \"there\"}},\n\nOrder {{order}} ({{number total 2}}) left our warehouse on {{date shipped_at \"long\"}}.",
                "email_html": "<p>Hi {{default user.name \"there\"}},</p><p>Order <b>{{order}}</b> ({{number total 2}}) left our warehouse on {{date shipped_at \"long\"}}.</p>",
                "sms_text": "Order {{order}} shipped {{date shipped_at \"short\"}}.",
                "push_title": "Order {{order}} shipped",
                "push_body": "Arriving soon, {{default user.name \"there\"}}.",
                "webhook_title": "Order {{order}} shipped",
                "webhook_body": "Order {{order}} ({{number total 2}}) shipped on {{date shipped_at \"long\"}}.",
                "inapp_title": "Order {{order}} shipped",
                "inapp_body": "It left our warehouse on {{date shipped_at \"long\"}}."
            }),
        ),
        (
            "order_shipped",
            "fr",
            json!({
                "email_subject": "Votre commande {{order}} est expédiée",
                "email_text": "Bonjour {{default user.name \"\"}},\n\nLa commande {{order}} ({{number total 2}}) a quitté notre entrepôt le {{date shipped_at \"long\"}}.",
                "sms_text": "Commande {{order}} expédiée le {{date shipped_at \"short\"}}.",
                "push_title": "Commande {{order}} expédiée",
                "push_body": "Elle arrive bientôt.",
                "webhook_title": "Commande {{order}} expédiée",
                "webhook_body": "Commande {{order}} ({{number total 2}}) expédiée le {{date shipped_at \"long\"}}.",
                "inapp_title": "Commande {{order}} expédiée",
                "inapp_body": "Elle a quitté notre entrepôt le {{date shipped_at \"long\"}}."
            }),
        ),
        (
            "welcome",
            "en",
            json!({
                "email_subject": "Welcome, {{default user.name \"friend\"}}",
                "email_text": "Welcome to {{product}}.",
                "webhook_title": "Welcome",
                "webhook_body": "Welcome to {{product}}, {{default user.name \"friend\"}}.",
                "inapp_title": "Welcome",
                "inapp_body": "Welcome to {{product}}."
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_examples_are_valid() {
        for (id, user) in users() {
            let fields: UserFields = serde_json::from_value(user).unwrap();
            fields.validate(&[]).unwrap_or_else(|e| panic!("user {id}: {e}"));
        }
        for (code, locale, parts) in templates() {
            let parts: Parts = serde_json::from_value(parts).unwrap();
            parts.check().unwrap_or_else(|e| panic!("{code}/{locale}: {e}"));
        }
    }
}
