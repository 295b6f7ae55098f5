//! Shared test support: the port contract suite (run against both backends), and helpers
//! that stand up AWS resources on the moto server the test command starts on loopback.

pub mod contract;
pub mod moto;

use std::collections::BTreeMap;

use anyhow::Result;
use fleet_shared::adapters::aws::AwsStore;
use fleet_shared::adapters::embedded::SqliteStore;

/// Read back archive objects (key → bytes) under a prefix, whatever the backend.
pub trait ArchiveInspect {
    fn objects(&self, prefix: &str) -> impl std::future::Future<Output = Result<BTreeMap<String, Vec<u8>>>>;
}

impl ArchiveInspect for SqliteStore {
    async fn objects(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        Ok(self.archive_objects(prefix).await?.into_iter().map(|o| (o.key, o.body)).collect())
    }
}

impl ArchiveInspect for AwsStore {
    async fn objects(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for key in self.list_keys(prefix, None).await? {
            let body = self.get_object(&key).await?;
            out.insert(key, body);
        }
        Ok(out)
    }
}
