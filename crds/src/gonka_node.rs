//! `GonkaNode` (`gonka.ai/v1alpha1`): one class of GPU machines joining one Gonka network node.
//!
//! Every doc comment below becomes the field's description in the CRD schema, so it is what
//! `kubectl explain gonkanode.spec.<field>` prints. Constraints the apiserver can check alone
//! (ranges, patterns, cross-field rules in CEL) live in the schema; rules that need parsing
//! (engine arguments) are checked by the operator's validate step and reported as conditions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The node label NVIDIA GPU Feature Discovery (and the GPU Operator) puts on every GPU node.
pub const NVIDIA_GPU_PRESENT_LABEL: &str = "nvidia.com/gpu.present";
/// The extended resource name of the NVIDIA device plugin, and the usual GPU-node taint key.
pub const NVIDIA_GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Upstream ML-node management / PoC port (`PORT` in the network's `config.env`).
pub const DEFAULT_POC_PORT: i32 = 8080;
/// Upstream ML-node inference port (the mlnode's vLLM proxy listens on 5000).
pub const DEFAULT_INFERENCE_PORT: i32 = 5000;
/// The node-daemon's monitoring port: `/metrics` and the kubelet's probes, nothing else.
pub const DEFAULT_METRICS_PORT: i32 = 9090;
/// Longest `GonkaNode` name: owned objects append suffixes and pod names append a hash.
pub const MAX_NAME_LENGTH: usize = 40;
/// The label a Secret's owner sets (to `"true"`) to let the operator use it as network-node
/// credentials. Without it the operator reads nothing from the Secret a GonkaNode names.
pub const CREDENTIALS_LABEL: &str = "gonka.ai/network-node-credentials";

/// The rule every network-node base URL obeys: absolute `http`/`https` with a host, and nothing
/// a path is appended to that could change where a request goes (a query or fragment swallows
/// the path) or leak into status and events (user info is a credential: those go in
/// `credentialsSecretRef`).
fn base_url_rule(field: &str) -> kube::core::Rule {
    kube::core::Rule::new(
        "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != '' \
         && !self.contains('?') && !self.contains('#') && !self.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/]*@')",
    )
    .message(kube::core::Message::Message(format!(
        "{field} must be an absolute http:// or https:// URL with a host, and no query, fragment or user info"
    )))
}

/// A fleet of ML nodes for the Gonka network: one ML node (a node-daemon pod owning the node's
/// GPUs) on every Kubernetes node that matches the placement, registered with the host's
/// network node, proving compute (PoC) and serving inference. Its scale subresource is the cap
/// in ML nodes (`spec.capacity.maxMlNodes`), so `kubectl scale`, an HPA or KEDA can size it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gonka.ai",
    version = "v1alpha1",
    kind = "GonkaNode",
    plural = "gonkanodes",
    shortname = "gn",
    category = "gonka",
    namespaced,
    status = "GonkaNodeStatus",
    derive = "PartialEq",
    doc = "A fleet of GPU machines joining one Gonka network node as ML nodes.",
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters (owned objects and pods append suffixes)"),
    scale(
        spec_replicas_path = ".spec.capacity.maxMlNodes",
        status_replicas_path = ".status.desiredMlNodes",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Every desired ML node is ready"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredMlNodes", description = "ML nodes wanted: Kubernetes nodes matching the placement"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.readyMlNodes", description = "ML nodes whose daemon is ready"),
    printcolumn(name = "Registered", type_ = "integer", json_path = ".status.registeredMlNodes", description = "ML nodes registered with the network node"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".status.totalGpus", description = "GPUs reported by the ML nodes"),
    printcolumn(name = "Weight", type_ = "integer", json_path = ".status.weight", description = "Valid nonces the ML nodes reported for the latest PoC round"),
    printcolumn(name = "Eligible", type_ = "integer", json_path = ".status.capacity.eligible", priority = 1, description = "Kubernetes nodes an ML node could join on (spec.capacity)"),
    printcolumn(name = "Held Back", type_ = "integer", json_path = ".status.capacity.heldBack", priority = 1, description = "Eligible nodes spec.capacity keeps out"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1, description = "Why the fleet is or is not ready"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.opportunistic) || has(self.priorityClassName)").message("opportunistic needs priorityClassName: a PriorityClass below the in-house work's, so that work preempts the ML nodes"))]
#[x_kube(validation = Rule::new("!has(self.modelStorage) || !has(self.modelStorage.preload) || self.models.exists(m, m.id == self.modelStorage.preload)").message("modelStorage.preload must be one of models[].id"))]
#[x_kube(validation = Rule::new("!has(self.networkNode.allowPlaintextCredentials) || !self.networkNode.allowPlaintextCredentials || has(self.networkNode.credentialsSecretRef)").message("networkNode.allowPlaintextCredentials is set but networkNode.credentialsSecretRef is not: there are no credentials to send"))]
#[x_kube(validation = Rule::new("!has(self.networkNode.mtlsSecretRef) || self.networkNode.mlCallbackUrl.startsWith('https://')").message("networkNode.mtlsSecretRef needs an https:// mlCallbackUrl: in mutual TLS mode the network node takes callbacks only over TLS"))]
#[x_kube(validation = Rule::new("!has(self.networkNode.caBundle) || self.networkNode.adminUrl.startsWith('https://') || self.networkNode.mlCallbackUrl.startsWith('https://') || (has(self.networkNode.publicUrl) && self.networkNode.publicUrl.startsWith('https://'))").message("networkNode.caBundle is set but no network-node URL is https://: nothing would use it"))]
pub struct GonkaNodeSpec {
    /// The host's network node (Gonka "dapi") these ML nodes join: where the operator registers
    /// them and where they send PoC results.
    pub network_node: NetworkNodeSpec,

    /// Which Kubernetes nodes run an ML node. Defaults select NVIDIA GPU nodes (label
    /// `nvidia.com/gpu.present=true`, as set by GPU Feature Discovery) and tolerate the usual
    /// `nvidia.com/gpu` taint.
    #[serde(default)]
    pub placement: Placement,

    /// GPUs each ML node owns, requested from the NVIDIA device plugin as `nvidia.com/gpu`, so
    /// the scheduler counts them and the container toolkit hands exactly these to the pod
    /// (usually all GPUs of the node: 8 on an HGX board). Required: a count can't be guessed,
    /// and "every GPU of the node" can't be requested. The ML node is not ready until it sees
    /// them all. Must be a multiple of every model's tensor-parallel x pipeline-parallel size.
    #[schemars(range(min = 1, max = 64))]
    pub gpus_per_ml_node: i32,

    /// How much of the matching Kubernetes nodes the fleet may take, and which nodes join
    /// first. Unset: every node the placement matches runs an ML node. Set: only the nodes the
    /// operator picks (it labels them `joined.gonka.ai/<GonkaNode UID>`, which the DaemonSet
    /// selects); setting or unsetting it rolls the ML nodes once, as any change of the pod
    /// template does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,

    /// Opportunistic mode: lend GPUs that in-house work may take back. The pods run at
    /// `priorityClassName` (required: a PriorityClass below the in-house work's, so the
    /// scheduler preempts them, and with `preemptionPolicy: Never` so they never preempt), and
    /// each daemon watches its GPUs: a process that is not its own, or utilisation while it runs
    /// nothing, makes it yield (disabled on the network node first, pending PoC batches sent,
    /// its model unloaded) until the GPUs have been idle for `rejoinAfterIdleSeconds`. Unset:
    /// the GPUs are the fleet's alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opportunistic: Option<Opportunistic>,

    /// The models these ML nodes serve, by Gonka (Hugging Face) model id. Each must be approved
    /// by the network's governance, or the network node rejects the registration.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub models: Vec<ModelSpec>,

    /// Where the ML nodes find model weights, mounted read-only at `/models`, and which model
    /// they load at start. Unset: no model volume (`/inference/up` then fails naming the
    /// missing models directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_storage: Option<ModelStorage>,

    /// Proof-of-compute settings of the node-daemons.
    #[serde(default)]
    pub poc: PocSpec,

    /// The node-daemon container image, a reference as a container runtime reads it
    /// (`[registry[:port]/]repository[:tag][@digest]`). Defaults to the operator's
    /// `--daemon-image` (`--daemon-image-vllm` when a model is on the vLLM engine). The cluster
    /// admin may allow only some registries (`--allowed-image-prefixes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 512),
        regex(
            pattern = r"^(([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(:[0-9]+)?/)?[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
        )
    )]
    pub image: Option<String>,

    /// When the kubelet pulls the image.
    #[serde(default)]
    pub image_pull_policy: ImagePullPolicy,

    /// Secrets in this namespace holding registry credentials for the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// CPU and memory for the node-daemon container. GPUs come from `gpusPerMlNode`; do not
    /// set `nvidia.com/gpu` here. Unset requests default to 2 CPUs and 8 GiB; no limit is set by
    /// default (loading a model needs host memory in proportion to the GPUs' memory, and a
    /// memory limit would kill the pod mid-load): set `limits` to cap it. Values are
    /// Kubernetes quantities, each request at most its limit; `claims` (dynamic resource
    /// allocation) is not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "resources_schema")]
    #[x_kube(validation = Rule::new("!has(self.claims)").message("resources.claims is not supported: GPUs come from gpusPerMlNode"))]
    #[x_kube(validation = Rule::new("(!has(self.limits) || !('nvidia.com/gpu' in self.limits)) && (!has(self.requests) || !('nvidia.com/gpu' in self.requests))").message("resources must not set nvidia.com/gpu: set gpusPerMlNode instead"))]
    #[x_kube(validation = Rule::new("(!has(self.limits) || self.limits.all(k, isQuantity(string(self.limits[k])))) && (!has(self.requests) || self.requests.all(k, isQuantity(string(self.requests[k]))))").message("resources values must be Kubernetes quantities, e.g. 500m, 2, 8Gi"))]
    #[x_kube(validation = Rule::new("!has(self.limits) || !has(self.requests) || self.requests.all(k, !(k in self.limits) || !isQuantity(string(self.requests[k])) || !isQuantity(string(self.limits[k])) || quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)").message("resources: every request must be at most its limit"))]
    pub resources: Option<ResourceRequirements>,

    /// Size of the pod's `/dev/shm` (a memory-backed volume, counted against the pod's memory):
    /// inference engines exchange tensors through it. Default `16Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))").message("shmSize must be a positive Kubernetes quantity, e.g. 16Gi"))]
    pub shm_size: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,

    /// RuntimeClass of the ML-node pods, e.g. `nvidia` where the NVIDIA container runtime is
    /// not the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub runtime_class_name: Option<String>,

    /// PriorityClass of the ML-node pods: a high one so less valuable work does not preempt
    /// them, or, with `opportunistic`, a low one so in-house work does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub priority_class_name: Option<String>,

    /// How a change of this spec rolls out over the ML nodes.
    #[serde(default)]
    pub update_strategy: UpdateStrategy,

    /// Drain switch. While true the operator holds every change to the fleet's objects (no
    /// rollout starts) and disables its ML nodes on the network node, so they finish the
    /// current epoch and get no new PoC round. Pods keep running; set back to false to resume.
    /// The disruption budget still follows the PoC windows (it guards the pods that run).
    #[serde(default)]
    pub paused: bool,
}

