//! Apply: the one module that writes to Kubernetes (owned objects by server-side apply, the
//! status subresource, events, and pod deletions of an operator-driven rollout). The finalizer's own add/remove patches are made by kube's
//! `finalizer` helper, called from the controller.
//!
//! Before applying an object it compares with the live one and skips the write when the live
//! object already carries every field we would set (a *derivative* of the desired object, as
//! apimachinery's `equality.Semantic.DeepDerivative` puts it): a steady fleet costs neither
//! writes nor reads, and a field someone else changed is put back on the next reconcile (the
//! change itself reconciles: the controller watches what it owns). The live object comes from
//! the controller's watches ([`OwnedStores`]); only a miss — an object not made yet, one that is
//! not ours (the watches see only objects labelled as ours), or a watch that has not listed yet —
//! is read from the apiserver. A cached object a moment behind costs at most one idempotent
//! write.

use gonka_crds::{GonkaNode, GonkaNodeStatus};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::build::{DesiredObjects, MANAGER};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("reading {kind} {name}: {source}")]
    Read { kind: String, name: String, source: kube::Error },
    #[error("applying {kind} {name}: {source}")]
    Write { kind: String, name: String, source: kube::Error },
    #[error("writing GonkaNode status: {0}")]
    Status(#[source] kube::Error),
    #[error(
        "{kind} {name} exists and this GonkaNode does not own it: the operator takes over no object it did not create (garbage collection would delete it with the GonkaNode); rename or delete it"
    )]
    NotOwned { kind: String, name: String },
    #[error("the {kind}s are not listed yet: the operator's watch has not completed its first list")]
    NotListed { kind: String },
}

impl ApplyError {
    /// A message fit for a condition: the apiserver's own words where it gave them.
    pub fn user_message(&self) -> String {
        match self {
            Self::Read { kind, name, source } | Self::Write { kind, name, source } => {
                let why = match source {
                    kube::Error::Api(status) => status.message.clone(),
                    other => other.to_string(),
                };
                format!("{kind} {name}: {why}")
            }
            Self::Status(e) => e.to_string(),
            Self::NotOwned { .. } | Self::NotListed { .. } => self.to_string(),
        }
    }
}

/// What an apply pass did.
#[derive(Debug, Default)]
pub struct Applied {
    /// `Kind/name` of objects that did not exist and were created.
    pub created: Vec<String>,
    /// `Kind/name` of objects that existed and were changed.
    pub updated: Vec<String>,
    /// The DaemonSet as the apiserver holds it after the pass.
    pub daemon_set: Option<DaemonSet>,
}

/// Whether `apply_objects` may change the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Make the owned objects match the desired ones.
    Apply,
    /// `spec.paused`: read only, hold every change.
    Hold,
}

/// The objects the operator owns, as its watches hold them.
#[derive(Clone)]
pub struct OwnedStores {
    pub daemon_sets: Store<DaemonSet>,
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    pub service_accounts: Store<ServiceAccount>,
    pub network_policies: Store<NetworkPolicy>,
    pub disruption_budgets: Store<PodDisruptionBudget>,
}

/// What fills [`OwnedStores`]: the controller's watches, once each ([`crate::controller::run`]).
pub struct OwnedStoreWriters {
    pub daemon_sets: reflector::store::Writer<DaemonSet>,
    pub config_maps: reflector::store::Writer<ConfigMap>,
    pub services: reflector::store::Writer<Service>,
    pub service_accounts: reflector::store::Writer<ServiceAccount>,
    pub network_policies: reflector::store::Writer<NetworkPolicy>,
    pub disruption_budgets: reflector::store::Writer<PodDisruptionBudget>,
}

/// Empty stores and their writers; until a watch has listed, every lookup misses.
pub fn owned_stores() -> (OwnedStores, OwnedStoreWriters) {
    let (daemon_sets, ds) = reflector::store();
    let (config_maps, cm) = reflector::store();
    let (services, svc) = reflector::store();
    let (service_accounts, sa) = reflector::store();
    let (network_policies, np) = reflector::store();
    let (disruption_budgets, pdb) = reflector::store();
    (
        OwnedStores { daemon_sets, config_maps, services, service_accounts, network_policies, disruption_budgets },
        OwnedStoreWriters {
            daemon_sets: ds,
            config_maps: cm,
            services: svc,
            service_accounts: sa,
            network_policies: np,
            disruption_budgets: pdb,
        },
    )
}

