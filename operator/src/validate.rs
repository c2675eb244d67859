//! Validate: the checks the apiserver's schema cannot make, and the operator's defaults.
//!
//! The CRD schema and its CEL rules already reject malformed fields at admission. What remains
//! needs parsing or the operator's own settings: engine arguments against `gpusPerMlNode`, what
//! the cluster admin allows ([`ClusterPolicy`]: host paths, image registries), the image
//! default. A few admission rules are checked again here, for objects stored before the rule
//! existed (a GPU request in `resources`, the PoC v2 batch bound). Every error names the field.

use std::fmt;

use gonka_crds::{GonkaNode, GonkaNodeSpec, NVIDIA_GPU_RESOURCE};

/// A spec that passed validation, with the operator's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedSpec {
    /// The GonkaNode's spec as written.
    pub spec: GonkaNodeSpec,
    /// The node-daemon image: `spec.image`, else the operator's default.
    pub image: String,
    /// The mutual-TLS Secret (`spec.networkNode.mtlsSecretRef`) once read and found opted in
    /// and complete; filled by the reconciler after validation (the Secret is an observation).
    pub mtls: Option<MtlsSecret>,
}

/// A Secret with upstream's mutual-TLS files, as the pods mount it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtlsSecret {
    pub name: String,
    /// A digest of its files: part of the config hash, so a new pair rolls the ML nodes.
    pub digest: String,
}

/// The files of upstream's `gen-mlnode-certs.sh` the ML nodes need (`dapi.key` stays with the
/// network node).
pub const MTLS_FILES: [&str; 3] = ["mlnode.crt", "mlnode.key", "dapi.crt"];

/// What the cluster admin allows GonkaNode authors, from the operator's flags (chart values):
/// the pods the operator creates run with its rights, so a GonkaNode author must not reach
/// further through them than the admin chose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterPolicy {
    /// Directories `spec.modelStorage.hostPath` may name (or lie under); empty: no hostPath.
    pub allowed_host_paths: Vec<String>,
    /// Image prefixes `spec.image` must start with (a registry or repository path); empty: any
    /// image.
    pub allowed_image_prefixes: Vec<String>,
}

/// The flags `ClusterPolicy` comes from, named in its refusals.
pub const ALLOWED_HOST_PATHS_FLAG: &str = "--allowed-host-paths (chart value modelStorage.allowedHostPaths)";
pub const ALLOWED_IMAGE_PREFIXES_FLAG: &str = "--allowed-image-prefixes (chart value daemonImage.allowedPrefixes)";

impl ClusterPolicy {
    /// Checks the admin's own lists: host paths absolute and normalised, prefixes non-empty.
    pub fn new(allowed_host_paths: Vec<String>, allowed_image_prefixes: Vec<String>) -> Result<Self, String> {
        for path in &allowed_host_paths {
            if !is_normalised_absolute(path) {
                return Err(format!(
                    "{ALLOWED_HOST_PATHS_FLAG}: {path:?} is not an absolute, normalised directory (no '.', '..', \
                     empty segment or trailing '/')"
                ));
            }
        }
        if let Some(bad) = allowed_image_prefixes.iter().find(|p| p.trim().is_empty() || p.trim() != p.as_str()) {
            return Err(format!("{ALLOWED_IMAGE_PREFIXES_FLAG}: {bad:?} is not an image prefix"));
        }
        Ok(Self { allowed_host_paths, allowed_image_prefixes })
    }

    /// `path` is an allowed directory or lies under one (segment by segment: `/srv/models`
    /// allows `/srv/models/hub`, not `/srv/models2`).
    pub fn allows_host_path(&self, path: &str) -> bool {
        is_normalised_absolute(path)
            && self.allowed_host_paths.iter().any(|allowed| {
                allowed == "/"
                    || path == allowed
                    || path.strip_prefix(allowed.as_str()).is_some_and(|rest| rest.starts_with('/'))
            })
    }

    /// `image` starts with an allowed prefix at a reference boundary (`ghcr.io/gonka` allows
    /// `ghcr.io/gonka/daemon:1` and `ghcr.io/gonka:1`, not `ghcr.io/gonka-evil/daemon`), or no
    /// prefix is configured.
    pub fn allows_image(&self, image: &str) -> bool {
        self.allowed_image_prefixes.is_empty()
            || self.allowed_image_prefixes.iter().any(|prefix| {
                image.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                    prefix.ends_with(['/', ':', '@']) || rest.is_empty() || rest.starts_with(['/', ':', '@'])
                })
            })
    }
}

