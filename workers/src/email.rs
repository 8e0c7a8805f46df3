//! The email channel's provider: SMTP through lettre, one [`SmtpProvider`] per URL of
//! `HERALD_SMTP_URLS`, each with its own connection pool.
//!
//! How a URL is reached: `smtp://` upgrades with STARTTLS and refuses a server that cannot
//! (`?tls=opportunistic` upgrades only when offered, `?tls=none` stays plain: a local relay);
//! `smtps://` is TLS from the first byte. The URL's user and `HERALD_SMTP_PASSWORD` log in.
//! Certificates are checked against the public roots, plus `HERALD_SMTP_CA_FILE` when set.
//!
//! The message: From and Reply-To from the template (`email_from`, `email_reply_to`) or the
//! configuration; To the recipient; a text and an HTML part as `multipart/alternative` when
//! both exist; `Message-ID: <{notification id}@{domain of From}>`, the same on every attempt,
//! so a receiver (or a person) can tell a resend of one notification; `Herald-Notification-Id`
//! and `Herald-Correlation-Id`. Every header is built by lettre's typed headers, and a subject
//! with a line break is refused, so nothing a caller writes becomes a header.
//!
//! [`classify`] turns an SMTP reply code into a [`FailureKind`]; the error message carries the
//! server's reply and never the password.

use std::time::Duration;

use herald_shared::{Channel, Config, Intent, config::SmtpSettings, state::FailureKind};
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{
        Mailbox, MultiPart, SinglePart,
        header::{Header, HeaderName, HeaderValue},
    },
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, Tls, TlsParameters},
        response::Response,
    },
};

use crate::provider::{Provider, ProviderError, Receipt, Sending};

/// One SMTP server.
pub struct SmtpProvider {
    /// `smtp` for the first URL, `smtp-2`, `smtp-3`… for the next.
    name: String,
    /// `host:port`, for messages.
    server: String,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `HERALD_EMAIL_FROM`, used when the template names no sender.
    from: Mailbox,
    /// `HERALD_EMAIL_REPLY_TO`.
    reply_to: Option<Mailbox>,
    /// Kept only to scrub it from any error text a server or library might echo.
    password: Option<String>,
}

/// How a connection to the server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// TLS from the first byte (`smtps://`).
    Implicit,
    /// STARTTLS, refusing a server that does not offer it (`smtp://`).
    Required,
    /// STARTTLS when the server offers it (`smtp://…?tls=opportunistic`).
    Opportunistic,
    /// Plain text (`smtp://…?tls=none`), for a relay on the same host or network.
    None,
}

impl Security {
    /// The protection a URL asks for, and the port it uses by default.
    pub fn of(url: &url::Url) -> anyhow::Result<(Security, u16)> {
        let tls = url.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
        match (url.scheme(), tls.as_deref()) {
            ("smtps", None | Some("implicit")) => Ok((Security::Implicit, 465)),
            ("smtp", None | Some("required" | "starttls")) => Ok((Security::Required, 587)),
            ("smtp", Some("opportunistic")) => Ok((Security::Opportunistic, 587)),
            ("smtp", Some("none")) => Ok((Security::None, 25)),
            (scheme, tls) => anyhow::bail!(
                "{scheme}:// with tls={} is not a known combination (smtps://, or smtp:// with tls=required, opportunistic or none)",
                tls.unwrap_or("")
            ),
        }
    }
}

