//! The report server's TLS: a certificate authority of the operator's own and a serving
//! certificate for the host the daemons dial (`--report-url`), kept in two Secrets of the
//! operator's namespace.
//!
//! Why self-managed: the report stream carries pod tokens, so it must not be plain text, and
//! the operator is the only party both ends trust already — it writes the daemons'
//! `daemon.json`, so it hands them the CA there (`report.caBundle`) and no cert-manager or
//! manual step is needed. The Secrets make every replica serve under the same CA, so a leader
//! change or restart leaves the daemons' trust intact.
//!
//! What limits a leaked key:
//! - the CA's key lives apart from the serving certificate (`<ca Secret>`: `ca.crt`, `ca.key`;
//!   `<tls Secret>`: `tls.crt`, `tls.key` and the bundle `ca.crt`), each Secret readable only by
//!   name (the chart's Role), both owned by the report Service so they go with it;
//! - the CA is name-constrained to the report hosts: even its key signs nothing a daemon, or
//!   anyone trusting the bundle, would take for another host;
//! - the CA lives two years, the serving certificate 90 days, and both are rotated by the
//!   replicas themselves ([`plan_ca`]): the next CA is published in the bundle
//!   [`CA_ROTATE_BEFORE`] ahead of the current one's end (or at once for a CA made before name
//!   constraints) and signs [`PUBLISHED_BEFORE_USE`] later, when the daemons' `daemon.json` has
//!   carried it for that long; a serving certificate is reissued in its last 30 days, under the
//!   current CA, or for new hosts. A report host outside the CA's constraints gets a new CA at
//!   once (the daemons' URL changes with it, so their pods roll anyway).

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DnType, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints,
};
use sha2::{Digest, Sha256};

/// Keys of the CA Secret.
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const NEXT_CERT: &str = "next.crt";
const NEXT_KEY: &str = "next.key";
/// Keys of the serving Secret (`kubernetes.io/tls`'s, and the bundle daemons trust).
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const BUNDLE: &str = "ca.crt";
/// The hosts the serving certificate was issued for, comma-separated.
pub const HOSTS_ANNOTATION: &str = "gonka.ai/report-tls-hosts";
/// When the serving certificate ends (Unix seconds).
const NOT_AFTER_ANNOTATION: &str = "gonka.ai/report-tls-not-after";
/// Which CA signed the serving certificate (the SHA-256 of its PEM, hex).
const ISSUER_ANNOTATION: &str = "gonka.ai/report-tls-issuer";
/// When the next CA was put in the bundle (Unix seconds).
const NEXT_PUBLISHED_ANNOTATION: &str = "gonka.ai/report-ca-next-published";

/// The DNS constraint of a CA for addresses alone: a reserved name no host has.
const NO_NAME: &str = "invalid";

const CA_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// The next CA goes into the bundle this long before the current one ends.
pub const CA_ROTATE_BEFORE: Duration = Duration::from_secs(120 * 24 * 3600);
/// ... and signs this long after it went into the bundle (the daemons' `daemon.json` carries it
/// by then: the controller writes it at the next reconcile, and the pods roll within a day).
pub const PUBLISHED_BEFORE_USE: Duration = Duration::from_secs(7 * 24 * 3600);
const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the report URL {0:?} names no host to issue a certificate for")]
    NoHost(String),
    #[error("issuing the report server's certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("the CA just issued does not read back (an rcgen and x509-parser disagreement)")]
    UnreadableCa,
    #[error("Secret {namespace}/{name}: {source}")]
    Secret { namespace: String, name: String, source: kube::Error },
    #[error("Secret {namespace}/{name} changed under us {attempts} times; giving up")]
    Contended { namespace: String, name: String, attempts: u32 },
}

/// What the report server serves with, and what the daemons trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportTls {
    /// The CA certificates daemons trust, PEM (`daemon.json` `report.caBundle`): the current
    /// CA, and the next one while it is published ahead of use.
    pub ca_pem: String,
    /// The serving certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
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

fn secs(d: Duration) -> i64 {
    d.as_secs() as i64
}

fn fingerprint(pem: &str) -> String {
    hex::encode(Sha256::digest(pem.as_bytes()))
}

/// How a CA's name constraints relate to the report hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Constraint {
    /// Permitted: exactly these hosts.
    Hosts,
    /// None at all (a CA made before they were added).
    Unconstrained,
    /// Other names.
    Other,
}