/// Where the host's network node is.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkNodeSpec {
    /// Base URL of the network node's admin API (upstream port 9200), e.g.
    /// `http://gonka-api.gonka.svc:9200`. The operator registers ML nodes there through
    /// `/admin/v1/nodes`. The admin API has no authentication of its own: keep it private.
    #[x_kube(validation = base_url_rule("adminUrl"))]
    #[schemars(length(min = 1, max = 2048))]
    pub admin_url: String,

    /// Base URL of the network node's ML callback server (upstream `DAPI_API__POC_CALLBACK_URL`,
    /// port 9100), e.g. `http://gonka-api.gonka.svc:9100`. Every ML-node pod must reach it: PoC
    /// batches are posted there.
    #[x_kube(validation = base_url_rule("mlCallbackUrl"))]
    #[schemars(length(min = 1, max = 2048))]
    pub ml_callback_url: String,

    /// Base URL of the network node's public API (upstream port 9000, or the 8000 proxy), e.g.
    /// `http://gonka-api.gonka.svc:9000`. The operator reads the epoch phase there
    /// (`/v1/epochs/latest`) to hold rollouts out of PoC windows; unset, rollouts are not held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = base_url_rule("publicUrl"))]
    #[schemars(length(min = 1, max = 2048))]
    pub public_url: Option<String>,

    /// Optional Secret in this namespace with credentials for the admin API, for network nodes
    /// fronted by an authenticating proxy. Key `token` is sent as a bearer token. The Secret
    /// must carry the label `gonka.ai/network-node-credentials: "true"`, set by whoever owns
    /// it: naming a Secret here does not make the operator read one that did not opt in. The
    /// token is sent only to an `https` adminUrl, or over plain `http` when
    /// `allowPlaintextCredentials` says so. With the cluster-wide install the namespace must be
    /// one the admin lists (chart `secretNamespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,

    /// PEM certificates to trust, besides the system's, for an `https` adminUrl, publicUrl or
    /// mlCallbackUrl (a network node behind a private CA); the ML nodes get it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub ca_bundle: Option<String>,

    /// Send the credentials of `credentialsSecretRef` over plain `http` (a proxy on a network
    /// you trust, e.g. a sidecar or an in-cluster service mesh). Off, an `http` adminUrl gets
    /// no credentials and registration is refused with the reason.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_plaintext_credentials: bool,

    /// Who may call the ML nodes' API (8080) and inference port (5000): NetworkPolicy peers,
    /// e.g. the network node's namespace and pods, or its address as an ipBlock. The operator
    /// owns a NetworkPolicy `<name>-ml-nodes` on the ML-node pods that admits these peers to
    /// those two ports and anyone to the monitoring port (9090: `/metrics` and the probes).
    /// Unset, it admits no caller to the two ports (default-deny: name the network node here);
    /// `[]` admits every caller, as an empty `from` does in a NetworkPolicy (the opt-out).
    /// Enforced only where the cluster's network plugin implements NetworkPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub ml_node_api_from: Option<Vec<NetworkPolicyPeer>>,

    /// Mutual TLS with the network node, upstream's optional mode (gonka-ai/gonka
    /// `deploy/join/MTLS.md`): a Secret in this namespace holding the files
    /// `gen-mlnode-certs.sh` makes, `mlnode.crt`, `mlnode.key` and `dapi.crt`. The ML nodes then
    /// serve their API and inference port over TLS to the holder of `dapi.crt` only, and post
    /// callbacks with `mlnode.crt` (so `mlCallbackUrl` must be `https`, the network node's
    /// `MTLS_POC_CALLBACK_URL`). Each ML node serves a certificate it issues itself under
    /// `mlnode.crt` for its pod IP, so no pod address needs to be known in advance. The Secret
    /// must carry the label `gonka.ai/network-node-credentials: "true"` (its owner's opt-in,
    /// as for credentials), and with the cluster-wide install its namespace must be one the
    /// admin lists (chart `secretNamespaces`). A new pair rolls the ML nodes at the next
    /// reconcile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_secret_ref: Option<SecretReference>,
}

