//! The report Service's endpoint: the leading replica's address, written by the leader itself
//! into an EndpointSlice of the Service (which has no selector).
//!
//! Why not a label selector: any pod created in the operator's namespace with the selected
//! labels would receive the daemons' report streams (and their pod tokens). An EndpointSlice
//! is written only with the rights the chart's Role grants by name, so only the operator
//! decides where reports go. A replica that stops leading takes its address out, unless the
//! new leader wrote its own already (the write is conditional on the slice it read).

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use kube::{Client, Resource};

/// Marks the slices this operator writes (the EndpointSlice controller leaves them alone).
const MANAGED_BY: &str = "gonka-operator";
/// The Service's port the slice names (the chart's `grpc-reports`).
pub const PORT_NAME: &str = "grpc-reports";

/// Where the leader is: its pod and the report server's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    pub pod: String,
    pub ip: String,
    pub port: u16,
}

/// The Service's EndpointSlice name.
pub fn slice_name(service: &str) -> String {
    format!("{service}-leader")
}

/// An owner reference to `service`, for what goes with it (the slice, the report Secrets).
pub fn owner(service: &Service) -> Option<OwnerReference> {
    service.controller_owner_ref(&()).map(|mut o| {
        o.controller = None;
        o.block_owner_deletion = None;
        o
    })
}

/// The slice routing `service` to `leader` alone (none: no endpoint). `address_type` is kept
/// from an existing slice (it cannot change), else follows the leader's address.
pub fn leader_slice(
    service: &Service,
    leader: Option<&Leader>,
    port: u16,
    address_type: Option<&str>,
) -> EndpointSlice {
    let name = service.metadata.name.clone().unwrap_or_default();
    let namespace = service.metadata.namespace.clone();
    let family = |ip: &str| if ip.contains(':') { "IPv6" } else { "IPv4" };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(&name)),
            namespace: namespace.clone(),
            labels: Some(
                [
                    ("kubernetes.io/service-name".to_string(), name),
                    ("endpointslice.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
                ]
                .into(),
            ),
            owner_references: owner(service).map(|o| vec![o]),
            ..Default::default()
        },
        address_type: address_type
            .map(str::to_string)
            .unwrap_or_else(|| leader.map_or("IPv4", |l| family(&l.ip)).to_string()),
        endpoints: leader
            .map(|l| Endpoint {
                addresses: vec![l.ip.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(l.pod.clone()),
                    namespace,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some(PORT_NAME.into()),
            port: Some(i32::from(port)),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

/// Points `service` at `leader` (`Some`), or takes `withdraw`'s address out (`None` leader):
/// only if the slice still lists it, so a new leader's address is never removed. `true` when
/// it wrote.
pub async fn write(
    client: Client,
    service: &Service,
    leader: Option<&Leader>,
    withdraw: Option<&str>,
    port: u16,
) -> Result<bool, kube::Error> {
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let name = slice_name(service.metadata.name.as_deref().unwrap_or_default());
    for _ in 0..3 {
        let existing = api.get_opt(&name).await?;
        if leader.is_none() {
            let listed = existing.as_ref().is_some_and(|s| {
                s.endpoints.iter().any(|e| withdraw.is_some_and(|ip| e.addresses.iter().any(|a| a == ip)))
            });
            if !listed {
                return Ok(false);
            }
        }
        let mut slice = leader_slice(service, leader, port, existing.as_ref().map(|s| s.address_type.as_str()));
        let written = match &existing {
            None => api.create(&PostParams::default(), &slice).await,
            Some(current) => {
                slice.metadata.resource_version = current.metadata.resource_version.clone();
                api.replace(&name, &PostParams::default(), &slice).await
            }
        };
        match written {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("gonka-operator".into()),
                namespace: Some("gonka-system".into()),
                uid: Some("uid-7".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_slice_routes_the_service_to_the_leader_alone() {
        let leader = Leader { pod: "op-a".into(), ip: "10.1.2.3".into(), port: 8082 };
        let slice = leader_slice(&service(), Some(&leader), 8082, None);
        assert_eq!(slice.metadata.name.as_deref(), Some("gonka-operator-leader"));
        let labels = slice.metadata.labels.clone().unwrap();
        assert_eq!(labels["kubernetes.io/service-name"], "gonka-operator");
        assert_eq!(labels["endpointslice.kubernetes.io/managed-by"], "gonka-operator");
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints.len(), 1);
        assert_eq!(slice.endpoints[0].addresses, ["10.1.2.3"]);
        assert_eq!(slice.endpoints[0].target_ref.as_ref().unwrap().name.as_deref(), Some("op-a"));
        let port = &slice.ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port), (Some(PORT_NAME), Some(8082)));
        let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Service", "gonka-operator", "uid-7")
        );

        let v6 = Leader { ip: "fd00::5".into(), ..leader };
        assert_eq!(leader_slice(&service(), Some(&v6), 8082, None).address_type, "IPv6");
        // No leader: no endpoint, the address type kept.
        let empty = leader_slice(&service(), None, 8082, Some("IPv6"));
        assert!(empty.endpoints.is_empty());
        assert_eq!(empty.address_type, "IPv6");
    }
}
