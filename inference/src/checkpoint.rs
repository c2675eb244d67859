//! A Hugging Face checkpoint's weights: `model.safetensors`, or the shards a
//! `model.safetensors.index.json` names. Headers are read (and validated by the `safetensors`
//! crate) when the checkpoint opens; each tensor is read from its file only when asked for and
//! goes straight to its device, so loading never holds more than one tensor in host memory.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use safetensors::Dtype;
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

    /// Each tensor's name, size and how the engine keeps it.
    pub fn tensor_sizes(&self) -> impl Iterator<Item = TensorSize> + '_ {
        self.shards.iter().flat_map(|shard| {
            shard.metadata.tensors().into_iter().map(|(name, info)| {
                let elements: u64 = info.shape.iter().map(|&d| d as u64).product();
                let kept = match info.dtype {
                    Dtype::F8_E4M3 => Kept::Quantised { weights: elements },
                    // Bytes of two FP4 codes each (the only byte tensors these checkpoints hold:
                    // DeepSeek-V4's MXFP4 experts, as transformers writes them).
                    Dtype::I8 | Dtype::U8 => Kept::Quantised { weights: 2 * elements },
                    Dtype::F4 => Kept::Quantised { weights: elements },
                    Dtype::F8_E8M0 => Kept::Factors,
                    Dtype::I64 | Dtype::I32 => Kept::Index,
                    _ => Kept::Widened,
                };
                TensorSize { name, elements, bytes: (info.data_offsets.1 - info.data_offsets.0) as u64, kept }
            })
        })
    }

    /// How `name` is stored, if the checkpoint has it.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        let shard = &self.shards[*self.index.get(name)?];
        Some(shard.metadata.info(name)?.dtype)
    }

    /// The tensor `name` as `kind` on `device`, checked against the shape the config implies.
    /// UE8M0 exponents become the powers of two they stand for.
    pub fn load(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor, LoadError> {
        let mut tensor = self.read(name, shape)?;
        if self.dtype(name) == Some(Dtype::F8_E8M0) {
            tensor = e8m0_factors(&tensor);
        }
        let stored = tensor.kind();
        // Narrow on the host (less to copy), widen on the device.
        let tensor = if kind.elt_size_in_bytes() <= stored.elt_size_in_bytes() {
            tensor.f_to_kind(kind)?.f_to_device(device)?
        } else {
            tensor.f_to_device(device)?.f_to_kind(kind)?
        };
        Ok(tensor)
    }

    /// The tensor `name` in the dtype it is stored in, on `device` (FP8 weights stay FP8;
    /// UE8M0 exponents and bytes are uint8).
    pub fn load_stored(&self, name: &str, shape: &[i64], device: Device) -> Result<Tensor, LoadError> {
        Ok(self.read(name, shape)?.f_to_device(device)?)
    }

    /// The FP4 (e2m1) weight `name` of `[rows, columns]` as its bytes on `device`, uint8
    /// `[rows, columns / 2]`, two codes a byte, the even column's in the low nibble: stored as
    /// such bytes (I8 or U8, as transformers writes DeepSeek-V4's experts) or as F4 (whose shape
    /// counts the codes).
    pub fn load_fp4(&self, name: &str, rows: i64, columns: i64, device: Device) -> Result<Tensor, LoadError> {
        let packed = [rows, columns / 2];
        let bytes = match self.dtype(name) {
            Some(Dtype::F4) => self.read(name, &[rows, columns])?,
            Some(Dtype::I8 | Dtype::U8) => self.read(name, &packed)?,
            Some(other) => {
                return Err(LoadError::TensorDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?} for FP4 codes"),
                });
            }
            None => return Err(LoadError::MissingTensor(name.to_string())),
        };
        Ok(bytes.f_view_dtype(Kind::Uint8)?.f_view(packed)?.f_to_device(device)?)
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
            // Packed FP4 codes and UE8M0 exponents (DeepSeek-V4's), as bytes.
            Dtype::I8 => Kind::Int8,
            Dtype::U8 | Dtype::F8_E8M0 | Dtype::F4 => Kind::Uint8,
            other => return Err(LoadError::TensorDtype { name: name.to_string(), dtype: format!("{other:?}") }),
        };
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        shard
            .file
            .read_exact_at(&mut bytes, shard.data_start + start as u64)
            .map_err(|source| LoadError::Io { path: shard.path.clone(), source })?;
        // F4's shape counts codes, two a byte.
        let mut held = found.clone();
        if info.dtype == Dtype::F4 {
            *held.last_mut().expect("an F4 tensor has dimensions") /= 2;
        }
        Ok(Tensor::f_from_data_size(&bytes, &held, stored)?)
    }
}

/// A tensor's size in a checkpoint and how loading keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSize {
    pub name: String,
    /// Elements as the header counts them.
    pub elements: u64,
    /// Bytes as stored.
    pub bytes: u64,
    pub kept: Kept,
}