/// A Secret in the GonkaNode's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// Which Kubernetes nodes run an ML node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Node labels a Kubernetes node must carry to run an ML node (label keys and values as
    /// Kubernetes spells them). An empty map selects every node the tolerations allow.
    #[serde(default = "default_node_selector")]
    #[schemars(schema_with = "node_selector_schema")]
    #[x_kube(validation = Rule::new(LABEL_KEYS_RULE).message("nodeSelector keys must be label keys: [prefix/]name, the name at most 63 letters, digits, '-', '_' or '.'"))]
    pub node_selector: BTreeMap<String, String>,

    /// Scheduling constraints beyond labels (e.g. only some GPU products).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Taints the ML-node pods tolerate, as in a Pod: `operator` `Exists` or `Equal` (the
    /// default), `effect` `NoSchedule`, `PreferNoSchedule`, `NoExecute` or empty (all),
    /// `tolerationSeconds` only with `NoExecute`, an empty key only with `Exists`.
    #[serde(default = "default_tolerations")]
    #[schemars(schema_with = "tolerations_schema")]
    #[x_kube(validation = Rule::new("self.all(t, !has(t.tolerationSeconds) || (has(t.effect) && t.effect == 'NoExecute'))").message("tolerations[].tolerationSeconds needs effect NoExecute"))]
    #[x_kube(validation = Rule::new("self.all(t, (has(t.key) && t.key != '') || (has(t.operator) && t.operator == 'Exists'))").message("tolerations[] with an empty key must use operator Exists"))]
    #[x_kube(validation = Rule::new("self.all(t, !has(t.operator) || t.operator != 'Exists' || !has(t.value) || t.value == '')").message("tolerations[] with operator Exists must not set a value"))]
    pub tolerations: Vec<Toleration>,
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name. (`[.]`, not
/// a backslash: it is also used inside CEL string literals, where `\.` is no escape.)
macro_rules! label_key_re {
    () => {
        r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    };
}
const LABEL_KEY_RE: &str = label_key_re!();
/// A Kubernetes label value, the empty one included.
const LABEL_VALUE_RE: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";
/// Map keys can't carry a schema of their own (no `propertyNames` in a structural schema): a CEL
/// rule checks them, with the length test first so the regex is costed on short keys.
const LABEL_KEYS_RULE: &str = concat!("self.all(k, size(k) <= 317 && k.matches('", label_key_re!(), "'))");

/// `nodeSelector`'s schema: at most 64 labels, values label values (pattern and length in the
/// schema itself: cheaper than CEL and the apiserver names the offending key).
fn node_selector_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <BTreeMap<String, String>>::json_schema(generator);
    schema.insert("maxProperties".into(), 64.into());
    let values = schema.get_mut("additionalProperties").and_then(|v| v.as_object_mut()).expect("a map schema");
    values.insert("maxLength".into(), 63.into());
    values.insert("pattern".into(), LABEL_VALUE_RE.into());
    schema
}

