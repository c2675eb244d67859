//! `gonka-operator uninstall`: what the Helm chart's pre-delete hook runs, so that uninstalling
//! leaves nothing behind. It deletes every GonkaNode in scope and waits until they are gone —
//! while the operator still runs, each one's finalizer deregisters its ML nodes from the network
//! node first. Only then may the release (and the CRD) go. If the GonkaNodes don't go in time
//! (no operator running, a network node that can't be reached), it fails and says which are
//! left, so `helm uninstall` stops instead of orphaning registrations.

use std::time::Duration;

use gonka_crds::GonkaNode;
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
