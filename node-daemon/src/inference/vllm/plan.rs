//! What a vLLM start looks like, decided before anything runs: how many instances, which GPUs
//! and port each one gets, its command line and environment — as upstream's runner
//! (`api/inference/vllm/runner.py`) decides them. Pure: the supervisor runs the plan.

use std::path::PathBuf;
use std::time::Duration;

/// How this ML node runs vLLM (flags and environment, upstream's names in brackets).
#[derive(Clone, Debug)]
pub struct VllmConfig {
    /// The Python that has vLLM (`VLLM_PYTHON_PATH`).
    pub python: PathBuf,
    /// The module served with `-m` (`MLNODE_VLLM_MODULE`).
    pub module: String,
    /// Instances at most (`INFERENCE_MAX_INSTANCES`).
    pub max_instances: usize,
    /// Where instances listen. Loopback: only the daemon's proxy reaches them (upstream binds
    /// 0.0.0.0, which lets any pod past the proxy's bounds).
    pub host: String,
    /// The `--worker-extension-cls` added when the args name none (upstream adds the `gonka_poc`
    /// plugin's); `None`: none added.
    pub worker_extension: Option<String>,
    /// Instance `i` starts `stagger · i` after the first (upstream 5 s).
    pub stagger: Duration,
    /// vLLM's own `LD_LIBRARY_PATH` where the daemon's differs (`GONKA_VLLM_LD_LIBRARY_PATH`: the
    /// vLLM image puts the daemon's libtorch first, which vLLM's torch must not load).
    pub ld_library_path: Option<String>,
}

/// Upstream's worker extension of the `gonka_poc` plugin (PoC v2 inside vLLM).
pub const GONKA_POC_WORKER_EXTENSION: &str = "gonka_poc.worker.PoCWorkerExtension";

/// Python run before vLLM, in the same process: it asks the kernel for SIGTERM when the
/// daemon dies (`PR_SET_PDEATHSIG`, kept across the exec) — a daemon killed outright (SIGKILL,
/// OOM) leaves no vLLM behind outside a container either — then execs `python -m <module>
/// <args>`; a daemon that died before the request was made is noticed by its pid
/// (`GONKA_NODE_DAEMON_PID`). (The daemon cannot set it itself between fork and exec without
/// unsafe code.)
pub const PARENT_DEATH_WRAPPER: &str = "import ctypes, os, signal, sys\n\
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n\
    if os.getppid() != int(os.environ['GONKA_NODE_DAEMON_PID']): sys.exit('the node-daemon is gone')\n\
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])";

/// One vLLM server to run.
#[derive(Clone, Debug, PartialEq)]
pub struct InstancePlan {
    pub index: usize,
    /// Where it listens (the config's host).
    pub host: String,
    pub port: u16,
    /// The GPUs it owns (NVML indices; `CUDA_VISIBLE_DEVICES`), empty without GPUs.
    pub gpus: Vec<u32>,
    /// How long after the first instance it starts.
    pub delay: Duration,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// The value of a numeric vLLM option, as upstream's `get_numeric_arg_value` reads it: `--name
/// N`, `--name=N`, underscores for dashes, the short alias (`-tp`, `-pp`), the last one
/// winning; unlike upstream a value that is no number is an error, not silently the default.
pub fn numeric_arg(args: &[String], name: &str) -> Result<Option<i64>, String> {
    let mut value = None;
    for (key, raw) in occurrences(args, name) {
        let parsed = raw.and_then(|r| r.parse::<i64>().ok()).filter(|n| *n >= 1);
        value = Some(parsed.ok_or_else(|| format!("{key} takes a positive whole number, not {raw:?}"))?);
    }
    Ok(value)
}

/// Each place `args` set option `name` (`--name v` or `--name=v`, underscores for dashes, the
/// short alias `-tp`/`-pp`), in order: the spelling used and the value that follows.
pub fn occurrences<'a>(args: &'a [String], name: &str) -> impl Iterator<Item = (String, Option<&'a str>)> {
    let alias = match name {
        "--tensor-parallel-size" => Some("-tp"),
        "--pipeline-parallel-size" => Some("-pp"),
        _ => None,
    };
    let name = name.to_string();
    args.iter().enumerate().filter_map(move |(i, arg)| {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (arg.as_str(), None),
        };
        let key = if key.starts_with("--") { key.replace('_', "-") } else { key.to_string() };
        (key == name || Some(key.as_str()) == alias)
            .then(|| (key, inline.or_else(|| args.get(i + 1).map(String::as_str))))
    })
}

