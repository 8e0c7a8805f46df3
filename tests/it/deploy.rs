//! What ships beside the binary, checked as far as a machine without a Docker engine allows:
//! docker-compose.yml parses, its services run real `herald` commands with variables the
//! configuration knows, and its nats-server is one Herald accepts; the binary answers
//! `--version` with its commit and prints shell completions; LICENSE matches Cargo's metadata.

use std::process::Command;

use herald_shared::{config::VARS, nats_server};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The `HERALD_*` names in `text` (environment keys and `${…}` interpolations alike).
fn herald_vars(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("HERALD_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        found.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

#[test]
fn docker_compose_runs_real_commands_with_known_variables() {
    let text = std::fs::read_to_string(format!("{ROOT}/docker-compose.yml")).unwrap();
    let compose: serde_yaml::Value = serde_yaml::from_str(&text).expect("docker-compose.yml is YAML");
    let services = compose["services"].as_mapping().expect("services");
    let mut herald_services = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if service["build"].as_str() == Some(".") {
            herald_services += 1;
            let command: Vec<&str> =
                service["command"].as_sequence().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
            // The image's entrypoint is `herald`: the command is a subcommand it has.
            let out = Command::new(HERALD).args(&command).arg("--help").output().unwrap();
            assert!(out.status.success(), "service {name}: `herald {}` is not a command", command.join(" "));
        }
        if name == "nats" {
            let image = service["image"].as_str().unwrap();
            let tag = image.rsplit(':').next().unwrap();
            let version = nats_server::parse_version(&format!("{tag}.0")).unwrap();
            let min = nats_server::parse_version(nats_server::MIN_SERVER_VERSION).unwrap();
            assert!(version >= min, "{image} is older than Herald needs");
            let command = serde_yaml::to_string(&service["command"]).unwrap();
            assert!(command.contains("--jetstream"), "the nats service runs without JetStream");
        }
    }
    assert!(herald_services >= 2, "a gateway and a worker service");
    let known: Vec<&str> = VARS.iter().map(|v| v.name).collect();
    // Comments may point at families of variables (`HERALD_TWILIO_*`); the settings may not.
    let settings: String = text
        .lines()
        .map(|l| if l.trim_start().starts_with('#') { "" } else { l.split(" #").next().unwrap_or(l) })
        .collect::<Vec<_>>()
        .join("\n");
    for var in herald_vars(&settings) {
        assert!(
            known.contains(&var.as_str()),
            "docker-compose.yml uses {var}, which the configuration does not have"
        );
    }
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    for var in herald_vars(&dockerfile) {
        assert!(
            known.contains(&var.as_str()),
            "the Dockerfile sets {var}, which the configuration does not have"
        );
    }
}

#[test]
fn version_names_the_commit_and_completions_are_printed() {
    let out = Command::new(HERALD).arg("--version").output().unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    assert!(version.starts_with(&format!("herald {} (commit ", env!("CARGO_PKG_VERSION"))), "{version}");
    let head = Command::new("git").args(["-C", ROOT, "rev-parse", "--short=12", "HEAD"]).output().unwrap();
    if head.status.success() {
        let commit = String::from_utf8(head.stdout).unwrap();
        // The commit the binary was built from; a test run right after a commit rebuilt it.
        assert!(version.contains(commit.trim()), "{version} is not from {commit}");
    }
    for (shell, marker) in
        [("bash", "complete -F _herald"), ("zsh", "#compdef herald"), ("fish", "complete -c herald")]
    {
        let out = Command::new(HERALD).args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("provision") && script.contains("topology"),
            "{shell} completes the commands"
        );
    }
    let out = Command::new(HERALD).args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success(), "an unknown shell is refused");
}

#[test]
fn the_license_file_is_the_one_cargo_names() {
    let manifest = std::fs::read_to_string(format!("{ROOT}/Cargo.toml")).unwrap();
    assert!(manifest.contains(r#"license = "Apache-2.0""#));
    let license = std::fs::read_to_string(format!("{ROOT}/LICENSE")).unwrap();
    assert!(license.contains("Apache License") && license.contains("Version 2.0, January 2004"));
}