impl SmtpProvider {
    /// One provider per URL of `settings`, in order.
    pub fn all(settings: &SmtpSettings, config: &Config) -> anyhow::Result<Vec<SmtpProvider>> {
        settings
            .urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let name = if i == 0 { "smtp".to_owned() } else { format!("smtp-{}", i + 1) };
                SmtpProvider::new(name, url, settings, config)
            })
            .collect()
    }

    pub fn new(
        name: String,
        url: &url::Url,
        settings: &SmtpSettings,
        config: &Config,
    ) -> anyhow::Result<SmtpProvider> {
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => anyhow::bail!("{name}: the URL has no host"),
        };
        let (security, default_port) = Security::of(url).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let port = url.port().unwrap_or(default_port);
        let tls = || -> anyhow::Result<TlsParameters> {
            let mut builder = TlsParameters::builder(host.clone());
            if let Some(pem) = &settings.ca_pem {
                builder = builder.add_root_certificate(
                    Certificate::from_pem(pem)
                        .map_err(|e| anyhow::anyhow!("HERALD_SMTP_CA_FILE is not PEM certificates: {e}"))?,
                );
            }
            Ok(builder.build_rustls()?)
        };
        let tls = match security {
            Security::Implicit => Tls::Wrapper(tls()?),
            Security::Required => Tls::Required(tls()?),
            Security::Opportunistic => Tls::Opportunistic(tls()?),
            Security::None => Tls::None,
        };
        let timeout = config.send_timeout.for_channel(Channel::Email);
        let pool = lettre::transport::smtp::PoolConfig::new()
            .max_size(config.send_concurrency.for_channel(Channel::Email).max(1) as u32)
            .idle_timeout(Duration::from_secs(60));
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
            .port(port)
            .tls(tls)
            .timeout(Some(timeout))
            .pool_config(pool);
        let password = settings.password.as_ref().map(|p| p.expose().to_owned());
        if !url.username().is_empty() {
            let user = percent_decode(url.username());
            builder = builder.credentials(Credentials::new(user, password.clone().unwrap_or_default()));
        }
        let from = settings
            .from
            .parse::<Mailbox>()
            .map_err(|e| anyhow::anyhow!("HERALD_EMAIL_FROM {:?}: {e}", settings.from))?;
        let reply_to = settings
            .reply_to
            .as_deref()
            .map(|r| r.parse::<Mailbox>().map_err(|e| anyhow::anyhow!("HERALD_EMAIL_REPLY_TO {r:?}: {e}")))
            .transpose()?;
        Ok(SmtpProvider {
            name,
            server: format!("{host}:{port}"),
            transport: builder.build(),
            from,
            reply_to,
            password: password.filter(|p| !p.is_empty()),
        })
    }

    async fn deliver(&self, intent: &Intent, to: &str) -> Result<Receipt, ProviderError> {
        let (message, message_id) = compose(intent, to, &self.from, self.reply_to.as_ref())?;
        match self.transport.send(message).await {
            Ok(response) => Ok(Receipt {
                provider_message_id: Some(message_id),
                detail: Some(self.scrub(&reply_text(&response))),
            }),
            Err(e) => Err(self.failure(&e)),
        }
    }

    /// A lettre error as a [`ProviderError`]: the server's reply when there is one.
    fn failure(&self, e: &lettre::transport::smtp::Error) -> ProviderError {
        let code = e.status().map(u16::from);
        let kind = classify(code, e.is_timeout());
        let message = match code {
            // The source of a reply error is the server's text, every line joined.
            Some(code) => {
                let text = std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_default();
                format!("{} ({}): {code} {text}", self.name, self.server)
            }
            None => format!("{} ({}): {}", self.name, self.server, chain(e)),
        };
        ProviderError::new(kind, self.scrub(message.trim_end()))
    }

    /// `text` without the password, whatever echoed it.
    fn scrub(&self, text: &str) -> String {
        match &self.password {
            Some(p) => text.replace(p.as_str(), "[redacted]"),
            None => text.to_owned(),
        }
    }
}

impl Provider for SmtpProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn send<'a>(&'a self, intent: &'a Intent, to: &'a str) -> Sending<'a> {
        Box::pin(self.deliver(intent, to))
    }
}

/// What a failed SMTP exchange means for the notification, from the reply code (RFC 5321
/// §4.2, RFC 4954 for authentication) or, without one, from how the exchange broke.
pub fn classify(code: Option<u16>, timed_out: bool) -> FailureKind {
    match code {
        // Authentication: the configuration is wrong, not the message.
        Some(530 | 534 | 535 | 538) => FailureKind::Unauthorized,
        // Mailbox unavailable, not local, or its name not allowed: this address will not work.
        Some(550 | 551 | 553) => FailureKind::InvalidRecipient,
        // 552 (storage exceeded), 554 (transaction failed, often policy) and the rest.
        Some(500..=599) => FailureKind::Rejected,
        // 421 (closing), 450/451/452 (busy, local error, full) and every other 4xx: later.
        Some(400..=499) => FailureKind::Unavailable,
        Some(_) => FailureKind::Connection,
        None if timed_out => FailureKind::Timeout,
        // Refused connections, TLS failures, broken streams, unreadable replies.
        None => FailureKind::Connection,
    }
}

/// `250 2.0.0 Ok: queued as …`: what the server said on taking the message.
fn reply_text(response: &Response) -> String {
    let code = u16::from(response.code());
    let text: Vec<&str> = response.message().collect();
    format!("{code} {}", text.join(" ")).trim_end().to_owned()
}

/// An error and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Herald-Notification-Id`: the notification, on every attempt.
#[derive(Debug, Clone)]
struct NotificationId(String);