/// One generation of the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ca {
    cert_pem: String,
    key_pem: String,
    /// Read from the certificate once, when the CA is made or read.
    not_after: i64,
    /// The names its constraints permit (IPs as text, without `invalid`); `None`: no
    /// constraints.
    permitted: Option<Vec<String>>,
}

impl Ca {
    /// A new CA for `hosts` alone, named after its start so generations are told apart.
    fn issue(hosts: &[String], now: i64) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, format!("gonka-operator report CA {now}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = offset(now - 3600);
        params.not_after = offset(now + secs(CA_LIFETIME));
        // A constraint binds only names of its own type: without an IP subtree, a DNS-only CA
        // would still sign for any address. So every IP is excluded when no host is one, and
        // DNS names are held to `invalid` (RFC 6761's, never a real name) when no host is one.
        let (ips, names): (Vec<&String>, Vec<&String>) = hosts.iter().partition(|h| h.parse::<IpAddr>().is_ok());
        let mut permitted: Vec<GeneralSubtree> = ips
            .iter()
            .filter_map(|h| h.parse::<IpAddr>().ok())
            .map(|ip| GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(ip, if ip.is_ipv4() { 32 } else { 128 })))
            .collect();
        permitted.extend(names.iter().map(|h| GeneralSubtree::DnsName(h.to_string())));
        let mut excluded = Vec::new();
        if ips.is_empty() {
            excluded.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(IpAddr::from([0u8; 4]), 0)));
            excluded.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(IpAddr::from([0u8; 16]), 0)));
        }
        if names.is_empty() {
            permitted.push(GeneralSubtree::DnsName(NO_NAME.into()));
        }
        params.name_constraints = Some(NameConstraints { permitted_subtrees: permitted, excluded_subtrees: excluded });
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Self::read(Some(cert_pem), Some(key.serialize_pem())).ok_or(TlsError::UnreadableCa)
    }

    /// A CA from the Secret's text, if the key and certificate read and belong together.
    fn read(cert_pem: Option<String>, key_pem: Option<String>) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (cert_pem, key_pem) = (cert_pem?, key_pem?);
        Issuer::from_ca_cert_pem(&cert_pem, KeyPair::from_pem(&key_pem).ok()?).ok()?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        let not_after = cert.validity().not_after.timestamp();
        let permitted = cert.name_constraints().ok()?.map(|constraints| {
            constraints
                .value
                .permitted_subtrees
                .iter()
                .flatten()
                .filter_map(|s| match &s.base {
                    GeneralName::DNSName(name) if *name == NO_NAME => None,
                    GeneralName::DNSName(name) => Some(name.to_string()),
                    GeneralName::IPAddress(bytes) => match bytes.len() {
                        8 => Some(IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?).to_string()),
                        32 => Some(IpAddr::from(<[u8; 16]>::try_from(&bytes[..16]).ok()?).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        });
        Some(Self { cert_pem, key_pem, not_after, permitted })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, rcgen::Error> {
        Issuer::from_ca_cert_pem(&self.cert_pem, KeyPair::from_pem(&self.key_pem)?)
    }

    fn constraint(&self, hosts: &[String]) -> Constraint {
        let Some(permitted) = &self.permitted else { return Constraint::Unconstrained };
        let mut permitted = permitted.clone();
        let mut wanted: Vec<String> =
            hosts.iter().map(|h| h.parse::<IpAddr>().map_or_else(|_| h.clone(), |ip| ip.to_string())).collect();
        permitted.sort();
        wanted.sort();
        if permitted == wanted { Constraint::Hosts } else { Constraint::Other }
    }

    /// A serving certificate for `hosts`, ending no later than this CA.
    fn sign(&self, hosts: &[String], now: i64) -> Result<Serving, TlsError> {
        let issuer = self.issuer()?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, "gonka-operator report server");
        params.not_before = offset(now - 3600);
        let not_after = (now + secs(LEAF_LIFETIME)).min(self.not_after);
        params.not_after = offset(not_after);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Serving {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            hosts: hosts.to_vec(),
            not_after,
            issuer: fingerprint(&self.cert_pem),
        })
    }
}

/// What the CA Secret holds: the CA that signs, and the next one while it is published ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaState {
    current: Ca,
    /// The next CA and when it went into the bundle.
    next: Option<(Ca, i64)>,
}

