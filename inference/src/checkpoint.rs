//! A Hugging Face checkpoint's weights: `model.safetensors`, or the shards a
//! `model.safetensors.index.json` names. Headers are read (and validated by the `safetensors`
//! crate) when the checkpoint opens; each tensor is read from its file only when asked for and
//! goes straight to its device, so loading never holds more than one tensor in host memory.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::Metadata;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::error::LoadError;

/// Headers over 100 MB are refused, as the safetensors crate does.
const MAX_HEADER: u64 = 100_000_000;

struct Shard {
    path: PathBuf,
    file: File,
    /// Where the tensor data starts (after the length prefix and the header).
    data_start: u64,
    metadata: Metadata,
}

pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let bytes =
                std::fs::read(&index_path).map_err(|source| LoadError::Io { path: index_path.clone(), source })?;
            let index: ShardIndex = serde_json::from_slice(&bytes)
                .map_err(|source| LoadError::Json { path: index_path.clone(), source })?;
            let mut files: Vec<&String> = index.weight_map.values().collect();
            files.sort();
            files.dedup();
            files
                .into_iter()
                .map(|f| {
                    // Shard names come from a file we did not write: keep them inside the directory.
                    let name = Path::new(f);
                    if name.components().count() != 1 || name.is_absolute() {
                        return Err(LoadError::Checkpoint {
                            path: index_path.clone(),
                            message: format!("shard {f:?} is not a file name in the model directory"),
                        });
                    }
                    Ok(dir.join(name))
                })
                .collect::<Result<_, _>>()?
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(LoadError::NoWeights(dir.to_path_buf()));
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let shard = Shard::open(path)?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Self { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Each tensor's name, element count, stored size in bytes, and whether it is stored as
    /// FP8 (which the engine keeps as it is).
    pub fn tensor_sizes(&self) -> impl Iterator<Item = (String, u64, u64, bool)> + '_ {
        self.shards.iter().flat_map(|shard| {
            shard.metadata.tensors().into_iter().map(|(name, info)| {
                let elements: u64 = info.shape.iter().map(|&d| d as u64).product();
                (name, elements, (info.data_offsets.1 - info.data_offsets.0) as u64, info.dtype == Dtype::F8_E4M3)
            })
        })
    }

    /// The tensor `name` as `kind` on `device`, checked against the shape the config implies.
    pub fn load(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor, LoadError> {
        let tensor = self.read(name, shape)?;
        let stored = tensor.kind();
        // Narrow on the host (less to copy), widen on the device.
        let tensor = if kind.elt_size_in_bytes() <= stored.elt_size_in_bytes() {
            tensor.f_to_kind(kind)?.f_to_device(device)?
        } else {
            tensor.f_to_device(device)?.f_to_kind(kind)?
        };
        Ok(tensor)
    }

    /// The tensor `name` in the dtype it is stored in, on `device` (FP8 weights stay FP8).
    pub fn load_stored(&self, name: &str, shape: &[i64], device: Device) -> Result<Tensor, LoadError> {
        Ok(self.read(name, shape)?.f_to_device(device)?)
    }

    /// The tensor `name` on the host as stored, checked against `shape`.
    fn read(&self, name: &str, shape: &[i64]) -> Result<Tensor, LoadError> {
        let &shard_index = self.index.get(name).ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        let shard = &self.shards[shard_index];
        let info = shard.metadata.info(name).ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if found != shape {
            return Err(LoadError::Shape { name: name.to_string(), expected: shape.to_vec(), found });
        }
        let stored = match info.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::F8_E4M3 => Kind::Float8e4m3fn,
            // Index tables (DeepSeek-V4's token → experts).
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            other => return Err(LoadError::TensorDtype { name: name.to_string(), dtype: format!("{other:?}") }),
        };
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        shard
            .file
            .read_exact_at(&mut bytes, shard.data_start + start as u64)
            .map_err(|source| LoadError::Io { path: shard.path.clone(), source })?;
        Ok(Tensor::f_from_data_size(&bytes, &found, stored)?)
    }
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self, LoadError> {
        let io = |source| LoadError::Io { path: path.clone(), source };
        let bad = |message: String| LoadError::Checkpoint { path: path.clone(), message };
        let file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut prefix = [0u8; 8];
        file.read_exact_at(&mut prefix, 0).map_err(io)?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(bad(format!("header length {header_len} does not fit a {file_len}-byte file")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8).map_err(io)?;
        // Metadata's own deserialisation checks that offsets are contiguous and match shapes.
        let metadata: Metadata = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = metadata.data_len() as u64;
        if data_start + data_len != file_len {
            return Err(bad(format!(
                "the header describes {data_len} bytes of tensors, the file holds {}",
                file_len - data_start
            )));
        }
        Ok(Self { path, file, data_start, metadata })
    }
}

/// Loads tensors under a name prefix, in the model dtype, onto one device (candle's
/// `VarBuilder`, without the variables).
#[derive(Clone)]
pub struct Loader<'a> {
    checkpoint: &'a Checkpoint,
    prefix: String,
    kind: Kind,
    device: Device,
    /// The FP8 weights' scaling blocks (`quantization_config.weight_block_size`), when the
    /// checkpoint is block-quantised.
    fp8_block: Option<[i64; 2]>,
}

impl<'a> Loader<'a> {
    pub fn new(checkpoint: &'a Checkpoint, kind: Kind, device: Device) -> Self {
        Self { checkpoint, prefix: String::new(), kind, device, fp8_block: None }
    }

    /// The same loader for a checkpoint whose FP8 weights are scaled in `block`s.
    pub fn with_fp8_block(self, block: Option<[i64; 2]>) -> Self {
        Self { fp8_block: block, ..self }
    }

    pub fn fp8_block(&self) -> Option<[i64; 2]> {
        self.fp8_block
    }

    /// The loader for `name` under this prefix (`model` → `model.layers`).
    pub fn at(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    /// The same prefix onto another device.
    pub fn on(&self, device: Device) -> Self {
        Self { device, ..self.clone() }
    }

    /// The same prefix loading as `kind` (MiniMax-M2's router stays float32 in a bfloat16 model).
    pub fn with_kind(&self, kind: Kind) -> Self {
        Self { kind, ..self.clone() }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `name` under this prefix, as the checkpoint spells it.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.checkpoint.contains(&self.name(name))
    }

    pub fn tensor(&self, name: &str, shape: &[i64]) -> Result<Tensor, LoadError> {
        self.checkpoint.load(&self.name(name), shape, self.kind, self.device)
    }

    /// The tensor `name` in the dtype it is stored in (an FP8 weight stays FP8).
    pub fn stored(&self, name: &str, shape: &[i64]) -> Result<Tensor, LoadError> {
        self.checkpoint.load_stored(&self.name(name), shape, self.device)
    }
}
