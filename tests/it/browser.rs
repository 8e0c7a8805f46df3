//! The reference inbox page (`GET /inbox`) in a real browser: Debian's headless Chromium,
//! driven through ChromeDriver's W3C WebDriver protocol over plain HTTP.
//!
//! `.ci/run` installs `chromium` and `chromium-driver`; in CI (`CI=true`) a missing browser
//! fails the test. On a developer's machine without them the test says loudly that it was
//! skipped.

use std::{path::Path, process::Command, time::Duration};

use herald_shared::{auth, nats_server::free_port};
use serde_json::{Value, json};

use crate::{
    cli::KillOnDrop,
    support::{Stack, TENANT, eventually},
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver session in headless Chromium, ended (and the driver killed) on drop.
struct Browser {
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
    _driver: KillOnDrop,
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium session, or `None` when they are not
    /// installed outside CI.
    async fn start() -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "{CHROMIUM} or {CHROMEDRIVER} is missing: .ci/run installs chromium and chromium-driver"
                );
            }
            eprintln!(
                "\n*** SKIPPED: the /inbox browser test needs Debian's chromium and chromium-driver \
                 ({CHROMIUM}, {CHROMEDRIVER}); `apt-get install chromium chromium-driver` or run .ci/run ***\n"
            );
            return None;
        }
        let port = free_port();
        let driver = KillOnDrop(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("chromedriver starts"),
        );
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(20), "chromedriver to listen", || async {
            let status = http.get(format!("{base}/status")).send().await.ok()?.json::<Value>().await.ok()?;
            (status["value"]["ready"] == true).then_some(())
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        // As root and on a closed network: no sandbox, no background connections.
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let created = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args}
            }}}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_owned();
        Some(Browser {
            http,
            session: format!("{base}/session/{session}"),
            _profile: profile,
            _driver: driver,
        })
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp =
            self.http.request(method, format!("{}{path}", self.session)).json(&body).send().await.unwrap();
        let status = resp.status();
        let answer = resp.json::<Value>().await.unwrap();
        assert!(status.is_success(), "WebDriver {path}: {status} {answer}");
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({"url": url})).await;
    }

    /// Runs `script` in the page and answers what it returns.
    async fn eval(&self, script: &str) -> Value {
        self.command(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await
    }

    /// Clicks the element `css` finds, as a user would.
    async fn click(&self, css: &str) {
        let found = self
            .command(reqwest::Method::POST, "/element", json!({"using": "css selector", "value": css}))
            .await;
        let id = found[ELEMENT].as_str().unwrap().to_owned();
        self.command(reqwest::Method::POST, &format!("/element/{id}/click"), json!({})).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (Chromium exits) before the driver is killed.
        let url = self.session.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async { reqwest::Client::new().delete(url).send().await })
        })
        .join();
    }
}

/// What the page shows: the badge, the status line, and each item's id, title and state.
async fn shown(browser: &Browser) -> Value {
    browser
        .eval(
            "return { badge: document.querySelector('#badge').textContent, \
                      status: document.querySelector('#status').textContent, \
                      error: document.querySelector('#error').textContent, \
                      marker: window.__marker || null, \
                      items: [...document.querySelectorAll('#items li')].map(li => ({ \
                        id: li.dataset.id, title: li.querySelector('.title').textContent, state: li.className })) };",
        )
        .await
}

#[tokio::test]
async fn the_inbox_page_lists_updates_live_and_marks_read() {
    let Some(browser) = Browser::start().await else { return };
    let stack = Stack::start().await;
    let admin = auth::mint(
        &stack.config.jwt_secret,
        "tests",
        Some(TENANT),
        &[auth::SCOPE_USERS_WRITE, auth::SCOPE_SEND, auth::SCOPE_INBOX],
        Duration::from_secs(600),
    );
    let put = stack
        .http
        .put(format!("{}/v1/users/ada", stack.base))
        .bearer_auth(&admin)
        .json(&json!({"name": "Ada"}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let send = |title: &'static str| {
        let stack = &stack;
        async move {
            stack
                .send(
                    json!({"recipient": {"user_id": "ada"}, "channels": ["inapp"],
                           "content": {"title": title, "body": format!("{title}, in full")}}),
                    None,
                )
                .await
        }
    };
    let first = send("Order shipped").await;
    let second = send("Invoice ready").await;
    eventually(Duration::from_secs(15), "both items stored", || async {
        let count: Value = stack
            .http
            .get(format!("{}/v1/users/ada/inbox/count", stack.base))
            .bearer_auth(&admin)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (count["total"] == 2).then_some(())
    })
    .await;

    let token =
        auth::mint_for_user(&stack.config.jwt_secret, Some(TENANT), "ada", Duration::from_secs(600)).0;
    browser.open(&format!("{}/inbox#user=ada&token={token}", stack.base)).await;
    let page = eventually(Duration::from_secs(20), "the page to list both items, live", || async {
        let page = shown(&browser).await;
        (page["items"].as_array()?.len() == 2 && page["badge"] == "2" && page["status"] == "live")
            .then_some(page)
    })
    .await;
    assert_eq!(page["error"], "");
    assert_eq!(page["items"][0]["id"].as_str(), Some(second.as_str()), "newest first: {page}");
    assert_eq!(page["items"][1]["title"], "Order shipped");
    assert_eq!(page["items"][0]["state"], "unread");

    // A notification sent now appears without a reload (the marker set on this page survives).
    browser.eval("window.__marker = 'same page'; return null;").await;
    let third = send("Password changed").await;
    let page = eventually(Duration::from_secs(15), "the new item to appear live", || async {
        let page = shown(&browser).await;
        (page["items"].as_array()?.len() == 3 && page["badge"] == "3").then_some(page)
    })
    .await;
    assert_eq!(page["marker"], "same page", "the page was not reloaded");
    assert_eq!(page["items"][0]["id"].as_str(), Some(third.as_str()));
    assert_eq!(page["items"][0]["title"], "Password changed");

    // Marking read with the page's own button updates the badge and the item.
    browser.click(&format!("li[data-id=\"{first}\"] button.read")).await;
    let page = eventually(Duration::from_secs(15), "the badge to drop to 2", || async {
        let page = shown(&browser).await;
        (page["badge"] == "2").then_some(page)
    })
    .await;
    let marked = page["items"].as_array().unwrap().iter().find(|i| i["id"] == first.as_str()).unwrap();
    assert_eq!(marked["state"], "read", "{page}");
    // And the server agrees.
    let listed: Value = stack
        .http
        .get(format!("{}/v1/users/ada/inbox?unread=true", stack.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let unread: Vec<&str> =
        listed["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(unread, vec![third.as_str(), second.as_str()]);
}
