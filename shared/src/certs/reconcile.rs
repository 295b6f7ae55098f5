//! Reconciliation: the certificate inventory against AWS IoT's registry.
//!
//! The hook records every certificate it provisions, but certificates also come from outside
//! it (the console, `CreateKeysAndCertificate` by hand, JITP, a migration). Reconciliation
//! pages through the registry (ListCertificates), describes only what the inventory does not
//! know (DescribeCertificate, its PEM parsed for the real dates) and adopts it, follows status
//! changes, and reports Device-Defender-style findings:
//! - a revoked or inactive certificate still attached to a thing;
//! - one certificate attached to several things;
//! - a device whose only certificate has expired (no other active, unexpired one attached).
//!
//! Every certificate costs one ListPrincipalThings; expired ones one ListThingPrincipals per
//! thing; unknown ones one DescribeCertificate. Calls run at bounded concurrency and back off
//! exponentially on throttling (the control plane's limits are a few to tens of requests per
//! second per account), so a sweep of a large fleet takes hours: [`reconcile`] works page by
//! page within a time budget and says where to continue (`next_marker`), and the scheduled
//! function keeps that cursor between slices ([`ReconcileState`](crate::ports::ReconcileState)).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};

use super::parse_pem;
use crate::error::StoreError;
use crate::model::{CertStatus, Certificate, CertificateId, RegisteredCertificate, ThingName};
use crate::ports::{CertificateInventory, CertificateRegistry};

/// Registry calls in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Certificates per ListCertificates page (AWS's maximum).
pub const DEFAULT_PAGE_SIZE: usize = 250;
/// Retries of one call after throttling or a transient failure, backing off from 200 ms to 20 s.
pub const MAX_RETRIES: usize = 8;
/// How long past its budget a slice lets the page in hand finish before cutting it off.
pub const PAGE_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Options {
    pub page_size: usize,
    pub concurrency: usize,
    /// Stop starting new pages after this long (`None`: sweep to the end).
    pub budget: Option<Duration>,
    /// First backoff after a throttled call (doubles, with jitter, up to 100 times this).
    pub first_backoff: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            page_size: DEFAULT_PAGE_SIZE,
            concurrency: DEFAULT_CONCURRENCY,
            budget: None,
            first_backoff: Duration::from_millis(200),
        }
    }
}

/// What reconciliation found wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// A revoked or inactive certificate still attached to things: detach it, or it is a sign
    /// that a decommission stopped half way.
    InactiveAttached { certificate: CertificateId, status: CertStatus, things: Vec<ThingName> },
    /// One certificate attached to several things: one identity for many devices.
    SharedCertificate { certificate: CertificateId, things: Vec<ThingName> },
    /// A device whose only certificate(s) have expired: it cannot connect, not even to be
    /// given a new one.
    OnlyCertificateExpired { thing: ThingName, certificate: CertificateId, not_after_ms: i64 },
}

impl Finding {
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::InactiveAttached { .. } => "inactive_attached",
            Finding::SharedCertificate { .. } => "shared_certificate",
            Finding::OnlyCertificateExpired { .. } => "only_certificate_expired",
        }
    }
}

/// A registry certificate whose PEM could not be read (kept out of the inventory, reported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreadable {
    pub certificate: CertificateId,
    pub error: String,
}

/// What one reconciliation (or one slice of it) did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciliation {
    /// Certificates listed by the registry.
    pub listed: u64,
    /// DescribeCertificate calls (certificates the inventory did not know).
    pub described: u64,
    /// Certificates recorded that the inventory did not have.
    pub adopted: u64,
    /// Inventory records whose status or thing changed to the registry's.
    pub updated: u64,
    /// Calls retried after throttling or a transient failure.
    pub retried: u64,
    pub unreadable: Vec<Unreadable>,
    /// Certificates a permanent error stopped (access denied on one, a thing name AWS would
    /// not give): the rest of the sweep goes on without them.
    pub failed: Vec<Unreadable>,
    /// Sorted, each once.
    pub findings: Vec<Finding>,
    /// The budget ran out before the registry's last page: continue from `next_marker`
    /// (`None`: the first page again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unfinished: bool,
    pub next_marker: Option<String>,
}

impl Reconciliation {
    pub fn finished(&self) -> bool {
        !self.unfinished
    }

    /// Findings per kind.
    pub fn counts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let mut counts = std::collections::BTreeMap::new();
        for f in &self.findings {
            *counts.entry(f.kind()).or_insert(0) += 1;
        }
        counts
    }
}

