//! End-to-end tests of the whole system: a real nats-server per test, the real gateway and
//! workers on ephemeral ports, and real HTTP servers standing in for webhook receivers.
//! One test binary (modules below) so it links once.

mod api;
mod chaos;
mod cli;
mod cluster;
mod console;
mod delivery;
mod dlq;
mod failover;
mod faults;
mod ledger;
mod outage;
mod push;
mod reference;
mod resilience;
mod sms;
mod support;
mod templates;
mod users;
