//! Event times as people write them: RFC 3339 or nanoseconds since the
//! Unix epoch in, RFC 3339 (UTC) out. Pure functions; any input gets a time
//! or an error, never a panic.

/// Why a time was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("time {0:?}: expected RFC 3339 such as 2026-11-22T05:09:40Z or 2026-11-22T06:09:40.5+01:00, or nanoseconds since the Unix epoch")]
    Malformed(String),
    #[error("time {text:?}: {year:04}-{month:02} has no day {day}")]
    NoSuchDay { text: String, year: i64, month: u32, day: u32 },
    #[error("time {0:?} is before 1970")]
    BeforeEpoch(String),
    #[error("time {0:?} is after 2554-07-21, the last time 64-bit nanoseconds hold")]
    TooLate(String),
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Parses `2026-11-22T05:09:40Z`, `2026-11-22T05:09:40.123456789+01:00`
/// (a space may replace the `T`), or a plain number of nanoseconds since
/// the Unix epoch.
pub fn parse_time_ns(s: &str) -> Result<u64, TimeError> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| TimeError::TooLate(s.to_string()));
    }
    let bad = || TimeError::Malformed(s.to_string());
    // Only ASCII from here on, so every byte index is a char boundary.
    let b = s.as_bytes();
    if !s.is_ascii() || b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ') || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<u32, TimeError> {
        let text = &s[r];
        if text.bytes().all(|c| c.is_ascii_digit()) { text.parse().map_err(|_| bad()) } else { Err(bad()) }
    };
    let (year, month, day) = (i64::from(num(0..4)?), num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day == 0 || hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    if day > days_in_month(year, month) {
        return Err(TimeError::NoSuchDay { text: s.to_string(), year, month, day });
    }
    let mut rest = &s[19..];
    let mut nanos = 0u64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return Err(bad());
        }
        nanos = frac[..digits].parse::<u64>().map_err(|_| bad())? * 10u64.pow(9 - digits as u32);
        rest = &frac[digits..];
    }
    let offset_s: i64 = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) && &rest[3..4] == ":" => {
            let at = s.len() - rest.len();
            let (h, m) = (num(at + 1..at + 3)?, num(at + 4..at + 6)?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * i64::from(h * 3600 + m * 60)
        }
        _ => return Err(bad()),
    };
    let secs = days_from_civil(year, month, day) * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second) - offset_s;
    if secs < 0 {
        return Err(TimeError::BeforeEpoch(s.to_string()));
    }
    (secs as u64).checked_mul(1_000_000_000).and_then(|n| n.checked_add(nanos)).ok_or_else(|| TimeError::TooLate(s.to_string()))
}

/// `2026-11-22T05:09:40.123456789Z`.
pub fn format_time_ns(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z", sod / 3600, sod % 3600 / 60, sod % 60, ns % 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_offsets() {
        let ns = parse_time_ns("2026-11-22T05:09:40.5Z").unwrap();
        assert_eq!(ns, 1_795_324_180_500_000_000);
        assert_eq!(format_time_ns(ns), "2026-11-22T05:09:40.500000000Z");
        assert_eq!(parse_time_ns(&format_time_ns(ns)).unwrap(), ns);
        assert_eq!(parse_time_ns("2026-11-22T06:09:40.5+01:00").unwrap(), ns);
        assert_eq!(parse_time_ns("2026-11-22 05:09:40.5Z").unwrap(), ns);
        assert_eq!(parse_time_ns("1795324180500000000").unwrap(), ns);
        assert_eq!(parse_time_ns("2000-02-29T00:00:00Z").unwrap(), 951_782_400_000_000_000);
        for (days, want) in [(0u64, "1970-01-01"), (20_779, "2026-11-22"), (11_016, "2000-02-29")] {
            assert_eq!(&format_time_ns(days * 86_400 * 1_000_000_000)[..10], want);
        }
        for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-22T05:09:40", "2026-11-22T05:09:40.Z", "1969-12-31T23:59:59Z", "2026-11-22T05:09:40+1:00Z"] {
            assert!(parse_time_ns(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_times_get_their_reason_not_a_panic() {
        let check = |text: &str, want: &str| {
            let got = parse_time_ns(text).map_err(|e| e.to_string());
            assert!(got.as_ref().is_err_and(|e| e.contains(want)), "{text:?}: {got:?}, wanted an error with {want:?}");
        };
        check("2600-01-01T00:00:00Z", "after 2554");
        check("99999999999999999999", "after 2554");
        check("2026-02-31T00:00:00Z", "has no day 31");
        check("2025-02-29T00:00:00Z", "has no day 29");
        check("2026-11-22T05:09:40\u{e9}Z", "expected RFC 3339");
        check("2026-11-22T05:09:4\u{e9}Z0", "expected RFC 3339");
        check("\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}", "expected RFC 3339");
        check("2026-11-22T05:09:40+25:00", "expected RFC 3339");
        check("+026-11-22T05:09:40Z", "expected RFC 3339");
        assert_eq!(parse_time_ns("2024-02-29T00:00:00Z").map(|_| ()), Ok(()));
    }
}
