//! Templates in the `herald_templates` bucket, one key per (tenant, code, locale):
//! `<tenant token>.<code>.<locale>`. Every write is a new version (1, 2, 3, …) recording who
//! wrote it and when; the bucket keeps a key's last [`KEPT_VERSIONS`] revisions (JetStream's
//! limit), which are the versions that can be read, listed and rolled back to. Writes are
//! compare-and-set on the revision read, so two writers never make the same version.

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::{
    ledger::tenant_token,
    templates::{Parts, fallbacks},
};

/// Revisions JetStream keeps per key: the template history that can be read back.
pub const KEPT_VERSIONS: i64 = 64;
/// Most templates one listing returns.
pub const MAX_LISTED: usize = 1000;

/// One version of a template, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub code: String,
    pub locale: String,
    /// 1 for the first write, one more for each write after it (a rollback included).
    pub version: u32,
    pub parts: Parts,
    /// Who wrote it: the token's subject.
    pub author: String,
    pub written_at: DateTime<Utc>,
    /// Set on a rollback: the version whose parts this one restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restores: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no template {0}")]
    NotFound(String),
    /// The `If-Match` revision is not the current one.
    #[error("the template changed since revision {0}; read it again")]
    Stale(u64),
    #[error("templates: {0}")]
    Nats(String),
}

fn nats(e: impl std::fmt::Display) -> StoreError {
    StoreError::Nats(e.to_string())
}

/// The templates of every tenant.
#[derive(Clone)]
pub struct TemplateStore {
    kv: kv::Store,
}

/// A version and the KV revision it is stored at (the `ETag`).
pub type Found = (Version, u64);

impl TemplateStore {
    pub fn new(kv: kv::Store) -> TemplateStore {
        TemplateStore { kv }
    }

    /// The KV key of a template: `<tenant token>.<code>.<locale>`.
    pub fn key(tenant: &str, code: &str, locale: &str) -> String {
        format!("{}.{code}.{locale}", tenant_token(Some(tenant)))
    }

    fn decode(entry: &kv::Entry) -> Option<Version> {
        (entry.operation == kv::Operation::Put).then(|| serde_json::from_slice(&entry.value).ok()).flatten()
    }

    /// The latest version, or `None` if there is none (never written, or deleted).
    pub async fn latest(&self, tenant: &str, code: &str, locale: &str) -> Result<Option<Found>, StoreError> {
        let entry = self.kv.entry(Self::key(tenant, code, locale)).await.map_err(nats)?;
        Ok(entry.and_then(|e| Self::decode(&e).map(|v| (v, e.revision))))
    }

    /// Every version still kept, oldest first.
    pub async fn versions(&self, tenant: &str, code: &str, locale: &str) -> Result<Vec<Found>, StoreError> {
        let key = Self::key(tenant, code, locale);
        let history = match self.kv.history(&key).await {
            Ok(h) => h,
            // No message at all for the key.
            Err(e) if e.to_string().contains("no messages") || e.to_string().contains("not found") => {
                return Ok(Vec::new());
            }
            Err(e) => return Err(nats(e)),
        };
        let entries: Vec<kv::Entry> = history.try_collect().await.map_err(nats)?;
        Ok(entries.iter().filter_map(|e| Self::decode(e).map(|v| (v, e.revision))).collect())
    }

    /// Version `n`, if still kept.
    pub async fn version(
        &self,
        tenant: &str,
        code: &str,
        locale: &str,
        n: u32,
    ) -> Result<Option<Found>, StoreError> {
        Ok(self.versions(tenant, code, locale).await?.into_iter().find(|(v, _)| v.version == n))
    }

