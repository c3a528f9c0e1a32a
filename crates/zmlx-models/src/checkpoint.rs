//! Safetensors checkpoints: one file or shards with `model.safetensors.index.json`,
//! memory-mapped; tensors are looked up by their mlx-lm names.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorInfo};
use zmlx_core::DType;

use crate::error::{ModelError, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// A raw tensor: dtype, shape and its bytes inside the mapped file.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Float data as f32 (exact for f16/bf16).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        zmlx_core::dtype::floats_from_le_bytes(self.dtype, self.bytes)
            .ok_or_else(|| ModelError::file(self.path, format!("tensor `{}` has dtype {}, expected a float", self.name, self.dtype)))
    }

    pub fn to_u32(&self) -> Result<Vec<u32>> {
        if self.dtype != DType::U32 {
            return Err(ModelError::file(self.path, format!("tensor `{}` has dtype {}, expected uint32", self.name, self.dtype)));
        }
        Ok(self.bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn expect_shape(&self, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(ModelError::file(
                self.path,
                format!("tensor `{}` has shape {:?}, but the config implies {:?}", self.name, self.shape, want),
            ));
        }
        Ok(())
    }
}

pub struct Checkpoint {
    shards: Vec<Shard>,
    where_is: HashMap<String, usize>,
}

impl Checkpoint {
    /// Open every `*.safetensors` of a model folder (the shards the index names, if there is one).
    pub fn open(model_dir: &Path) -> Result<Self> {
        let files = shard_files(model_dir)?;
        let mut shards = Vec::new();
        let mut where_is = HashMap::new();
        for path in files {
            let shard = open_shard(&path)?;
            for name in shard.tensors.keys() {
                where_is.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Checkpoint { shards, where_is })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.where_is.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.where_is.keys()
    }

    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let Some(&i) = self.where_is.get(name) else {
            let dir = self.shards.first().and_then(|s| s.path.parent()).unwrap_or(Path::new("."));
            return Err(ModelError::file(dir, format!("checkpoint has no tensor `{name}`")));
        };
        let shard = &self.shards[i];
        let info = &shard.tensors[name];
        let dtype = map_dtype(info.dtype).ok_or_else(|| ModelError::file(&shard.path, format!("tensor `{name}` has unsupported dtype {:?}", info.dtype)))?;
        let (start, end) = info.data_offsets;
        Ok(TensorRef {
            name: shard.tensors.get_key_value(name).map(|(k, _)| k.as_str()).unwrap_or(""),
            path: &shard.path,
            dtype,
            shape: &info.shape,
            bytes: &shard.mmap[shard.data_start + start..shard.data_start + end],
        })
    }
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::file(&index, format!("cannot read: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::file(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::file(&index, "missing object `weight_map`"))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::file(dir, format!("cannot read model folder: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::file(dir, "no *.safetensors weights in the model folder"));
    }
    Ok(files)
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| ModelError::file(path, format!("cannot open: {e}")))?;
    // SAFETY: the map is read-only; a checkpoint changed under us while running is the user's risk, as in every mmap loader.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::file(path, format!("cannot map: {e}")))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::file(path, describe_st_error(&e, mmap.len())))?;
    let tensors = metadata.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
    Ok(Shard { path: path.to_path_buf(), data_start: 8 + header_len, mmap, tensors })
}

fn describe_st_error(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => format!("truncated or corrupt safetensors file ({len} bytes): the header promises more data than the file holds"),
        E::HeaderTooSmall => format!("not a safetensors file ({len} bytes, too short for a header)"),
        E::InvalidHeaderLength | E::HeaderTooLarge => "corrupt safetensors header length".to_string(),
        other => format!("bad safetensors header: {other}"),
    }
}

fn map_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::U32 => DType::U32,
        StDtype::I32 => DType::I32,
        StDtype::U8 => DType::U8,
        StDtype::I64 => DType::I64,
        _ => return None,
    })
}
