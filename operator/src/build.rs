//! Build: a validated GonkaNode in, the Kubernetes objects it wants out. Pure: no client, no
//! clock, no randomness, so the same spec always builds byte-identical objects and the apply
//! step can tell "nothing changed" from "something changed".

use std::collections::BTreeMap;
use std::time::Duration;

use gonka_crds::{DEFAULT_INFERENCE_PORT, DEFAULT_METRICS_PORT, DEFAULT_POC_PORT, GonkaNode, NVIDIA_GPU_RESOURCE};
use gonka_protocol::daemon_config::{self, DaemonConfig, ModelConfig, OpportunisticConfig, PocConfig, ReportConfig};
use gonka_protocol::report;
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServiceAccount,
    ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::validate::{MTLS_FILES, ValidatedSpec};

/// The daemon's user and group (the images' non-root user; distroless's `nonroot`).
pub const DAEMON_UID: i64 = 65532;
/// Requests of the daemon container unless `spec.resources` sets them.
const DEFAULT_REQUESTS: [(&str, &str); 2] = [("cpu", "2"), ("memory", "8Gi")];
/// `/dev/shm` unless `spec.shmSize` sets it.
const DEFAULT_SHM_SIZE: &str = "16Gi";
/// Where `modelStorage` is mounted in the ML-node pods (the daemon's models directory).
pub const MODELS_MOUNT: &str = "/models";
/// Where the mutual-TLS files are mounted (`spec.networkNode.mtlsSecretRef`).
pub const MTLS_MOUNT: &str = "/etc/gonka-mtls";

/// Field manager and `app.kubernetes.io/managed-by` value of everything the operator writes.
pub const MANAGER: &str = "gonka-operator";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
/// Label naming the GonkaNode an object belongs to.
pub const LABEL_GONKA_NODE: &str = "gonka.ai/gonka-node";
/// Pod-template annotation with a hash of the daemon config, so a config change rolls the pods.
pub const ANNOTATION_CONFIG_HASH: &str = "gonka.ai/config-hash";
/// Pod-template annotation with a hash of the whole template: a pod whose value differs from
/// the DaemonSet's runs an old spec (how the operator finds pods to replace under `OnDelete`).
pub const ANNOTATION_TEMPLATE_HASH: &str = "gonka.ai/template-hash";
/// Name of the node-daemon container.
pub const CONTAINER: &str = "node-daemon";
/// Environment variable telling the daemon where its config file is.
pub const ENV_CONFIG: &str = "GONKA_DAEMON_CONFIG";
const APP_NAME: &str = "gonka-ml-node";

/// Everything a GonkaNode owns, in the order they are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredObjects {
    /// Their names (also of those the spec does not ask for now, to delete them).
    pub names: Names,
    pub service_account: ServiceAccount,
    pub config_map: ConfigMap,
    pub service: Service,
    /// Who may call the ML nodes (`spec.networkNode.mlNodeApiFrom`; nobody when unset).
    pub network_policy: NetworkPolicy,
    pub daemon_set: DaemonSet,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("GonkaNode has no namespace")]
    NoNamespace,
    #[error("GonkaNode has no uid yet (not read from the apiserver?)")]
    NoUid,
}

/// Names of the owned objects, derived from the GonkaNode's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub daemon_set: String,
    pub service_account: String,
    pub config_map: String,
    pub service: String,
    pub disruption_budget: String,
    pub network_policy: String,
}

impl Names {
    pub fn of(gonka_node: &str) -> Self {
        Self {
            daemon_set: format!("{gonka_node}-ml-node"),
            service_account: format!("{gonka_node}-ml-node"),
            config_map: format!("{gonka_node}-daemon-config"),
            service: format!("{gonka_node}-ml-nodes"),
            disruption_budget: format!("{gonka_node}-ml-nodes"),
            network_policy: format!("{gonka_node}-ml-nodes"),
        }
    }
}

/// How many ML nodes evictions may take now (the PodDisruptionBudget's stance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisruptionGuard {
    /// Outside PoC windows, or no epoch to tell them by: as many as
    /// `updateStrategy.maxUnavailable`, the same tolerance rollouts have.
    Tolerate,
    /// A PoC window is on, or its phase is unknown while rollouts are held: none (an ML node
    /// evicted now loses the epoch's weight).
    PocWindow,
}

/// The budget's stance from the epoch check: `None` when it was not read (rollouts are not
/// held), else whether a PoC window is on, or why the phase could not be read and for how long
/// it has not been. An unknown phase counts as a window (an eviction now could cost the epoch's
/// weight), but for at most `limit`: a network node that stays unreadable must not block node
/// maintenance for good. Past it evictions are tolerated again, and the second value says why
/// (for `Degraded`).
pub fn disruption_guard(
    epoch: Option<Result<bool, String>>,
    unreadable_for: Duration,
    limit: Duration,
) -> (DisruptionGuard, Option<String>) {
    match epoch {
        None | Some(Ok(false)) => (DisruptionGuard::Tolerate, None),
        Some(Ok(true)) => (DisruptionGuard::PocWindow, None),
        Some(Err(_)) if unreadable_for < limit => (DisruptionGuard::PocWindow, None),
        Some(Err(why)) => (
            DisruptionGuard::Tolerate,
            Some(format!(
                "the network node's epoch phase has been unreadable for {} min ({why}): PoC windows can't be \
                 told, so evictions are allowed again up to maxUnavailable",
                unreadable_for.as_secs() / 60
            )),
        ),
    }
}