/// `tolerations`' schema: a Pod's `Toleration`, with what Pod validation checks and the
/// OpenAPI schema of `Toleration` leaves to code: the operators and effects there are, label
/// syntax of key and value, and bounds (which also keep the CEL rules' cost estimate low).
fn tolerations_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <Vec<Toleration>>::json_schema(generator);
    schema.insert("maxItems".into(), 32.into());
    let properties = schema
        .get_mut("items")
        .and_then(|items| items.get_mut("properties"))
        .and_then(|p| p.as_object_mut())
        .expect("Toleration's schema is inlined");
    let mut set = |field: &str, key: &str, value: serde_json::Value| {
        properties
            .get_mut(field)
            .and_then(|f| f.as_object_mut())
            .expect("a Toleration field")
            .insert(key.into(), value);
    };
    // "" is Equal, as in a Pod.
    set("operator", "enum", serde_json::json!(["", "Exists", "Equal"]));
    set("effect", "enum", serde_json::json!(["", "NoSchedule", "PreferNoSchedule", "NoExecute"]));
    set("key", "maxLength", 317.into());
    set("key", "pattern", format!("^$|{}", LABEL_KEY_RE).into());
    set("value", "maxLength", 63.into());
    set("value", "pattern", LABEL_VALUE_RE.into());
    schema
}

