//! Self-tests + micro-benchmarks on GPU 0.
//!
//! usage: selftest [--tests-only | --bench-only] [--latency] [--dump DIR]
//!   --latency: only the decode-latency kernels (attention grid, qk_norm_rope_append,
//!              softmax_topk fast path, qmv_multi) and their before/after rows
//!   --dump DIR: write qmv / gather_qmv / attention cases for tests/torch_check.py
//! Exit code 1 when any test fails.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let latency = args.iter().any(|a| a == "--latency");
    let tests = !args.iter().any(|a| a == "--bench-only");
    let bench = !args.iter().any(|a| a == "--tests-only");
    let dump = args.iter().position(|a| a == "--dump").and_then(|i| args.get(i + 1)).map(std::path::PathBuf::from);
    let dev = match zmlx_cuda::CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("no CUDA device: {e}");
            std::process::exit(2);
        }
    };
    let nvrtc = zmlx_cuda::nvrtc::ensure_nvrtc().unwrap_or_else(|e| format!("(none: {e})"));
    println!("device: {} ({}, {} SMs); nvrtc: {nvrtc}; kernel cache: {}", dev.name(), dev.arch(), dev.sm_count(), zmlx_cuda::nvrtc::cache_dir().display());
    let t = std::time::Instant::now();
    for m in ["qmv_bf16", "ops_bf16", "qmv_f16", "ops_f16", "qmv_f32", "ops_f32", "fused_bf16", "fused_f16", "fused_f32"] {
        if let Err(e) = dev.load_module(m) {
            eprintln!("load {m}: {e}");
            std::process::exit(1);
        }
    }
    for (m, s, cached) in dev.compile_log() {
        println!("  module {m:<10} {} in {s:.3} s", if cached { "from disk cache" } else { "compiled by NVRTC" });
    }
    println!("all modules ready in {:.2} s", t.elapsed().as_secs_f64());
    let mut failed = 0;
    if tests {
        let t = std::time::Instant::now();
        let rows = if latency { zmlx_cuda::selftest::run_latency_tests(&dev) } else { zmlx_cuda::selftest::run_self_tests_dump(&dev, dump.as_deref()) };
        failed = rows.iter().filter(|r| !r.passed).count();
        print!("{}", zmlx_cuda::selftest::format_tests(&rows));
        println!("self-tests took {:.1} s", t.elapsed().as_secs_f64());
    }
    if bench {
        let rows = if latency { zmlx_cuda::bench::run_latency_benchmarks(&dev) } else { zmlx_cuda::run_benchmarks(&dev) };
        print!("{}", zmlx_cuda::bench::format_bench(&rows));
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
