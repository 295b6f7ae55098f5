//! Calendar helpers on Unix milliseconds (UTC), without a date-time dependency.

/// `("YYYY-MM-DD", hour)` of a Unix time in milliseconds, UTC.
pub fn utc_date_hour(ms: i64) -> (String, u32) {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let hour = (secs.rem_euclid(86_400) / 3600) as u32;
    let (y, m, d) = civil_from_days(days);
    (format!("{y:04}-{m:02}-{d:02}"), hour)
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let (date, hour) = utc_date_hour(ms);
    let secs_of_hour = ms.div_euclid(1000).rem_euclid(3600);
    format!("{date}T{hour:02}:{:02}:{:02}.{:03}Z", secs_of_hour / 60, secs_of_hour % 60, ms.rem_euclid(1000))
}

/// Parse Timestream's `YYYY-MM-DD HH:MM:SS[.fffffffff]` (UTC) to Unix milliseconds.
pub fn parse_timestream_time(s: &str) -> Option<i64> {
    let (date, clock) = s.split_once([' ', 'T'])?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let frac = frac.trim_end_matches('Z');
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    Some((days_from_civil(y, m as u32, day as u32) * 86_400 + hh * 3600 + mm * 60 + ss) * 1000 + ms)
}

/// Howard Hinnant's civil date → days algorithm (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's days → civil date algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Milliseconds since the Unix epoch, from the system clock (handler boundaries only).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
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
        assert_eq!(parse_timestream_time("yesterday"), None);
    }
}
