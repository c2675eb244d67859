//! The report server's TLS: a certificate authority of the operator's own, kept in a Secret in
//! its namespace, and a serving certificate for the host the daemons dial (`--report-url`).
//!
//! Why self-managed: the report stream carries pod tokens, so it must not be plain text, and
//! the operator is the only party both ends trust already — it writes the daemons'
//! `daemon.json`, so it hands them the CA there (`report.caBundle`) and no cert-manager or
//! manual step is needed. The Secret makes every replica serve under the same CA, so a leader
//! change or restart leaves the daemons' trust intact. The CA is reused for as long as it is
//! valid; the serving certificate is reissued under it when the report host changes or it
//! nears its end. Deleting the Secret and restarting the operator rotates everything (the
//! daemons get the new CA with their next `daemon.json`).

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// Keys of the Secret (the usual `kubernetes.io/tls` ones, plus the CA's key).
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
/// The hosts the serving certificate was issued for, comma-separated.
pub const HOSTS_ANNOTATION: &str = "gonka.ai/report-tls-hosts";
/// When the serving certificate ends (Unix seconds).
const NOT_AFTER_ANNOTATION: &str = "gonka.ai/report-tls-not-after";

const CA_NAME: &str = "gonka-operator report CA";
/// The CA lives ten years: it is what every daemon's `daemon.json` carries.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A serving certificate lives a year and is reissued in its last 30 days (at a restart or
/// leader change; operators restart far more often than that).
const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the report URL {0:?} names no host to issue a certificate for")]
    NoHost(String),
    #[error("issuing the report server's certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("Secret {namespace}/{name}: {source}")]
    Secret { namespace: String, name: String, source: kube::Error },
    #[error("Secret {namespace}/{name} changed under us {attempts} times; giving up")]
    Contended { namespace: String, name: String, attempts: u32 },
}

/// What the report server serves with, and what the daemons trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportTls {
    /// The CA certificate, PEM (`daemon.json` `report.caBundle`).
    pub ca_pem: String,
    ca_key_pem: String,
    /// The serving certificate chain, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    hosts: Vec<String>,
    not_after: i64,
}

/// The host in a report URL (`https://host:port`), brackets of an IPv6 address removed.
pub fn host_of(url: &str) -> Result<String, TlsError> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']').map(|(h, _)| h).unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.is_empty() { Err(TlsError::NoHost(url.into())) } else { Ok(host.to_string()) }
}

fn now_unix() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn offset(seconds: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn ca_params(now: i64) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset(now - 3600);
    params.not_after = offset(now + CA_LIFETIME.as_secs() as i64);
    Ok(params)
}

impl ReportTls {
    /// A new CA and a serving certificate for `hosts`.
    pub fn issue(hosts: &[String]) -> Result<Self, TlsError> {
        let now = now_unix();
        let ca_key = KeyPair::generate()?;
        let ca_pem = ca_params(now)?.self_signed(&ca_key)?.pem();
        Self::issue_leaf(ca_pem, ca_key.serialize_pem(), hosts, now)
    }

    /// A serving certificate for `hosts` under the CA this one has.
    fn reissue(&self, hosts: &[String]) -> Result<Self, TlsError> {
        Self::issue_leaf(self.ca_pem.clone(), self.ca_key_pem.clone(), hosts, now_unix())
    }