/// `resources`' schema: a container's `ResourceRequirements` with its maps bounded (16 resources,
/// 64-character values), which keeps the CEL rules that read every quantity cheap.
fn resources_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = ResourceRequirements::json_schema(generator);
    let properties = schema.get_mut("properties").and_then(|p| p.as_object_mut()).expect("an object schema");
    for map in ["limits", "requests"] {
        let map = properties.get_mut(map).and_then(|m| m.as_object_mut()).expect("a resource map");
        map.insert("maxProperties".into(), 16.into());
        let values = map.get_mut("additionalProperties").and_then(|v| v.as_object_mut()).expect("quantities");
        values.insert("maxLength".into(), 64.into());
    }
    schema
}

impl Default for Placement {
    fn default() -> Self {
        Self { node_selector: default_node_selector(), affinity: None, tolerations: default_tolerations() }
    }
}

fn default_node_selector() -> BTreeMap<String, String> {
    BTreeMap::from([(NVIDIA_GPU_PRESENT_LABEL.to_string(), "true".to_string())])
}

fn default_tolerations() -> Vec<Toleration> {
    vec![Toleration {
        key: Some(NVIDIA_GPU_RESOURCE.to_string()),
        operator: Some("Exists".to_string()),
        effect: Some("NoSchedule".to_string()),
        ..Toleration::default()
    }]
}

/// Caps on the fleet and the order nodes join in. A node is eligible when an ML node could run
/// there: it matches the placement (node selector, required node affinity, tolerated taints),
/// is not going (cordoned, being removed by an autoscaler, deleted) and has `gpusPerMlNode`
/// GPUs allocatable. Joined nodes stay while eligible and within the cap (a better node that
/// arrives later does not push one out); when the cap shrinks, the lowest-ranked leave first,
/// each ML node disabled on the network node before its pod goes, and none during a PoC window.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.maxMlNodes) || has(self.maxGpus)").message("capacity needs maxMlNodes or maxGpus: without a cap every matching node joins (leave capacity unset)"))]
pub struct Capacity {
    /// The most ML nodes (Kubernetes nodes: one ML node each) that may join. 0 joins none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_ml_nodes: Option<i32>,

    /// The most GPUs the ML nodes may hold together. Each holds `gpusPerMlNode`, so at most
    /// `maxGpus / gpusPerMlNode` ML nodes join (rounded down). With `maxMlNodes` too, the
    /// smaller cap holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 6400000))]
    pub max_gpus: Option<i32>,

    /// Which eligible nodes join first: a node scores the sum of the weights of the
    /// preferences whose labels it carries; higher scores join first and leave last, ties by
    /// node name. Empty: by node name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub preferences: Vec<CapacityPreference>,
}