/// What happened to one certificate.
#[derive(Default)]
struct Outcome {
    described: bool,
    adopted: bool,
    updated: bool,
    unreadable: Option<Unreadable>,
    findings: Vec<Finding>,
}

/// Reconcile from `marker` (`None`: the registry's first page) until the registry's end or the
/// budget (checked between pages, at least one page done; a page still running past the budget
/// and [`PAGE_GRACE`] is cut off and done again next time). A certificate a permanent error
/// stops is listed in `failed` and the sweep goes on; a call still failing transiently after
/// its retries fails the reconciliation (the caller keeps its cursor and runs again). Fails on a call that still fails after its retries, or a permanent error (access
/// denied): the caller keeps its cursor and runs again.
pub async fn reconcile<R, I>(
    registry: &R,
    inventory: &I,
    marker: Option<String>,
    now_ms: i64,
    opts: &Options,
) -> Result<Reconciliation, StoreError>
where
    R: CertificateRegistry,
    I: CertificateInventory,
{
    let started = Instant::now();
    let retried = AtomicU64::new(0);
    let mut out = Reconciliation::default();
    let mut findings = BTreeSet::new();
    let mut marker = marker;
    loop {
        // A page under heavy throttling can outlast the budget: it is cut off at the budget
        // (and a grace for the calls in flight) and done again by the next slice, from its own
        // marker (every step is idempotent).
        let page_work = async {
            let page = with_retries(opts, &retried, || {
                registry.list_certificates(marker.as_deref(), opts.page_size)
            })
            .await?;
            let outcomes: Vec<(CertificateId, Result<Outcome, StoreError>)> =
                stream::iter(page.certificates.clone())
                    .map(|listed| async {
                        let id = listed.id.clone();
                        (id, one(registry, inventory, listed, now_ms, opts, &retried).await)
                    })
                    .buffer_unordered(opts.concurrency.max(1))
                    .collect()
                    .await;
            Ok::<_, StoreError>((page, outcomes))
        };
        let worked = match opts.budget {
            Some(budget) => {
                let left = budget.saturating_sub(started.elapsed()) + PAGE_GRACE;
                match tokio::time::timeout(left, page_work).await {
                    Ok(worked) => worked,
                    Err(_) => {
                        out.unfinished = true;
                        out.next_marker = marker;
                        break;
                    }
                }
            }
            None => page_work.await,
        };
        let (page, outcomes) = worked?;
        out.listed += page.certificates.len() as u64;
        for (id, outcome) in outcomes {
            match outcome {
                Ok(o) => {
                    out.described += u64::from(o.described);
                    out.adopted += u64::from(o.adopted);
                    out.updated += u64::from(o.updated);
                    out.unreadable.extend(o.unreadable);
                    findings.extend(o.findings);
                }
                // Still failing after its retries: the slice fails and its page is done again.
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => out.failed.push(Unreadable { certificate: id, error: e.to_string() }),
            }
        }
        match page.next {
            // At least one page per call, so every slice makes progress.
            Some(next) if opts.budget.is_some_and(|b| started.elapsed() >= b) => {
                out.unfinished = true;
                out.next_marker = Some(next);
                break;
            }
            Some(next) => marker = Some(next),
            None => break,
        }
    }
    out.retried = retried.load(Relaxed);
    out.findings = findings.into_iter().collect();
    out.unreadable.sort_by(|a, b| a.certificate.cmp(&b.certificate));
    out.failed.sort_by(|a, b| a.certificate.cmp(&b.certificate));
    Ok(out)
}