    fn issue_leaf(ca_pem: String, ca_key_pem: String, hosts: &[String], now: i64) -> Result<Self, TlsError> {
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        // A leaf verifies against the trust anchor by its issuer name and key, so rebuilding the
        // issuer from the stored key and the same name signs for the CA the daemons hold.
        let issuer = Issuer::new(ca_params(now)?, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, "gonka-operator report server");
        params.not_before = offset(now - 3600);
        let not_after = now + LEAF_LIFETIME.as_secs() as i64;
        params.not_after = offset(not_after);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Self {
            ca_pem,
            ca_key_pem,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            hosts: hosts.to_vec(),
            not_after,
        })
    }

    /// Whether this can serve `hosts` now without reissuing.
    fn serves(&self, hosts: &[String], now: i64) -> bool {
        self.hosts == hosts && self.not_after - LEAF_RENEW_BEFORE.as_secs() as i64 > now
    }

    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok());
        let annotations = secret.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).cloned().unwrap_or_default();
        Some(Self {
            ca_pem: text(CA_CERT)?,
            ca_key_pem: text(CA_KEY)?,
            cert_pem: text(TLS_CERT).unwrap_or_default(),
            key_pem: text(TLS_KEY).unwrap_or_default(),
            hosts: annotation(HOSTS_ANNOTATION).split(',').filter(|h| !h.is_empty()).map(str::to_string).collect(),
            not_after: annotation(NOT_AFTER_ANNOTATION).parse().unwrap_or(0),
        })
        .filter(|tls| KeyPair::from_pem(&tls.ca_key_pem).is_ok())
    }

    fn into_secret(self, name: &str, namespace: &str, resource_version: Option<String>) -> Secret {
        let data =
            [(CA_CERT, self.ca_pem), (CA_KEY, self.ca_key_pem), (TLS_CERT, self.cert_pem), (TLS_KEY, self.key_pem)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                resource_version,
                labels: Some([("app.kubernetes.io/managed-by".to_string(), crate::build::MANAGER.to_string())].into()),
                annotations: Some(
                    [
                        (HOSTS_ANNOTATION.to_string(), self.hosts.join(",")),
                        (NOT_AFTER_ANNOTATION.to_string(), self.not_after.to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        }
    }
}

/// The report server's TLS from Secret `namespace/name`: created when missing, its serving
/// certificate reissued (same CA) when it names other hosts or nears its end. Safe with
/// several replicas starting at once: a lost race re-reads what the winner wrote.
pub async fn ensure(
    client: kube::Client,
    namespace: &str,
    name: &str,
    hosts: &[String],
) -> Result<ReportTls, TlsError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let err = |source| TlsError::Secret { namespace: namespace.into(), name: name.into(), source };
    const ATTEMPTS: u32 = 5;
    for _ in 0..ATTEMPTS {
        let existing = api.get_opt(name).await.map_err(err)?;
        let written = match existing {
            None => {
                let tls = ReportTls::issue(hosts)?;
                api.create(&PostParams::default(), &tls.clone().into_secret(name, namespace, None)).await.map(|_| tls)
            }
            Some(secret) => match ReportTls::from_secret(&secret) {
                Some(tls) if tls.serves(hosts, now_unix()) => return Ok(tls),
                current => {
                    // No usable CA (emptied or edited by hand): start over with a new one.
                    let tls = match current {
                        Some(tls) => tls.reissue(hosts)?,
                        None => ReportTls::issue(hosts)?,
                    };
                    let version = secret.metadata.resource_version.clone();
                    api.replace(name, &PostParams::default(), &tls.clone().into_secret(name, namespace, version))
                        .await
                        .map(|_| tls)
                }
            },
        };
        match written {
            Ok(tls) => return Ok(tls),
            // Another replica wrote first: take what it wrote.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Err(TlsError::Contended { namespace: namespace.into(), name: name.into(), attempts: ATTEMPTS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_report_urls() {
        assert_eq!(host_of("https://gonka-operator.gonka-system.svc:8082").unwrap(), "gonka-operator.gonka-system.svc");
        assert_eq!(host_of("https://127.0.0.1:8082/").unwrap(), "127.0.0.1");
        assert_eq!(host_of("https://[fd00::1]:8082").unwrap(), "fd00::1");
        assert_eq!(host_of("https://report.example").unwrap(), "report.example");
        assert!(host_of("https://:8082").is_err());
    }

    #[test]
    fn reissued_certificate_keeps_the_ca_and_follows_the_hosts() {
        let hosts = vec!["gonka-operator.gonka-system.svc".to_string()];
        let tls = ReportTls::issue(&hosts).unwrap();
        let now = now_unix();
        assert!(tls.serves(&hosts, now));
        assert!(!tls.serves(&["other.svc".to_string()], now));
        assert!(!tls.serves(&hosts, tls.not_after - LEAF_RENEW_BEFORE.as_secs() as i64 + 1));

        let moved = tls.reissue(&["other.svc".to_string()]).unwrap();
        assert_eq!(moved.ca_pem, tls.ca_pem);
        assert_ne!(moved.cert_pem, tls.cert_pem);
        assert!(moved.serves(&["other.svc".to_string()], now));
    }

    #[test]
    fn secret_round_trip() {
        let tls = ReportTls::issue(&["a.svc".to_string(), "127.0.0.1".to_string()]).unwrap();
        let secret = tls.clone().into_secret("report-tls", "ns", None);
        assert_eq!(ReportTls::from_secret(&secret), Some(tls));
        let mut broken = secret;
        broken.data.as_mut().unwrap().insert(CA_KEY.into(), ByteString(b"not a key".to_vec()));
        assert_eq!(ReportTls::from_secret(&broken), None);
    }
}