/// When an opportunistic ML node yields its GPUs and takes them again.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Opportunistic {
    /// Seconds the GPUs must have been idle (no process but the ML node's own, utilisation at
    /// most `busyUtilizationPercent`) before a yielded ML node rejoins. 30 to 86400, default
    /// 600.
    #[serde(default = "default_rejoin_after_idle")]
    #[schemars(range(min = 30, max = 86400))]
    pub rejoin_after_idle_seconds: i32,

    /// GPU utilisation, in percent, that counts as other work on a GPU while the ML node runs
    /// nothing on it. 1 to 100, default 10.
    #[serde(default = "default_busy_utilization")]
    #[schemars(range(min = 1, max = 100))]
    pub busy_utilization_percent: i32,
}

fn default_rejoin_after_idle() -> i32 {
    600
}

fn default_busy_utilization() -> i32 {
    10
}

/// One weighted preference among eligible nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CapacityPreference {
    /// What matching this preference adds to a node's score, 1 to 100 (as in a Pod's preferred
    /// node affinity).
    #[schemars(range(min = 1, max = 100))]
    pub weight: i32,

    /// Node labels a node must carry, all of them, to match (keys and values as Kubernetes
    /// spells them; an empty value matches a label with an empty value).
    #[schemars(schema_with = "node_selector_schema")]
    #[x_kube(validation = Rule::new(LABEL_KEYS_RULE).message("matchLabels keys must be label keys: [prefix/]name, the name at most 63 letters, digits, '-', '_' or '.'"))]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("matchLabels needs at least one label"))]
    pub match_labels: BTreeMap<String, String>,
}

/// One model the ML nodes serve.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The Gonka model id, which is its Hugging Face repository, e.g. `Qwen/Qwen2.5-7B-Instruct`.
    #[schemars(
        length(min = 3, max = 256),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub id: String,

    /// Inference-engine (vLLM) arguments for this model, e.g. `["--tensor-parallel-size", "4"]`.
    /// Sent to the network node with the registration and merged there with the governance
    /// `model_args`.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(a, size(a) > 0 && size(a) <= 512)").message("args entries must be non-empty and at most 512 characters"))]
    pub args: Vec<String>,

    /// Which engine serves the model on each ML node: `auto` (the default) is the node-daemon's
    /// own libtorch engine when it runs the checkpoint's architecture (Qwen2, Qwen3, Qwen3-MoE
    /// without quantisation) and vLLM otherwise; `native` and `vllm` force one. vLLM needs a
    /// node-daemon image that carries it (`images/node-daemon-vllm`); `args` are vLLM's flags
    /// either way (the native engine reads the few that apply to it).
    #[serde(default, skip_serializing_if = "ModelEngine::is_auto")]
    pub engine: ModelEngine,
}

/// The engine that serves a model.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelEngine {
    /// Native when it runs the checkpoint, else vLLM.
    #[default]
    Auto,
    /// The node-daemon's own libtorch engine.
    Native,
    /// vLLM servers run and fronted by the node-daemon, as upstream's ML node runs them.
    Vllm,
}

impl ModelEngine {
    pub fn is_auto(&self) -> bool {
        *self == Self::Auto
    }
}

/// Model weights for the ML nodes: a volume in the Hugging Face layouts the node-daemon reads
/// (`<org>/<name>/` directories, or a Hugging Face cache of `models--<org>--<name>/snapshots/`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.persistentVolumeClaim) != has(self.hostPath)").message("modelStorage needs exactly one of persistentVolumeClaim and hostPath"))]
pub struct ModelStorage {
    /// A PersistentVolumeClaim in this namespace holding the weights, mounted read-only by
    /// every ML node: a ReadOnlyMany volume (NFS, a CSI driver) for a fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub persistent_volume_claim: Option<String>,

    /// A directory on every GPU node holding the weights (staged there beforehand), mounted
    /// read-only (recursively, where the kubelet supports it). Only under a directory the
    /// cluster admin allows (the operator's `--allowed-host-paths`, chart value
    /// `modelStorage.allowedHostPaths`; none by default, and then hostPath is refused): a
    /// hostPath volume reads the node's own files. hostPath volumes are also refused where the
    /// namespace enforces the `restricted` Pod Security profile: use a PersistentVolumeClaim
    /// there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/') && self.substring(1).split('/').all(p, p != '' && p != '.' && p != '..')").message("hostPath must be an absolute, normalised path below '/': no '.' or '..' segments, no empty segment, no trailing '/'"))]
    pub host_path: Option<String>,