/// How loading keeps a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kept {
    /// Converted to the model's dtype.
    Widened,
    /// Quantised weights kept as stored (FP8, packed FP4), widened to the model's dtype per
    /// forward: `weights` of them.
    Quantised { weights: u64 },
    /// UE8M0 factors of quantised weights: MXFP4's kept as bytes, FP8 blocks' as float32 (one
    /// per block, so counting them as stored misses 3 bytes per block of 16K weights).
    Factors,
    /// Index tables (DeepSeek-V4's token → experts), loaded as int64.
    Index,
}

/// UE8M0 exponents (bytes, any shape, on any device) as the float32 powers of two they stand
/// for: `2^(e - 127)`, 0 the subnormal `2^-127`, 255 NaN. Built from the bits (an exponent
/// field is a float32's bits shifted by 23), so no rounding enters.
pub fn e8m0_factors(exponents: &Tensor) -> Tensor {
    let e = exponents.to_kind(Kind::Int);
    let bits = e.bitwise_left_shift_tensor_scalar(23);
    let bits = bits.where_self(&e.ne(0), &Tensor::scalar_tensor(0x0040_0000, (Kind::Int, e.device())));
    let bits = bits.where_self(&e.ne(255), &Tensor::scalar_tensor(0x7FC0_0000, (Kind::Int, e.device())));
    bits.view_dtype(Kind::Float)
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

    /// How `name` is stored, if it is.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.checkpoint.dtype(&self.name(name))
    }

    /// The FP4 weight `name` of `[rows, columns]` as its bytes (see [`Checkpoint::load_fp4`]).
    pub fn fp4(&self, name: &str, rows: i64, columns: i64) -> Result<Tensor, LoadError> {
        self.checkpoint.load_fp4(&self.name(name), rows, columns, self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-file checkpoint of `(name, dtype, shape, bytes)` tensors, written by hand.
    fn write(dir: &Path, tensors: &[(&str, &str, &[i64], &[u8])]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let offsets = [data.len(), data.len() + bytes.len()];
            header
                .insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}));
            data.extend_from_slice(bytes);
        }
        let header = serde_json::Value::Object(header).to_string();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(&data);
        std::fs::write(dir.join("model.safetensors"), file).unwrap();
    }

    /// UE8M0 exponents as the powers of two they stand for, the two ends included; loaded as
    /// float they are those values, loaded as stored the bytes.
    #[test]
    fn ue8m0_exponents_are_powers_of_two() {
        let bytes = [0u8, 1, 126, 127, 128, 130, 254, 255];
        let factors = Vec::<f32>::try_from(e8m0_factors(&Tensor::from_slice(&bytes))).unwrap();
        let expected = [2f32.powi(-127), 2f32.powi(-126), 0.5, 1.0, 2.0, 8.0, 2f32.powi(127)];
        assert_eq!(factors[..7], expected);
        assert!(factors[7].is_nan());

        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[("s", "F8_E8M0", &[2, 4], &bytes)]);
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let loaded = checkpoint.load("s", &[2, 4], Kind::Float, Device::Cpu).unwrap();
        assert_eq!(Vec::<f32>::try_from(loaded.flatten(0, -1)).unwrap()[..7], expected);
        let stored = checkpoint.load_stored("s", &[2, 4], Device::Cpu).unwrap();
        assert_eq!(stored.kind(), Kind::Uint8);
        assert_eq!(Vec::<u8>::try_from(stored.flatten(0, -1)).unwrap(), bytes);
        assert_eq!(checkpoint.tensor_sizes().next().unwrap().kept, Kept::Factors);
    }

    /// FP4 codes stored as bytes (I8, `[rows, columns / 2]`) or as F4 (`[rows, columns]`, the
    /// header counting codes) load as the same bytes; other dtypes and shapes are refused.
    #[test]
    fn fp4_codes_load_from_bytes_or_f4() {
        let bytes: Vec<u8> = (0..12u8).map(|i| i.wrapping_mul(37)).collect();
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &[("as_i8", "I8", &[2, 6], &bytes), ("as_f4", "F4", &[2, 12], &bytes), ("as_f32", "F32", &[3], &[0; 12])],
        );
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        for name in ["as_i8", "as_f4"] {
            let codes = checkpoint.load_fp4(name, 2, 12, Device::Cpu).unwrap();
            assert_eq!((codes.kind(), codes.size()), (Kind::Uint8, vec![2, 6]), "{name}");
            assert_eq!(Vec::<u8>::try_from(codes.flatten(0, -1)).unwrap(), bytes, "{name}");
        }
        assert!(matches!(checkpoint.load_fp4("as_i8", 2, 10, Device::Cpu), Err(LoadError::Shape { .. })));
        assert!(matches!(checkpoint.load_fp4("as_f32", 1, 6, Device::Cpu), Err(LoadError::TensorDtype { .. })));
        let kept: Vec<(String, Kept)> = checkpoint.tensor_sizes().map(|t| (t.name, t.kept)).collect();
        assert!(kept.contains(&("as_i8".into(), Kept::Quantised { weights: 24 })));
        assert!(kept.contains(&("as_f4".into(), Kept::Quantised { weights: 24 })));
        assert!(kept.contains(&("as_f32".into(), Kept::Widened)));
    }
}
