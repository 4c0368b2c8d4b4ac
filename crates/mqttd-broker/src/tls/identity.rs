//! What a certificate says, read with x509-parser: the client identity that
//! `use_identity_as_username` makes the user name, and the facts the generated certificates are
//! checked against on a later start.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

/// The identity a client certificate carries: its subject CN, else its first DNS or e-mail
/// subject alternative name. `None` if it names nobody (or does not parse, which cannot
/// happen to a certificate rustls verified).
pub(super) fn of_certificate(cert: &CertificateDer<'_>) -> Option<Arc<str>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let common_name = parsed
        .subject()
        .iter_common_name()
        .filter_map(|attr| attr.as_str().ok())
        .find(|cn| !cn.is_empty());
    if let Some(cn) = common_name {
        return Some(Arc::from(cn));
    }
    let san = parsed.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(s) | GeneralName::RFC822Name(s) if !s.is_empty() => {
            Some(Arc::from(*s))
        }
        _ => None,
    })
}

/// Whether the certificate's validity ended (false if it does not parse: rustls says why).
pub(super) fn expired(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert)
        .is_ok_and(|(_, parsed)| parsed.validity().not_after < ASN1Time::now())
}

/// The facts about a server certificate that decide whether a generated one can be reused.
#[derive(Debug)]
pub(super) struct ServerFacts {
    /// Lower-case DNS names and IP addresses it is valid for.
    pub(super) names: Vec<String>,
    /// Seconds since the epoch when it expires.
    pub(super) not_after: i64,
    /// Its issuer's name, DER.
    pub(super) issuer: Vec<u8>,
}

/// Reads the facts of a certificate; `None` if it does not parse.
pub(super) fn server_facts(cert: &CertificateDer<'_>) -> Option<ServerFacts> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(ServerFacts {
        names: san_names(&parsed),
        not_after: parsed.validity().not_after.timestamp(),
        issuer: parsed.issuer().as_raw().to_vec(),
    })
}

/// The subject's name of a certificate, DER; `None` if it does not parse.
pub(super) fn subject(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.subject().as_raw().to_vec())
}

fn san_names(parsed: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(s) => Some(s.to_ascii_lowercase()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}