/// The PodDisruptionBudget that guards PoC windows against eviction-API callers (the cluster
/// autoscaler, a descheduler, `kubectl drain` of non-DaemonSet pods does not apply to ours).
/// `expected` is the DaemonSet's desired pod count. DaemonSet pods only admit an integer
/// `minAvailable` (the disruption controller cannot scale a DaemonSet), hence a count here;
/// pods that are not Ready can always be evicted, so a broken pod never blocks maintenance.
pub fn disruption_budget(
    gn: &GonkaNode,
    expected: i32,
    guard: DisruptionGuard,
) -> Result<PodDisruptionBudget, BuildError> {
    let namespace = gn.namespace().ok_or(BuildError::NoNamespace)?;
    let owner = gn.controller_owner_ref(&()).ok_or(BuildError::NoUid)?;
    let expected = expected.max(0);
    let min_available = match guard {
        DisruptionGuard::PocWindow => expected,
        DisruptionGuard::Tolerate => {
            let tolerated =
                crate::status::tolerated_unavailable(Some(&gn.spec.update_strategy.max_unavailable), expected);
            (expected - tolerated).max(0)
        }
    };
    Ok(PodDisruptionBudget {
        metadata: ObjectMeta {
            name: Some(Names::of(&gn.name_any()).disruption_budget),
            namespace: Some(namespace),
            labels: Some(labels(gn)),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(min_available)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(gn)), ..LabelSelector::default() }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

/// Labels that select a GonkaNode's pods. Immutable on a DaemonSet, so never change them.
pub fn selector_labels(gn: &GonkaNode) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_NAME.into(), APP_NAME.into()), (LABEL_INSTANCE.into(), gn.name_any())])
}

/// Labels on every object the operator makes for a GonkaNode.
pub fn labels(gn: &GonkaNode) -> BTreeMap<String, String> {
    let mut labels = selector_labels(gn);
    labels.insert(LABEL_COMPONENT.into(), "ml-node".into());
    labels.insert(LABEL_MANAGED_BY.into(), MANAGER.into());
    labels.insert(LABEL_PART_OF.into(), "gonka".into());
    labels.insert(LABEL_GONKA_NODE.into(), gn.name_any());
    labels
}

/// Whether rollouts wait for PoC windows to end: `holdDuringPoc` and a public URL to read the
/// epoch phase from.
pub fn holds_rollouts(gn: &GonkaNode) -> bool {
    gn.spec.update_strategy.hold_during_poc && gn.spec.network_node.public_url.is_some()
}

/// The template hash a DaemonSet's pods should carry.
pub fn template_hash(ds: &DaemonSet) -> Option<&str> {
    ds.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(ANNOTATION_TEMPLATE_HASH)
        .map(String::as_str)
}

/// The operator's report endpoint as the daemons reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportEndpoint {
    /// `https://<operator Service>.<namespace>.svc:8082` in a cluster.
    pub url: String,
    /// The CA the daemons trust for an https `url` (PEM); the report server's own CA.
    pub ca_bundle: Option<String>,
}

/// The daemon's configuration file for this GonkaNode; `report` is the operator's report
/// endpoint, if daemons should report.
pub fn daemon_config(gn: &GonkaNode, report: Option<&ReportEndpoint>) -> DaemonConfig {
    let spec = &gn.spec;
    DaemonConfig {
        gonka_node: format!("{}/{}", gn.namespace().unwrap_or_default(), gn.name_any()),
        ml_callback_url: spec.network_node.ml_callback_url.clone(),
        ca_bundle: spec.network_node.ca_bundle.clone(),
        poc_port: DEFAULT_POC_PORT as u16,
        inference_port: DEFAULT_INFERENCE_PORT as u16,
        metrics_port: Some(DEFAULT_METRICS_PORT as u16),
        gpus: Some(spec.gpus_per_ml_node.max(1) as u32),
        models: spec
            .models
            .iter()
            .map(|m| ModelConfig { id: m.id.clone(), args: m.args.clone(), engine: model_engine(m.engine) })
            .collect(),
        models_dir: spec.model_storage.as_ref().map(|_| MODELS_MOUNT.into()),
        preload_model: spec.model_storage.as_ref().and_then(|s| s.preload.clone()),
        poc: PocConfig {
            batch_size: spec.poc.batch_size as u32,
            send_interval_seconds: spec.poc.send_interval_seconds as u32,
            max_pending_batches: spec.poc.max_pending_batches as u32,
        },
        report: report.map(|r| ReportConfig {
            url: r.url.clone(),
            token_file: Some(report::TOKEN_PATH.into()),
            ca_bundle: r.ca_bundle.clone(),
        }),
        opportunistic: spec.opportunistic.as_ref().map(|o| OpportunisticConfig {
            rejoin_after_idle_seconds: o.rejoin_after_idle_seconds.max(0) as u32,
            busy_utilization_percent: o.busy_utilization_percent.clamp(0, 100) as u32,
        }),
    }
}

