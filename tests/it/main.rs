//! End-to-end tests of the whole system: a real nats-server per test, the real gateway and
//! workers on ephemeral ports, real HTTP servers standing in for webhook receivers, and a real
//! SMTP server (aiosmtpd) for email.
//! One test binary (modules below) so it links once.

mod accept;
mod api;
mod browser;
mod chaos;
mod cli;
mod clients;
mod cluster;
mod console;
mod delivery;
mod deploy;
mod dlq;
mod email;
mod failover;
mod faults;
mod inbox;
mod ledger;
mod limits;
mod nats_auth;
mod outage;
mod push;
mod reference;
mod resilience;
mod server_version;
mod sms;
mod support;
mod templates;
mod traces;
mod users;
