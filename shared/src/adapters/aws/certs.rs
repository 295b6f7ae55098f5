//! Certificates table (DynamoDB): the provisioning allowlist, the certificate inventory, the
//! provisioning audit trail and per-claim counters, one table keyed `pk` / `sk`:
//!
//! | item | `pk` | `sk` | indexed |
//! |---|---|---|---|
//! | allowlist entry | `serial#<serial>` | `allow` | `kind = allow` in `by_kind` (operators list the allowlist) |
//! | certificate | `cert#<id>` | `cert` | `exp_bucket = d#<UTC day of notAfter>#<0..3>`, `not_after_ms` in `by_expiry` |
//! | audit event | `audit#<serial>` | `<at_ms, 13 digits>#<n>` | |
//! | reconciliation cursor | `$reconcile` | `state` | |
//! | claim counter | `claim#<claim certificate id>` | `unknown` | `kind = suspicious` in `by_kind` once it reaches the threshold |
//!
//! The daily expiry check reads one `by_expiry` Query per day of its window and bucket shard
//! (`[from, to)`: at 7 + 30 days, 152 small Queries), each returning only certificates that
//! expire that day: O(expiring), never a scan, never a per-certificate API call. Four shards
//! per day keep a provisioning burst (certificates issued together expire together) from
//! writing one index partition. Enrolment is a PutItem conditioned on the entry's state, so
//! two devices presenting one serial at once cannot both provision; a rotation is a PutItem
//! conditioned on the entry exactly as read (the certificate it rotates from).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use futures_util::stream::{self, StreamExt};

use super::{classify, query_items, MAX_CONCURRENT_REQUESTS};
use crate::certs::expiry;
use crate::certs::hook::SUSPICIOUS_UNKNOWN_SERIALS;
use crate::env::{ConfigError, Env};
use crate::error::StoreError;
use crate::model::{AllowlistEntry, Certificate, CertificateId, Enrolment, ThingName};
use crate::ports::{
    rotation_settled, Allowlist, AuditEvent, CertificateInventory, Enrolled, ProvisioningAudit,
    ReconcileProgress, ReconcileState,
};

pub const EXPIRY_INDEX: &str = "by_expiry";
pub const KIND_INDEX: &str = "by_kind";
/// Shards of each expiry day in the `by_expiry` index.
pub const EXPIRY_SHARDS: u32 = 4;

type Item = HashMap<String, AttributeValue>;

#[derive(Clone, Debug)]
pub struct CertificatesTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl CertificatesTable {
    /// Reads `FLEET_CERTIFICATES_TABLE`.
    pub fn from_env(sdk: &aws_config::SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self::new(aws_sdk_dynamodb::Client::new(sdk), env.required("FLEET_CERTIFICATES_TABLE")?))
    }

    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }
}

/// 64 random bits (the standard library's per-process random hasher keys, mixed with a counter
/// and the time): enough to tell apart audit events written in the same millisecond.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn key(pk: String, sk: &str) -> Item {
    HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s(sk))])
}

fn serial_key(serial: &ThingName) -> Item {
    key(format!("serial#{serial}"), "allow")
}

/// The `by_expiry` bucket of a certificate: its expiry day and a shard from its id.
pub fn expiry_bucket(id: &CertificateId, not_after_ms: i64) -> String {
    let h = crate::hash::fnv1a32(id.as_str().as_bytes());
    format!("d#{}#{}", expiry::day(not_after_ms), h % EXPIRY_SHARDS)
}

fn json_attr<T: serde::de::DeserializeOwned>(
    item: &Item,
    name: &str,
    op: &'static str,
) -> Result<T, StoreError> {
    let text = item
        .get(name)
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::permanent(op, format!("item without {name}")))?;
    serde_json::from_str(text).map_err(|e| StoreError::permanent(op, e))
}

fn to_json<T: serde::Serialize>(v: &T, op: &'static str) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::permanent(op, e))
}

fn state_of(e: &Enrolment) -> &'static str {
    match e {
        Enrolment::Allowed => "allowed",
        Enrolment::Provisioned { .. } => "provisioned",
        Enrolment::Decommissioned { .. } => "decommissioned",
    }
}