impl CaState {
    /// The PEM bundle daemons trust.
    fn bundle(&self) -> String {
        let mut bundle = self.current.cert_pem.clone();
        if let Some((next, _)) = &self.next {
            bundle.push_str(&next.cert_pem);
        }
        bundle
    }

    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok());
        let current = Ca::read(text(CA_CERT), text(CA_KEY))?;
        let published = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NEXT_PUBLISHED_ANNOTATION))
            .and_then(|v| v.parse::<i64>().ok());
        let next = Ca::read(text(NEXT_CERT), text(NEXT_KEY)).zip(published);
        Some(Self { current, next })
    }

    fn into_secret(self, name: &str, namespace: &str, meta: SecretMeta) -> Secret {
        let mut data = vec![(CA_CERT, self.current.cert_pem), (CA_KEY, self.current.key_pem)];
        let mut annotations = std::collections::BTreeMap::new();
        if let Some((next, published)) = self.next {
            data.extend([(NEXT_CERT, next.cert_pem), (NEXT_KEY, next.key_pem)]);
            annotations.insert(NEXT_PUBLISHED_ANNOTATION.to_string(), published.to_string());
        }
        secret(name, namespace, meta, data, annotations)
    }
}

/// The CA Secret's content at `now` for `hosts`, from what it holds (`None`: nothing usable);
/// `true` when it changed.
pub fn plan_ca(existing: Option<CaState>, hosts: &[String], now: i64) -> Result<(CaState, bool), TlsError> {
    let usable = existing.filter(|s| s.current.constraint(hosts) != Constraint::Other && s.current.not_after > now);
    let Some(before) = usable else {
        return Ok((CaState { current: Ca::issue(hosts, now)?, next: None }, true));
    };
    let mut state = before.clone();
    if state.next.as_ref().is_some_and(|(next, _)| next.constraint(hosts) != Constraint::Hosts) {
        state.next = None;
    }
    let current_end = state.current.not_after;
    if let Some((next, published)) = state.next.clone()
        && (now >= published + secs(PUBLISHED_BEFORE_USE) || current_end - now < secs(PUBLISHED_BEFORE_USE))
    {
        state = CaState { current: next, next: None };
    }
    let current_end = state.current.not_after;
    let due =
        current_end - now < secs(CA_ROTATE_BEFORE) || state.current.constraint(hosts) == Constraint::Unconstrained;
    if state.next.is_none() && due {
        state.next = Some((Ca::issue(hosts, now)?, now));
    }
    let changed = state != before;
    Ok((state, changed))
}

/// The serving certificate the serving Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Serving {
    cert_pem: String,
    key_pem: String,
    hosts: Vec<String>,
    not_after: i64,
    /// The fingerprint of the CA that signed it.
    issuer: String,
}

impl Serving {
    /// Whether this can serve `hosts` now, signed by `current`.
    fn serves(&self, hosts: &[String], current: &Ca, now: i64) -> bool {
        self.hosts == hosts
            && self.issuer == fingerprint(&current.cert_pem)
            && self.not_after - secs(LEAF_RENEW_BEFORE) > now
    }

    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok());
        let annotations = secret.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).cloned().unwrap_or_default();
        Some(Self {
            cert_pem: text(TLS_CERT)?,
            key_pem: text(TLS_KEY)?,
            hosts: annotation(HOSTS_ANNOTATION).split(',').filter(|h| !h.is_empty()).map(str::to_string).collect(),
            not_after: annotation(NOT_AFTER_ANNOTATION).parse().unwrap_or(0),
            issuer: annotation(ISSUER_ANNOTATION),
        })
    }

    fn into_secret(self, bundle: &str, name: &str, namespace: &str, meta: SecretMeta) -> Secret {
        let annotations = [
            (HOSTS_ANNOTATION.to_string(), self.hosts.join(",")),
            (NOT_AFTER_ANNOTATION.to_string(), self.not_after.to_string()),
            (ISSUER_ANNOTATION.to_string(), self.issuer),
        ]
        .into();
        let data = vec![(TLS_CERT, self.cert_pem), (TLS_KEY, self.key_pem), (BUNDLE, bundle.to_string())];
        secret(name, namespace, meta, data, annotations)
    }
}

/// What a written Secret carries beside its data.
#[derive(Clone, Debug, Default)]
struct SecretMeta {
    resource_version: Option<String>,
    owner: Option<OwnerReference>,
}

