//! The committed `openapi.json` as users meet it through client generators: openapi-python-client
//! (PyPI) and openapi-typescript (npm) generate every operation with no warning, and the
//! generated Python client sends a notification and reads it back against a running gateway.
//!
//! `.ci/run` installs both generators (the TypeScript one into `target/ci-node`); in CI a missing
//! generator fails the test, elsewhere the test says loudly that it was skipped.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

use crate::support::{Sink, Stack};

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// `None` (after saying so loudly) when `what` is missing outside CI; a failure in CI.
fn require(found: bool, what: &str) -> Option<()> {
    if found {
        return Some(());
    }
    if in_ci() {
        panic!("{what} is missing: .ci/run installs it");
    }
    eprintln!("\n*** SKIPPED: {what} is not installed (run .ci/run, or see it for the install) ***\n");
    None
}

/// Lines of a generator's output that warn or fail.
fn complaints(output: &std::process::Output) -> Vec<String> {
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    text.lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("warn") || l.contains("error") || l.contains("cannot") || l.contains("could not")
        })
        .map(str::to_owned)
        .collect()
}

fn python_generator_present() -> bool {
    Command::new("python3")
        .args(["-m", "openapi_python_client", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn generated_python_client_sends_and_reads_a_notification() {
    let Some(()) =
        require(python_generator_present(), "openapi-python-client (pip install openapi-python-client)")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let package = dir.path().join("herald_client");
    let out = Command::new("python3")
        .args(["-m", "openapi_python_client", "generate", "--meta", "none", "--path", SPEC, "--output-path"])
        .arg(&package)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(complaints(&out), Vec::<String>::new(), "openapi-python-client warned");
    // Every operation of the spec became a module.
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(SPEC).unwrap()).unwrap();
    for ops in spec["paths"].as_object().unwrap().values() {
        for op in ops.as_object().unwrap().values() {
            let id = op["operationId"].as_str().unwrap();
            let found = walkdir(&package.join("api")).iter().any(|p| p.file_stem().is_some_and(|s| s == id));
            assert!(found, "no generated function for {id}");
        }
    }

    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/send_and_read.py");
    let ran = tokio::process::Command::new("python3")
        .arg(script)
        .args([&stack.base, &stack.token])
        .arg(dir.path())
        .arg(&sink.url)
        .output()
        .await
        .unwrap();
    assert!(
        ran.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
    let id = String::from_utf8(ran.stdout).unwrap().trim().to_owned();
    let got = sink.wait_for(1).await;
    assert_eq!(got[0].body["id"], id.as_str());
    assert_eq!(got[0].body["title"], "From Python");
}

#[test]
fn openapi_typescript_generates_the_spec_without_a_warning() {
    let binary: PathBuf =
        [env!("CARGO_MANIFEST_DIR"), "target", "ci-node", "node_modules", ".bin", "openapi-typescript"]
            .iter()
            .collect();
    let Some(()) = require(
        binary.exists(),
        "openapi-typescript (npm install --prefix target/ci-node openapi-typescript@7.13.0)",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let types = dir.path().join("herald.d.ts");
    let out = Command::new(&binary).arg(SPEC).arg("-o").arg(&types).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(complaints(&out), Vec::<String>::new(), "openapi-typescript warned");
    let written = std::fs::read_to_string(&types).unwrap();
    for id in ["send_notification", "get_notification", "list_inbox", "stream_inbox"] {
        assert!(written.contains(&format!("{id}: {{")), "no operation {id} in the generated types");
    }
}

fn walkdir(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walkdir(&path));
        } else {
            out.push(path);
        }
    }
    out
}
