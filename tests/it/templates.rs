//! `/v1/templates` against a real nats-server: versions, rollback, conditional writes,
//! locale fallback, previews, tenants and hostile input.

use std::time::Duration;

use herald_shared::auth;
use poem::http::StatusCode;
use serde_json::{Value, json};

use crate::support::Stack;

/// A token of `tenant` that may read and write templates.
fn token(stack: &Stack, tenant: &str, sub: &str) -> String {
    auth::mint(
        &stack.config.jwt_secret,
        sub,
        Some(tenant),
        &[auth::SCOPE_TEMPLATES_READ, auth::SCOPE_TEMPLATES_WRITE],
        Duration::from_secs(600),
    )
}

/// One request; answers the status, the JSON body and the ETag.
async fn call(
    stack: &Stack,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
    if_match: Option<&str>,
) -> (StatusCode, Value, Option<String>) {
    let url = format!("{}{path}", stack.base);
    let mut req = match method {
        "GET" => stack.http.get(url),
        "PUT" => stack.http.put(url),
        "POST" => stack.http.post(url),
        "DELETE" => stack.http.delete(url),
        _ => unreachable!(),
    }
    .bearer_auth(token);
    if let Some(b) = body {
        req = req.header("Content-Type", "application/json").body(b.to_string());
    }
    if let Some(m) = if_match {
        req = req.header("If-Match", m);
    }
    let resp = req.send().await.unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let etag = resp.headers().get("etag").map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), etag)
}

fn shipped(word: &str) -> Value {
    json!({
        "email_subject": format!("{word} {{{{order}}}}"),
        "email_html": "<p>Hi {{name}}, order {{order}} ships {{date when \"long\"}}</p>",
        "webhook_title": word,
        "webhook_body": "Order {{order}}: {{number total 2}}"
    })
}

#[tokio::test]
async fn templates_are_versioned_with_author_and_can_be_rolled_back() {
    let stack = Stack::start().await;
    let alice = token(&stack, "acme", "alice");
    let bob = token(&stack, "acme", "bob");
    let path = "/v1/templates/order_shipped/en";

    let (status, v1, etag1) = call(&stack, "PUT", path, &alice, Some(shipped("Shipped")), None).await;
    assert_eq!(status, StatusCode::OK, "{v1}");
    assert_eq!((v1["version"].as_u64(), v1["author"].as_str()), (Some(1), Some("alice")));
    let etag1 = etag1.expect("an ETag");
    let (status, v2, _) = call(&stack, "PUT", path, &bob, Some(shipped("On its way")), Some(&etag1)).await;
    assert_eq!(status, StatusCode::OK, "{v2}");
    assert_eq!((v2["version"].as_u64(), v2["author"].as_str()), (Some(2), Some("bob")));

    // A write on the first ETag is stale now, and changes nothing.
    let (status, stale, _) = call(&stack, "PUT", path, &alice, Some(shipped("Lost")), Some(&etag1)).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{stale}");
    assert_eq!(stale["code"], "precondition_failed");
    let (_, latest, _) = call(&stack, "GET", path, &alice, None, None).await;
    assert_eq!(latest["parts"]["webhook_title"], "On its way");
    assert_eq!(latest["version"], 2);

    let (_, old, _) = call(&stack, "GET", &format!("{path}?version=1"), &alice, None, None).await;
    assert_eq!(old["parts"]["webhook_title"], "Shipped");
    let (status, back, _) =
        call(&stack, "POST", &format!("{path}/rollback"), &bob, Some(json!({"version": 1})), None).await;
    assert_eq!(status, StatusCode::OK, "{back}");
    assert_eq!((back["version"].as_u64(), back["restores"].as_u64()), (Some(3), Some(1)));
    assert_eq!(back["parts"], old["parts"]);
    let (_, history, _) = call(&stack, "GET", &format!("{path}/versions"), &alice, None, None).await;
    let rows: Vec<(u64, &str)> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["author"].as_str().unwrap()))
        .collect();
    assert_eq!(rows, [(1, "alice"), (2, "bob"), (3, "bob")]);
    let (status, missing, _) =
        call(&stack, "POST", &format!("{path}/rollback"), &bob, Some(json!({"version": 9})), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");

    // Deleted, then written again: numbering goes on.
    let (status, _, _) = call(&stack, "DELETE", path, &alice, None, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = call(&stack, "GET", path, &alice, None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(&stack, "DELETE", path, &alice, None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, again, _) = call(&stack, "PUT", path, &alice, Some(shipped("Back")), None).await;
    assert_eq!(again["version"], 4);
    let (_, list, _) = call(&stack, "GET", "/v1/templates", &alice, None, None).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["code"], "order_shipped");
}

#[tokio::test]
async fn of_two_writers_on_the_same_etag_exactly_one_wins() {
    let stack = Stack::start().await;
    let t = token(&stack, "acme", "alice");
    let path = "/v1/templates/race/en";
    let (_, _, etag) = call(&stack, "PUT", path, &t, Some(shipped("v1")), None).await;
    let etag = etag.unwrap();
    let (a, b) = tokio::join!(
        call(&stack, "PUT", path, &t, Some(shipped("a")), Some(&etag)),
        call(&stack, "PUT", path, &t, Some(shipped("b")), Some(&etag)),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::PRECONDITION_FAILED]);
    let (_, latest, _) = call(&stack, "GET", path, &t, None, None).await;
    assert_eq!(latest["version"], 2);
    let winner = if a.0 == StatusCode::OK { "a" } else { "b" };
    assert_eq!(latest["parts"]["webhook_title"], winner);
}