    /// Writes a new version with `parts` (checked by the caller). `if_match`: only if the
    /// current revision is this one. Numbering continues across a delete.
    #[allow(clippy::too_many_arguments, reason = "which template, what, who, and the two conditions")]
    pub async fn put(
        &self,
        tenant: &str,
        code: &str,
        locale: &str,
        parts: Parts,
        author: &str,
        restores: Option<u32>,
        if_match: Option<u64>,
    ) -> Result<Found, StoreError> {
        let key = Self::key(tenant, code, locale);
        loop {
            let current = self.kv.entry(&key).await.map_err(nats)?;
            let revision = current.as_ref().map(|e| e.revision);
            if let Some(want) = if_match
                && revision != Some(want)
            {
                return Err(StoreError::Stale(want));
            }
            let last_version = match current.as_ref().and_then(Self::decode) {
                Some(v) => v.version,
                // Deleted or never written: continue after the highest version kept.
                None => self
                    .versions(tenant, code, locale)
                    .await?
                    .iter()
                    .map(|(v, _)| v.version)
                    .max()
                    .unwrap_or(0),
            };
            let version = Version {
                code: code.to_owned(),
                locale: locale.to_owned(),
                version: last_version + 1,
                parts: parts.clone(),
                author: author.to_owned(),
                written_at: Utc::now(),
                restores,
            };
            let bytes = serde_json::to_vec(&version).expect("a version serializes");
            let written = match revision {
                Some(rev) => self.kv.update(&key, bytes.into(), rev).await.map_err(|e| {
                    (e.kind() == kv::UpdateErrorKind::WrongLastRevision).then_some(()).ok_or_else(|| nats(e))
                }),
                None => self.kv.create(&key, bytes.into()).await.map_err(|e| {
                    (e.kind() == kv::CreateErrorKind::AlreadyExists).then_some(()).ok_or_else(|| nats(e))
                }),
            };
            match written {
                Ok(rev) => return Ok((version, rev)),
                // Someone wrote in between: with If-Match that is a stale write; without, number
                // this one after theirs.
                Err(Ok(())) if if_match.is_some() => {
                    return Err(StoreError::Stale(if_match.unwrap_or_default()));
                }
                Err(Ok(())) => continue,
                Err(Err(e)) => return Err(e),
            }
        }
    }

    /// Deletes the template (its history stays until it ages out of the kept revisions).
    pub async fn delete(&self, tenant: &str, code: &str, locale: &str) -> Result<(), StoreError> {
        let key = Self::key(tenant, code, locale);
        if self.latest(tenant, code, locale).await?.is_none() {
            return Err(StoreError::NotFound(format!("{code}/{locale}")));
        }
        self.kv.delete(&key).await.map_err(nats)
    }

    /// The latest version of every template of `tenant`, ordered by code and locale.
    pub async fn list(&self, tenant: &str) -> Result<Vec<Found>, StoreError> {
        let prefix = format!("{}.", tenant_token(Some(tenant)));
        let subjects: Vec<(String, usize)> = self
            .kv
            .stream
            .info_with_subjects(format!("$KV.{}.{prefix}>", self.kv.name))
            .await
            .map_err(nats)?
            .try_collect()
            .await
            .map_err(nats)?;
        let mut keys: Vec<String> = subjects
            .into_iter()
            .filter_map(|(s, _)| s.strip_prefix(&format!("$KV.{}.", self.kv.name)).map(str::to_owned))
            .collect();
        keys.sort();
        let found = futures::stream::iter(keys.into_iter().take(MAX_LISTED))
            .map(|key| async move { self.kv.entry(&key).await })
            .buffered(16)
            .try_collect::<Vec<_>>()
            .await
            .map_err(nats)?;
        Ok(found.into_iter().flatten().filter_map(|e| Self::decode(&e).map(|v| (v, e.revision))).collect())
    }

    /// The template to use for `locale`: the first of `fr-CA`, `fr`, the default locale that
    /// exists.
    pub async fn resolve(
        &self,
        tenant: &str,
        code: &str,
        locale: &str,
        default_locale: &str,
    ) -> Result<Option<Found>, StoreError> {
        for candidate in fallbacks(locale, default_locale) {
            if let Some(found) = self.latest(tenant, code, &candidate).await? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}