/// Whether `args` set `flag` (either spelling).
fn has_flag(args: &[String], flag: &str) -> bool {
    occurrences(args, flag).next().is_some()
}

/// The instances for `model`: one per `tp · pp` of `gpus` (at least one, at most
/// `max_instances`), instance `i` on `base_port + i + 1` with the `i`-th contiguous block of
/// GPUs, started `stagger · i` after the first.
pub fn plan(
    config: &VllmConfig,
    base_port: u16,
    model: &str,
    dtype: &str,
    additional_args: &[String],
    gpus: &[u32],
) -> Result<Vec<InstancePlan>, String> {
    for flag in ["--port", "--host"] {
        if has_flag(additional_args, flag) {
            return Err(format!(
                "{flag} is the ML node's to choose (each instance listens where the daemon's proxy finds it); \
                 remove it from the model's args"
            ));
        }
    }
    let tp = numeric_arg(additional_args, "--tensor-parallel-size")?.unwrap_or(1) as usize;
    let pp = numeric_arg(additional_args, "--pipeline-parallel-size")?.unwrap_or(1) as usize;
    let per_instance = tp * pp;
    if !gpus.is_empty() && gpus.len() < per_instance {
        return Err(format!(
            "{model} needs {per_instance} GPUs per instance (tensor parallel {tp} × pipeline parallel {pp}); \
             this ML node has {} available",
            gpus.len()
        ));
    }
    let count = (gpus.len() / per_instance).clamp(1, config.max_instances.max(1));
    let mut args_tail = additional_args.to_vec();
    if let Some(extension) = &config.worker_extension
        && !has_flag(&args_tail, "--worker-extension-cls")
    {
        args_tail.extend(["--worker-extension-cls".to_string(), extension.clone()]);
    }
    (0..count)
        .map(|i| {
            let port = u16::try_from(u32::from(base_port) + i as u32 + 1)
                .map_err(|_| format!("instance {i} would listen past port 65535 (inference port {base_port})"))?;
            let block: Vec<u32> =
                if gpus.is_empty() { Vec::new() } else { gpus[i * per_instance..(i + 1) * per_instance].to_vec() };
            let mut args: Vec<String> =
                vec!["-c".into(), PARENT_DEATH_WRAPPER.into(), "-m".into(), config.module.clone()];
            args.extend(
                ["--model", model, "--dtype", dtype, "--port", &port.to_string(), "--host", &config.host]
                    .map(str::to_string),
            );
            args.extend(args_tail.iter().cloned());
            // No vendor telemetry (upstream's "metrics trust contract"); CUDA numbers GPUs by
            // PCI bus as NVML does, so NVML's indices name the same GPUs.
            let mut env = vec![("VLLM_NO_USAGE_STATS".to_string(), "1".to_string())];
            if let Some(path) = &config.ld_library_path {
                env.push(("LD_LIBRARY_PATH".into(), path.clone()));
            }
            if !block.is_empty() {
                env.push(("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()));
                env.push((
                    "CUDA_VISIBLE_DEVICES".into(),
                    block.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
                ));
            }
            Ok(InstancePlan {
                index: i,
                host: config.host.clone(),
                port,
                gpus: block,
                delay: config.stagger * i as u32,
                program: config.python.clone(),
                args,
                env,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VllmConfig {
        VllmConfig {
            python: "/usr/bin/python3.12".into(),
            module: "vllm.entrypoints.openai.api_server".into(),
            max_instances: 128,
            host: "127.0.0.1".into(),
            worker_extension: Some(GONKA_POC_WORKER_EXTENSION.into()),
            stagger: Duration::from_secs(5),
            ld_library_path: None,
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn numeric_args_are_read_as_upstream_reads_them() {
        let args = strings(&["--tensor_parallel_size", "2", "-tp", "4", "--max-model-len=4096"]);
        assert_eq!(numeric_arg(&args, "--tensor-parallel-size").unwrap(), Some(4), "the last one wins");
        assert_eq!(numeric_arg(&args, "--max-model-len").unwrap(), Some(4096));
        assert_eq!(numeric_arg(&args, "--pipeline-parallel-size").unwrap(), None);
        let err = numeric_arg(&strings(&["-tp", "two"]), "--tensor-parallel-size").unwrap_err();
        assert!(err.contains("-tp") && err.contains("two"), "{err}");
        assert!(numeric_arg(&strings(&["-tp"]), "--tensor-parallel-size").is_err(), "no value");
        assert!(numeric_arg(&strings(&["-tp", "0"]), "--tensor-parallel-size").is_err());
    }

    #[test]
    fn instances_split_the_gpus_in_contiguous_blocks() {
        // MiniMax-M2.7 on an 8x H200 box with upstream's H200 args: four instances of two.
        let args = strings(&["--kv-cache-dtype", "fp8", "-tp", "2"]);
        let plans = plan(&config(), 5000, "MiniMaxAI/MiniMax-M2.7", "auto", &args, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert_eq!(plans.len(), 4);
        assert_eq!(plans.iter().map(|p| p.port).collect::<Vec<_>>(), [5001, 5002, 5003, 5004]);
        assert_eq!(plans[2].gpus, [4, 5]);
        assert_eq!(plans[3].delay, Duration::from_secs(15));
        assert!(plans[1].env.contains(&("CUDA_VISIBLE_DEVICES".into(), "2,3".into())));
        assert!(plans[1].env.contains(&("VLLM_NO_USAGE_STATS".into(), "1".into())));
        assert_eq!(
            plans[0].args,
            strings(&[
                "-c",
                PARENT_DEATH_WRAPPER,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                "MiniMaxAI/MiniMax-M2.7",
                "--dtype",
                "auto",
                "--port",
                "5001",
                "--host",
                "127.0.0.1",
                "--kv-cache-dtype",
                "fp8",
                "-tp",
                "2",
                "--worker-extension-cls",
                GONKA_POC_WORKER_EXTENSION,
            ])
        );
        // Seven GPUs for instances of two: three instances, the odd GPU idle (upstream's floor).
        assert_eq!(plan(&config(), 5000, "m", "auto", &args, &[0, 1, 2, 3, 4, 5, 6]).unwrap().len(), 3);
    }

    #[test]
    fn limits_and_refusals() {
        let mut c = config();
        c.max_instances = 2;
        assert_eq!(plan(&c, 5000, "m", "auto", &[], &[0, 1, 2, 3]).unwrap().len(), 2);
        // No GPUs (development on a CPU): one instance, no CUDA_VISIBLE_DEVICES.
        let cpu = plan(&config(), 5000, "m", "auto", &[], &[]).unwrap();
        assert_eq!(cpu.len(), 1);
        assert!(cpu[0].env.iter().all(|(k, _)| k != "CUDA_VISIBLE_DEVICES"));
        let err = plan(&config(), 5000, "m", "auto", &strings(&["-tp", "4"]), &[0, 1]).unwrap_err();
        assert!(err.contains("needs 4 GPUs") && err.contains("2 available"), "{err}");
        let err = plan(&config(), 5000, "m", "auto", &strings(&["--port=7000"]), &[0]).unwrap_err();
        assert!(err.starts_with("--port"), "{err}");
        assert!(plan(&config(), 65535, "m", "auto", &[], &[0]).unwrap_err().contains("65535"));
        // An extension the args name already is not added twice; none configured, none added.
        let named = strings(&["--worker-extension-cls", "my.Ext"]);
        let p = plan(&config(), 5000, "m", "auto", &named, &[0]).unwrap();
        assert_eq!(p[0].args.iter().filter(|a| *a == "--worker-extension-cls").count(), 1);
        c.ld_library_path = Some("/usr/local/cuda/lib64".into());
        assert!(
            plan(&c, 5000, "m", "auto", &[], &[0]).unwrap()[0]
                .env
                .contains(&("LD_LIBRARY_PATH".into(), "/usr/local/cuda/lib64".into()))
        );
        assert!(
            plan(&config(), 5000, "m", "auto", &[], &[0]).unwrap()[0].env.iter().all(|(k, _)| k != "LD_LIBRARY_PATH")
        );
        c.worker_extension = None;
        assert!(!plan(&c, 5000, "m", "auto", &[], &[0]).unwrap()[0].args.contains(&"--worker-extension-cls".into()));
    }
}