/// What an allowlist write expects to find: no entry, an entry in a state, or exactly the
/// `entry` attribute read.
enum AsRead {
    Absent,
    State(&'static str),
    Entry(AttributeValue),
}

impl CertificatesTable {
    async fn get(&self, key: Item, op: &'static str) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        Ok(out.item().cloned())
    }

    /// Write an entry if the stored one is still as read ([`AsRead`]).
    async fn put_entry(&self, e: &AllowlistEntry, read: AsRead) -> Result<bool, StoreError> {
        let op = "dynamodb allowlist put";
        let mut item = serial_key(&e.serial);
        item.insert("entry".into(), s(to_json(e, op)?));
        item.insert("state".into(), s(state_of(&e.enrolment)));
        item.insert("kind".into(), s("allow"));
        let req = self.client.put_item().table_name(&self.table).set_item(Some(item));
        let req = match read {
            AsRead::Absent => req.condition_expression("attribute_not_exists(pk)"),
            // `state` is a reserved word.
            AsRead::State(state) => req
                .condition_expression("#st = :read")
                .expression_attribute_names("#st", "state")
                .expression_attribute_values(":read", s(state)),
            AsRead::Entry(entry) => req
                .condition_expression("#en = :read")
                .expression_attribute_names("#en", "entry")
                .expression_attribute_values(":read", entry),
        };
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|se| se.is_conditional_check_failed_exception()) => {
                Ok(false)
            }
            Err(e) => Err(classify(op, e)),
        }
    }

    /// One `by_expiry` bucket's certificates in `[from_ms, to_ms)`, at most `limit`.
    async fn expiring_in(
        &self,
        bucket: String,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Certificate>, StoreError> {
        let op = "dynamodb certificates expiring";
        let req = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(EXPIRY_INDEX)
            .key_condition_expression("exp_bucket = :b AND not_after_ms BETWEEN :lo AND :hi")
            .expression_attribute_values(":b", s(bucket))
            .expression_attribute_values(":lo", n(from_ms))
            .expression_attribute_values(":hi", n(to_ms - 1));
        query_items(req, op, limit, |item| json_attr(item, "cert", op).map(Some)).await
    }
}

impl Allowlist for CertificatesTable {
    async fn entry(&self, serial: &ThingName) -> Result<Option<AllowlistEntry>, StoreError> {
        let op = "dynamodb allowlist get";
        self.get(serial_key(serial), op).await?.map(|item| json_attr(&item, "entry", op)).transpose()
    }

    async fn allow(&self, entries: &[AllowlistEntry]) -> Result<(), StoreError> {
        for e in entries {
            // A new entry, or an update of class and region that keeps the enrolment: read,
            // then write conditioned on the state read (a race reads again).
            loop {
                let (next, read) = match self.entry(&e.serial).await? {
                    None => (e.clone(), AsRead::Absent),
                    Some(old) => {
                        let read = state_of(&old.enrolment);
                        (
                            AllowlistEntry { enrolment: old.enrolment, added_ms: old.added_ms, ..e.clone() },
                            AsRead::State(read),
                        )
                    }
                };
                if self.put_entry(&next, read).await? {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn disallow(&self, serial: &ThingName) -> Result<bool, StoreError> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(serial_key(serial)))
            .condition_expression("#st = :allowed")
            .expression_attribute_names("#st", "state")
            .expression_attribute_values(":allowed", s("allowed"))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|se| se.is_conditional_check_failed_exception()) => {
                Ok(false)
            }
            Err(e) => Err(classify("dynamodb allowlist remove", e)),
        }
    }

    async fn entries(
        &self,
        after: Option<&ThingName>,
        limit: usize,
    ) -> Result<Vec<AllowlistEntry>, StoreError> {
        let op = "dynamodb allowlist list";
        let req = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(KIND_INDEX)
            .key_condition_expression("kind = :k AND pk > :after")
            .expression_attribute_values(":k", s("allow"))
            .expression_attribute_values(
                ":after",
                s(format!("serial#{}", after.map(ToString::to_string).unwrap_or_default())),
            );
        query_items(req, op, limit, |item| json_attr(item, "entry", op).map(Some)).await
    }