/// Builds every object `gn` owns.
pub fn desired_objects(
    gn: &GonkaNode,
    validated: &ValidatedSpec,
    report: Option<&ReportEndpoint>,
) -> Result<DesiredObjects, BuildError> {
    let namespace = gn.namespace().ok_or(BuildError::NoNamespace)?;
    let owner = gn.controller_owner_ref(&()).ok_or(BuildError::NoUid)?;
    let names = Names::of(&gn.name_any());
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.clone()),
        labels: Some(labels(gn)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };

    let config_json = daemon_config(gn, report).to_json();
    let mut config_digest = Sha256::new();
    config_digest.update(config_json.as_bytes());
    // A new mutual-TLS pair rolls the ML nodes (they read it at start); without one, the hash
    // is daemon.json's alone, as before the field existed.
    if let Some(mtls) = &validated.mtls {
        config_digest.update(mtls.digest.as_bytes());
    }
    let config_hash = hex::encode(&config_digest.finalize()[..8]);

    let service_account = ServiceAccount {
        metadata: meta(&names.service_account),
        // The daemon talks to the operator and the network node, never to the apiserver.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    };
    let config_map = ConfigMap {
        metadata: meta(&names.config_map),
        data: Some(BTreeMap::from([(daemon_config::FILE_NAME.to_string(), config_json)])),
        ..ConfigMap::default()
    };
    let service = Service {
        metadata: meta(&names.service),
        spec: Some(ServiceSpec {
            // Headless: the network node addresses each ML node by pod IP; DNS lists them all.
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(gn)),
            ports: Some(vec![
                service_port("poc-api", DEFAULT_POC_PORT),
                service_port("inference-api", DEFAULT_INFERENCE_PORT),
                service_port("metrics", DEFAULT_METRICS_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let mut template = pod_template(gn, validated, &names, &config_hash, report.is_some());
    let template_hash = hex::encode(&Sha256::digest(serde_json::to_vec(&template).expect("serializes"))[..8]);
    if let Some(annotations) = template.metadata.as_mut().and_then(|m| m.annotations.as_mut()) {
        annotations.insert(ANNOTATION_TEMPLATE_HASH.into(), template_hash);
    }
    let update_strategy = if holds_rollouts(gn) {
        // The operator replaces pods itself, outside PoC windows.
        DaemonSetUpdateStrategy { type_: Some("OnDelete".into()), rolling_update: None }
    } else {
        DaemonSetUpdateStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDaemonSet {
                max_unavailable: Some(gn.spec.update_strategy.max_unavailable.clone()),
                // A surge pod would need the same GPUs; GPU nodes cannot run two.
                max_surge: Some(IntOrString::Int(0)),
            }),
        }
    };
    let daemon_set = DaemonSet {
        metadata: meta(&names.daemon_set),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector { match_labels: Some(selector_labels(gn)), ..LabelSelector::default() },
            revision_history_limit: Some(5),
            update_strategy: Some(update_strategy),
            template,
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    };
    let network_policy = ml_node_network_policy(gn, meta(&names.network_policy));
    Ok(DesiredObjects { names, service_account, config_map, service, network_policy, daemon_set })
}

/// Default-deny for the ML-node API and inference port: only `mlNodeApiFrom` (nobody when
/// unset; everybody for `[]`, as an empty `from` means in a NetworkPolicy). The monitoring port
/// is open to all: it serves metrics and probes, no control.
fn ml_node_network_policy(gn: &GonkaNode, metadata: ObjectMeta) -> NetworkPolicy {
    let tcp = |port: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    };
    let mut ingress = vec![NetworkPolicyIngressRule { from: None, ports: Some(vec![tcp(DEFAULT_METRICS_PORT)]) }];
    if let Some(peers) = &gn.spec.network_node.ml_node_api_from {
        ingress.push(NetworkPolicyIngressRule {
            from: (!peers.is_empty()).then(|| peers.clone()),
            ports: Some(vec![tcp(DEFAULT_POC_PORT), tcp(DEFAULT_INFERENCE_PORT)]),
        });
    }
    NetworkPolicy {
        metadata,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(selector_labels(gn)), ..LabelSelector::default() }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    }
}

fn pod_template(
    gn: &GonkaNode,
    validated: &ValidatedSpec,
    names: &Names,
    config_hash: &str,
    reports: bool,
) -> PodTemplateSpec {
    let spec = &gn.spec;
    let placement = &spec.placement;
    let config_path = format!("{}/{}", daemon_config::MOUNT_DIR, daemon_config::FILE_NAME);

    let mut env = vec![
        env_value(ENV_CONFIG, &config_path),
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env_field("POD_IP", "status.podIP"),
        env_field("NODE_NAME", "spec.nodeName"),
        // CUDA numbers GPUs fastest-first by default; the daemon maps CUDA devices to NVML's
        // (bus order) when it cuts GPU groups, so make both count the same way.
        env_value("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
    ];
    // Always through the device plugin: the scheduler counts the GPUs, and hardened container
    // toolkits and managed clusters hand a pod only the GPUs it requested.
    let mut resources = spec.resources.clone().unwrap_or_default();
    resources
        .limits
        .get_or_insert_with(BTreeMap::new)
        .insert(NVIDIA_GPU_RESOURCE.into(), Quantity(spec.gpus_per_ml_node.to_string()));
    let requests = resources.requests.get_or_insert_with(BTreeMap::new);
    for (resource, default) in DEFAULT_REQUESTS {
        requests.entry(resource.into()).or_insert_with(|| Quantity(default.into()));
    }

    let mut volume_mounts = vec![
        VolumeMount {
            name: "daemon-config".into(),
            mount_path: daemon_config::MOUNT_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount { name: "shm".into(), mount_path: "/dev/shm".into(), ..VolumeMount::default() },
        // The root filesystem is read-only; scratch space goes here.
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() },
    ];
    let mut volumes = vec![
        Volume {
            name: "daemon-config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        // Inference engines share tensors through /dev/shm (upstream runs `ipc: host`);
        // a memory-backed volume gives them room without the host's IPC namespace.
        Volume {
            name: "shm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(spec.shm_size.clone().unwrap_or_else(|| Quantity(DEFAULT_SHM_SIZE.into()))),
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(Quantity("1Gi".into())), ..Default::default() }),
            ..Volume::default()
        },
    ];
    if let Some(storage) = &spec.model_storage {
        // Weights are only read: read-only mounts keep one ML node from spoiling the fleet's.
        volume_mounts.push(VolumeMount {
            name: "models".into(),
            mount_path: MODELS_MOUNT.into(),
            sub_path: storage.sub_path.clone(),
            read_only: Some(true),
            // Read-only all the way down: a mount below the directory (a hostPath's submounts)
            // stays read-only too, where the kubelet and kernel can do it (Linux 5.12+).
            recursive_read_only: Some("IfPossible".into()),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "models".into(),
            persistent_volume_claim: storage
                .persistent_volume_claim
                .as_ref()
                .map(|claim| PersistentVolumeClaimVolumeSource { claim_name: claim.clone(), read_only: Some(true) }),
            host_path: storage
                .host_path
                .as_ref()
                .map(|path| HostPathVolumeSource { path: path.clone(), type_: Some("Directory".into()) }),
            ..Volume::default()
        });
    }
    if let Some(mtls) = &validated.mtls {
        // Upstream's files under upstream's ML-node variables; `dapi.key` is not mounted even
        // when the Secret holds it.
        volume_mounts.push(VolumeMount {
            name: "mtls".into(),
            mount_path: MTLS_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "mtls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(mtls.name.clone()),
                items: Some(
                    MTLS_FILES
                        .iter()
                        .map(|f| KeyToPath { key: f.to_string(), path: f.to_string(), mode: None })
                        .collect(),
                ),
                // Readable by the daemon's user (not the files' owner); the container runs
                // nothing else.
                default_mode: Some(0o444),
                optional: Some(false),
            }),
            ..Volume::default()
        });
        for (variable, file) in [
            ("MLNODE_MTLS_CLIENT_CERT", "mlnode.crt"),
            ("MLNODE_MTLS_CLIENT_KEY", "mlnode.key"),
            ("MLNODE_MTLS_SERVER_CA", "dapi.crt"),
        ] {
            env.push(env_value(variable, &format!("{MTLS_MOUNT}/{file}")));
        }
    }
    if reports {
        // The daemon proves who it is to the operator with a token bound to its pod, for the
        // operator's audience only, rotated by the kubelet (no Secret, no apiserver access).
        let (dir, file) = report::TOKEN_PATH.rsplit_once('/').expect("an absolute path");
        volume_mounts.push(VolumeMount {
            name: "report-token".into(),
            mount_path: dir.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "report-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(report::TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: file.into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
    }

    let container = Container {
        name: CONTAINER.into(),
        image: Some(validated.image.clone()),
        image_pull_policy: Some(spec.image_pull_policy.as_str().into()),
        env: Some(env),
        ports: Some(vec![
            container_port("poc-api", DEFAULT_POC_PORT),
            container_port("inference-api", DEFAULT_INFERENCE_PORT),
            container_port("metrics", DEFAULT_METRICS_PORT),
        ]),
        resources: non_empty_resources(resources),
        // `/healthz` is the daemon process itself. Upstream's `/livez` answers 503 when GPUs
        // are unavailable, which would make the kubelet restart a pod that a restart can't
        // fix; GPU trouble shows in readiness, status and metrics instead. On the monitoring
        // port: the kubelet needs no access to the ML-node API (which may want a client
        // certificate) and the NetworkPolicy keeps that port open.
        startup_probe: Some(http_probe("/healthz", 5, 60)),
        liveness_probe: Some(http_probe("/healthz", 20, 6)),
        readiness_probe: Some(http_probe("/readyz", 10, 3)),
        volume_mounts: Some(volume_mounts),
        // The `restricted` Pod Security profile: no root, no privilege escalation, no
        // capabilities, the runtime's seccomp profile, nothing written outside the volumes.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(gn)),
            annotations: Some(BTreeMap::from([(ANNOTATION_CONFIG_HASH.into(), config_hash.into())])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(names.service_account.clone()),
            automount_service_account_token: Some(false),
            node_selector: node_selector(gn),
            affinity: placement.affinity.clone(),
            tolerations: (!placement.tolerations.is_empty()).then(|| placement.tolerations.clone()),
            priority_class_name: spec.priority_class_name.clone(),
            image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| spec.image_pull_secrets.clone()),
            termination_grace_period_seconds: Some(60),
            runtime_class_name: spec.runtime_class_name.clone(),
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
                run_as_non_root: Some(true),
                run_as_user: Some(DAEMON_UID),
                run_as_group: Some(DAEMON_UID),
                ..PodSecurityContext::default()
            }),
            containers: vec![container],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    }
}

