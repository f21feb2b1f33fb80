//! The lab's CA and the server certificate, generated with rcgen and kept in the state directory so
//! that a restarted server is still trusted by kubeconfigs written before.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::Error;

/// PEM material for serving.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "warren-lab-ca");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn sans(extra: &[String]) -> Vec<String> {
    let mut all: Vec<String> = [
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in extra {
        if !all.contains(s) {
            all.push(s.clone());
        }
    }
    all
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn write_private(path: &Path, data: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Io(format!("writing {}", path.display()), e))?;
    f.write_all(data.as_bytes())
        .map_err(|e| Error::Io(format!("writing {}", path.display()), e))
}

/// Loads the CA from `dir` (or creates one), and a server certificate for the SANs (reused when
/// the SANs are unchanged, re-issued by the same CA otherwise).
pub fn load_or_create(dir: &Path, extra_sans: &[String]) -> Result<Pki, Error> {
    let (ca_cert_path, ca_key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (cert_path, key_path, sans_path) = (dir.join("server.crt"), dir.join("server.key"), dir.join("server.sans"));
    let wanted = sans(extra_sans);
    let wanted_line = wanted.join(",");

    let (ca_pem, ca_key) = match (read(&ca_cert_path), read(&ca_key_path)) {
        (Some(cert), Some(key)) => (cert, KeyPair::from_pem(&key).map_err(Error::Cert)?),
        _ => {
            let key = KeyPair::generate().map_err(Error::Cert)?;
            let cert = ca_params().self_signed(&key).map_err(Error::Cert)?;
            write_private(&ca_key_path, &key.serialize_pem())?;
            write_private(&ca_cert_path, &cert.pem())?;
            (cert.pem(), key)
        }
    };
    if let (Some(cert_pem), Some(key_pem), Some(line)) = (read(&cert_path), read(&key_path), read(&sans_path)) {
        if line.trim() == wanted_line {
            return Ok(Pki {
                ca_pem,
                cert_pem,
                key_pem,
            });
        }
    }
    // Signing needs only the CA's name and key; the parameters are rebuilt identically.
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver");
    params.distinguished_name = dn;
    params.subject_alt_names = wanted
        .iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => s.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()
        .map_err(Error::Cert)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(Error::Cert)?;
    let cert = params.signed_by(&key, &issuer).map_err(Error::Cert)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    write_private(&key_path, &key_pem)?;
    write_private(&cert_path, &cert_pem)?;
    write_private(&sans_path, &wanted_line)?;
    Ok(Pki {
        ca_pem,
        cert_pem,
        key_pem,
    })
}