#[tokio::test]
async fn previews_fall_back_by_locale_and_render_in_the_recipients_time_zone() {
    let stack = Stack::start().await;
    let t = token(&stack, "acme", "alice");
    call(&stack, "PUT", "/v1/templates/order_shipped/en", &t, Some(shipped("Shipped")), None).await;
    let fr = json!({
        "email_html": "<p>Bonjour {{name}}, commande {{order}} expédiée le {{date when \"long\"}}</p>",
        "webhook_title": "Expédiée",
        "webhook_body": "Commande {{order}} : {{number total 2}}"
    });
    call(&stack, "PUT", "/v1/templates/order_shipped/fr", &t, Some(fr), None).await;
    let data = json!({"name": "<Zoé>", "order": 1234, "total": 1234.5, "when": "2026-11-22T23:30:00Z"});
    let render = |locale: &'static str, tz: &'static str| {
        let (stack, t, data) = (&stack, t.clone(), data.clone());
        async move {
            let (status, out, _) = call(
                stack,
                "POST",
                "/v1/templates/order_shipped/render",
                &t,
                Some(json!({"locale": locale, "time_zone": tz, "data": data})),
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{out}");
            out
        }
    };
    let quebec = render("fr-CA", "America/Montreal").await;
    assert_eq!(quebec["locale"], "fr", "fr-CA falls back to fr");
    assert_eq!(
        quebec["parts"]["webhook_body"], "Commande 1234 : 1\u{a0}234,50",
        "fr-CA groups with a no-break space"
    );
    assert_eq!(
        quebec["parts"]["email_html"],
        "<p>Bonjour &lt;Zoé&gt;, commande 1234 expédiée le 22 novembre 2026</p>",
        "HTML parts escape; the date is the 22nd in Montreal"
    );
    let paris = render("fr-FR", "Europe/Paris").await;
    assert!(paris["parts"]["email_html"].as_str().unwrap().contains("23 novembre 2026"), "{paris}");
    let german = render("de-DE", "Europe/Berlin").await;
    assert_eq!(german["locale"], "en", "no German: the default locale");
    assert_eq!(
        german["parts"]["webhook_body"], "Order 1234: 1.234,50",
        "numbers still in the recipient's locale"
    );
    assert_eq!(german["parts"]["email_subject"], "Shipped 1234", "text parts do not escape");

    // Data that lacks a variable is named; so are bad locales and time zones.
    let bad = |body: Value, status: StatusCode, field: &'static str| {
        let (stack, t) = (&stack, t.clone());
        async move {
            let (got, out, _) =
                call(stack, "POST", "/v1/templates/order_shipped/render", &t, Some(body), None).await;
            assert_eq!(got, status, "{out}");
            assert_eq!(out["field"], field, "{out}");
            out
        }
    };
    let out = bad(json!({"data": {"order": 1}}), StatusCode::UNPROCESSABLE_ENTITY, "parts.email_html").await;
    assert!(out["message"].as_str().unwrap().contains("no `name`"), "{out}");
    bad(json!({"locale": "français"}), StatusCode::UNPROCESSABLE_ENTITY, "locale").await;
    bad(json!({"time_zone": "Mars/Olympus"}), StatusCode::UNPROCESSABLE_ENTITY, "time_zone").await;
    bad(json!({"data": {"__herald": 1}}), StatusCode::UNPROCESSABLE_ENTITY, "data").await;
    bad(json!({"colour": "red"}), StatusCode::BAD_REQUEST, "colour").await;
    let (status, _, _) = call(&stack, "POST", "/v1/templates/nope/render", &t, Some(json!({})), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn broken_templates_are_refused_when_written_with_the_place_named() {
    let stack = Stack::start().await;
    let t = token(&stack, "acme", "alice");
    let put = |parts: Value| {
        let (stack, t) = (&stack, t.clone());
        async move { call(stack, "PUT", "/v1/templates/broken/en", &t, Some(parts), None).await }
    };
    let (status, err, _) = put(json!({"email_text": "Hello\n{{#if vip}}VIP"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["field"], "parts.email_text");
    assert!(err["message"].as_str().unwrap().contains("line 2 column"), "{err}");
    let (status, err, _) = put(json!({"sms_text": "{{shout name}}"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err["message"].as_str().unwrap().contains("unknown helper `shout`"), "{err}");
    let (status, err, _) = put(json!({"sms_text": "{{> header}} hi"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err["message"].as_str().unwrap().contains("partials are not supported"), "{err}");
    let (status, err, _) = put(json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (status, err, _) = put(json!({"sms_text": 5})).await;
    assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("sms_text")), "{err}");
    let (status, err, _) = put(json!({"sms_text": "x".repeat(20_000)})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    let many: serde_json::Map<String, Value> = (0..40).map(|i| (format!("k{i}"), json!("v"))).collect();
    let (status, err, _) = put(json!({"push_title": "t", "push_data": many})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    for path in ["/v1/templates/bad.code/en", "/v1/templates/ok/not-a-locale!", "/v1/templates/ok/english"] {
        let (status, err, _) = call(&stack, "PUT", path, &t, Some(shipped("x")), None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {err}");
    }
    let (status, err, _) =
        call(&stack, "PUT", "/v1/templates/ok/en", &t, Some(shipped("x")), Some("yesterday")).await;
    assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("If-Match")), "{err}");
    // Nothing was stored by any of it.
    let (_, list, _) = call(&stack, "GET", "/v1/templates", &t, None, None).await;
    assert_eq!(list, json!([]));
    // Scopes.
    let (status, _, _) = call(&stack, "GET", "/v1/templates", &stack.token, None, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn one_tenant_never_sees_another_tenants_templates() {
    let stack = Stack::start().await;
    let acme = token(&stack, "acme", "alice");
    let globex = token(&stack, "globex", "gina");
    call(&stack, "PUT", "/v1/templates/welcome/en", &acme, Some(shipped("Acme")), None).await;
    let (status, _, _) = call(&stack, "GET", "/v1/templates/welcome/en", &globex, None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list, _) = call(&stack, "GET", "/v1/templates", &globex, None, None).await;
    assert_eq!(list, json!([]));
    let (status, _, _) =
        call(&stack, "POST", "/v1/templates/welcome/render", &globex, Some(json!({})), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The same code in both tenants: each sees its own.
    call(&stack, "PUT", "/v1/templates/welcome/en", &globex, Some(shipped("Globex")), None).await;
    let (_, a, _) = call(&stack, "GET", "/v1/templates/welcome/en", &acme, None, None).await;
    let (_, g, _) = call(&stack, "GET", "/v1/templates/welcome/en", &globex, None, None).await;
    assert_eq!((a["parts"]["webhook_title"].as_str(), a["version"].as_u64()), (Some("Acme"), Some(1)));
    assert_eq!((g["parts"]["webhook_title"].as_str(), g["version"].as_u64()), (Some("Globex"), Some(1)));
    let (status, _, _) = call(&stack, "DELETE", "/v1/templates/welcome/en", &globex, None, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = call(&stack, "GET", "/v1/templates/welcome/en", &acme, None, None).await;
    assert_eq!(status, StatusCode::OK, "deleting globex's left acme's");
}
