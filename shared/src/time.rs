//! Time on Unix milliseconds (UTC), through `jiff`: archive partitions, RFC 3339 for people,
//! Timestream's timestamp format, and the wall clock (read at handler boundaries only).

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;

fn timestamp(ms: i64) -> Timestamp {
    // Out-of-range times (beyond year ±9999) clamp to the nearest representable instant.
    Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 { Timestamp::MIN } else { Timestamp::MAX })
}

/// `("YYYY-MM-DD", hour)` of a Unix time in milliseconds, UTC.
pub fn utc_date_hour(ms: i64) -> (String, u32) {
    let dt = TimeZone::UTC.to_datetime(timestamp(ms));
    (dt.date().strftime("%Y-%m-%d").to_string(), dt.hour() as u32)
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    timestamp(ms).strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Parse Timestream's `YYYY-MM-DD HH:MM:SS[.fffffffff]` (UTC; `T` also accepted) to Unix
/// milliseconds, truncating below the millisecond.
pub fn parse_timestream_time(s: &str) -> Option<i64> {
    let dt: DateTime = s.trim_end_matches('Z').parse().ok()?;
    Some(dt.to_zoned(TimeZone::UTC).ok()?.timestamp().as_millisecond())
}

/// An RFC 3339 instant (`2025-11-24T16:00:00Z`, any offset) to Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    s.parse::<Timestamp>().ok().map(|t| t.as_millisecond())
}

/// Milliseconds since the Unix epoch, from the system clock (handler boundaries only).
pub fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(utc_date_hour(0), ("1970-01-01".to_owned(), 0));
        assert_eq!(utc_date_hour(951_782_400_000), ("2000-02-29".to_owned(), 0));
        assert_eq!(rfc3339_ms(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
        assert_eq!(rfc3339_ms(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
    }

    #[test]
    fn parses_timestream_times() {
        assert_eq!(parse_timestream_time("2025-11-24 16:00:00.123001042"), Some(1_764_000_000_123));
        assert_eq!(parse_timestream_time("2000-02-29 00:00:00"), Some(951_782_400_000));
        assert_eq!(parse_timestream_time("1970-01-01 00:00:00.5"), Some(500));
        assert_eq!(parse_timestream_time("2025-13-01 00:00:00"), None);
        assert_eq!(parse_timestream_time("2025-02-30 00:00:00"), None);
        assert_eq!(parse_timestream_time("yesterday"), None);
    }

    #[test]
    fn parses_rfc3339_with_offsets() {
        assert_eq!(parse_rfc3339("2025-11-24T16:00:00Z"), Some(1_764_000_000_000));
        assert_eq!(parse_rfc3339("2025-11-24T17:00:00.5+01:00"), Some(1_764_000_000_500));
        assert_eq!(parse_rfc3339("2025-11-24"), None);
    }
}