/// An owned kind and where its watch keeps it.
pub trait Owned:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Serialize
    + DeserializeOwned
    + Clone
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn store(stores: &OwnedStores) -> &Store<Self>;
}

macro_rules! owned {
    ($($kind:ty => $field:ident),* $(,)?) => {
        $(impl Owned for $kind {
            fn store(stores: &OwnedStores) -> &Store<Self> {
                &stores.$field
            }
        })*
    };
}

owned!(
    DaemonSet => daemon_sets,
    ConfigMap => config_maps,
    Service => services,
    ServiceAccount => service_accounts,
    NetworkPolicy => network_policies,
    PodDisruptionBudget => disruption_budgets,
);

pub struct Writer {
    client: Client,
    params: PatchParams,
    stores: OwnedStores,
}

impl Writer {
    pub fn new(client: Client, stores: OwnedStores) -> Self {
        // force: the operator owns these fields; a conflicting manager (kubectl edit) loses.
        Self { client, params: PatchParams::apply(MANAGER).force(), stores }
    }

    /// The live `name` in `namespace`: from the watch's store, or read on a miss.
    pub async fn live<K: Owned>(&self, namespace: &str, name: &str) -> Result<Option<K>, ApplyError> {
        if let Some(cached) = K::store(&self.stores).get(&ObjectRef::new(name).within(namespace)) {
            return Ok(Some((*cached).clone()));
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name).await.map_err(|source| ApplyError::Read {
            kind: K::kind(&()).to_string(),
            name: name.to_string(),
            source,
        })
    }

    /// Brings the owned objects to `desired` (or only reads them, in [`Mode::Hold`]).
    pub async fn apply_objects(&self, desired: &DesiredObjects, mode: Mode) -> Result<Applied, ApplyError> {
        let mut applied = Applied::default();
        if mode == Mode::Apply {
            self.apply_one(&desired.service_account, &mut applied).await?;
            self.apply_one(&desired.config_map, &mut applied).await?;
            self.apply_one(&desired.service, &mut applied).await?;
            self.apply_one(&desired.network_policy, &mut applied).await?;
            applied.daemon_set = Some(self.apply_one(&desired.daemon_set, &mut applied).await?);
        } else {
            let ds = &desired.daemon_set;
            applied.daemon_set = self.live(&ds.namespace().unwrap_or_default(), &ds.name_any()).await?;
        }
        Ok(applied)
    }

    /// Brings the GonkaNode's PodDisruptionBudget to `desired` (it follows the PoC windows, so
    /// it is applied after the epoch was read, apart from the other objects).
    pub async fn apply_disruption_budget(
        &self,
        desired: &PodDisruptionBudget,
        applied: &mut Applied,
    ) -> Result<(), ApplyError> {
        self.apply_one(desired, applied).await.map(|_| ())
    }