    async fn enrol(
        &self,
        serial: &ThingName,
        certificate: &CertificateId,
        at_ms: i64,
    ) -> Result<Enrolled, StoreError> {
        loop {
            let Some(current) = self.entry(serial).await? else { return Ok(Enrolled::Unknown) };
            match &current.enrolment {
                Enrolment::Decommissioned { .. } => return Ok(Enrolled::Decommissioned),
                Enrolment::Provisioned { certificate: c, .. } if c == certificate => {
                    return Ok(Enrolled::Yes)
                }
                Enrolment::Provisioned { certificate: c, .. } => return Ok(Enrolled::Taken(c.clone())),
                Enrolment::Allowed => {}
            }
            let next = AllowlistEntry {
                enrolment: Enrolment::Provisioned {
                    thing: serial.clone(),
                    certificate: certificate.clone(),
                    at_ms,
                },
                ..current
            };
            if self.put_entry(&next, AsRead::State("allowed")).await? {
                return Ok(Enrolled::Yes);
            }
            // Another writer got there first: read again and decide on what it wrote.
        }
    }

    async fn rotate(
        &self,
        serial: &ThingName,
        from: &CertificateId,
        to: &CertificateId,
        at_ms: i64,
    ) -> Result<Enrolled, StoreError> {
        let op = "dynamodb allowlist rotate";
        loop {
            let Some(item) = self.get(serial_key(serial), op).await? else { return Ok(Enrolled::Unknown) };
            let current: AllowlistEntry = json_attr(&item, "entry", op)?;
            if let Some(settled) = rotation_settled(&current.enrolment, from, to) {
                return Ok(settled);
            }
            let read =
                item.get("entry").cloned().ok_or_else(|| StoreError::permanent(op, "item without entry"))?;
            let next = AllowlistEntry {
                enrolment: Enrolment::Provisioned { thing: serial.clone(), certificate: to.clone(), at_ms },
                ..current
            };
            if self.put_entry(&next, AsRead::Entry(read)).await? {
                return Ok(Enrolled::Yes);
            }
            // Written meanwhile: read again and decide on what is there now.
        }
    }

    async fn reset(&self, serial: &ThingName) -> Result<bool, StoreError> {
        let Some(current) = self.entry(serial).await? else { return Ok(false) };
        if !matches!(current.enrolment, Enrolment::Provisioned { .. }) {
            return Ok(false);
        }
        self.put_entry(
            &AllowlistEntry { enrolment: Enrolment::Allowed, ..current },
            AsRead::State("provisioned"),
        )
        .await
    }

    async fn decommission(
        &self,
        serial: &ThingName,
        at_ms: i64,
    ) -> Result<Option<AllowlistEntry>, StoreError> {
        loop {
            let Some(current) = self.entry(serial).await? else { return Ok(None) };
            let next = AllowlistEntry { enrolment: Enrolment::Decommissioned { at_ms }, ..current.clone() };
            if self.put_entry(&next, AsRead::State(state_of(&current.enrolment))).await? {
                return Ok(Some(current));
            }
        }
    }
}

impl CertificateInventory for CertificatesTable {
    async fn record(&self, cert: &Certificate) -> Result<(), StoreError> {
        let op = "dynamodb certificate put";
        let mut item = key(format!("cert#{}", cert.id), "cert");
        item.insert("cert".into(), s(to_json(cert, op)?));
        item.insert("not_after_ms".into(), n(cert.not_after_ms));
        item.insert("exp_bucket".into(), s(expiry_bucket(&cert.id, cert.not_after_ms)));
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        Ok(())
    }

    async fn record_many(&self, certs: &[Certificate]) -> Result<(), StoreError> {
        // One PutItem each (the hook's grant; bulk loads are rare and operator-driven).
        for c in certs {
            self.record(c).await?;
        }
        Ok(())
    }

    async fn certificate(&self, id: &CertificateId) -> Result<Option<Certificate>, StoreError> {
        let op = "dynamodb certificate get";
        self.get(key(format!("cert#{id}"), "cert"), op)
            .await?
            .map(|item| json_attr(&item, "cert", op))
            .transpose()
    }