fn secret(
    name: &str,
    namespace: &str,
    meta: SecretMeta,
    data: Vec<(&str, String)>,
    annotations: std::collections::BTreeMap<String, String>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            resource_version: meta.resource_version,
            labels: Some([("app.kubernetes.io/managed-by".to_string(), crate::build::MANAGER.to_string())].into()),
            annotations: Some(annotations),
            owner_references: meta.owner.map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data.into_iter().map(|(k, v)| (k.to_string(), ByteString(v.into_bytes()))).collect()),
        ..Default::default()
    }
}

/// Where the report TLS is kept: two Secrets of one namespace, and what owns them.
#[derive(Clone, Debug)]
pub struct TlsSecrets {
    pub namespace: String,
    /// The CA's certificate and key.
    pub ca: String,
    /// The serving certificate, its key and the bundle.
    pub serving: String,
    /// The report Service, which both Secrets go with.
    pub owner: Option<OwnerReference>,
}

/// The report server's TLS for `hosts`, from the Secrets `at` names: made when missing,
/// rotated as [`plan_ca`] says, the serving certificate reissued when it names other hosts,
/// nears its end or was signed by a CA no longer current. Safe with several replicas at once:
/// a lost race re-reads what the winner wrote. A CA key found in the serving Secret (as
/// operators before this one kept it) moves to the CA Secret.
pub async fn ensure(client: kube::Client, at: &TlsSecrets, hosts: &[String]) -> Result<ReportTls, TlsError> {
    let api: Api<Secret> = Api::namespaced(client, &at.namespace);
    let err = |name: &str| {
        let (namespace, name) = (at.namespace.clone(), name.to_string());
        move |source| TlsError::Secret { namespace, name, source }
    };
    const ATTEMPTS: u32 = 5;
    for _ in 0..ATTEMPTS {
        let now = now_unix();
        let ca_secret = api.get_opt(&at.ca).await.map_err(err(&at.ca))?;
        let serving_secret = api.get_opt(&at.serving).await.map_err(err(&at.serving))?;
        let existing = ca_secret.as_ref().and_then(CaState::from_secret).or_else(|| {
            // The earlier layout: the CA's key beside the serving certificate.
            let data = serving_secret.as_ref()?.data.as_ref()?;
            let text = |key: &str| data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok());
            Ca::read(text(CA_CERT), text(CA_KEY)).map(|current| CaState { current, next: None })
        });
        let (state, changed) = plan_ca(existing, hosts, now)?;
        let ca_written = if changed || ca_secret.is_none() {
            let meta = SecretMeta {
                resource_version: ca_secret.as_ref().and_then(|s| s.metadata.resource_version.clone()),
                owner: at.owner.clone(),
            };
            let secret = state.clone().into_secret(&at.ca, &at.namespace, meta);
            match &ca_secret {
                None => api.create(&PostParams::default(), &secret).await,
                Some(_) => api.replace(&at.ca, &PostParams::default(), &secret).await,
            }
            .map(|_| ())
        } else {
            Ok(())
        };
        match ca_written {
            Ok(()) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(err(&at.ca)(e)),
        }
        let bundle = state.bundle();
        let current = serving_secret.as_ref().and_then(Serving::from_secret);
        let kept_as_is = serving_secret.as_ref().is_some_and(|s| {
            let data = s.data.as_ref();
            data.is_some_and(|d| {
                !d.contains_key(CA_KEY) && d.get(BUNDLE).map(|b| b.0.as_slice()) == Some(bundle.as_bytes())
            })
        });
        let serving = match current {
            Some(serving) if kept_as_is && serving.serves(hosts, &state.current, now) => {
                return Ok(ReportTls { ca_pem: bundle, cert_pem: serving.cert_pem, key_pem: serving.key_pem });
            }
            Some(serving) if serving.serves(hosts, &state.current, now) => serving,
            _ => state.current.sign(hosts, now)?,
        };
        let meta = SecretMeta {
            resource_version: serving_secret.as_ref().and_then(|s| s.metadata.resource_version.clone()),
            owner: at.owner.clone(),
        };
        let secret = serving.clone().into_secret(&bundle, &at.serving, &at.namespace, meta);
        let written = match &serving_secret {
            None => api.create(&PostParams::default(), &secret).await,
            Some(_) => api.replace(&at.serving, &PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => return Ok(ReportTls { ca_pem: bundle, cert_pem: serving.cert_pem, key_pem: serving.key_pem }),
            // Another replica wrote first: take what it wrote.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(err(&at.serving)(e)),
        }
    }
    Err(TlsError::Contended { namespace: at.namespace.clone(), name: at.serving.clone(), attempts: ATTEMPTS })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    const DAY: i64 = 24 * 3600;

    fn hosts() -> Vec<String> {
        vec!["gonka-operator.gonka-system.svc".to_string()]
    }

    fn der(pem: &str) -> Vec<CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| c.unwrap()).collect()
    }

    /// Whether a daemon trusting `bundle` (webpki, as rustls checks the report server) takes
    /// `leaf` for `host` at `now`.
    fn trusted(bundle: &str, leaf: &str, host: &str, now: i64) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in der(bundle) {
            roots.add(ca).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider).build().unwrap();
        let leaf = der(leaf).remove(0);
        let name = ServerName::try_from(host.to_string()).unwrap();
        let at = UnixTime::since_unix_epoch(Duration::from_secs(now as u64));
        verifier.verify_server_cert(&leaf, &[], &name, &[], at).map(|_| ())
    }

    #[test]
    fn host_of_report_urls() {
        assert_eq!(host_of("https://gonka-operator.gonka-system.svc:8082").unwrap(), "gonka-operator.gonka-system.svc");
        assert_eq!(host_of("https://127.0.0.1:8082/").unwrap(), "127.0.0.1");
        assert_eq!(host_of("https://[fd00::1]:8082").unwrap(), "fd00::1");
        assert_eq!(host_of("https://report.example").unwrap(), "report.example");
        assert!(host_of("https://:8082").is_err());
    }

    #[test]
    fn the_ca_signs_for_the_report_hosts_and_nothing_else() {
        let now = now_unix();
        for hosts in [hosts(), vec!["127.0.0.1".to_string()]] {
            let ca = Ca::issue(&hosts, now).unwrap();
            assert_eq!(ca.constraint(&hosts), Constraint::Hosts);
            let leaf = ca.sign(&hosts, now).unwrap();
            assert_eq!(trusted(&ca.cert_pem, &leaf.cert_pem, &hosts[0], now), Ok(()));
            // Its key, stolen, signs a certificate for another host: no one trusting it takes that.
            for other in ["kubernetes.default.svc", "10.0.0.1", "evil.gonka-system.svc", "::1"] {
                let forged = ca.sign(&[other.to_string()], now).unwrap();
                let refused = trusted(&ca.cert_pem, &forged.cert_pem, other, now);
                assert!(refused.is_err(), "{other}: {refused:?}");
            }
        }
    }

    #[test]
    fn a_serving_certificate_never_outlives_its_ca() {
        let now = now_unix();
        let ca = Ca::issue(&hosts(), now - secs(CA_LIFETIME) + 10 * DAY).unwrap();
        let leaf = ca.sign(&hosts(), now).unwrap();
        assert_eq!(leaf.not_after, ca.not_after);
        assert!(!leaf.serves(&hosts(), &ca, now), "ten days left: renew");
        let young = Ca::issue(&hosts(), now).unwrap();
        let leaf = young.sign(&hosts(), now).unwrap();
        assert_eq!(leaf.not_after, now + secs(LEAF_LIFETIME));
        assert!(leaf.serves(&hosts(), &young, now));
        assert!(!leaf.serves(&hosts(), &ca, now), "signed by another CA");
        assert!(!leaf.serves(&["other.svc".to_string()], &young, now));
    }

    /// A CA's life: alone for most of it; published as `next` 120 days before its end, signing
    /// 7 days later, and the daemons' bundle trusts the serving certificate at every step.
    #[test]
    fn the_ca_rotates_through_the_bundle_before_it_signs() {
        let start = now_unix();
        let (fresh, changed) = plan_ca(None, &hosts(), start).unwrap();
        assert!(changed && fresh.next.is_none());
        let (same, changed) = plan_ca(Some(fresh.clone()), &hosts(), start + DAY / 2).unwrap();
        assert_eq!((same.clone(), changed), (fresh.clone(), false), "nothing to do yet");

        // 120 days before its end: the next CA goes into the bundle; the current one still signs.
        let publish = start + secs(CA_LIFETIME) - secs(CA_ROTATE_BEFORE) + DAY;
        let (same, changed) = plan_ca(Some(same), &hosts(), publish - 2 * DAY).unwrap();
        assert_eq!((same.clone(), changed), (fresh.clone(), false), "122 days before its end: nothing to do");
        let (published, changed) = plan_ca(Some(same), &hosts(), publish).unwrap();
        assert!(changed);
        assert_eq!(published.current, fresh.current);
        let (next, at) = published.next.clone().unwrap();
        assert_eq!(at, publish);
        let bundle = published.bundle();
        let leaf = published.current.sign(&hosts(), publish).unwrap();
        assert_eq!(trusted(&bundle, &leaf.cert_pem, &hosts()[0], publish), Ok(()));
        // A daemon that got this bundle trusts the next CA's certificates already.
        let ahead = next.sign(&hosts(), publish).unwrap();
        assert_eq!(trusted(&bundle, &ahead.cert_pem, &hosts()[0], publish), Ok(()));
        let (waiting, changed) = plan_ca(Some(published.clone()), &hosts(), publish + 6 * DAY).unwrap();
        assert_eq!((waiting, changed), (published.clone(), false), "published less than 7 days");

        // 7 days on, it signs; the old CA leaves the bundle.
        let promote = publish + secs(PUBLISHED_BEFORE_USE);
        let (promoted, changed) = plan_ca(Some(published), &hosts(), promote).unwrap();
        assert!(changed);
        assert_eq!((promoted.current.clone(), promoted.next.clone()), (next.clone(), None));
        let leaf = promoted.current.sign(&hosts(), promote).unwrap();
        assert_eq!(trusted(&bundle, &leaf.cert_pem, &hosts()[0], promote), Ok(()), "the bundle the daemons hold");
        assert_eq!(trusted(&promoted.bundle(), &leaf.cert_pem, &hosts()[0], promote), Ok(()));
    }

    #[test]
    fn a_ca_from_before_name_constraints_is_replaced_through_the_bundle_and_other_hosts_start_over() {
        let now = now_unix();
        // The earlier operators' CA: ten years, no name constraints.
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, "gonka-operator report CA");
        params.not_after = offset(now + 3000 * DAY);
        let key = KeyPair::generate().unwrap();
        let legacy = Ca::read(Some(params.self_signed(&key).unwrap().pem()), Some(key.serialize_pem())).unwrap();
        assert_eq!(legacy.constraint(&hosts()), Constraint::Unconstrained);
        let (state, changed) = plan_ca(Some(CaState { current: legacy.clone(), next: None }), &hosts(), now).unwrap();
        assert!(changed);
        assert_eq!(state.current, legacy, "still signing: the daemons trust only it");
        assert_eq!(state.next.as_ref().map(|(n, _)| n.constraint(&hosts())), Some(Constraint::Hosts));
        let (state, _) = plan_ca(Some(state), &hosts(), now + secs(PUBLISHED_BEFORE_USE)).unwrap();
        assert_eq!(state.current.constraint(&hosts()), Constraint::Hosts);
        assert!(state.next.is_none());

        // The report host moves out of the CA's constraints: a new CA at once.
        let moved = vec!["report.other-namespace.svc".to_string()];
        let (fresh, changed) = plan_ca(Some(state.clone()), &moved, now).unwrap();
        assert!(changed);
        assert_ne!(fresh.current, state.current);
        assert_eq!(fresh.current.constraint(&moved), Constraint::Hosts);
        // An expired CA too.
        let (renewed, changed) = plan_ca(Some(state.clone()), &hosts(), state.current.not_after + 1).unwrap();
        assert!(changed);
        assert_ne!(renewed.current, state.current);
    }

    #[test]
    fn the_ca_key_stays_out_of_the_serving_secret() {
        let now = now_unix();
        let (state, _) = plan_ca(None, &hosts(), now).unwrap();
        let owner = OwnerReference {
            api_version: "v1".into(),
            kind: "Service".into(),
            name: "gonka-operator".into(),
            uid: "uid-1".into(),
            ..Default::default()
        };
        let meta = SecretMeta { resource_version: None, owner: Some(owner.clone()) };
        let ca_secret = state.clone().into_secret("report-ca", "ns", meta.clone());
        assert_eq!(CaState::from_secret(&ca_secret), Some(state.clone()));
        let serving = state.current.sign(&hosts(), now).unwrap();
        let tls_secret = serving.clone().into_secret(&state.bundle(), "report-tls", "ns", meta);
        let data = tls_secret.data.as_ref().unwrap();
        let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
        assert_eq!(Serving::from_secret(&tls_secret), Some(serving));
        for s in [&ca_secret, &tls_secret] {
            assert_eq!(s.metadata.owner_references.as_deref(), Some(std::slice::from_ref(&owner)));
        }
        let mut broken = ca_secret;
        broken.data.as_mut().unwrap().insert(CA_KEY.into(), ByteString(b"not a key".to_vec()));
        assert_eq!(CaState::from_secret(&broken), None);
    }
}