    /// The directory inside the volume that holds the models; default: the volume's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.split('/').all(p, p != '' && p != '.' && p != '..')").message("subPath must be a relative, normalised path: no '.' or '..' segments, no empty segment, no leading or trailing '/'"))]
    pub sub_path: Option<String>,

    /// A model (one of `models`) each ML node loads as it starts, so it serves before the
    /// network node asks (the network node then finds it running and does not restart it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 256))]
    pub preload: Option<String>,
}

/// Proof-of-compute settings of the node-daemons.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PocSpec {
    /// Nonces computed per forward pass, tuned to the GPUs (upstream's ML node tunes its own,
    /// `POC_BATCH_SIZE_DEFAULT`); it replaces the `batch_size` the network node sends. Larger
    /// batches use more GPU memory: a batch that does not fit is refused with the reason. At
    /// most 1024, the largest batch PoC v2 (the live network's) takes: a larger one would be
    /// refused by every v2 round and the fleet would prove nothing.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 1024))]
    pub batch_size: i32,

    /// How often a daemon posts its pending PoC batches to the callback URL, in seconds
    /// (upstream sends every 5 s).
    #[serde(default = "default_send_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub send_interval_seconds: i32,

    /// Most PoC batches a daemon keeps while the callback URL is unreachable. When full, nonce
    /// generation waits (backpressure) instead of dropping proofs.
    #[serde(default = "default_max_pending_batches")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_pending_batches: i32,
}

impl Default for PocSpec {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            send_interval_seconds: default_send_interval(),
            max_pending_batches: default_max_pending_batches(),
        }
    }
}

fn default_batch_size() -> i32 {
    32
}
fn default_send_interval() -> i32 {
    5
}
fn default_max_pending_batches() -> i32 {
    10_000
}

/// When the kubelet pulls the node-daemon image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ImagePullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the image is not on the node.
    #[default]
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// How a change of the spec rolls out over the ML nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStrategy {
    /// Most ML nodes down at once during a rollout: a count (e.g. `1`) or a percentage of the
    /// desired ML nodes (e.g. `"25%"`). The GonkaNode's PodDisruptionBudget
    /// (`<name>-ml-nodes`) lets evictions take as many.
    #[serde(default = "default_max_unavailable")]
    #[x_kube(validation = Rule::new("type(self) == int ? self >= 1 : self.matches('^(100|[1-9][0-9]?)%$')").message("maxUnavailable must be a count >= 1 or a percentage between 1% and 100%"))]
    pub max_unavailable: IntOrString,

    /// Hold a rollout while the network is in a PoC window (PoC generation, validation or a
    /// confirmation PoC), so no ML node restarts and loses its weight. Needs
    /// `spec.networkNode.publicUrl`: the DaemonSet then updates `OnDelete` and the operator
    /// replaces pods itself, outside PoC windows, at most `maxUnavailable` at a time, disabling
    /// each ML node on the network node first; and the PodDisruptionBudget allows no eviction
    /// during a PoC window (nor while the phase can't be read).
    #[serde(default = "default_true")]
    pub hold_during_poc: bool,
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        Self { max_unavailable: default_max_unavailable(), hold_during_poc: true }
    }
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}
fn default_true() -> bool {
    true
}

/// Observed state of the fleet, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GonkaNodeStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current state as standard conditions: `Ready`, `Progressing`, `Degraded`, `Registered`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// ML nodes wanted: Kubernetes nodes that match the placement.
    #[serde(default)]
    pub desired_ml_nodes: i32,

    /// ML nodes running the current spec.
    #[serde(default)]
    pub updated_ml_nodes: i32,

    /// ML nodes whose daemon passes its readiness probe.
    #[serde(default)]
    pub ready_ml_nodes: i32,

    /// ML nodes registered with the network node.
    #[serde(default)]
    pub registered_ml_nodes: i32,

    /// GPUs reported by the ML nodes, summed over `gpus`.
    #[serde(default)]
    pub total_gpus: i32,

    /// GPUs reported by the ML nodes, by model, in upstream's hardware form
    /// (`"<NVML name> | <N>GB"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub gpus: Vec<GpuCount>,

    /// Valid nonces the ML nodes found in the latest PoC round they reported (`pocBlockHeight`),
    /// summed: the weight the fleet claims for that round, before the network validates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,

    /// Block height of the PoC round `weight` is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poc_block_height: Option<i64>,

    /// The label selector of the ML-node pods, as the scale subresource reports it (HPA and
    /// KEDA need one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub selector: Option<String>,

    /// What `spec.capacity` lets join, and what it holds back; absent without `spec.capacity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<CapacityStatus>,

    /// Each ML node as its node-daemon last reported, by Kubernetes node; the first 1000
    /// (the counts above cover all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub ml_nodes: Vec<MlNodeStatus>,
}

