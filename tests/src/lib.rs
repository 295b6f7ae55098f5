//! Shared test support: the port contract suite (run against both backends), and helpers
//! that stand up AWS resources on the moto server the test command starts on loopback.

pub mod contract;
pub mod load;
pub mod moto;

use std::collections::BTreeMap;

use anyhow::Result;
use fleet_shared::ports::ArchiveReader;

/// Every archive object (key → bytes) under a prefix, read through the port.
pub async fn archive_objects<X: ArchiveReader>(
    reader: &X,
    prefix: &str,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for key in reader.archive_keys(prefix).await? {
        let body = reader.archive_object(&key).await?;
        out.insert(key, body);
    }
    Ok(out)
}