    async fn apply_one<K: Owned>(&self, desired: &K, applied: &mut Applied) -> Result<K, ApplyError> {
        let kind = K::kind(&()).to_string();
        let name = desired.name_any();
        let namespace = desired.namespace().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.client.clone(), &namespace);
        let live: Option<K> = self.live(&namespace, &name).await?;
        let mut want = serde_json::to_value(desired).expect("k8s objects serialize");
        want["apiVersion"] = json!(K::api_version(&()));
        want["kind"] = json!(K::kind(&()));
        if let Some(live) = &live {
            // Ours only when our owner (the GonkaNode) is its controller, by UID: an object of
            // the same name someone else made is not taken over (and so not deleted with us).
            let owner = desired.owner_references().iter().find(|o| o.controller == Some(true)).map(|o| o.uid.as_str());
            let ours =
                live.owner_references().iter().any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == owner);
            if !ours {
                return Err(ApplyError::NotOwned { kind, name });
            }
            let live_json = serde_json::to_value(live).expect("k8s objects serialize");
            if is_derivative(&want, &live_json) {
                return Ok(live.clone());
            }
        }
        let result = api
            .patch(&name, &self.params, &Patch::Apply(&want))
            .await
            .map_err(|source| ApplyError::Write { kind: kind.clone(), name: name.clone(), source })?;
        let record = format!("{kind}/{name}");
        if live.is_some() {
            applied.updated.push(record)
        } else {
            applied.created.push(record)
        }
        Ok(result)
    }

    /// Writes one GonkaNode's PoC-window claim on a Kubernetes node
    /// ([`crate::node_protection`]): both annotations when `protect`, none otherwise, by
    /// server-side apply under the GonkaNode's own field manager `manager`. Not forced: an
    /// annotation another manager holds with another value stays theirs (a conflict).
    pub async fn protect_node(&self, node: &str, manager: &str, protect: bool) -> Result<(), ApplyError> {
        let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let claim = crate::node_protection::claim(node, protect);
        api.patch(node, &PatchParams::apply(manager), &Patch::Apply(&claim))
            .await
            .map(|_| ())
            .map_err(|source| ApplyError::Write { kind: "Node".into(), name: node.into(), source })
    }

    /// Puts `gn`'s capacity label on `node` (`join`) or takes it off, by server-side apply under
    /// `manager` (unforced: another manager's label of the same key is not taken over).
    pub async fn label_node(&self, node: &str, label: &str, manager: &str, join: bool) -> Result<(), ApplyError> {
        let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let claim = crate::capacity::claim(node, label, join);
        api.patch(node, &PatchParams::apply(manager), &Patch::Apply(&claim))
            .await
            .map(|_| ())
            .map_err(|source| ApplyError::Write { kind: "Node".into(), name: node.into(), source })
    }

    /// Writes `status` to the status subresource, unless it is already what the object has.
    /// Returns whether it wrote.
    pub async fn patch_status(&self, gn: &GonkaNode, status: &GonkaNodeStatus) -> Result<bool, ApplyError> {
        if gn.status.as_ref() == Some(status) {
            return Ok(false);
        }
        let api: Api<GonkaNode> = Api::namespaced(self.client.clone(), &gn.namespace().unwrap_or_default());
        let body = json!({
            "apiVersion": GonkaNode::api_version(&()),
            "kind": GonkaNode::kind(&()),
            "status": status,
        });
        api.patch_status(&gn.name_any(), &self.params, &Patch::Apply(&body)).await.map_err(ApplyError::Status)?;
        Ok(true)
    }

    /// Deletes an ML-node pod (an `OnDelete` rollout step); the DaemonSet controller starts its
    /// replacement.
    pub async fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), kube::Error> {
        let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), namespace);
        api.delete(name, &Default::default()).await.map(drop)
    }

    /// Publishes a Kubernetes Event about `gn`. Events are best effort: a failure is logged,
    /// never fails the reconcile.
    pub async fn event(&self, recorder: &Recorder, gn: &GonkaNode, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &gn.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Whether `live` already has every field `desired` sets, with the same values. Fields only
/// `live` has (defaults, status, other managers' fields) don't matter; `null`s and empty
/// collections in `desired` mean "not set". Lists must match element by element.
pub fn is_derivative(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Null, _) => true,
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => is_derivative(dv, lv),
            None => is_unset(dv),
        }),
        (Value::Object(d), Value::Null) => d.values().all(is_unset),
        (Value::Array(d), Value::Array(l)) => d.len() == l.len() && d.iter().zip(l).all(|(d, l)| is_derivative(d, l)),
        (Value::Array(d), Value::Null) => d.is_empty(),
        (Value::Number(d), Value::Number(l)) => d.as_f64() == l.as_f64(),
        (d, l) => d == l,
    }
}

fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_unset),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivative_ignores_server_defaults_but_not_our_fields() {
        let desired = json!({"spec": {"a": 1, "list": [{"x": 1}], "empty": [], "none": null, "obj": {}}});
        let live = json!({"spec": {"a": 1.0, "list": [{"x": 1, "defaulted": true}], "b": 2}, "status": {}});
        assert!(is_derivative(&desired, &live));
        assert!(!is_derivative(&json!({"spec": {"a": 2}}), &live), "changed value");
        assert!(!is_derivative(&json!({"spec": {"c": 1}}), &live), "missing field");
        assert!(!is_derivative(&json!({"spec": {"list": [{"x": 1}, {"x": 2}]}}), &live), "list grew");
        assert!(!is_derivative(&json!({"spec": {"list": [{"x": 2}]}}), &live), "list element changed");
    }

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("ééé".into(), 3), "é");
        assert_eq!(truncate("abc".into(), 10), "abc");
    }
}