/// An absolute path below `/` without `.`, `..` or empty segments (the CRD's rule for hostPath).
fn is_normalised_absolute(path: &str) -> bool {
    path == "/"
        || path.strip_prefix('/').is_some_and(|rest| rest.split('/').all(|p| !p.is_empty() && p != "." && p != ".."))
}

/// The largest batch PoC v2 takes (the ML node's `init/generate` refuses more).
pub const MAX_POC_V2_BATCH_SIZE: i32 = 1024;

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.models[0].args`.
    pub field: String,
    pub message: String,
}

/// Every problem found in a spec, so the user can fix them in one go.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
        f.write_str(&parts.join("; "))
    }
}

/// The operator's default node-daemon image for `gn`: `vllm` (`--daemon-image-vllm`, the
/// image built on upstream's ML-node image, with vLLM) when a model asks for the vLLM engine,
/// else `native` (`--daemon-image`). `spec.image` overrides either.
pub fn default_image_for<'a>(gn: &GonkaNode, native: &'a str, vllm: &'a str) -> &'a str {
    let wants_vllm = gn.spec.models.iter().any(|m| m.engine == gonka_crds::ModelEngine::Vllm);
    if wants_vllm && !vllm.trim().is_empty() { vllm } else { native }
}

/// Validates `gn` against the schema's parsed rules and the admin's `policy`, and resolves
/// defaults. `default_image` is the operator's default image for it ([`default_image_for`]).
pub fn validate(
    gn: &GonkaNode,
    default_image: &str,
    policy: &ClusterPolicy,
) -> Result<ValidatedSpec, ValidationErrors> {
    let spec = &gn.spec;
    let mut errors = Vec::new();
    let mut err = |field: String, message: String| errors.push(FieldError { field, message });

    let image = match spec.image.as_deref().map(str::trim) {
        Some(image) if !image.is_empty() => image.to_string(),
        _ if !default_image.trim().is_empty() => default_image.trim().to_string(),
        _ => {
            err("spec.image".into(), "required: the operator was started without a default --daemon-image".into());
            String::new()
        }
    };

    if !image.is_empty() && !policy.allows_image(&image) {
        err(
            "spec.image".into(),
            format!(
                "{image} is not under an image prefix the cluster admin allows ({}; {ALLOWED_IMAGE_PREFIXES_FLAG})",
                policy.allowed_image_prefixes.join(", ")
            ),
        );
    }

    if let Some(path) = spec.model_storage.as_ref().and_then(|m| m.host_path.as_deref())
        && !policy.allows_host_path(path)
    {
        let allowed = if policy.allowed_host_paths.is_empty() {
            "none is: hostPath volumes are off; use modelStorage.persistentVolumeClaim".to_string()
        } else {
            format!("allowed: {}", policy.allowed_host_paths.join(", "))
        };
        err(
            "spec.modelStorage.hostPath".into(),
            format!(
                "{path} is not under a host directory the cluster admin allows ({ALLOWED_HOST_PATHS_FLAG}; {allowed})"
            ),
        );
    }

    if spec.poc.batch_size > MAX_POC_V2_BATCH_SIZE {
        err(
            "spec.poc.batchSize".into(),
            format!(
                "{} is above {MAX_POC_V2_BATCH_SIZE}, the largest batch PoC v2 takes: every v2 round would be refused",
                spec.poc.batch_size
            ),
        );
    }

    for (i, model) in spec.models.iter().enumerate() {
        let field = format!("spec.models[{i}].args");
        let parallel = match parallel_size(&model.args) {
            Ok(p) => p,
            Err(message) => {
                err(field, message);
                continue;
            }
        };
        let gpus = spec.gpus_per_ml_node;
        if !(gpus.max(1) as u32).is_multiple_of(parallel) {
            err(
                field,
                format!(
                    "model {} needs {parallel} GPUs per engine (tensor x pipeline parallel), which does not divide spec.gpusPerMlNode={gpus}",
                    model.id
                ),
            );
        }
    }

    if let Some(resources) = &spec.resources {
        let asks_gpu =
            [&resources.limits, &resources.requests].into_iter().flatten().any(|m| m.contains_key(NVIDIA_GPU_RESOURCE));
        if asks_gpu {
            err("spec.resources".into(), format!("must not set {NVIDIA_GPU_RESOURCE}; set spec.gpusPerMlNode instead"));
        }
    }

    if errors.is_empty() {
        Ok(ValidatedSpec { spec: spec.clone(), image, mtls: None })
    } else {
        Err(ValidationErrors(errors))
    }
}

/// GPUs one inference engine of a model needs: tensor-parallel x pipeline-parallel size, read
/// from vLLM's flags (`--tensor-parallel-size N`, `--tensor-parallel-size=N`, `-tp N`, and the
/// pipeline-parallel equivalents). Flags absent = 1.
pub fn parallel_size(args: &[String]) -> Result<u32, String> {
    let mut tp = 1;
    let mut pp = 1;
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (arg, None),
        };
        let target = match flag {
            "--tensor-parallel-size" | "-tp" => Some(&mut tp),
            "--pipeline-parallel-size" | "-pp" => Some(&mut pp),
            _ => None,
        };
        if let Some(target) = target {
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i).map(String::as_str).ok_or_else(|| format!("{flag} needs a value"))?
                }
            };
            *target = value
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("{flag} must be a positive integer, got {value:?}"))?;
        }
        i += 1;
    }
    Ok(tp * pp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::gonka_node;

    /// No host path allowed, any image: the operator's defaults.
    fn open() -> ClusterPolicy {
        ClusterPolicy::default()
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parallel_size_reads_vllm_flags() {
        let cases: &[(&[&str], Result<u32, &str>)] = &[
            (&[], Ok(1)),
            (&["--quantization", "fp8"], Ok(1)),
            (&["--tensor-parallel-size", "4"], Ok(4)),
            (&["--tensor-parallel-size=4", "--pipeline-parallel-size", "2"], Ok(8)),
            (&["-tp", "2", "-pp=2"], Ok(4)),
            (&["--tensor-parallel-size"], Err("--tensor-parallel-size needs a value")),
            (&["--tensor-parallel-size", "0"], Err("--tensor-parallel-size must be a positive integer, got \"0\"")),
            (&["-tp", "four"], Err("-tp must be a positive integer, got \"four\"")),
        ];
        for (input, want) in cases {
            let got = parallel_size(&args(input));
            assert_eq!(got, want.map_err(str::to_string), "args {input:?}");
        }
    }

    #[test]
    fn image_defaults_to_the_operators() {
        let gn = gonka_node("a", |_| {});
        assert_eq!(validate(&gn, "img:default", &open()).unwrap().image, "img:default");
        // A model on the vLLM engine takes the vLLM image by default.
        let mut vllm = gn.clone();
        assert_eq!(default_image_for(&vllm, "img:native", "img:vllm"), "img:native");
        vllm.spec.models[0].engine = gonka_crds::ModelEngine::Vllm;
        assert_eq!(default_image_for(&vllm, "img:native", "img:vllm"), "img:vllm");
        assert_eq!(default_image_for(&vllm, "img:native", ""), "img:native", "no vLLM image configured");
        let gn = gonka_node("a", |s| s.image = Some("img:mine".into()));
        assert_eq!(validate(&gn, "img:default", &open()).unwrap().image, "img:mine");
        let err = validate(&gonka_node("a", |_| {}), "", &open()).unwrap_err();
        assert_eq!(err.0[0].field, "spec.image");
    }

    #[test]
    fn host_paths_only_under_what_the_admin_allows() {
        let policy = ClusterPolicy::new(vec!["/srv/models".into(), "/data/hf".into()], vec![]).unwrap();
        for (path, allowed) in [
            ("/srv/models", true),
            ("/srv/models/hub", true),
            ("/data/hf/models--org--m", true),
            ("/srv/models2", false),
            ("/srv", false),
            ("/srv/models/../../etc", false),
            ("/srv/models/./hub", false),
            ("/srv/models//hub", false),
            ("/", false),
            ("/var/lib/kubelet", false),
        ] {
            assert_eq!(policy.allows_host_path(path), allowed, "{path}");
        }
        let with = |path: &str| {
            gonka_node("a", |s| {
                s.model_storage = Some(gonka_crds::ModelStorage {
                    persistent_volume_claim: None,
                    host_path: Some(path.into()),
                    sub_path: None,
                    preload: None,
                })
            })
        };
        assert!(validate(&with("/srv/models/hub"), "img", &policy).is_ok());
        let err = validate(&with("/proc"), "img", &policy).unwrap_err();
        assert_eq!(err.0[0].field, "spec.modelStorage.hostPath");
        assert!(err.0[0].message.contains("allowed: /srv/models, /data/hf"), "{err}");
        // The default: no host path at all, and the refusal names the setting.
        let err = validate(&with("/srv/models"), "img", &open()).unwrap_err();
        assert!(
            err.0[0].message.contains("--allowed-host-paths") && err.0[0].message.contains("persistentVolumeClaim"),
            "{err}"
        );
        // The admin's own list is checked too.
        assert!(ClusterPolicy::new(vec!["srv".into()], vec![]).is_err());
        assert!(ClusterPolicy::new(vec!["/srv/".into()], vec![]).is_err());
        assert!(ClusterPolicy::new(vec![], vec![" ".into()]).is_err());
    }

    #[test]
    fn images_only_from_allowed_prefixes_when_some_are_set() {
        let policy =
            ClusterPolicy::new(vec![], vec!["ghcr.io/gonka-operator".into(), "registry.local:5000/".into()]).unwrap();
        for (image, allowed) in [
            ("ghcr.io/gonka-operator/gonka-node-daemon:0.1.0", true),
            ("ghcr.io/gonka-operator@sha256:aa", true),
            ("registry.local:5000/anything/else:1", true),
            ("ghcr.io/gonka-operator-evil/daemon:1", false),
            ("docker.io/library/busybox", false),
            ("registry.local:50000/x", false),
        ] {
            assert_eq!(policy.allows_image(image), allowed, "{image}");
        }
        assert!(open().allows_image("anything:1"), "no prefix configured: any image");
        let gn = gonka_node("a", |s| s.image = Some("docker.io/evil/miner:1".into()));
        let err = validate(&gn, "img", &policy).unwrap_err();
        assert_eq!(err.0[0].field, "spec.image");
        assert!(err.0[0].message.contains("--allowed-image-prefixes"), "{err}");
        // The operator's own default must be allowed too, or every GonkaNode is refused: said.
        let err = validate(&gonka_node("a", |_| {}), "docker.io/default:1", &policy).unwrap_err();
        assert_eq!(err.0[0].field, "spec.image");
    }

    #[test]
    fn batches_above_what_poc_v2_takes_are_refused() {
        let gn = gonka_node("a", |s| s.poc.batch_size = MAX_POC_V2_BATCH_SIZE);
        assert!(validate(&gn, "img", &open()).is_ok());
        let gn = gonka_node("a", |s| s.poc.batch_size = MAX_POC_V2_BATCH_SIZE + 1);
        let err = validate(&gn, "img", &open()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.poc.batchSize: 1025 is above 1024, the largest batch PoC v2 takes: every v2 round would be refused"
        );
    }

    #[test]
    fn parallelism_must_divide_gpus_per_ml_node() {
        let gn = gonka_node("a", |s| {
            s.gpus_per_ml_node = 6;
            s.models[0].args = args(&["--tensor-parallel-size", "4"]);
        });
        let err = validate(&gn, "img", &open()).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].field, "spec.models[0].args");
        assert!(err.0[0].message.contains("does not divide spec.gpusPerMlNode=6"), "{err}");

        let ok = gonka_node("a", |s| {
            s.gpus_per_ml_node = 8;
            s.models[0].args = args(&["--tensor-parallel-size", "4"]);
        });
        assert!(validate(&ok, "img", &open()).is_ok());
    }

    #[test]
    fn gpu_requests_belong_in_gpus_per_ml_node() {
        use k8s_openapi::api::core::v1::ResourceRequirements;
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let gn = gonka_node("a", |s| {
            s.resources = Some(ResourceRequirements {
                limits: Some([(NVIDIA_GPU_RESOURCE.to_string(), Quantity("2".into()))].into()),
                ..Default::default()
            })
        });
        let err = validate(&gn, "img", &open()).unwrap_err();
        assert_eq!(err.to_string(), "spec.resources: must not set nvidia.com/gpu; set spec.gpusPerMlNode instead");
    }

    #[test]
    fn reports_every_error_at_once() {
        let gn = gonka_node("a", |s| {
            s.gpus_per_ml_node = 3;
            s.models[0].args = args(&["-tp", "2"]);
            s.models.push(gonka_crds::ModelSpec { id: "x/y".into(), args: args(&["-tp"]), engine: Default::default() });
        });
        let err = validate(&gn, "", &open()).unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.image", "spec.models[0].args", "spec.models[1].args"]);
    }

    /// Every sample in manifests/samples/ (and samples/vllm/) is a GonkaNode the operator
    /// accepts, the vLLM ones on the vLLM image.
    #[test]
    fn the_samples_are_valid_gonka_nodes() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/samples");
        let mut seen = Vec::new();
        for dir in [root.clone(), root.join("vllm")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if !text.contains("kind: GonkaNode") {
                    continue;
                }
                let gn: GonkaNode = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let image = default_image_for(&gn, "img:native", "img:vllm");
                let validated = validate(&gn, image, &open()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let on_vllm = dir.ends_with("vllm");
                assert_eq!(validated.image, if on_vllm { "img:vllm" } else { "img:native" }, "{}", path.display());
                seen.push(gn.metadata.name.clone().unwrap());
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                "a100",
                "deepseek-v4-flash-b200",
                "deepseek-v4-flash-h200",
                "h100",
                "minimax-m27-b200",
                "minimax-m27-h200"
            ]
        );
    }
}
