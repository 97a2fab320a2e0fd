//! A certificate's validity end (notAfter), read with x509-parser.

/// The notAfter of a DER certificate, as Unix seconds; `None` if it is not a certificate.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::not_after;

    /// A self-signed certificate valid until `y-m-d` 00:00 UTC.
    fn valid_until(y: i32, m: u8, d: u8) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(y, m, d);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn both_time_forms_are_read() {
        // Up to 2049 the certificate carries a UTCTime, from 2050 a GeneralizedTime.
        assert_eq!(not_after(&valid_until(2049, 12, 31)), Some(2_524_521_600));
        assert_eq!(not_after(&valid_until(2050, 1, 1)), Some(2_524_608_000));
    }

    #[test]
    fn truncated_input_is_refused() {
        assert_eq!(not_after(&[]), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
        let whole = valid_until(2040, 6, 1);
        assert_eq!(not_after(&whole[..whole.len() / 2]), None);
    }
}
