//! Compiles every kernel with NVRTC, no GPU needed. Finds libnvrtc through
//! `ZMLX_NVRTC_LIB`, the loader path, /usr/local/cuda, or a PyPI wheel
//! (`pip install nvidia-cuda-nvrtc-cu12`) in the active venv / /tmp/nvrtc-venv / ~/.local.
//! FAILS when no libnvrtc can be found: set ZMLX_SKIP_NVRTC=1 to skip on purpose.

#[test]
fn all_kernels_compile_with_nvrtc() {
    if std::env::var("ZMLX_SKIP_NVRTC").is_ok_and(|v| v == "1") {
        eprintln!("ZMLX_SKIP_NVRTC=1: kernel compilation NOT checked");
        return;
    }
    let arch = std::env::var("ZMLX_CUDA_ARCH").unwrap_or_else(|_| "sm_90".into());
    let lib = zmlx_cuda::nvrtc::ensure_nvrtc().unwrap_or_else(|e| panic!("cannot check kernels: {e}"));
    let ver = zmlx_cuda::nvrtc::nvrtc_version().unwrap();
    eprintln!("NVRTC {}.{} from {lib}, arch {arch}", ver.0, ver.1);
    let t = std::time::Instant::now();
    let results = zmlx_cuda::check_all_kernels(&arch, false).expect("NVRTC unusable");
    let mut failed = Vec::new();
    for (name, r) in &results {
        match r {
            Ok(_) => eprintln!("  ok   {name}"),
            Err(log) => {
                eprintln!("  FAIL {name}\n{log}");
                failed.push(name.clone());
            }
        }
    }
    eprintln!("{} modules in {:.1} s", results.len(), t.elapsed().as_secs_f64());
    assert!(results.len() >= 6, "catalog shrank");
    assert!(failed.is_empty(), "kernels failed to compile: {failed:?}");
}
