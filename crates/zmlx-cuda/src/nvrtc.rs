//! Finding libnvrtc and compiling CUDA C with it (no GPU needed), plus the disk cache.
//!
//! cudarc (feature `cuda-13000`, dynamic loading) dlopens `libnvrtc.so`, `libnvrtc.so.13`,
//! then `libnvrtc.so.12`, … by name. A PyPI NVRTC (`nvidia-cuda-nvrtc-cu12`) is not on the
//! loader path, so we first dlopen it by full path: once a library with that soname is
//! loaded, cudarc's dlopen by name returns it. Order: `$ZMLX_NVRTC_LIB`, the loader path,
//! `$CUDA_HOME`/`/usr/local/cuda`, then `site-packages/nvidia/cuda_nvrtc/lib` of the
//! active virtualenv, `/tmp/nvrtc-venv`, `~/.local` and the system Pythons.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};

use crate::{CudaError, Result};

static NVRTC: OnceLock<std::result::Result<String, String>> = OnceLock::new();

fn candidate_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var) {
            roots.push(PathBuf::from(v));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    for r in &roots {
        for sub in ["lib64", "lib", "targets/x86_64-linux/lib"] {
            for name in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
                out.push(r.join(sub).join(name));
            }
        }
    }
    let mut lib_dirs: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("VIRTUAL_ENV") {
        lib_dirs.push(PathBuf::from(v).join("lib"));
    }
    lib_dirs.push(PathBuf::from("/tmp/nvrtc-venv/lib"));
    if let Ok(h) = std::env::var("HOME") {
        lib_dirs.push(PathBuf::from(h).join(".local/lib"));
    }
    for d in ["/usr/local/lib", "/usr/lib", "/opt/conda/lib"] {
        lib_dirs.push(PathBuf::from(d));
    }
    for d in lib_dirs {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        let mut pys: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")))
            .collect();
        pys.sort();
        for py in pys {
            for sp in ["site-packages", "dist-packages"] {
                let lib = py.join(sp).join("nvidia/cuda_nvrtc/lib");
                out.push(lib.join("libnvrtc.so.13"));
                out.push(lib.join("libnvrtc.so.12"));
                // cu13 wheels put it under nvidia/cu13/lib
                out.push(py.join(sp).join("nvidia/cu13/lib/libnvrtc.so.13"));
            }
        }
    }
    out
}

fn preload(path: &Path) -> std::result::Result<(), String> {
    // RTLD_GLOBAL so the builtins library and cudarc's by-name dlopen both see it.
    let lib = unsafe {
        libloading::os::unix::Library::open(Some(path), libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL)
    }
    .map_err(|e| format!("{}: {e}", path.display()))?;
    std::mem::forget(lib); // stays loaded for the life of the process
    Ok(())
}

/// Make sure some libnvrtc is loaded; returns a description of where it came from.
pub fn ensure_nvrtc() -> Result<String> {
    NVRTC
        .get_or_init(|| {
            if let Ok(p) = std::env::var("ZMLX_NVRTC_LIB") {
                preload(Path::new(&p)).map_err(|e| format!("ZMLX_NVRTC_LIB: {e}"))?;
                return Ok(p);
            }
            if unsafe { nvrtc_sys::is_culib_present() } {
                return Ok("loader path".into());
            }
            let mut tried = Vec::new();
            for c in candidate_paths() {
                if c.exists() {
                    match preload(&c) {
                        Ok(()) => return Ok(c.display().to_string()),
                        Err(e) => tried.push(e),
                    }
                }
            }
            Err(format!(
                "libnvrtc not found: set ZMLX_NVRTC_LIB=/path/to/libnvrtc.so.12 (pip install nvidia-cuda-nvrtc-cu12) \
                 or put CUDA's lib64 on LD_LIBRARY_PATH{}",
                if tried.is_empty() { String::new() } else { format!("; failed: {}", tried.join("; ")) }
            ))
        })
        .clone()
        .map_err(CudaError::Nvrtc)
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut a, mut b) = (0, 0);
    unsafe { nvrtc_sys::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| CudaError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
    Ok((a, b))
}

