//! The `herald` binary itself.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use crate::support::{eventually, http_client};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

#[test]
fn token_prints_a_jwt_signed_with_the_configured_secret() {
    let out = Command::new(HERALD)
        .args(["token", "--tenant", "acme", "--ttl", "5m"])
        .env("HERALD_JWT_SECRET", "cli-secret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let claims = herald_shared::auth::verify("cli-secret", token.trim()).unwrap();
    assert_eq!(claims.tenant.as_deref(), Some("acme"));
    assert!(claims.allows(herald_shared::auth::SCOPE_SEND));
    assert!(herald_shared::auth::verify("other", token.trim()).is_err());
}

#[test]
fn token_for_an_end_user_carries_the_user_and_only_the_inbox_scope() {
    let mint = |args: &[&str]| {
        Command::new(HERALD).arg("token").args(args).env("HERALD_JWT_SECRET", "cli-secret").output().unwrap()
    };
    let out = mint(&["--tenant", "acme", "--user", "42", "--scopes", "inbox"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let claims =
        herald_shared::auth::verify("cli-secret", String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!((claims.user.as_deref(), claims.scope.as_str()), (Some("42"), "inbox"));
    assert!(!claims.allows(herald_shared::auth::SCOPE_SEND));
    for (args, says) in [
        (&["--user", "42", "--scopes", "notifications:write"][..], "only have the scope `inbox`"),
        (&["--user", "a.b"][..], "not a user id"),
        (&["--user", "42", "--ttl", "200h"][..], "at most 7d"),
    ] {
        let out = mint(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn bad_configuration_is_refused_with_the_variable_named() {
    let out = Command::new(HERALD).args(["token"]).env("HERALD_MAX_ATTEMPTS", "zero").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HERALD_MAX_ATTEMPTS"), "{err}");
}

#[tokio::test]
async fn up_runs_the_whole_stack_and_ctrl_c_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let port = herald_shared::nats_server::free_port();
    let mut child = Command::new(HERALD)
        .args(["up", "--seed", "--http-addr", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .env_remove("HERALD_NATS_URL")
        .env("HERALD_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs =
        std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let banner = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains("ctrl-c stops everything");
            lines.push(line);
            if done {
                break;
            }
        }
        lines.join("\n")
    });
    let banner = tokio::time::timeout(Duration::from_secs(30), banner).await.expect("no banner").unwrap();
    assert!(banner.contains(&format!("http://127.0.0.1:{port}/docs")), "{banner}");
    assert!(banner.contains("curl") && banner.contains("nats --server"), "{banner}");

    // The printed curl works as printed (its token included).
    let token = banner.split("Bearer ").nth(1).unwrap().split('\'').next().unwrap().to_owned();
    let http = http_client();
    let resp = http
        .post(format!("http://127.0.0.1:{port}/v1/notifications"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"recipient": {"webhook_url": "http://127.0.0.1:9/x"}, "content": {"body": "hi"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // With --seed, the notification by user and template it prints is accepted too.
    assert!(banner.contains("\"user_id\":\"42\""), "{banner}");
    let resp = http
        .post(format!("http://127.0.0.1:{port}/v1/notifications"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"recipient": {"user_id": "42"}, "template": "order_shipped",
            "data": {"order": 1, "total": 2, "shipped_at": "2026-11-22T10:00:00Z"}}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(status, 202, "{}", resp.text().await.unwrap());
    // The printed in-app curl lands in user 42's inbox, where the printed page (with that
    // user's token) reads it.
    let page =
        banner.split_whitespace().find(|w| w.contains("/inbox#user=42&token=")).expect("the inbox address");
    let user_token = page.split("token=").nth(1).unwrap().to_owned();
    let inbox_page = http.get(page.split('#').next().unwrap()).send().await.unwrap();
    assert_eq!(inbox_page.status(), 200);
    assert!(inbox_page.text().await.unwrap().contains("EventSource"));
    assert!(banner.contains("\"channels\":[\"inapp\"]"), "{banner}");
    let resp = http
        .post(format!("http://127.0.0.1:{port}/v1/notifications"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"recipient": {"user_id": "42"}, "channels": ["inapp"], "template": "order_shipped",
            "data": {"order": 1234, "total": 59.9, "shipped_at": "2026-11-22T10:00:00Z"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let item =
        crate::support::eventually(Duration::from_secs(15), "the in-app item in user 42's inbox", || {
            let (http, user_token) = (http.clone(), user_token.clone());
            async move {
                let page: serde_json::Value = http
                    .get(format!("http://127.0.0.1:{port}/v1/users/42/inbox"))
                    .bearer_auth(user_token)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                page["items"].as_array()?.iter().find(|i| i["title"] == "Order 1234 shipped").cloned()
            }
        })
        .await;
    assert_eq!(item["read"], false);
    // Every local copy of the process (the gateway's users, the worker's users and templates)
    // says how far behind it is.
    // The workers open theirs as they start, which may be just after the banner.
    let ready = crate::support::eventually(Duration::from_secs(10), "every local copy on /ready", || {
        let http = http.clone();
        async move {
            let ready: serde_json::Value =
                http.get(format!("http://127.0.0.1:{port}/ready")).send().await.ok()?.json().await.ok()?;
            let copies: Vec<String> = ready["copies_lag"].as_object()?.keys().cloned().collect();
            let count = |prefix: &str| copies.iter().filter(|c| c.starts_with(prefix)).count();
            (count("users-") == 2 && count("templates-") == 1).then_some(ready)
        }
    })
    .await;
    assert_eq!(ready["status"], "ready", "{ready}");
    let metrics =
        http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("herald_gateway_copy_lag{copy=\"templates-")), "{metrics}");
    // The workers' provider metrics are on the same page.
    assert!(
        metrics.contains(r#"herald_provider_calls_total{channel="webhook",provider="webhook"}"#),
        "{metrics}"
    );

    // The child nats-server is running with its store under the data dir.
    let nats_pid = std::fs::read_dir(dir.path().join("nats")).is_ok();
    assert!(nats_pid, "no nats store under the data dir");
    let nats_url = banner.split("NATS:").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let nats_port: u16 = nats_url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_ok());

    let status = Command::new("kill").args(["-INT", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = eventually(Duration::from_secs(15), "herald up to exit", || {
        let r = child.0.try_wait().unwrap();
        async move { r }
    })
    .await;
    assert!(exit.success(), "herald up exited with {exit}");
    // Logs are JSON lines, and the line about the accepted notification carries its ids.
    let logs = logs.join().unwrap();
    let parsed: Vec<serde_json::Value> =
        logs.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    let accepted = parsed.iter().find(|l| l["message"] == "accepted").expect("an `accepted` log line");
    assert!(accepted["notification_id"].is_string() && accepted["correlation_id"].is_string(), "{accepted}");
    // Its nats-server child is gone too.
    eventually(Duration::from_secs(5), "nats-server to stop", || async {
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err().then_some(())
    })
    .await;
}

#[test]
fn shipped_nats_server_configurations_are_valid() {
    let server =
        herald_shared::nats_server::locate(&herald_shared::nats_server::Locator::from_env()).unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/nats");
    let mut checked = 0;
    for sub in ["", "cluster", "edge"] {
        for entry in std::fs::read_dir(format!("{dir}/{sub}")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "conf") {
                continue;
            }
            let out = Command::new(&server)
                .args(["-t", "-c"])
                .arg(&path)
                .env("HUB_URL", "nats-leaf://127.0.0.1:7422")
                // accounts.conf takes its users' passwords from the environment.
                .envs(
                    ["ADMIN", "GATEWAY", "WORKER", "CONSOLE"]
                        .map(|u| (format!("HERALD_{u}_PASSWORD"), "checked")),
                )
                .output()
                .unwrap();
            let text =
                String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && text.contains("is valid"), "{}: {text}", path.display());
            checked += 1;
        }
    }
    assert_eq!(checked, 7);
}

#[test]
fn committed_jetstream_definitions_are_current() {
    let config = herald_shared::Config::from_pairs(&[]).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/jetstream");
    let definitions = herald_shared::topology::definitions(&config);
    let committed = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(committed, definitions.len(), "nats/jetstream has stale files: run `cargo run -- topology`");
    for (file, definition) in definitions {
        let text = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
        let on_disk: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(on_disk, definition, "nats/jetstream/{file} is stale: run `cargo run -- topology`");
    }
}

#[test]
fn readme_documents_every_configuration_variable() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for var in herald_shared::config::VARS {
        assert!(
            readme.contains(&format!("| `{}` |", var.name)),
            "README's configuration table lacks {}",
            var.name
        );
    }
}

/// `herald worker` on its own serves its provider metrics on `HERALD_METRICS_ADDR`, counting
/// what it sent; and a provider's secret never reaches its logs, even when every call fails.
#[tokio::test]
async fn a_standalone_worker_serves_its_metrics_and_never_logs_secrets() {
    let nats = tokio::task::spawn_blocking(herald_shared::nats_server::NatsServer::for_test).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = herald_shared::nats_server::free_port();
    let sink = crate::support::Sink::ok().await;
    // Twilio is configured at a port nobody listens on: every SMS fails with a connection error.
    let dead = format!("http://127.0.0.1:{}", herald_shared::nats_server::free_port());
    let secret = "tw-secret-9f8e7d6c5b4a";
    let mut child = Command::new(HERALD)
        .args(["worker"])
        .env("HERALD_NATS_URL", nats.url())
        .env("HERALD_DATA_DIR", dir.path())
        .env("HERALD_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("HERALD_WEBHOOK_ALLOW_PRIVATE", "true")
        .env("HERALD_WEBHOOK_SECRET", crate::support::WEBHOOK_SECRET)
        .env("HERALD_TWILIO_ACCOUNT_SID", "AC0000")
        .env("HERALD_TWILIO_AUTH_TOKEN", secret)
        .env("HERALD_TWILIO_FROM", "+15005550006")
        .env("HERALD_TWILIO_BASE_URL", &dead)
        .env("HERALD_RETRY_BACKOFF", "100ms")
        .env("HERALD_MAX_ATTEMPTS", "2")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs =
        std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
    let mut child = KillOnDrop(child);
    let http = http_client();
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    eventually(Duration::from_secs(20), "the worker's metrics", || {
        let (http, url) = (http.clone(), url.clone());
        async move { http.get(url).send().await.ok()?.status().is_success().then_some(()) }
    })
    .await;
    // Publish as a NATS user would, once the worker made the topology.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    eventually(Duration::from_secs(10), "the intents stream", || {
        let js = js.clone();
        async move { js.get_stream("HERALD_INTENTS").await.ok().map(|_| ()) }
    })
    .await;
    for (subject, body) in [
        (
            "herald.intent.webhook",
            serde_json::json!({"id": "hook-1", "recipient": {"webhook_url": sink.url}, "content": {"body": "hi"}}),
        ),
        (
            "herald.intent.sms",
            serde_json::json!({"id": "sms-1", "recipient": {"phone": "+15005550101"}, "content": {"body": "hi"}}),
        ),
    ] {
        js.publish(subject, serde_json::to_vec(&body).unwrap().into()).await.unwrap().await.unwrap();
    }
    sink.wait_for(1).await;
    let page = eventually(Duration::from_secs(20), "both channels counted", || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let page = http.get(url).send().await.ok()?.text().await.ok()?;
            let failed = crate::support::metric(
                &page,
                r#"herald_provider_failures_total{channel="sms",provider="twilio",class="connection"}"#,
            );
            (failed == Some(2.0)).then_some(page)
        }
    })
    .await;
    let series = |s: &str| crate::support::metric(&page, s);
    assert_eq!(
        series(r#"herald_provider_calls_total{channel="webhook",provider="webhook"}"#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        series(r#"herald_provider_call_duration_seconds_count{channel="webhook",provider="webhook"}"#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        series(r#"herald_provider_calls_total{channel="sms",provider="twilio"}"#),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        series(r#"herald_provider_breakers_open{channel="sms",provider="twilio"}"#),
        Some(0.0),
        "{page}"
    );
    // The deliveries' own figures, on the standalone worker too.
    assert_eq!(series(r#"herald_intents_received_total{channel="webhook"}"#), Some(1.0), "{page}");
    assert_eq!(
        series(r#"herald_outcomes_total{channel="webhook",outcome="delivered"}"#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(series(r#"herald_attempts_total{channel="sms"}"#), Some(2.0), "{page}");
    assert!(page.contains("herald_consumer_pending_messages{consumer=\"sms\"}"), "{page}");
    assert!(page.trim_end().ends_with("# EOF"), "{page}");
    let _ = Command::new("kill").args(["-INT", &child.0.id().to_string()]).status();
    eventually(Duration::from_secs(15), "the worker to exit", || {
        let r = child.0.try_wait().unwrap();
        async move { r }
    })
    .await;
    let logs = logs.join().unwrap();
    assert!(logs.iter().any(|l| l.contains("sms-1")), "the failing SMS is logged");
    assert!(!logs.iter().any(|l| l.contains(secret)), "the Twilio token appears in the worker's log");
}

/// A child process killed when the test ends, passed or not.
pub(crate) struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