impl Header for NotificationId {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Herald-Notification-Id")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(NotificationId(s.to_owned()))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// `Herald-Correlation-Id`: the caller's correlation id, when it is plain printable ASCII.
#[derive(Debug, Clone)]
struct CorrelationId(String);

impl Header for CorrelationId {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Herald-Correlation-Id")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(CorrelationId(s.to_owned()))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// The message for `intent` to `to`, and its Message-ID. Errors are the message's fault, so
/// they are permanent: an address that is no mailbox, a subject with a line break, nothing
/// to say.
pub fn compose(
    intent: &Intent,
    to: &str,
    default_from: &Mailbox,
    default_reply_to: Option<&Mailbox>,
) -> Result<(Message, String), ProviderError> {
    let rejected = |message: String| ProviderError::new(FailureKind::Rejected, message);
    let content = &intent.content;
    let mailbox = |what: &str, value: &str| {
        if !herald_shared::users::is_mailbox(value) {
            return Err(rejected(format!("{what} {value:?} is not a mailbox")));
        }
        value.trim().parse::<Mailbox>().map_err(|e| rejected(format!("{what} {value:?}: {e}")))
    };
    let from = match content.from.as_deref() {
        Some(f) => mailbox("from", f)?,
        None => default_from.clone(),
    };
    let reply_to = match content.reply_to.as_deref() {
        Some(r) => Some(mailbox("reply-to", r)?),
        None => default_reply_to.cloned(),
    };
    if !herald_shared::users::is_email_address(to) {
        return Err(ProviderError::new(
            FailureKind::InvalidRecipient,
            format!("{to:?} is not an email address"),
        ));
    }
    let to: Mailbox =
        to.parse().map_err(|e| ProviderError::new(FailureKind::InvalidRecipient, format!("{to:?}: {e}")))?;
    // The id is validated as `A-Z a-z 0-9 - _` (`Intent::validate`), so it is a dot-atom.
    let message_id = format!("<{}@{}>", intent.id, from.email.domain());
    let mut builder = Message::builder()
        .from(from)
        .to(to)
        .message_id(Some(message_id.clone()))
        .header(NotificationId(intent.id.clone()));
    if let Some(r) = reply_to {
        builder = builder.reply_to(r);
    }
    if let Some(subject) = content.subject.as_deref() {
        if subject.contains(['\r', '\n']) {
            return Err(rejected("the subject contains a line break".into()));
        }
        builder = builder.subject(subject);
    }
    if let Some(c) = intent.correlation_id.as_deref()
        && !c.is_empty()
        && c.len() <= 200
        && c.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        builder = builder.header(CorrelationId(c.to_owned()));
    }
    let built = match (content.body.as_deref(), content.html.as_deref()) {
        (Some(text), Some(html)) => {
            builder.multipart(MultiPart::alternative_plain_html(text.to_owned(), html.to_owned()))
        }
        (None, Some(html)) => builder.singlepart(SinglePart::html(html.to_owned())),
        (Some(text), None) => builder.singlepart(SinglePart::plain(text.to_owned())),
        (None, None) => return Err(rejected("the email has neither a body nor html".into())),
    };
    let message = built.map_err(|e| rejected(format!("building the message: {e}")))?;
    Ok((message, message_id))
}

#[cfg(test)]
mod tests {
    use herald_shared::intent::Recipient;

    use super::*;

    #[test]
    fn reply_codes_are_classified() {
        let check = |code: Option<u16>, timed_out: bool, expected: FailureKind| {
            assert_eq!(classify(code, timed_out), expected, "{code:?} timed out: {timed_out}");
        };
        check(Some(421), false, FailureKind::Unavailable);
        check(Some(450), false, FailureKind::Unavailable);
        check(Some(451), false, FailureKind::Unavailable);
        check(Some(452), false, FailureKind::Unavailable);
        check(Some(454), false, FailureKind::Unavailable);
        check(Some(550), false, FailureKind::InvalidRecipient);
        check(Some(551), false, FailureKind::InvalidRecipient);
        check(Some(553), false, FailureKind::InvalidRecipient);
        check(Some(552), false, FailureKind::Rejected);
        check(Some(554), false, FailureKind::Rejected);
        check(Some(500), false, FailureKind::Rejected);
        check(Some(535), false, FailureKind::Unauthorized);
        check(Some(530), false, FailureKind::Unauthorized);
        check(None, true, FailureKind::Timeout);
        check(None, false, FailureKind::Connection);
        for transient in [421, 450, 451, 452] {
            assert!(classify(Some(transient), false).is_transient(), "{transient}");
        }
        for permanent in [550, 551, 552, 553, 554, 535] {
            assert!(!classify(Some(permanent), false).is_transient(), "{permanent}");
        }
    }