/// Options every kernel is compiled with (FMA contraction stays on; kernels that need
/// exact op-by-op rounding use `__fmul_rn`/`__fadd_rn`/`__fmaf_rn` explicitly).
/// `ZMLX_KERNEL_DEFINES="-DNAME ..."` adds preprocessor switches (same-binary A/B runs of a
/// kernel variant; they are options, so part of the cache key).
pub fn compile_options(arch: &str) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=true".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
    ];
    if let Ok(defs) = std::env::var("ZMLX_KERNEL_DEFINES") {
        opts.extend(defs.split_whitespace().filter(|d| d.starts_with("-D")).map(String::from));
    }
    opts
}

/// Compile `src` for `arch` (e.g. "sm_90"); returns the cubin. Needs only libnvrtc.
pub fn compile_cubin(name: &str, src: &str, opts: &[String]) -> Result<Vec<u8>> {
    ensure_nvrtc()?;
    let csrc = CString::new(src).map_err(|e| CudaError::Nvrtc(e.to_string()))?;
    let cname = CString::new(format!("{name}.cu")).unwrap();
    let prog = nvrtc_result::create_program(&csrc, Some(&cname)).map_err(|e| CudaError::Nvrtc(format!("{e:?}")))?;
    let res = unsafe { nvrtc_result::compile_program(prog, opts) };
    let log = unsafe { nvrtc_result::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    if let Err(e) = res {
        unsafe { nvrtc_result::destroy_program(prog).ok() };
        return Err(CudaError::Compile { module: name.into(), log: format!("{e:?}\n{log}") });
    }
    let mut size = 0usize;
    let cubin = unsafe {
        nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| CudaError::Nvrtc(format!("nvrtcGetCUBINSize: {e:?}")))?;
        let mut buf = vec![0u8; size];
        nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _)
            .result()
            .map_err(|e| CudaError::Nvrtc(format!("nvrtcGetCUBIN: {e:?}")))?;
        nvrtc_result::destroy_program(prog).ok();
        buf
    };
    Ok(cubin)
}

/// Kernel cache directory: `$ZMLX_CACHE_DIR`, else `~/.cache/zmlx/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("ZMLX_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    PathBuf::from(home).join(".cache/zmlx/kernels")
}

/// 128-bit FNV-1a-style hash (two independent 64-bit lanes); stable across Rust versions,
/// unlike `DefaultHasher`, so cache files stay valid between builds.
pub fn stable_hash(parts: &[&[u8]]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for p in parts {
        for &byte in p.iter().chain(&[0xffu8]) {
            a = (a ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
            b = (b ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(17);
        }
    }
    format!("{a:016x}{b:016x}")
}

/// Cubin for (name, src, arch): from the disk cache when present, else compiled and stored.
/// Returns (cubin, was_cached).
pub fn cached_cubin(name: &str, src: &str, arch: &str) -> Result<(Vec<u8>, bool)> {
    if let Ok(bytes) = std::fs::read(cache_path(name, src, arch)) {
        if bytes.len() > 4 && &bytes[..4] == b"\x7fELF" {
            return Ok((bytes, true));
        }
    }
    Ok((fresh_cubin(name, src, arch)?, false))
}

/// Cubin for (name, src, arch) compiled now, then stored in the disk cache.
pub fn fresh_cubin(name: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    let cubin = compile_cubin(name, src, &compile_options(arch))?;
    let path = cache_path(name, src, arch);
    if let (Some(dir), Some(file)) = (path.parent().filter(|d| std::fs::create_dir_all(d).is_ok()), path.file_name()) {
        // Write then rename, so a concurrent reader never sees half a cubin; the temporary name
        // keeps the key, as two sources of one module may be compiled at once.
        let tmp = dir.join(format!(".{}.{}.tmp", file.to_string_lossy(), std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(cubin)
}

/// Where the cubin of (name, src, arch) lives in the cache: keyed by (source, options, arch).
fn cache_path(name: &str, src: &str, arch: &str) -> std::path::PathBuf {
    let key = stable_hash(&[src.as_bytes(), compile_options(arch).join(" ").as_bytes(), arch.as_bytes()]);
    cache_dir().join(format!("{name}-{arch}-{key}.cubin"))
}