/// The pods' node selector: the placement's, and with a cap (`spec.capacity`) the label of
/// the nodes the operator let join ([`crate::capacity`]).
fn node_selector(gn: &GonkaNode) -> Option<BTreeMap<String, String>> {
    let mut selector = gn.spec.placement.node_selector.clone();
    if gn.spec.capacity.is_some()
        && let Some(label) = crate::capacity::label_key(gn)
    {
        selector.insert(label, "true".into());
    }
    (!selector.is_empty()).then_some(selector)
}

/// The GonkaNode's engine choice in `daemon.json`'s words.
fn model_engine(engine: gonka_crds::ModelEngine) -> daemon_config::ModelEngine {
    match engine {
        gonka_crds::ModelEngine::Auto => daemon_config::ModelEngine::Auto,
        gonka_crds::ModelEngine::Native => daemon_config::ModelEngine::Native,
        gonka_crds::ModelEngine::Vllm => daemon_config::ModelEngine::Vllm,
    }
}

fn non_empty_resources(r: ResourceRequirements) -> Option<ResourceRequirements> {
    let empty = r.limits.as_ref().is_none_or(BTreeMap::is_empty)
        && r.requests.as_ref().is_none_or(BTreeMap::is_empty)
        && r.claims.as_ref().is_none_or(Vec::is_empty);
    (!empty).then_some(r)
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort { name: Some(name.into()), container_port: port, protocol: Some("TCP".into()), ..Default::default() }
}