    async fn expiring(&self, from_ms: i64, to_ms: i64, limit: usize) -> Result<Vec<Certificate>, StoreError> {
        if to_ms <= from_ms {
            return Ok(Vec::new());
        }
        let buckets: Vec<String> = (expiry::day(from_ms)..=expiry::day(to_ms - 1))
            .flat_map(|day| (0..EXPIRY_SHARDS).map(move |shard| format!("d#{day}#{shard}")))
            .collect();
        let results: Vec<Result<Vec<Certificate>, StoreError>> = stream::iter(buckets)
            .map(|b| self.expiring_in(b, from_ms, to_ms, limit))
            .buffer_unordered(MAX_CONCURRENT_REQUESTS)
            .collect()
            .await;
        let mut all = Vec::new();
        for r in results {
            all.extend(r?);
        }
        all.sort_by(|a, b| (a.not_after_ms, &a.id).cmp(&(b.not_after_ms, &b.id)));
        all.truncate(limit);
        Ok(all)
    }
}

impl ProvisioningAudit for CertificatesTable {
    async fn audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let op = "dynamodb audit put";
        // Events of one serial in one millisecond (two sandboxes racing for one serial) are
        // told apart by a random suffix, and an event never replaces another: a taken key is
        // tried again with another suffix.
        for _ in 0..4 {
            let mut item = key(
                format!("audit#{}", event.serial),
                &format!("{:013}#{:016x}", event.at_ms.max(0), random()),
            );
            item.insert("event".into(), s(to_json(event, op)?));
            let out = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(sk)")
                .send()
                .await;
            match out {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.as_service_error().is_some_and(|se| se.is_conditional_check_failed_exception()) => {}
                Err(e) => return Err(classify(op, e)),
            }
        }
        Err(StoreError::transient(op, "no free audit key after 4 tries"))
    }

    async fn unknown_serial(&self, claim: &str, at_ms: i64) -> Result<u64, StoreError> {
        let op = "dynamodb claim counter";
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(format!("claim#{claim}"), "unknown")))
            .update_expression("ADD unknown_serials :one SET last_ms = :now")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(at_ms))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        let count = out
            .attributes()
            .and_then(|a| a.get("unknown_serials"))
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        // From the threshold on (a failed mark is made again by the next count).
        if count >= SUSPICIOUS_UNKNOWN_SERIALS {
            self.client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key(format!("claim#{claim}"), "unknown")))
                .update_expression("SET kind = :k")
                .expression_attribute_values(":k", s("suspicious"))
                .send()
                .await
                .map_err(|e| classify(op, e))?;
        }
        Ok(count)
    }

    async fn trail(&self, serial: &str) -> Result<Vec<AuditEvent>, StoreError> {
        let op = "dynamodb audit trail";
        let req = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(format!("audit#{serial}")));
        query_items(req, op, usize::MAX, |item| json_attr(item, "event", op).map(Some)).await
    }

    async fn suspicious_claims(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let op = "dynamodb suspicious claims";
        let req = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(KIND_INDEX)
            .key_condition_expression("kind = :k")
            .expression_attribute_values(":k", s("suspicious"));
        let mut out = query_items(req, op, usize::MAX, |item| {
            let claim = item.get("pk").and_then(|v| v.as_s().ok()).and_then(|p| p.strip_prefix("claim#"));
            let count =
                item.get("unknown_serials").and_then(|v| v.as_n().ok()).and_then(|v| v.parse::<u64>().ok());
            Ok(claim.zip(count).map(|(claim, count)| (claim.to_owned(), count)))
        })
        .await?;
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(out)
    }
}

impl ReconcileProgress for CertificatesTable {
    async fn reconcile_state(&self) -> Result<Option<ReconcileState>, StoreError> {
        let op = "dynamodb reconcile state get";
        self.get(key("$reconcile".to_owned(), "state"), op)
            .await?
            .map(|item| json_attr(&item, "state", op))
            .transpose()
    }

    async fn save_reconcile_state(&self, state: &ReconcileState) -> Result<(), StoreError> {
        let op = "dynamodb reconcile state put";
        let mut item = key("$reconcile".to_owned(), "state");
        item.insert("state".into(), s(to_json(state, op)?));
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        Ok(())
    }
}
