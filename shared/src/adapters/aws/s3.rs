//! Cold archive (S3): raw batches under `raw/`, quarantined payloads under `quarantine/`,
//! one gzip NDJSON object per batch named by the SHA-256 of its body (a replay overwrites the
//! same key with the same bytes), which also signs the upload.

use aws_config::SdkConfig;
use aws_runtime::auth::PayloadSigningOverride;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_runtime_api::box_error::BoxError;

use super::{classify, endpoint_overridden};
use crate::env::{ConfigError, Env};
use crate::error::StoreError;
use crate::ingest::archive::{decode_lines, quarantine_object, QUARANTINE_PREFIX};
use crate::ingest::{ArchiveObject, QuarantineLine};
use crate::ports::{ArchiveReader, Quarantine, QuarantineReader, RawArchive};
use crate::time::utc_date_hour;

/// The archive bucket, on its own client.
#[derive(Clone, Debug)]
pub struct S3Archive {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Archive {
    /// Reads `FLEET_ARCHIVE_BUCKET`. Custom endpoints (moto, MinIO) are addressed path-style,
    /// AWS itself virtual-host style.
    pub fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        let config = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(endpoint_overridden(sdk, "AWS_ENDPOINT_URL_S3"))
            .build();
        Ok(Self::new(aws_sdk_s3::Client::from_conf(config), env.required("FLEET_ARCHIVE_BUCKET")?))
    }

    pub fn new(client: aws_sdk_s3::Client, bucket: impl Into<String>) -> Self {
        Self { client, bucket: bucket.into() }
    }

    async fn put_object(&self, op: &'static str, object: &ArchiveObject) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(object.key())
            .content_type("application/gzip")
            .body(ByteStream::from(object.body().to_vec()))
            .customize()
            .interceptor(PrecomputedPayloadHash(object.body_sha256_hex()))
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        Ok(())
    }

    /// Keys under `prefix` (after `start_after`), in key order, every page up to `max` keys.
    pub async fn list_keys(
        &self,
        prefix: &str,
        start_after: Option<String>,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_start_after(start_after)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("s3 list", e))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
            if keys.len() >= max {
                keys.truncate(max);
                break;
            }
        }
        Ok(keys)
    }

    pub async fn get_object(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify("s3 get", e))?;
        let bytes = out.body.collect().await.map_err(|e| StoreError::transient("s3 get body", e))?;
        Ok(bytes.into_bytes().to_vec())
    }

    async fn list_quarantined(&self, since_ms: i64) -> Result<Vec<QuarantineLine>, StoreError> {
        // Keys are partitioned by date: start listing at the first hour that can qualify.
        let (date, hour) = utc_date_hour(since_ms);
        let start_after = format!("{QUARANTINE_PREFIX}dt={date}/hour={:02}/", hour);
        let mut out = Vec::new();
        for key in self.list_keys(QUARANTINE_PREFIX, Some(start_after), usize::MAX).await? {
            let body = self.get_object(&key).await?;
            let lines =
                decode_lines(&body).map_err(|e| StoreError::permanent("quarantine object decode", e))?;
            for line in lines {
                let q: QuarantineLine = serde_json::from_slice(&line)
                    .map_err(|e| StoreError::permanent("quarantine line decode", e))?;
                if q.received_ms >= since_ms {
                    out.push(q);
                }
            }
        }
        out.sort_by(|a, b| (a.received_ms, &a.message_id).cmp(&(b.received_ms, &b.message_id)));
        Ok(out)
    }
}

/// Signs a request with the payload hash computed beforehand: an archive object's SHA-256 names
/// it, so the SDK need not compute it a second time (it still adds its CRC32 checksum). S3
/// checks the body against it. Only for a body held in memory (the archive's always is): a
/// streamed body keeps the SDK's own signing.
#[derive(Debug)]
pub(super) struct PrecomputedPayloadHash(pub(super) String);

impl Intercept for PrecomputedPayloadHash {
    fn name(&self) -> &'static str {
        "PrecomputedPayloadHash"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if context.request().body().bytes().is_some() {
            cfg.interceptor_state().store_put(PayloadSigningOverride::Precomputed(self.0.clone()));
        }
        Ok(())
    }
}

impl RawArchive for S3Archive {
    async fn put_raw(&self, object: &ArchiveObject) -> Result<(), StoreError> {
        self.put_object("s3 put raw", object).await
    }
}

impl ArchiveReader for S3Archive {
    async fn archive_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.list_keys(prefix, None, usize::MAX).await
    }

    async fn archive_keys_after(
        &self,
        prefix: &str,
        start_after: &str,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.list_keys(prefix, Some(start_after.to_owned()), max).await
    }

    async fn archive_object(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.get_object(key).await
    }
}

impl Quarantine for S3Archive {
    async fn put_quarantined(&self, lines: &[QuarantineLine], received_ms: i64) -> Result<(), StoreError> {
        match quarantine_object(lines, received_ms) {
            Some(object) => self.put_object("s3 put quarantine", &object).await,
            None => Ok(()),
        }
    }
}

impl QuarantineReader for S3Archive {
    async fn quarantined(&self, since_ms: i64) -> Result<Vec<QuarantineLine>, StoreError> {
        self.list_quarantined(since_ms).await
    }
}

/// Reports live under `reports/` in the archive bucket (no lifecycle rule expires them).
pub const REPORTS_PREFIX: &str = "reports/";

impl crate::ports::Reports for S3Archive {
    async fn put_report(&self, key: &str, json: &[u8]) -> Result<(), StoreError> {
        let op = "s3 put report";
        if !key.starts_with(REPORTS_PREFIX) {
            return Err(StoreError::permanent(
                op,
                format!("report key {key:?} is not under {REPORTS_PREFIX}"),
            ));
        }
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(json.to_vec()))
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        Ok(())
    }

    async fn report(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let op = "s3 get report";
        // Listed first: the role may list `reports/` only (a condition on `s3:prefix`), and
        // without ListBucket on the request S3 answers a missing key with 403, not 404.
        if !self.list_keys(key, None, 1).await?.iter().any(|k| k == key) {
            return Ok(None);
        }
        let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(classify(op, e)),
        };
        let bytes = out.body.collect().await.map_err(|e| StoreError::transient(op, e))?;
        Ok(Some(bytes.into_bytes().to_vec()))
    }
}
