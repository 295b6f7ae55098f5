//! When certificates expire, and how urgently that matters: the classes the daily check
//! reports (as Device Defender's expiring-certificate check does, with its threshold range),
//! and the day buckets of the inventory's expiry index, so the check reads only the
//! certificates inside its window.

use serde::{Deserialize, Serialize};

use crate::model::{CertStatus, Certificate, CertificateId, ThingName};

const DAY_MS: i64 = 86_400_000;

/// Under this much validity left, an expiring certificate is critical.
pub const CRITICAL_MS: i64 = 7 * DAY_MS;
/// Device Defender's range for the expiring-certificate threshold, in days.
pub const THRESHOLD_DAYS: std::ops::RangeInclusive<u32> = 30..=3652;
pub const DEFAULT_THRESHOLD_DAYS: u32 = 30;

/// How urgent a certificate's expiry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryClass {
    /// Past `notAfter`: the device can no longer connect, not even to be fixed.
    Expired,
    /// Less than 7 days left.
    Critical,
    /// Less than the threshold left.
    Warning,
}

impl ExpiryClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryClass::Expired => "expired",
            ExpiryClass::Critical => "critical",
            ExpiryClass::Warning => "warning",
        }
    }
}

/// The warning threshold, in days, within Device Defender's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold(u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expiry threshold {0} days: Device Defender allows 30 to 3652")]
pub struct InvalidThreshold(pub u32);

impl Threshold {
    pub fn days(days: u32) -> Result<Self, InvalidThreshold> {
        if THRESHOLD_DAYS.contains(&days) {
            Ok(Self(days))
        } else {
            Err(InvalidThreshold(days))
        }
    }

    pub fn as_days(self) -> u32 {
        self.0
    }

    pub fn as_ms(self) -> i64 {
        i64::from(self.0) * DAY_MS
    }
}

impl Default for Threshold {
    fn default() -> Self {
        Self(DEFAULT_THRESHOLD_DAYS)
    }
}

/// The class of a certificate valid until `not_after_ms` (inclusive, as X.509 validity is)
/// at `now_ms`; `None` while more than the threshold is left.
pub fn classify(not_after_ms: i64, now_ms: i64, threshold: Threshold) -> Option<ExpiryClass> {
    let left = not_after_ms - now_ms;
    if left < 0 {
        Some(ExpiryClass::Expired)
    } else if left < CRITICAL_MS {
        Some(ExpiryClass::Critical)
    } else if left < threshold.as_ms() {
        Some(ExpiryClass::Warning)
    } else {
        None
    }
}

/// The UTC day (days since 1970-01-01) a time falls in: the expiry index's bucket.
pub fn day(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// The window the daily check reads: certificates that expired within `lookback_days` or
/// expire before the threshold is over, as `[from_ms, to_ms)`.
pub fn window(now_ms: i64, threshold: Threshold, lookback_days: u32) -> (i64, i64) {
    (now_ms - i64::from(lookback_days) * DAY_MS, now_ms + threshold.as_ms())
}

/// How many days back the daily check looks for certificates that already expired (a device
/// cut off in the last week is still a finding worth repeating).
pub const LOOKBACK_DAYS: u32 = 7;

/// One certificate the daily check reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiryFinding {
    pub certificate: CertificateId,
    pub thing: Option<ThingName>,
    pub class: ExpiryClass,
    pub not_after_ms: i64,
}

/// What the daily check found in its window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiryReport {
    pub checked_ms: i64,
    pub threshold_days: u32,
    pub window_from_ms: i64,
    pub window_to_ms: i64,
    pub expired: usize,
    pub critical: usize,
    pub warning: usize,
    /// Certificates in the window that are not active (inactive, revoked, ...): listed
    /// nowhere else, never a device's rotation.
    pub not_active: usize,
    /// Active certificates only, most urgent first.
    pub findings: Vec<ExpiryFinding>,
}

