//! vLLM as this ML node's engine, for the models the native engine does not run (the live
//! network's MiniMax-M2.7, DeepSeek-V4-Flash, GLM-5.3-Flash): the daemon runs vLLM servers as
//! upstream's ML node does ([`plan`], [`supervisor`]) and stays in front of them — the
//! inference port forwards to them ([`proxy`]), PoC v2 fans out to the `gonka_poc` plugin on
//! each ([`pow_v2`]), a hung or dead one is restarted ([`heartbeat`]); under mutual TLS the
//! plugin's callbacks go through the daemon ([`callback_relay`]).

pub mod callback_relay;
pub mod heartbeat;
pub mod plan;
pub mod pow_v2;
pub mod proxy;
pub mod supervisor;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gonka_protocol::ml_node::InferenceUpRequest;

use self::plan::{GONKA_POC_WORKER_EXTENSION, VllmConfig};
use self::supervisor::{Supervision, VllmServer};

/// How this ML node runs vLLM; `None` in [`super::manager::InferenceSettings`] when it has none.
#[derive(Clone, Debug)]
pub struct VllmSettings {
    pub config: VllmConfig,
    pub supervision: Supervision,
    /// Add upstream's `gonka_poc` worker extension when vLLM's Python has the plugin.
    pub detect_poc_plugin: bool,
}

/// Whether `python` can import `module` (a quick probe, bounded).
async fn importable(python: &Path, module: &str) -> bool {
    let probe = tokio::process::Command::new(python)
        .args(["-c", &format!("import importlib.util, sys; sys.exit(importlib.util.find_spec({module:?}) is None)")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    matches!(tokio::time::timeout(Duration::from_secs(30), probe).await, Ok(Ok(s)) if s.success())
}

/// The first name the last `--served-model-name` gives (vLLM answers to each), if any.
fn served_model_name(args: &[String]) -> Option<String> {
    plan::occurrences(args, "--served-model-name").last().and_then(|(_, v)| v.map(str::to_string))
}

/// Adds upstream's `gonka_poc` worker extension to `settings` when vLLM's Python has the
/// plugin (asked once, as the daemon starts).
pub async fn detect_poc_plugin(settings: &mut VllmSettings) {
    if settings.detect_poc_plugin
        && settings.config.worker_extension.is_none()
        && importable(&settings.config.python, "gonka_poc").await
    {
        tracing::info!("vLLM has the gonka_poc plugin: instances run its worker extension");
        settings.config.worker_extension = Some(GONKA_POC_WORKER_EXTENSION.into());
    }
}

/// Starts vLLM for `request`: `model_dir` is where the daemon found the weights (then vLLM
/// loads that directory and answers to the requested name), `None` lets vLLM find the model
/// itself (its Hugging Face cache). `gpus` are the available GPUs' NVML indices. The returned
/// future ends when every instance serves, or with why one could not.
pub fn start(
    settings: &VllmSettings,
    inference_port: u16,
    request: &InferenceUpRequest,
    model_dir: Option<&Path>,
    gpus: &[u32],
    http: reqwest::Client,
) -> Result<(Arc<VllmServer>, impl std::future::Future<Output = Result<(), String>> + Send + 'static), String> {
    let mut args = request.additional_args.clone();
    let served_name = served_model_name(&args).unwrap_or_else(|| request.model.clone());
    let model = match model_dir {
        Some(dir) => {
            if served_model_name(&args).is_none() {
                args.extend(["--served-model-name".to_string(), request.model.clone()]);
            }
            dir.display().to_string()
        }
        None => request.model.clone(),
    };
    let dtype = if request.dtype.is_empty() { "auto" } else { request.dtype.as_str() };
    let plans = plan::plan(&settings.config, inference_port, &model, dtype, &args, gpus)?;
    tracing::info!(model = %request.model, instances = plans.len(), python = %settings.config.python.display(), "starting vLLM");
    Ok(VllmServer::start(request.model.clone(), served_name, plans, settings.supervision.clone(), http))
}

#[cfg(test)]
mod tests {
    use super::served_model_name;

    #[test]
    fn the_served_name_is_read_in_both_spellings() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(served_model_name(&args(&["--served-model-name", "a", "b"])).as_deref(), Some("a"));
        assert_eq!(served_model_name(&args(&["-tp", "2", "--served-model-name=x"])).as_deref(), Some("x"));
        assert_eq!(served_model_name(&args(&["--max-model-len", "9"])), None);
    }
}
