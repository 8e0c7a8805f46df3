//! What a slow, stalled or greedy client may cost the gateway: bounded, and never for long.
//!
//! - [`GuardedAcceptor`] caps live connections (`HERALD_MAX_CONNECTIONS`): one more is answered
//!   `503` with `Retry-After` and closed at once, without reading it.
//! - [`Guarded`] times every request's reading on its connection: from a request's first byte,
//!   its headers must end within `HERALD_HEADER_READ_TIMEOUT`, and from there its response must
//!   be under way within `HERALD_BODY_READ_TIMEOUT` (the body read and the handler's work,
//!   which is itself bounded by `HERALD_NATS_TIMEOUT`). Past either, reads fail and hyper
//!   drops the connection; a handler still reading the body answers `408`. A connection idle
//!   between requests is closed after `HERALD_IDLE_TIMEOUT` (poem's `idle_timeout`).
//!   Trickling a byte at a time does not extend any of these.
//! - [`limit_in_flight`] caps requests being handled at once (`HERALD_MAX_IN_FLIGHT`); beyond
//!   it the answer is `503 overloaded` with `Retry-After: 1`, at once. `/health` is exempt.
//!
//! - [`RateLimits`] holds a token bucket per tenant (`HERALD_TENANT_RATE`) and per API token
//!   (`HERALD_TOKEN_RATE`) for sending; over it, `429` with `Retry-After` and the
//!   `RateLimit-*` fields, and nothing is stored.
//!
//! The timing sees bytes, not HTTP: a request's headers end at its first `\r\n\r\n`, and a
//! response written ends the request. HTTP/2 connections get the idle timeout only.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use poem::{
    Endpoint, IntoResponse, Request, Response,
    listener::{Acceptor, TcpAcceptor},
    web::{LocalAddr, RemoteAddr},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};

use crate::errors::ApiError;

/// How long a request may take to arrive.
#[derive(Debug, Clone, Copy)]
pub struct ReadTimeouts {
    pub header: Duration,
    pub body: Duration,
}

/// A TCP acceptor that caps live connections and times their requests.
pub struct GuardedAcceptor {
    inner: TcpAcceptor,
    live: Arc<AtomicUsize>,
    max: usize,
    timeouts: ReadTimeouts,
}

impl GuardedAcceptor {
    pub fn new(inner: TcpAcceptor, max: usize, timeouts: ReadTimeouts) -> GuardedAcceptor {
        GuardedAcceptor { inner, live: Arc::new(AtomicUsize::new(0)), max, timeouts }
    }
}

impl Acceptor for GuardedAcceptor {
    type Io = Guarded<TcpStream>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        loop {
            let (io, local, remote, scheme) = self.inner.accept().await?;
            if self.live.load(Ordering::Acquire) >= self.max {
                tokio::spawn(refuse(io));
                continue;
            }
            self.live.fetch_add(1, Ordering::AcqRel);
            let guarded = Guarded::new(io, self.timeouts, self.live.clone());
            return Ok((guarded, local, remote, scheme));
        }
    }
}

/// Answers a connection over the cap with `503` and closes it, giving it a second at most.
async fn refuse(mut io: TcpStream) {
    let body = r#"{"code":"overloaded","message":"the gateway holds as many connections as it may (HERALD_MAX_CONNECTIONS); retry shortly"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(answer.as_bytes()).await?;
        io.shutdown().await
    })
    .await;
}

/// Where a connection's current request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests: only the idle timeout applies.
    Idle,
    /// A request began; its headers have not ended. `matched`: how much of `\r\n\r\n` the last
    /// bytes were.
    Headers { matched: u8 },
    /// The headers ended; the body and the handler are under way.
    Body,
}

/// A connection whose requests must arrive in time (see the module).
pub struct Guarded<T> {
    inner: T,
    phase: Phase,
    timeouts: ReadTimeouts,
    deadline: Pin<Box<Sleep>>,
    live: Arc<AtomicUsize>,
}

impl<T> Guarded<T> {
    fn new(inner: T, timeouts: ReadTimeouts, live: Arc<AtomicUsize>) -> Guarded<T> {
        Guarded {
            inner,
            phase: Phase::Idle,
            timeouts,
            deadline: Box::pin(tokio::time::sleep(Duration::ZERO)),
            live,
        }
    }

    /// Follows the bytes just read through the request's phases.
    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Headers { matched: 0 };
            self.deadline.as_mut().reset(Instant::now() + self.timeouts.header);
        }
        let Phase::Headers { mut matched } = self.phase else { return };
        const END: &[u8; 4] = b"\r\n\r\n";
        for &b in bytes {
            matched = if b == END[matched as usize] {
                matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if matched == 4 {
                self.phase = Phase::Body;
                self.deadline.as_mut().reset(Instant::now() + self.timeouts.body);
                return;
            }
        }
        self.phase = Phase::Headers { matched };
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = buf.filled()[before..].to_vec();
                this.saw(&fresh);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.phase == Phase::Idle => Poll::Pending,
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    match this.phase {
                        Phase::Headers { .. } => "the request's headers did not arrive in time",
                        _ => "the request's body did not arrive in time",
                    },
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            // An answer is under way: this request is done arriving.
            this.phase = Phase::Idle;
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Requests in the handlers at once: at most the semaphore's permits.
#[derive(Clone)]
pub struct InFlight(pub Arc<tokio::sync::Semaphore>);

/// Runs a request if there is room for it, else answers `503 overloaded` at once.
pub async fn limit_in_flight<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    // Health checks must answer when busy, and a live inbox stream is held open for hours:
    // counted here, a few hundred idle browsers would refuse every other request. Streams are
    // bounded by HERALD_MAX_CONNECTIONS instead.
    if req.uri().path() == "/health" || req.uri().path().ends_with("/inbox/stream") {
        return next.call(req).await.map(IntoResponse::into_response);
    }
    let in_flight = req.data::<InFlight>().cloned();
    let _permit = match in_flight.map(|f| f.0.try_acquire_owned()) {
        Some(Ok(permit)) => Some(permit),
        Some(Err(_)) => return Err(ApiError::Overloaded.into()),
        None => None,
    };
    next.call(req).await.map(IntoResponse::into_response)
}