    #[test]
    fn url_schemes_choose_the_protection() {
        let check = |url: &str, expected: Option<(Security, u16)>| {
            let got = Security::of(&url::Url::parse(url).unwrap()).ok();
            assert_eq!(got, expected, "{url}");
        };
        check("smtp://user@mail.test:587", Some((Security::Required, 587)));
        check("smtp://mail.test", Some((Security::Required, 587)));
        check("smtps://mail.test", Some((Security::Implicit, 465)));
        check("smtp://mail.test?tls=none", Some((Security::None, 25)));
        check("smtp://mail.test?tls=opportunistic", Some((Security::Opportunistic, 587)));
        check("smtp://mail.test?tls=maybe", None);
        check("smtps://mail.test?tls=none", None);
    }

    fn intent() -> Intent {
        let mut i = Intent::new(
            Channel::Email,
            Recipient { email: Some("ada@example.test".into()), ..Recipient::default() },
        );
        i.id = "0190-abc_DEF".into();
        i.content.subject = Some("Your order shipped".into());
        i.content.body = Some("Hello Ada".into());
        i.content.html = Some("<p>Hello <b>Ada</b></p>".into());
        i.correlation_id = Some("corr-42".into());
        i
    }

    fn default_from() -> Mailbox {
        "Acme <noreply@acme.test>".parse().unwrap()
    }

    fn formatted(intent: &Intent) -> Result<String, ProviderError> {
        let (m, _) = compose(intent, "ada@example.test", &default_from(), None)?;
        Ok(String::from_utf8(m.formatted()).unwrap())
    }

    #[test]
    fn a_message_carries_its_ids_and_both_parts() {
        let (_, id) = compose(&intent(), "ada@example.test", &default_from(), None).unwrap();
        assert_eq!(id, "<0190-abc_DEF@acme.test>");
        let text = formatted(&intent()).unwrap();
        for expected in [
            "From: Acme <noreply@acme.test>\r\n",
            "To: ada@example.test\r\n",
            "Subject: Your order shipped\r\n",
            "Message-ID: <0190-abc_DEF@acme.test>\r\n",
            "Herald-Notification-Id: 0190-abc_DEF\r\n",
            "Herald-Correlation-Id: corr-42\r\n",
            "multipart/alternative",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Type: text/html; charset=utf-8",
        ] {
            assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
        }
        assert!(!text.contains("Reply-To"), "{text}");
    }

    #[test]
    fn the_template_sender_wins_over_the_configured_one() {
        let mut i = intent();
        i.content.from = Some("\"Acme Billing\" <billing@acme.test>".into());
        i.content.reply_to = Some("help@acme.test".into());
        i.content.html = None;
        let text = formatted(&i).unwrap();
        assert!(text.contains("From: \"Acme Billing\" <billing@acme.test>\r\n"), "{text}");
        assert!(text.contains("Reply-To: help@acme.test\r\n"), "{text}");
        assert!(text.contains("Message-ID: <0190-abc_DEF@acme.test>"), "{text}");
        assert!(!text.contains("multipart"), "{text}");
        assert!(text.contains("Content-Type: text/plain"), "{text}");
    }

    #[test]
    fn html_alone_is_sent_as_html() {
        let mut i = intent();
        i.content.body = None;
        let text = formatted(&i).unwrap();
        assert!(text.contains("Content-Type: text/html"), "{text}");
        assert!(!text.contains("text/plain"), "{text}");
    }

    #[test]
    fn nothing_a_caller_writes_becomes_a_header() {
        let mut i = intent();
        i.content.subject = Some("Hi\r\nBcc: everyone@example.test".into());
        assert_eq!(formatted(&i).unwrap_err().kind, FailureKind::Rejected);

        let mut i = intent();
        i.content.from = Some("x@acme.test\r\nBcc: everyone@example.test".into());
        assert_eq!(formatted(&i).unwrap_err().kind, FailureKind::Rejected);

        let mut i = intent();
        i.correlation_id = Some("c\r\nBcc: everyone@example.test".into());
        let text = formatted(&i).unwrap();
        assert!(!text.contains("Bcc"), "{text}");
        assert!(!text.contains("Herald-Correlation-Id"), "{text}");

        let err = compose(&intent(), "ada@example.test\r\nBcc: x@y.test", &default_from(), None).unwrap_err();
        assert_eq!(err.kind, FailureKind::InvalidRecipient);

        let mut i = intent();
        i.content.body = None;
        i.content.html = None;
        assert_eq!(formatted(&i).unwrap_err().kind, FailureKind::Rejected);
    }

    #[test]
    fn user_names_in_urls_are_percent_decoded() {
        assert_eq!(percent_decode("ada%40acme.test"), "ada@acme.test");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
    }
}
