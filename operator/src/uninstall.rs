//! `gonka-operator uninstall`: what the Helm chart's pre-delete hook runs, so that uninstalling
//! leaves nothing behind. It deletes every GonkaNode in scope and waits until they are gone —
//! while the operator still runs, each one's finalizer deregisters its ML nodes from the network
//! node first. Only then may the release (and the CRD) go. If the GonkaNodes don't go in time
//! (no operator running, a network node that can't be reached), it fails and says which are
//! left, so `helm uninstall` stops instead of orphaning registrations. It first checks that an
//! operator holds its leader Lease ([`ensure_operator_leads`]): with none running, deleting
//! would only leave every GonkaNode stuck Terminating, so nothing is deleted and it says so.

use std::time::Duration;

use gonka_crds::GonkaNode;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("talking to the apiserver: {0}")]
    Api(#[from] kube::Error),
    #[error(
        "{} GonkaNodes still terminating after {timeout:?}: {}. Their finalizers wait for the operator to deregister their ML nodes: is it running, and can it reach the network node? (To abandon the registrations, annotate them gonka.ai/skip-deregistration=true.)",
        left.len(),
        left.join(", ")
    )]
    Timeout { left: Vec<String>, timeout: Duration },
    #[error(
        "no operator is running to deregister the GonkaNodes' ML nodes (Lease {namespace}/{name}: {why}); nothing was deleted. Start the operator, or uninstall with uninstall.deleteGonkaNodes=false to leave the GonkaNodes and their registrations as they are"
    )]
    NoOperator { namespace: String, name: String, why: String },
}

/// Whether `lease` is held now: a holder whose last renewal is within the lease's duration.
/// Returns the holder, or why not.
pub fn lease_holder(lease: Option<&Lease>, now: jiff::Timestamp) -> Result<String, String> {
    let spec = lease.and_then(|l| l.spec.as_ref()).ok_or("there is none")?;
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty()).ok_or("nobody holds it")?;
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).ok_or("never renewed")?.0;
    let duration = jiff::SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let age = now.duration_since(renewed);
    if age > duration {
        return Err(format!("{holder} last renewed it {}s ago, beyond its {}s", age.as_secs(), duration.as_secs()));
    }
    Ok(holder)
}

/// Fails unless an operator holds the leader Lease `namespace/name` now.
pub async fn ensure_operator_leads(client: Client, namespace: &str, name: &str) -> Result<String, UninstallError> {
    let lease = Api::<Lease>::namespaced(client, namespace).get_opt(name).await?;
    lease_holder(lease.as_ref(), jiff::Timestamp::now()).map_err(|why| UninstallError::NoOperator {
        namespace: namespace.into(),
        name: name.into(),
        why,
    })
}

/// Deletes every GonkaNode in `namespace` (all namespaces when `None`) and waits until none is
/// left, checking every `poll`. Returns how many it deleted.
pub async fn delete_gonka_nodes(
    client: Client,
    namespace: Option<&str>,
    timeout: Duration,
    poll: Duration,
) -> Result<usize, UninstallError> {
    let api: Api<GonkaNode> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let found = api.list(&ListParams::default()).await?.items;
    for gn in &found {
        let scoped: Api<GonkaNode> = Api::namespaced(client.clone(), &gn.namespace().unwrap_or_default());
        match scoped.delete(&gn.name_any(), &DeleteParams::default()).await {
            Ok(_) => tracing::info!(gonka_node = %key(gn), "deleting"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left: Vec<String> = api.list(&ListParams::default()).await?.items.iter().map(key).collect();
        if left.is_empty() {
            return Ok(found.len());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(UninstallError::Timeout { left, timeout });
        }
        tokio::time::sleep(poll).await;
    }
}

fn key(gn: &GonkaNode) -> String {
    format!("{}/{}", gn.namespace().unwrap_or_default(), gn.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: Option<&str>, renewed_secs_ago: Option<i64>, duration: i32) -> Lease {
        let now: jiff::Timestamp = "2026-12-03T12:00:00Z".parse().unwrap();
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                renew_time: renewed_secs_ago.map(|s| MicroTime(now - jiff::SignedDuration::from_secs(s))),
                lease_duration_seconds: Some(duration),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_lease_is_held_while_renewed_within_its_duration() {
        let now: jiff::Timestamp = "2026-12-03T12:00:00Z".parse().unwrap();
        assert_eq!(lease_holder(Some(&lease(Some("op-a"), Some(3), 15)), now), Ok("op-a".into()));
        assert_eq!(lease_holder(Some(&lease(Some("op-a"), Some(15), 15)), now), Ok("op-a".into()), "the boundary");
        let stale = lease_holder(Some(&lease(Some("op-a"), Some(16), 15)), now).unwrap_err();
        assert_eq!(stale, "op-a last renewed it 16s ago, beyond its 15s");
        assert_eq!(lease_holder(Some(&lease(None, Some(1), 15)), now).unwrap_err(), "nobody holds it");
        assert_eq!(lease_holder(Some(&lease(Some(""), Some(1), 15)), now).unwrap_err(), "nobody holds it");
        assert_eq!(lease_holder(Some(&lease(Some("op-a"), None, 15)), now).unwrap_err(), "never renewed");
        assert_eq!(lease_holder(None, now).unwrap_err(), "there is none");
    }
}