/// Buckets kept before idle (full) ones are forgotten: a full bucket is what a new one is.
const MAX_BUCKETS: usize = 10_000;

/// One token bucket: `tokens` at `at`, refilled at `rate` per second up to `capacity`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

/// Token buckets by tenant and by token, for sending.
pub struct RateLimits {
    tenant: Option<herald_shared::config::Rate>,
    token: Option<herald_shared::config::Rate>,
    buckets: std::sync::Mutex<std::collections::HashMap<String, Bucket>>,
}

/// A refusal: how long to wait, and the `RateLimit-*` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub which: &'static str,
    pub limit: u64,
    pub remaining: u64,
    pub retry_after: Duration,
}

impl RateLimits {
    pub fn new(config: &herald_shared::Config) -> RateLimits {
        RateLimits { tenant: config.tenant_rate, token: config.token_rate, buckets: Default::default() }
    }

    /// Takes `cost` sends from the tenant's and the token's buckets, or neither. A bucket that
    /// is full lets any cost through (into debt), so a batch larger than a second's worth still
    /// goes, and the next requests wait for the debt to be paid. A bucket holds the rate's count
    /// (`600` of `600/m`).
    pub fn take(&self, tenant: &str, token: &str, cost: u64) -> Result<(), Limited> {
        let checks = [
            ("tenant", self.tenant, format!("tenant\u{0}{tenant}")),
            ("token", self.token, format!("token\u{0}{token}")),
        ];
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().expect("never poisoned");
        let refill = |key: &String, rate: herald_shared::config::Rate| {
            let capacity = rate.burst.max(1.0);
            let b = buckets.get(key).copied().unwrap_or(Bucket { tokens: capacity, at: now });
            let tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate.per_second).min(capacity);
            (tokens, capacity)
        };
        let mut taken = Vec::new();
        for (which, rate, key) in &checks {
            let Some(rate) = *rate else { continue };
            let (tokens, capacity) = refill(key, rate);
            let cost = cost as f64;
            if tokens < cost && tokens < capacity {
                let missing = cost.min(capacity) - tokens;
                return Err(Limited {
                    which,
                    limit: capacity as u64,
                    remaining: tokens.max(0.0) as u64,
                    retry_after: Duration::from_secs_f64(missing / rate.per_second),
                });
            }
            taken.push((key.clone(), tokens - cost));
        }
        if buckets.len() + taken.len() > MAX_BUCKETS {
            let (tenant, token) = (self.tenant, self.token);
            buckets.retain(|key, b| {
                let rate = if key.starts_with("tenant") { tenant } else { token };
                rate.is_some_and(|r| {
                    b.tokens + now.duration_since(b.at).as_secs_f64() * r.per_second < r.burst.max(1.0)
                })
            });
        }
        for (key, tokens) in taken {
            buckets.insert(key, Bucket { tokens, at: now });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guarded() -> Guarded<tokio::io::Empty> {
        let timeouts = ReadTimeouts { header: Duration::from_secs(10), body: Duration::from_secs(30) };
        Guarded::new(tokio::io::empty(), timeouts, Arc::new(AtomicUsize::new(1)))
    }

    #[tokio::test]
    async fn the_end_of_the_headers_is_found_across_reads() {
        let mut g = guarded();
        g.saw(b"POST / HTTP/1.1\r\nHost: x\r");
        assert_eq!(g.phase, Phase::Headers { matched: 1 });
        g.saw(b"\n\r");
        assert_eq!(g.phase, Phase::Headers { matched: 3 });
        g.saw(b"\n{\"a\":1}");
        assert_eq!(g.phase, Phase::Body);
        // Body bytes do not restart the request.
        g.saw(b"\r\n\r\nmore");
        assert_eq!(g.phase, Phase::Body);
        let mut h = guarded();
        h.saw(b"GET / HTTP/1.1\r\n\r\r\n\r\n");
        assert_eq!(h.phase, Phase::Body);
    }

    #[test]
    fn a_bucket_refuses_past_its_rate_and_keeps_tenants_and_tokens_apart() {
        let config = herald_shared::Config::from_pairs(&[
            (herald_shared::config::TENANT_RATE, "5/s"),
            (herald_shared::config::TOKEN_RATE, "3/s"),
            (herald_shared::config::JWT_SECRET, "x".repeat(32).as_str()),
            (herald_shared::config::WEBHOOK_SECRET, "y".repeat(32).as_str()),
        ])
        .unwrap();
        let limits = RateLimits::new(&config);
        for _ in 0..3 {
            limits.take("acme", "t1", 1).unwrap();
        }
        let refused = limits.take("acme", "t1", 1).unwrap_err();
        assert_eq!((refused.which, refused.limit, refused.remaining), ("token", 3, 0));
        assert!(refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_millis(334));
        // Another token of the tenant has its own bucket, but shares the tenant's.
        limits.take("acme", "t2", 2).unwrap();
        assert_eq!(limits.take("acme", "t2", 1).unwrap_err().which, "tenant");
        limits.take("globex", "t3", 3).unwrap();
        // A full bucket lets a large batch through into debt.
        limits.take("initech", "t4", 50).unwrap();
        assert!(limits.take("initech", "t4", 1).unwrap_err().retry_after > Duration::from_secs(9));
    }
}