/// How `spec.capacity` applies to the cluster's nodes now.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CapacityStatus {
    /// Kubernetes nodes an ML node could run on: matching the placement, not going, with
    /// `gpusPerMlNode` GPUs allocatable.
    pub eligible: i32,
    /// Nodes joined (labelled for the DaemonSet), leaving ones included until they have left.
    pub joined: i32,
    /// Eligible nodes the cap keeps out.
    pub held_back: i32,
    /// Joined nodes waiting to leave: over the cap or no longer eligible, held while a PoC
    /// window is on or until their ML nodes are disabled on the network node.
    pub leaving: i32,
    /// The most ML nodes the caps allow.
    pub limit: i32,
    /// Why nodes are held back or wait to leave, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

/// One ML node (one pod) as its node-daemon reports it over the report stream.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MlNodeStatus {
    /// The Kubernetes node the ML node runs on.
    pub node: String,
    /// The pod.
    pub pod: String,
    /// Upstream's ML-node state: `STOPPED`, `POW`, `INFERENCE` or `TRAIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub state: Option<String>,
    /// GPUs the daemon sees through NVML.
    #[serde(default)]
    pub gpus: i32,
    /// Of those, GPUs fit to work (no lost GPU, no XID that needs a reset).
    #[serde(default)]
    pub gpus_available: i32,
    /// The available GPUs in upstream's hardware form, as registered with the network node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub hardware: Vec<GpuCount>,
    /// Why NVML shows no GPUs (no driver, no library), when it doesn't.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub gpu_error: Option<String>,
    /// The daemon's report stream to the operator is up.
    pub reporting: bool,
    /// When the report stream came up (`reporting`) or went down (not `reporting`).
    pub since: Time,
    /// Block height of the ML node's latest PoC round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poc_block_height: Option<i64>,
    /// Valid nonces (proofs) the ML node found in that round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poc_valid_nonces: Option<i64>,
    /// What serves the model here, while one is up or coming up, or why it failed to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<MlNodeInference>,
    /// Set while this opportunistic ML node has yielded its GPUs to other work: disabled on
    /// the network node, it takes work again once they have been idle for
    /// `spec.opportunistic.rejoinAfterIdleSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yielded: Option<MlNodeYield>,
}

/// Why and since when an opportunistic ML node has handed its GPUs back.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MlNodeYield {
    /// What the daemon saw, e.g. `GPU 1: process 4242 is not this ML node's`.
    #[schemars(length(max = 256))]
    pub reason: String,
    /// When it yielded.
    pub since: Time,
    /// Since when the GPUs are idle; unset while other work holds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<Time>,
}

/// The served model's engine and health, as the ML node reports them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MlNodeInference {
    /// The model, as the network node asked for it.
    #[schemars(length(max = 256))]
    pub model: String,
    /// `native` (the node-daemon's own engine) or `vllm`; `none` when the start failed before
    /// an engine was chosen.
    #[schemars(length(max = 16))]
    pub engine: String,
    /// vLLM servers (one for the native engine).
    pub instances: i32,
    /// Of those, the ones serving.
    pub instances_healthy: i32,
    /// vLLM servers restarted since the model came up (one died or hung).
    pub restarts: i64,
    /// Why the start-up or a vLLM server failed: the end of the message, with the server's
    /// last lines of output (a crash loop says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub last_error: Option<String>,
}

/// A number of GPUs of one model.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GpuCount {
    /// The GPU model and memory, as upstream reports hardware: `"<NVML name> | <N>GB"`.
    #[serde(rename = "type")]
    #[schemars(length(max = 128))]
    pub type_: String,
    /// How many GPUs of this model.
    pub count: i32,
}

/// Condition types of `GonkaNode.status.conditions`.
pub mod condition {
    /// Every desired ML node is ready.
    pub const READY: &str = "Ready";
    /// A rollout or scale-out is under way, or held.
    pub const PROGRESSING: &str = "Progressing";
    /// Something needs an operator's attention: bad spec, failed apply, ML nodes unavailable.
    pub const DEGRADED: &str = "Degraded";
    /// ML nodes are registered with the network node.
    pub const REGISTERED: &str = "Registered";
}