async fn one<R, I>(
    registry: &R,
    inventory: &I,
    listed: RegisteredCertificate,
    now_ms: i64,
    opts: &Options,
    retried: &AtomicU64,
) -> Result<Outcome, StoreError>
where
    R: CertificateRegistry,
    I: CertificateInventory,
{
    let mut o = Outcome::default();
    let things = with_retries(opts, retried, || registry.certificate_things(&listed.arn)).await?;
    let sole_thing = match things.as_slice() {
        [only] => Some(only.clone()),
        _ => None,
    };
    let known = with_retries(opts, retried, || inventory.certificate(&listed.id)).await?;
    let cert = match known {
        Some(mut cert) => {
            let thing = cert.thing.clone().or(sole_thing);
            if cert.status != listed.status || cert.thing != thing {
                cert.status = listed.status;
                cert.thing = thing;
                cert.recorded_ms = now_ms;
                with_retries(opts, retried, || inventory.record(&cert)).await?;
                o.updated = true;
            }
            cert
        }
        None => {
            o.described = true;
            let Some(detail) =
                with_retries(opts, retried, || registry.describe_certificate(&listed.id)).await?
            else {
                return Ok(o); // deleted since it was listed
            };
            let parsed = match parse_pem(&detail.pem) {
                Ok(p) if p.id == listed.id => p,
                Ok(p) => {
                    o.unreadable = Some(Unreadable {
                        certificate: listed.id,
                        error: format!("the PEM's SHA-256 is {}, not the certificate's id", p.id),
                    });
                    return Ok(o);
                }
                Err(e) => {
                    o.unreadable = Some(Unreadable { certificate: listed.id, error: e.to_string() });
                    return Ok(o);
                }
            };
            let cert = Certificate {
                id: listed.id.clone(),
                thing: sole_thing,
                serial: parsed.serial,
                issuer: parsed.issuer,
                subject: parsed.subject,
                not_before_ms: parsed.not_before_ms,
                not_after_ms: parsed.not_after_ms,
                status: detail.listed.status,
                recorded_ms: now_ms,
            };
            with_retries(opts, retried, || inventory.record(&cert)).await?;
            o.adopted = true;
            cert
        }
    };

    if matches!(cert.status, CertStatus::Inactive | CertStatus::Revoked) && !things.is_empty() {
        o.findings.push(Finding::InactiveAttached {
            certificate: cert.id.clone(),
            status: cert.status,
            things: things.clone(),
        });
    }
    if things.len() > 1 {
        o.findings.push(Finding::SharedCertificate { certificate: cert.id.clone(), things: things.clone() });
    }
    if cert.not_after_ms <= now_ms {
        for thing in &things {
            if let Some(finding) =
                only_expired(registry, inventory, thing, &cert, now_ms, opts, retried).await?
            {
                o.findings.push(finding);
            }
        }
    }
    Ok(o)
}

/// `thing` has no usable certificate: every one attached to it has expired or is not active.
/// Reported once per thing, by its expired certificate with the smallest id.
async fn only_expired<R, I>(
    registry: &R,
    inventory: &I,
    thing: &ThingName,
    expired: &Certificate,
    now_ms: i64,
    opts: &Options,
    retried: &AtomicU64,
) -> Result<Option<Finding>, StoreError>
where
    R: CertificateRegistry,
    I: CertificateInventory,
{
    let attached = with_retries(opts, retried, || registry.thing_certificates(thing)).await?;
    for other in attached.iter().filter(|id| **id != expired.id) {
        let Some(cert) = with_retries(opts, retried, || inventory.certificate(other)).await? else {
            // Not in the inventory yet (this sweep adopts it on its own page): judge it by the
            // registry, with the same rules as below.
            match with_retries(opts, retried, || registry.describe_certificate(other)).await? {
                Some(d) => match parse_pem(&d.pem) {
                    Ok(p) if d.listed.status == CertStatus::Active && p.not_after_ms > now_ms => {
                        return Ok(None)
                    }
                    Ok(p) if p.not_after_ms <= now_ms && *other < expired.id => return Ok(None),
                    _ => continue,
                },
                None => continue,
            }
        };
        if cert.status == CertStatus::Active && cert.not_after_ms > now_ms {
            return Ok(None);
        }
        if cert.not_after_ms <= now_ms && cert.id < expired.id {
            return Ok(None); // reported by that one
        }
    }
    Ok(Some(Finding::OnlyCertificateExpired {
        thing: thing.clone(),
        certificate: expired.id.clone(),
        not_after_ms: expired.not_after_ms,
    }))
}

/// A registry call, retried with exponential backoff and jitter while it fails transiently.
async fn with_retries<T, F, Fut>(opts: &Options, retried: &AtomicU64, call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    call.retry(
        ExponentialBuilder::default()
            .with_min_delay(opts.first_backoff)
            .with_max_delay(opts.first_backoff * 100)
            .with_max_times(MAX_RETRIES)
            .with_jitter(),
    )
    .sleep(tokio::time::sleep)
    .when(StoreError::is_transient)
    .notify(|_, _| {
        retried.fetch_add(1, Relaxed);
    })
    .await
}

#[cfg(test)]
mod tests;