fn http_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

fn env_value(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::gonka_node;
    use crate::validate::validate;
    use gonka_crds::GonkaNodeSpec;
    use k8s_openapi::api::core::v1::Toleration;

    fn build(edit: impl FnOnce(&mut GonkaNodeSpec)) -> DesiredObjects {
        let gn = gonka_node("h100", edit);
        let validated = validate(&gn, "ghcr.io/example/daemon:1", &crate::test_fixtures::lenient_policy()).unwrap();
        desired_objects(&gn, &validated, None).unwrap()
    }

    fn pod_spec(objects: &DesiredObjects) -> &PodSpec {
        objects.daemon_set.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn env(objects: &DesiredObjects, name: &str) -> Option<String> {
        pod_spec(objects).containers[0].env.as_ref().unwrap().iter().find(|e| e.name == name).map(|e| {
            e.value
                .clone()
                .unwrap_or_else(|| e.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path.clone())
        })
    }

    #[test]
    fn every_object_is_owned_labelled_and_named_after_the_gonka_node() {
        let o = build(|_| {});
        let metas = [&o.service_account.metadata, &o.config_map.metadata, &o.service.metadata, &o.daemon_set.metadata];
        let names: Vec<&str> = metas.iter().map(|m| m.name.as_deref().unwrap()).collect();
        assert_eq!(names, ["h100-ml-node", "h100-daemon-config", "h100-ml-nodes", "h100-ml-node"]);
        for m in metas {
            assert_eq!(m.namespace.as_deref(), Some("gpu"));
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("GonkaNode", "h100", Some(true)));
            let labels = m.labels.as_ref().unwrap();
            assert_eq!(labels[LABEL_MANAGED_BY], MANAGER);
            assert_eq!(labels[LABEL_GONKA_NODE], "h100");
        }
    }

    /// Table: spec edits in, the pod template facts they must produce out.
    #[test]
    fn pod_template_follows_the_spec() {
        struct Case {
            name: &'static str,
            edit: fn(&mut GonkaNodeSpec),
            check: fn(&DesiredObjects),
        }
        let cases = [
            Case {
                name: "defaults select NVIDIA GPU nodes, request the GPUs, default requests, restricted",
                edit: |_| {},
                check: |o| {
                    let pod = pod_spec(o);
                    assert_eq!(pod.node_selector.as_ref().unwrap()["nvidia.com/gpu.present"], "true");
                    assert_eq!(pod.tolerations.as_ref().unwrap()[0].key.as_deref(), Some("nvidia.com/gpu"));
                    assert_eq!(env(o, "NVIDIA_VISIBLE_DEVICES"), None, "only the GPUs requested");
                    let resources = pod.containers[0].resources.as_ref().unwrap();
                    assert_eq!(resources.limits.as_ref().unwrap()["nvidia.com/gpu"], Quantity("8".into()));
                    let requests = resources.requests.as_ref().unwrap();
                    assert_eq!(
                        (&requests["cpu"], &requests["memory"]),
                        (&Quantity("2".into()), &Quantity("8Gi".into()))
                    );
                    assert_eq!(pod.containers[0].image.as_deref(), Some("ghcr.io/example/daemon:1"));
                    assert_eq!(pod.containers[0].image_pull_policy.as_deref(), Some("IfNotPresent"));
                    let container = pod.containers[0].security_context.as_ref().unwrap();
                    assert_eq!(
                        (container.read_only_root_filesystem, container.run_as_non_root),
                        (Some(true), Some(true))
                    );
                    assert_eq!(pod.security_context.as_ref().unwrap().run_as_user, Some(DAEMON_UID));
                    let shm = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "shm").unwrap();
                    assert_eq!(shm.empty_dir.as_ref().unwrap().size_limit, Some(Quantity("16Gi".into())));
                    assert_eq!(pod.runtime_class_name, None);
                },
            },
            Case {
                name: "gpusPerMlNode, resources, shm size and runtime class follow the spec",
                edit: |s| {
                    s.gpus_per_ml_node = 4;
                    s.resources = Some(ResourceRequirements {
                        requests: Some(BTreeMap::from([("memory".into(), Quantity("64Gi".into()))])),
                        ..Default::default()
                    });
                    s.shm_size = Some(Quantity("64Gi".into()));
                    s.runtime_class_name = Some("nvidia".into());
                },
                check: |o| {
                    let pod = pod_spec(o);
                    let resources = pod.containers[0].resources.as_ref().unwrap();
                    assert_eq!(resources.limits.as_ref().unwrap()["nvidia.com/gpu"], Quantity("4".into()));
                    let requests = resources.requests.as_ref().unwrap();
                    assert_eq!(
                        (&requests["cpu"], &requests["memory"]),
                        (&Quantity("2".into()), &Quantity("64Gi".into()))
                    );
                    let shm = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "shm").unwrap();
                    assert_eq!(shm.empty_dir.as_ref().unwrap().size_limit, Some(Quantity("64Gi".into())));
                    assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
                },
            },
            Case {
                name: "a cap selects the nodes the operator lets join, besides the placement's labels",
                edit: |s| s.capacity = Some(gonka_crds::Capacity { max_ml_nodes: Some(2), ..Default::default() }),
                check: |o| {
                    let selector = pod_spec(o).node_selector.clone().unwrap();
                    assert_eq!(selector.len(), 2);
                    assert_eq!(selector["nvidia.com/gpu.present"], "true");
                    assert_eq!(selector["joined.gonka.ai/uid-h100"], "true");
                },
            },
            Case {
                name: "an empty node selector and no tolerations are left out",
                edit: |s| {
                    s.placement.node_selector.clear();
                    s.placement.tolerations.clear();
                },
                check: |o| {
                    assert_eq!(pod_spec(o).node_selector, None);
                    assert_eq!(pod_spec(o).tolerations, None);
                },
            },
            Case {
                name: "custom tolerations, priority class, pull policy and secrets pass through",
                edit: |s| {
                    s.placement.tolerations = vec![Toleration {
                        key: Some("dedicated".into()),
                        operator: Some("Equal".into()),
                        value: Some("gonka".into()),
                        ..Default::default()
                    }];
                    s.priority_class_name = Some("gonka-critical".into());
                    s.image_pull_policy = gonka_crds::ImagePullPolicy::Always;
                    s.image_pull_secrets =
                        vec![k8s_openapi::api::core::v1::LocalObjectReference { name: "regcred".into() }];
                },
                check: |o| {
                    let pod = pod_spec(o);
                    assert_eq!(pod.tolerations.as_ref().unwrap()[0].value.as_deref(), Some("gonka"));
                    assert_eq!(pod.priority_class_name.as_deref(), Some("gonka-critical"));
                    assert_eq!(pod.containers[0].image_pull_policy.as_deref(), Some("Always"));
                    assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
                },
            },
            Case {
                name: "maxUnavailable reaches the rolling update, with no surge",
                edit: |s| s.update_strategy.max_unavailable = IntOrString::String("25%".into()),
                check: |o| {
                    let ru = o
                        .daemon_set
                        .spec
                        .as_ref()
                        .unwrap()
                        .update_strategy
                        .as_ref()
                        .unwrap()
                        .rolling_update
                        .as_ref()
                        .unwrap();
                    assert_eq!(ru.max_unavailable, Some(IntOrString::String("25%".into())));
                    assert_eq!(ru.max_surge, Some(IntOrString::Int(0)));
                },
            },
            Case {
                name: "holding rollouts for PoC windows makes the DaemonSet OnDelete",
                edit: |s| s.network_node.public_url = Some("http://api:9000".into()),
                check: |o| {
                    let st = o.daemon_set.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
                    assert_eq!((st.type_.as_deref(), st.rolling_update.is_none()), (Some("OnDelete"), true));
                },
            },
            Case {
                name: "the pod learns where its config and identity are",
                edit: |_| {},
                check: |o| {
                    assert_eq!(env(o, ENV_CONFIG).as_deref(), Some("/etc/gonka/daemon.json"));
                    assert_eq!(env(o, "NODE_NAME").as_deref(), Some("spec.nodeName"));
                    assert_eq!(env(o, "POD_IP").as_deref(), Some("status.podIP"));
                    assert_eq!(env(o, "CUDA_DEVICE_ORDER").as_deref(), Some("PCI_BUS_ID"));
                    let ports: Vec<i32> =
                        pod_spec(o).containers[0].ports.as_ref().unwrap().iter().map(|p| p.container_port).collect();
                    assert_eq!(ports, [8080, 5000, 9090]);
                    let probe = pod_spec(o).containers[0].readiness_probe.clone().unwrap().http_get.unwrap();
                    assert_eq!(probe.port, IntOrString::String("metrics".into()));
                },
            },
        ];
        for case in cases {
            let objects = build(case.edit);
            let result = std::panic::catch_unwind(|| (case.check)(&objects));
            assert!(result.is_ok(), "case failed: {}", case.name);
        }
    }

    #[test]
    fn the_mtls_pair_is_mounted_under_upstream_s_variables_and_rolls_the_pods() {
        use crate::validate::MtlsSecret;
        let with = |digest: Option<&str>| {
            let gn = gonka_node("h100", |_| {});
            let mut validated =
                validate(&gn, "ghcr.io/example/daemon:1", &crate::test_fixtures::lenient_policy()).unwrap();
            validated.mtls = digest.map(|d| MtlsSecret { name: "gonka-mtls".into(), digest: d.into() });
            desired_objects(&gn, &validated, None).unwrap()
        };
        let hash = |o: &DesiredObjects| {
            o.daemon_set.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
                [ANNOTATION_CONFIG_HASH]
                .clone()
        };
        let plain = with(None);
        assert!(pod_spec(&plain).volumes.as_ref().unwrap().iter().all(|v| v.name != "mtls"));
        assert_eq!(env(&plain, "MLNODE_MTLS_CLIENT_CERT"), None);

        let o = with(Some("a1"));
        let volume = pod_spec(&o).volumes.as_ref().unwrap().iter().find(|v| v.name == "mtls").unwrap().clone();
        let secret = volume.secret.unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("gonka-mtls"));
        let files: Vec<_> = secret.items.unwrap().into_iter().map(|i| (i.key, i.path)).collect();
        // dapi.key (the network node's) is never mounted, even when the Secret holds it.
        assert_eq!(
            files,
            [("mlnode.crt", "mlnode.crt"), ("mlnode.key", "mlnode.key"), ("dapi.crt", "dapi.crt")]
                .map(|(k, p)| (k.to_string(), p.to_string()))
        );
        let mount =
            pod_spec(&o).containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "mtls").cloned();
        assert_eq!(mount.map(|m| (m.mount_path, m.read_only)), Some((MTLS_MOUNT.to_string(), Some(true))));
        assert_eq!(env(&o, "MLNODE_MTLS_CLIENT_CERT").as_deref(), Some("/etc/gonka-mtls/mlnode.crt"));
        assert_eq!(env(&o, "MLNODE_MTLS_CLIENT_KEY").as_deref(), Some("/etc/gonka-mtls/mlnode.key"));
        assert_eq!(env(&o, "MLNODE_MTLS_SERVER_CA").as_deref(), Some("/etc/gonka-mtls/dapi.crt"));
        // Another pair, another hash: the pods roll; no pair, the hash is daemon.json's as before.
        assert_ne!(hash(&o), hash(&with(Some("b2"))));
        assert_ne!(hash(&o), hash(&plain));
        let config_json = &plain.config_map.data.as_ref().unwrap()["daemon.json"];
        assert_eq!(hash(&plain), hex::encode(&Sha256::digest(config_json.as_bytes())[..8]));
    }

    #[test]
    fn an_unreadable_epoch_holds_evictions_for_a_bounded_time() {
        let limit = Duration::from_secs(1800);
        let at = |secs: u64| Duration::from_secs(secs);
        let unreadable = || Some(Err("connection refused".to_string()));
        assert_eq!(disruption_guard(None, at(0), limit), (DisruptionGuard::Tolerate, None));
        assert_eq!(disruption_guard(Some(Ok(false)), at(0), limit), (DisruptionGuard::Tolerate, None));
        assert_eq!(disruption_guard(Some(Ok(true)), at(9999), limit), (DisruptionGuard::PocWindow, None));
        assert_eq!(disruption_guard(unreadable(), at(0), limit), (DisruptionGuard::PocWindow, None));
        assert_eq!(disruption_guard(unreadable(), at(1799), limit), (DisruptionGuard::PocWindow, None));
        let (guard, why) = disruption_guard(unreadable(), at(1800), limit);
        assert_eq!(guard, DisruptionGuard::Tolerate);
        let why = why.unwrap();
        assert!(why.contains("unreadable for 30 min") && why.contains("connection refused"), "{why}");
    }

    #[test]
    fn ml_node_api_callers_are_the_spec_s_peers_only() {
        let rules = |o: DesiredObjects| {
            let policy = o.network_policy;
            assert_eq!(policy.metadata.name.as_deref(), Some("h100-ml-nodes"));
            let spec = policy.spec.unwrap();
            assert_eq!(spec.pod_selector.unwrap().match_labels, o.daemon_set.spec.unwrap().selector.match_labels);
            assert_eq!(spec.policy_types.unwrap(), ["Ingress"]);
            spec.ingress
                .unwrap()
                .into_iter()
                .map(|r| (r.from, r.ports.unwrap().into_iter().map(|p| p.port.unwrap()).collect::<Vec<_>>()))
                .collect::<Vec<_>>()
        };
        let (api, monitoring) = ([IntOrString::Int(8080), IntOrString::Int(5000)], [IntOrString::Int(9090)]);
        // Unset: default-deny for the API and inference ports; metrics and probes stay open.
        assert_eq!(rules(build(|_| {})), [(None, monitoring.to_vec())]);
        // `[]`: every caller, as an empty `from` admits all in a NetworkPolicy.
        assert_eq!(
            rules(build(|s| s.network_node.ml_node_api_from = Some(vec![]))),
            [(None, monitoring.to_vec()), (None, api.to_vec())]
        );
        let peers: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer> =
            serde_json::from_value(serde_json::json!([
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gonka"}}},
                {"ipBlock": {"cidr": "10.0.0.7/32"}},
            ]))
            .unwrap();
        assert_eq!(
            rules(build(|s| s.network_node.ml_node_api_from = Some(peers.clone()))),
            [(None, monitoring.to_vec()), (Some(peers.clone()), api.to_vec())]
        );
    }

    #[test]
    fn model_storage_is_mounted_read_only_and_named_in_daemon_json() {
        use gonka_crds::ModelStorage;
        let models = |o: &DesiredObjects| {
            let pod = pod_spec(o);
            let volume = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "models").cloned();
            let mount = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "models").cloned();
            let config = DaemonConfig::from_json(&o.config_map.data.as_ref().unwrap()["daemon.json"]).unwrap();
            (volume, mount, config)
        };
        // None by default, and daemon.json says nothing (its bytes, and so the rollout hash,
        // stay those of GonkaNodes made before the field existed).
        let (volume, mount, config) = models(&build(|_| {}));
        assert!(volume.is_none() && mount.is_none());
        assert_eq!((config.models_dir, config.preload_model), (None, None));
        assert!(!build(|_| {}).config_map.data.unwrap()["daemon.json"].contains("modelsDir"));

        let claim = build(|s| {
            s.model_storage = Some(ModelStorage {
                persistent_volume_claim: Some("qwen-weights".into()),
                host_path: None,
                sub_path: Some("hub".into()),
                preload: Some(s.models[0].id.clone()),
            })
        });
        let (volume, mount, config) = models(&claim);
        let pvc = volume.unwrap().persistent_volume_claim.unwrap();
        assert_eq!((pvc.claim_name.as_str(), pvc.read_only), ("qwen-weights", Some(true)));
        let mount = mount.unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.sub_path.as_deref(), mount.read_only),
            ("/models", Some("hub"), Some(true))
        );
        assert_eq!(mount.recursive_read_only.as_deref(), Some("IfPossible"));
        assert_eq!(config.models_dir.as_deref(), Some("/models"));
        assert_eq!(config.preload_model.as_deref(), Some("Qwen/Qwen2.5-7B-Instruct"));

        let host = build(|s| {
            s.model_storage = Some(ModelStorage {
                persistent_volume_claim: None,
                host_path: Some("/srv/models".into()),
                sub_path: None,
                preload: None,
            })
        });
        let host_path = models(&host).0.unwrap().host_path.unwrap();
        assert_eq!((host_path.path.as_str(), host_path.type_.as_deref()), ("/srv/models", Some("Directory")));
        // A new storage is a new daemon.json: the pods roll.
        let hash = |o: &DesiredObjects| {
            o.daemon_set.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
                [ANNOTATION_CONFIG_HASH]
                .clone()
        };
        assert_ne!(hash(&claim), hash(&host));
    }

    #[test]
    fn disruption_budget_allows_no_eviction_in_a_poc_window_and_the_rollout_tolerance_outside() {
        let min_available = |max_unavailable: IntOrString, expected: i32, guard: DisruptionGuard| {
            let gn = gonka_node("h100", |s| s.update_strategy.max_unavailable = max_unavailable.clone());
            let pdb = disruption_budget(&gn, expected, guard).unwrap();
            let spec = pdb.spec.unwrap();
            assert_eq!(spec.selector.unwrap().match_labels.unwrap(), selector_labels(&gn));
            assert_eq!(spec.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
            assert_eq!(pdb.metadata.owner_references.unwrap()[0].name, "h100");
            spec.min_available.unwrap()
        };
        use DisruptionGuard::*;
        assert_eq!(min_available(IntOrString::Int(1), 10, PocWindow), IntOrString::Int(10));
        assert_eq!(min_available(IntOrString::Int(1), 10, Tolerate), IntOrString::Int(9));
        assert_eq!(min_available(IntOrString::String("25%".into()), 10, Tolerate), IntOrString::Int(7));
        assert_eq!(min_available(IntOrString::Int(3), 2, Tolerate), IntOrString::Int(0));
        assert_eq!(min_available(IntOrString::Int(1), 0, PocWindow), IntOrString::Int(0));
    }

    #[test]
    fn reporting_daemons_get_the_endpoint_and_a_pod_bound_token_for_the_operator_only() {
        let gn = gonka_node("h100", |_| {});
        let validated = validate(&gn, "ghcr.io/example/daemon:1", &crate::test_fixtures::lenient_policy()).unwrap();
        let url = "https://gonka-operator.gonka-system.svc:8082";
        let endpoint = ReportEndpoint { url: url.into(), ca_bundle: Some("CA PEM".into()) };
        let o = desired_objects(&gn, &validated, Some(&endpoint)).unwrap();
        let config = DaemonConfig::from_json(&o.config_map.data.as_ref().unwrap()[daemon_config::FILE_NAME]).unwrap();
        let report = config.report.unwrap();
        assert_eq!((report.url.as_str(), report.token_file.as_deref()), (url, Some(report::TOKEN_PATH)));
        assert_eq!(report.ca_bundle.as_deref(), Some("CA PEM"));
        let pod = pod_spec(&o);
        let volume = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "report-token").unwrap();
        let token = volume.projected.as_ref().unwrap().sources.as_ref().unwrap()[0].service_account_token.as_ref();
        assert_eq!(token.unwrap().audience.as_deref(), Some("gonka-operator"));
        let mount = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "report-token");
        assert_eq!(format!("{}/{}", mount.unwrap().mount_path, token.unwrap().path), report::TOKEN_PATH);
        // The apiserver token stays out of the pod.
        assert_eq!(pod.automount_service_account_token, Some(false));

        let quiet = build(|_| {});
        assert!(pod_spec(&quiet).volumes.as_ref().unwrap().iter().all(|v| v.name != "report-token"));
        let config =
            DaemonConfig::from_json(&quiet.config_map.data.as_ref().unwrap()[daemon_config::FILE_NAME]).unwrap();
        assert_eq!(config.report, None);
    }

    #[test]
    fn config_map_carries_the_daemon_config_and_the_pods_roll_when_it_changes() {
        let a = build(|_| {});
        let b = build(|s| s.poc.batch_size = 64);
        let config: DaemonConfig =
            DaemonConfig::from_json(&a.config_map.data.as_ref().unwrap()[daemon_config::FILE_NAME]).unwrap();
        assert_eq!(config.gonka_node, "gpu/h100");
        assert_eq!(config.ml_callback_url, "http://gonka-api.gonka.svc:9100");
        assert_eq!(config.poc.batch_size, 32);
        let hash = |o: &DesiredObjects| {
            o.daemon_set.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
                [ANNOTATION_CONFIG_HASH]
                .clone()
        };
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(a, build(|_| {}), "building is deterministic");
        let image_change = build(|s| s.image = Some("other:2".into()));
        assert_eq!(hash(&a), hash(&image_change), "the config did not change");
        assert_ne!(template_hash(&a.daemon_set), template_hash(&image_change.daemon_set), "the template did");
    }

    #[test]
    fn headless_service_exposes_the_ml_node_ports() {
        let o = build(|_| {});
        let spec = o.service.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        let ports: Vec<(&str, i32)> =
            spec.ports.as_ref().unwrap().iter().map(|p| (p.name.as_deref().unwrap(), p.port)).collect();
        assert_eq!(ports, [("poc-api", 8080), ("inference-api", 5000), ("metrics", 9090)]);
        assert_eq!(spec.selector.as_ref(), o.daemon_set.spec.as_ref().unwrap().selector.match_labels.as_ref());
    }

    #[test]
    fn refuses_objects_without_identity() {
        let mut gn = gonka_node("x", |_| {});
        let validated = validate(&gn, "img", &crate::test_fixtures::lenient_policy()).unwrap();
        gn.metadata.uid = None;
        assert_eq!(desired_objects(&gn, &validated, None), Err(BuildError::NoUid));
        gn.metadata.namespace = None;
        assert_eq!(desired_objects(&gn, &validated, None), Err(BuildError::NoNamespace));
    }
}
