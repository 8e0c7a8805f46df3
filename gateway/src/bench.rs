//! Placeholder until the load generator lands (being written now).
use std::{path::PathBuf, time::Duration};
pub struct BenchOptions { pub url: Option<String>, pub nats_url: Option<String>, pub connections: usize, pub duration: Duration, pub rate: Option<u64>, pub raw_messages: usize, pub herald_exe: PathBuf }
pub struct BenchReport;
impl std::fmt::Display for BenchReport { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("") } }
pub async fn run(_o: BenchOptions, _c: &herald_shared::Config) -> anyhow::Result<BenchReport> { anyhow::bail!("not yet") }