/// Classify the certificates the window returned (active ones; the rest are only counted).
pub fn report(certs: &[Certificate], now_ms: i64, threshold: Threshold, window: (i64, i64)) -> ExpiryReport {
    let mut out = ExpiryReport {
        checked_ms: now_ms,
        threshold_days: threshold.as_days(),
        window_from_ms: window.0,
        window_to_ms: window.1,
        ..ExpiryReport::default()
    };
    for c in certs {
        if c.status != CertStatus::Active {
            out.not_active += 1;
            continue;
        }
        let Some(class) = classify(c.not_after_ms, now_ms, threshold) else { continue };
        match class {
            ExpiryClass::Expired => out.expired += 1,
            ExpiryClass::Critical => out.critical += 1,
            ExpiryClass::Warning => out.warning += 1,
        }
        out.findings.push(ExpiryFinding {
            certificate: c.id.clone(),
            thing: c.thing.clone(),
            class,
            not_after_ms: c.not_after_ms,
        });
    }
    out.findings.sort_by(|a, b| {
        (a.class, a.not_after_ms, &a.certificate).cmp(&(b.class, b.not_after_ms, &b.certificate))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000;
    const HOUR_MS: i64 = 3_600_000;

    #[test]
    fn boundaries_fall_where_device_defender_puts_them() {
        let t = Threshold::default();
        // exactly 30 days left: not under the threshold yet
        assert_eq!(classify(NOW + 30 * DAY_MS, NOW, t), None);
        // 29 days 23 hours left: warning
        assert_eq!(classify(NOW + 30 * DAY_MS - HOUR_MS, NOW, t), Some(ExpiryClass::Warning));
        // exactly 7 days: warning; a second less: critical
        assert_eq!(classify(NOW + 7 * DAY_MS, NOW, t), Some(ExpiryClass::Warning));
        assert_eq!(classify(NOW + 7 * DAY_MS - 1000, NOW, t), Some(ExpiryClass::Critical));
        // valid through notAfter itself; expired one second after
        assert_eq!(classify(NOW, NOW, t), Some(ExpiryClass::Critical));
        assert_eq!(classify(NOW - 1000, NOW, t), Some(ExpiryClass::Expired));
        // a longer threshold widens only the warning class
        let year = Threshold::days(365).expect("in range");
        assert_eq!(classify(NOW + 200 * DAY_MS, NOW, year), Some(ExpiryClass::Warning));
        assert_eq!(classify(NOW + 200 * DAY_MS, NOW, t), None);
    }

    #[test]
    fn thresholds_stay_within_device_defenders_range() {
        assert!(Threshold::days(29).is_err() && Threshold::days(3653).is_err());
        assert_eq!(Threshold::days(3652).map(Threshold::as_days), Ok(3652));
        assert_eq!(Threshold::default().as_days(), 30);
    }

    #[test]
    fn days_and_windows_are_utc_days_and_half_open() {
        assert_eq!(day(0), 0);
        assert_eq!(day(DAY_MS - 1), 0);
        assert_eq!(day(-1), -1);
        let (from, to) = window(NOW, Threshold::default(), 7);
        assert_eq!((NOW - from, to - NOW), (7 * DAY_MS, 30 * DAY_MS));
    }

    #[test]
    fn a_report_counts_active_certificates_by_class_most_urgent_first() {
        let cert = |n: u8, left_ms: i64, status: CertStatus| Certificate {
            id: CertificateId::of_der(&[n]),
            thing: ThingName::parse(&format!("dev-{n}")).ok(),
            serial: String::new(),
            issuer: String::new(),
            subject: String::new(),
            not_before_ms: 0,
            not_after_ms: NOW + left_ms,
            status,
            recorded_ms: 0,
        };
        let certs = [
            cert(1, 20 * DAY_MS, CertStatus::Active),
            cert(2, -1000, CertStatus::Active),
            cert(3, 3 * DAY_MS, CertStatus::Active),
            cert(4, 2 * DAY_MS, CertStatus::Revoked),
            cert(5, 40 * DAY_MS, CertStatus::Active),
        ];
        let r = report(&certs, NOW, Threshold::default(), window(NOW, Threshold::default(), LOOKBACK_DAYS));
        assert_eq!((r.expired, r.critical, r.warning, r.not_active), (1, 1, 1, 1));
        let order: Vec<ExpiryClass> = r.findings.iter().map(|f| f.class).collect();
        assert_eq!(order, [ExpiryClass::Expired, ExpiryClass::Critical, ExpiryClass::Warning]);
        assert_eq!(r.findings[0].thing.as_ref().map(|t| t.as_str()), Some("dev-2"));
    }
}
