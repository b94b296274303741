//! Event times on the command line: RFC 3339 or nanoseconds since the Unix
//! epoch in, RFC 3339 (UTC) out.

use anyhow::{bail, Context};

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
pub fn parse_time_ns(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().context("nanoseconds since the epoch");
    }
    let bad = || format!("time {s:?}: expected RFC 3339 such as 2026-11-22T05:09:40Z or 2026-11-22T06:09:40.5+01:00, or nanoseconds since the Unix epoch");
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ') || b[13] != b':' || b[16] != b':' {
        bail!(bad());
    }
    let num = |r: std::ops::Range<usize>| -> anyhow::Result<u32> { s.get(r).and_then(|x| x.parse().ok()).with_context(bad) };
    let (year, month, day) = (num(0..4)? as i64, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 || year < 1970 {
        bail!(bad());
    }
    let mut rest = &s[19..];
    let mut nanos = 0u64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            bail!(bad());
        }
        nanos = frac[..digits].parse::<u64>().with_context(bad)? * 10u64.pow(9 - digits as u32);
        rest = &frac[digits..];
    }
    let offset_s: i64 = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) && &rest[3..4] == ":" => {
            let h: i64 = rest[1..3].parse().with_context(bad)?;
            let m: i64 = rest[4..6].parse().with_context(bad)?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => bail!(bad()),
    };
    let secs = days_from_civil(year, month, day) * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second) - offset_s;
    if secs < 0 {
        bail!("time {s:?} is before 1970");
    }
    Ok(secs as u64 * 1_000_000_000 + nanos)
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
        for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-22T05:09:40", "2026-11-22T05:09:40.Z", "1969-12-31T23:59:59Z"] {
            assert!(parse_time_ns(bad).is_err(), "{bad}");
        }
    }
}
