//! RFC 1123 dates for the Date header (RFC 3261 §20.17), cached per second.

/// Formats `secs` (Unix time) as `Sat, 13 Nov 2010 23:29:00 GMT` into a fixed buffer.
pub fn http_date(secs: u64, out: &mut [u8; 29]) {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    // Civil-from-days (proleptic Gregorian), days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let two = |v: u64| [b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8];
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    out[3..5].copy_from_slice(b", ");
    out[5..7].copy_from_slice(&two(d as u64));
    out[7] = b' ';
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    out[11] = b' ';
    let y = year.clamp(0, 9999) as u64;
    out[12..14].copy_from_slice(&two(y / 100));
    out[14..16].copy_from_slice(&two(y % 100));
    out[16] = b' ';
    out[17..19].copy_from_slice(&two(h));
    out[19] = b':';
    out[20..22].copy_from_slice(&two(m));
    out[22] = b':';
    out[23..25].copy_from_slice(&two(s));
    out[25..29].copy_from_slice(b" GMT");
}

/// The Date value for the current second, recomputed only when the second changes.
#[derive(Debug, Clone)]
pub struct DateCache {
    secs: u64,
    buf: [u8; 29],
}

impl Default for DateCache {
    fn default() -> Self {
        let mut c = DateCache {
            secs: 0,
            buf: [0; 29],
        };
        http_date(0, &mut c.buf);
        c
    }
}

impl DateCache {
    pub fn get(&mut self, now_secs: u64) -> &[u8] {
        if now_secs != self.secs {
            self.secs = now_secs;
            http_date(now_secs, &mut self.buf);
        }
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc1123() {
        let mut b = [0u8; 29];
        http_date(0, &mut b);
        assert_eq!(&b, b"Thu, 01 Jan 1970 00:00:00 GMT");
        http_date(1_289_690_940, &mut b);
        assert_eq!(&b, b"Sat, 13 Nov 2010 23:29:00 GMT");
        http_date(951_782_400, &mut b); // leap day
        assert_eq!(&b, b"Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
