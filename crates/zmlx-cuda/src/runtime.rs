//! Device, stream, memory and launch plumbing on the CUDA driver API (through cudarc).
//!
//! Kernels take raw device pointers (`u64`), so buffers are plain allocations ([`DevBuf`])
//! or sub-ranges of one preallocated [`Arena`]: a decode step allocates nothing, and the
//! same addresses are baked into a captured CUDA graph ([`CudaDevice::capture`]) that is
//! replayed every token; per-token values (position, length, token id) live in device
//! memory and are updated with [`CudaDevice::write`] before a replay.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use crate::{catalog, nvrtc, CudaError, Result};

fn drv<T>(r: std::result::Result<T, result::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| CudaError::Driver(format!("{what}: {e:?}")))
}

/// One kernel parameter by value.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    U64(u64),
    F64(f64),
}

/// A device allocation (freed on drop). `ptr()` is what kernels take.
pub struct DevBuf {
    ptr: u64,
    bytes: usize,
    ctx: Arc<CudaContext>,
    owned: bool,
}

impl DevBuf {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Pointer `off` bytes in.
    pub fn at(&self, off: usize) -> u64 {
        assert!(off <= self.bytes, "offset {off} past a buffer of {} bytes", self.bytes);
        self.ptr + off as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.owned && self.ptr != 0 {
            let _ = self.ctx.bind_to_thread();
            unsafe {
                let _ = result::free_sync(self.ptr);
            }
        }
    }
}

/// A bump allocator over one device allocation, for activations and scratch: reserve once
/// at model load, `alloc` while building the step (256-byte aligned), never free.
pub struct Arena {
    buf: DevBuf,
    used: usize,
}

impl Arena {
    pub fn alloc(&mut self, bytes: usize) -> Result<u64> {
        let off = self.used.div_ceil(256) * 256;
        if off + bytes > self.buf.bytes {
            return Err(CudaError::Invalid(format!(
                "arena of {} bytes exhausted (asked {bytes} at {off})",
                self.buf.bytes
            )));
        }
        self.used = off + bytes;
        Ok(self.buf.ptr + off as u64)
    }
    pub fn used(&self) -> usize {
        self.used
    }
    pub fn capacity(&self) -> usize {
        self.buf.bytes
    }
    /// Forget every allocation (the memory stays reserved).
    pub fn reset(&mut self) {
        self.used = 0;
    }
}

/// A captured sequence of launches, replayed with [`CudaGraph::replay`].
pub struct CudaGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: sys::CUstream,
    ctx: Arc<CudaContext>,
}

impl CudaGraph {
    pub fn replay(&self) -> Result<()> {
        drv(self.ctx.bind_to_thread(), "bind")?;
        drv(unsafe { result::graph::launch(self.exec, self.stream) }, "cuGraphLaunch")
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

unsafe impl Send for CudaGraph {}

/// A u32 in page-locked host memory that the stream copies into without blocking the host,
/// and the event recorded after the copy ([`CudaDevice::read_u32_async`], [`HostU32::wait`]).
pub struct HostU32 {
    ptr: *mut u32,
    event: sys::CUevent,
    ctx: Arc<CudaContext>,
}

impl HostU32 {
    /// Wait for the last copy into this slot and return its value.
    pub fn wait(&self) -> Result<u32> {
        drv(self.ctx.bind_to_thread(), "bind")?;
        drv(unsafe { result::event::synchronize(self.event) }, "event sync")?;
        Ok(unsafe { std::ptr::read_volatile(self.ptr) })
    }
}

impl Drop for HostU32 {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        unsafe {
            let _ = result::event::synchronize(self.event);
            let _ = result::event::destroy(self.event);
            let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

// The slot is owned by one HostU32; the device writes it only through copies ordered before its event.
unsafe impl Send for HostU32 {}

/// An ordering point on a lane ([`CudaDevice::record_event`]).
pub struct Event {
    e: sys::CUevent,
    ctx: Arc<CudaContext>,
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        unsafe {
            let _ = result::event::destroy(self.e);
        }
    }
}

/// A CUDA event pair for timing on the device's stream.
pub struct EventTimer {
    start: sys::CUevent,
    end: sys::CUevent,
}

/// The GPU, its context and the stream everything runs on (plus lanes: extra streams that
/// the prompt's concurrent steps use, see [`CudaDevice::on_lane`]).
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Lanes 1.. (lane 0 is `stream`), created on first use.
    lanes: Mutex<Vec<Arc<CudaStream>>>,
    /// The stream launches and copies go to now (null: `stream`).
    current: std::sync::atomic::AtomicPtr<sys::CUstream_st>,
    arch: String,
    /// Compute capability as one number (90 for sm_90).
    cc: u32,
    name: String,
    sm_count: u32,
    /// Launch with programmatic dependent launch (Hopper+): each kernel may start while the
    /// previous one drains; kernels wait for it with `griddepcontrol.wait` (ZMLX_GRID_DEP in
    /// common.cuh) before touching memory, so results are unchanged. `ZMLX_PDL=0` turns it off.
    pdl: bool,
    funcs: Mutex<HashMap<String, sys::CUfunction>>,
    /// Whether a kernel can run as one cluster of this many blocks (asked once per shape).
    cluster_fits: Mutex<HashMap<(String, u32, u32, u32), bool>>,
    /// Blocks of a kernel the whole GPU holds at once, by (name, threads, shared memory).
    resident: Mutex<HashMap<(String, u32, u32), u32>>,
    /// Kernel launches issued so far (graph captures included), for launches-per-token counts.
    launches: std::sync::atomic::AtomicU64,
    modules: Mutex<HashMap<String, sys::CUmodule>>,
    /// (module, seconds spent in NVRTC or 0 when it came from the disk cache)
    pub(crate) compile_log: Mutex<Vec<(String, f64, bool)>>,
}

unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    /// Open GPU `ordinal` with a fresh non-blocking stream (capturable, unlike the legacy stream).
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        // cudarc panics when it cannot load libcuda; ask first, so a machine without an
        // NVIDIA driver gets an error, not a panic.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::Driver(
                "no NVIDIA driver found (libcuda.so.1 is not loadable): this machine has no usable CUDA GPU".into(),
            ));
        }
        let ctx = drv(CudaContext::new(ordinal), "cuInit/context")?;
        // Single-stream use: cudarc's per-buffer event tracking is not needed (and would
        // add events inside graph captures).
        unsafe { ctx.disable_event_tracking() };
        let stream = drv(ctx.new_stream(), "stream")?;
        let (maj, min) = drv(ctx.compute_capability(), "compute capability")?;
        let sm_count = drv(
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            "SM count",
        )? as u32;
        let name = drv(ctx.name(), "device name")?;
        let pdl = maj >= 9 && std::env::var("ZMLX_PDL").map_or(true, |v| v != "0");
        Ok(Arc::new(Self {
            ctx,
            stream,
            lanes: Mutex::new(Vec::new()),
            current: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
            arch: format!("sm_{maj}{min}"),
            cc: (maj * 10 + min) as u32,
            name,
            sm_count,
            pdl,
            funcs: Mutex::new(HashMap::new()),
            cluster_fits: Mutex::new(HashMap::new()),
            resident: Mutex::new(HashMap::new()),
            launches: std::sync::atomic::AtomicU64::new(0),
            modules: Mutex::new(HashMap::new()),
            compile_log: Mutex::new(Vec::new()),
        }))
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }
    /// Compute capability as one number (90 for sm_90), for feature checks.
    pub fn compute_capability(&self) -> u32 {
        self.cc
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    pub fn stream_handle(&self) -> sys::CUstream {
        self.cur()
    }

    /// The stream launches and copies go to: lane 0 (the device's stream) unless inside
    /// [`Self::on_lane`].
    fn cur(&self) -> sys::CUstream {
        let p = self.current.load(std::sync::atomic::Ordering::Relaxed);
        if p.is_null() {
            self.stream.cu_stream()
        } else {
            p
        }
    }

    /// Run `body` with every launch and copy on lane `lane` (0: the device's stream; others are
    /// streams created on first use). Lanes order work among themselves only through events
    /// ([`Self::record_event`], [`Self::wait_event`]); a graph captured on lane 0 takes in the
    /// lanes that wait on one of its events, and must end by waiting on each of them.
    pub fn on_lane<R>(&self, lane: usize, body: impl FnOnce() -> Result<R>) -> Result<R> {
        let s = if lane == 0 {
            std::ptr::null_mut()
        } else {
            let mut lanes = self.lanes.lock().unwrap();
            while lanes.len() < lane {
                lanes.push(drv(self.ctx.new_stream(), "stream")?);
            }
            lanes[lane - 1].cu_stream()
        };
        let before = self.current.swap(s, std::sync::atomic::Ordering::Relaxed);
        let out = body();
        self.current.store(before, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// An event recorded on the current lane: work enqueued after a [`Self::wait_event`] on it
    /// runs after everything enqueued on this lane so far.
    pub fn record_event(&self) -> Result<Event> {
        self.bind()?;
        let e = drv(result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING), "event")?;
        let ev = Event { e, ctx: self.ctx.clone() };
        drv(unsafe { result::event::record(ev.e, self.cur()) }, "event record")?;
        Ok(ev)
    }

    /// Make the current lane wait for `e` (a dependency edge inside a graph capture).
    pub fn wait_event(&self, e: &Event) -> Result<()> {
        drv(unsafe { result::stream::wait_event(self.cur(), e.e, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }, "stream wait event")
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn bind(&self) -> Result<()> {
        drv(self.ctx.bind_to_thread(), "bind context")
    }

    /// Allocate `bytes` of device memory (contents undefined).
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        self.bind()?;
        let ptr = drv(unsafe { result::malloc_sync(bytes.max(1)) }, "cuMemAlloc")?;
        Ok(DevBuf { ptr, bytes, ctx: self.ctx.clone(), owned: true })
    }

    /// Reserve an arena of `bytes` for step activations.
    pub fn arena(&self, bytes: usize) -> Result<Arena> {
        Ok(Arena { buf: self.alloc(bytes)?, used: 0 })
    }

    /// Allocate and copy a host slice (synchronous).
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DevBuf> {
        let b = self.alloc(std::mem::size_of_val(data))?;
        self.write(b.ptr, data)?;
        Ok(b)
    }

    /// Copy host → device at `dst`, ordered on the stream (waits for the copy to finish).
    pub fn write<T: Copy>(&self, dst: u64, data: &[T]) -> Result<()> {
        self.bind()?;
        unsafe {
            drv(result::memcpy_htod_async(dst, data, self.cur()), "memcpy htod")?;
        }
        self.sync()
    }

    /// Copy device → host (synchronizes the stream first).
    pub fn read<T: Copy + Default>(&self, src: u64, n: usize) -> Result<Vec<T>> {
        self.sync()?;
        let mut out = vec![T::default(); n];
        unsafe { drv(result::memcpy_dtoh_sync(&mut out, src), "memcpy dtoh")? };
        Ok(out)
    }

    /// Store the u32 `v` at `dst`, stream-ordered, without waiting (the value is taken now).
    pub fn store_u32(&self, dst: u64, v: u32) -> Result<()> {
        self.bind()?;
        drv(unsafe { sys::cuMemsetD32Async(dst, v, 1, self.cur()).result() }, "memset d32")
    }

    /// A page-locked host slot for [`Self::read_u32_async`].
    pub fn host_u32(&self) -> Result<HostU32> {
        self.bind()?;
        let ptr = drv(unsafe { result::malloc_host(4, 0) }, "cuMemHostAlloc")? as *mut u32;
        let event = drv(result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING), "event")?;
        Ok(HostU32 { ptr, event, ctx: self.ctx.clone() })
    }

    /// Enqueue a copy of the u32 at `src` into `slot` and an event after it; returns at once
    /// (`slot.wait()` gives the value).
    pub fn read_u32_async(&self, src: u64, slot: &HostU32) -> Result<()> {
        self.bind()?;
        let dst = unsafe { std::slice::from_raw_parts_mut(slot.ptr, 1) };
        drv(unsafe { result::memcpy_dtoh_async(dst, src, self.cur()) }, "memcpy dtoh async")?;
        drv(unsafe { result::event::record(slot.event, self.cur()) }, "event record")
    }

    /// Fill `bytes` at `dst` with `byte` (stream-ordered).
    pub fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        drv(unsafe { result::memset_d8_async(dst, byte, bytes, self.cur()) }, "memset")
    }

    /// Device-to-device copy on the stream.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        drv(unsafe { result::memcpy_dtod_async(dst, src, bytes, self.cur()) }, "memcpy dtod")
    }

    /// Wait for everything enqueued on every lane.
    pub fn sync(&self) -> Result<()> {
        self.bind()?;
        for lane in self.lanes.lock().unwrap().iter() {
            drv(lane.synchronize(), "stream synchronize")?;
        }
        drv(self.stream.synchronize(), "stream synchronize")
    }

    /// Compile (or fetch from the disk cache) and load a catalog module.
    pub fn load_module(&self, module: &str) -> Result<()> {
        if self.modules.lock().unwrap().contains_key(module) {
            return Ok(());
        }
        let spec = catalog::module_spec(module)
            .ok_or_else(|| CudaError::Invalid(format!("no kernel module named {module}")))?;
        let t = std::time::Instant::now();
        let (cubin, cached) = nvrtc::cached_cubin(&spec.name, &spec.source, &self.arch)?;
        self.compile_log.lock().unwrap().push((module.to_string(), t.elapsed().as_secs_f64(), cached));
        self.bind()?;
        let m = drv(unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) }, "cuModuleLoadData")?;
        let mut funcs = self.funcs.lock().unwrap();
        for f in &spec.functions {
            let cname = CString::new(f.as_str()).unwrap();
            let h = drv(unsafe { result::module::get_function(m, cname) }, f)?;
            funcs.insert(f.clone(), h);
        }
        self.modules.lock().unwrap().insert(module.to_string(), m);
        Ok(())
    }

    /// Kernel handle by name (loads its module on first use).
    pub fn function(&self, name: &str) -> Result<sys::CUfunction> {
        if let Some(f) = self.funcs.lock().unwrap().get(name) {
            return Ok(*f);
        }
        self.load_module(&catalog::module_of(name))?;
        self.funcs
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .ok_or_else(|| CudaError::Invalid(format!("no kernel named {name}")))
    }

    /// Launch kernel `name` on the stream.
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg]) -> Result<()> {
        self.launch_in_cluster(name, grid, block, smem, args, 0)
    }

    /// Launch kernel `name` with its grid as thread block clusters of `cluster` blocks along x
    /// (0: no cluster). Check [`Self::cluster_fits`] first.
    pub fn launch_in_cluster(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg], cluster: u32) -> Result<()> {
        let f = self.function(name)?;
        self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.bind()?;
        // Each parameter lives in an 8-byte slot; CUDA reads the parameter's size from it.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::U64(v) => v,
                Arg::F64(v) => v.to_bits(),
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        if !self.pdl && cluster == 0 {
            return drv(
                unsafe { result::launch_kernel(f, grid, block, smem, self.cur(), &mut ptrs) },
                name,
            );
        }
        let mut cfg = self.launch_config(grid, block, smem);
        let mut attrs: Vec<sys::CUlaunchAttribute> = Vec::new();
        if self.pdl {
            // Programmatic stream serialization: the launch may overlap the previous kernel's
            // tail (captured into graphs as a programmatic edge).
            let mut a: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            a.value.programmaticStreamSerializationAllowed = 1;
            attrs.push(a);
        }
        if cluster > 0 {
            attrs.push(cluster_attr(cluster));
            allow_large_clusters(f, cluster, name)?;
        }
        cfg.attrs = attrs.as_mut_ptr();
        cfg.numAttrs = attrs.len() as u32;
        let r = unsafe { sys::cuLaunchKernelEx(&cfg, f, ptrs.as_mut_ptr(), std::ptr::null_mut()) };
        drv(r.result(), name)
    }

    /// Whether `name` can run with its grid as clusters of `cluster` blocks (sm_90+, and the
    /// GPU can co-schedule that many blocks of this size; up to 16, beyond the portable 8).
    pub fn cluster_fits(&self, name: &str, blocks: u32, threads: u32, smem: u32, cluster: u32) -> Result<bool> {
        let sm = self.cc;
        if sm < 90 || cluster == 0 || cluster > 16 || blocks % cluster != 0 {
            return Ok(false);
        }
        let key = (name.to_string(), threads, smem, cluster);
        if let Some(&fits) = self.cluster_fits.lock().unwrap().get(&key) {
            return Ok(fits);
        }
        let f = self.function(name)?;
        self.bind()?;
        allow_large_clusters(f, cluster, name)?;
        let mut cfg = self.launch_config((blocks, 1, 1), (threads, 1, 1), smem);
        let mut attr = cluster_attr(cluster);
        cfg.attrs = &mut attr;
        cfg.numAttrs = 1;
        let mut n: std::ffi::c_int = 0;
        let fits = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f, &cfg) }.result().is_ok() && n > 0;
        self.cluster_fits.lock().unwrap().insert(key, fits);
        Ok(fits)
    }

    /// Kernel launches issued on this device so far (captured ones included).
    pub fn launch_count(&self) -> u64 {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many blocks of `name` (`threads` each, `smem` bytes of dynamic shared memory) the
    /// whole GPU holds at once (0: it does not fit), for kernels with a grid-wide barrier, whose
    /// blocks must all be resident. Also lets `name` use more than 48 KiB of dynamic shared memory.
    pub fn resident_blocks(&self, name: &str, threads: u32, smem: u32) -> Result<u32> {
        let key = (name.to_string(), threads, smem);
        if let Some(&n) = self.resident.lock().unwrap().get(&key) {
            return Ok(n);
        }
        let f = self.function(name)?;
        self.bind()?;
        if smem > 48 * 1024 {
            let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            if unsafe { sys::cuFuncSetAttribute(f, attr, smem as i32) }.result().is_err() {
                return Ok(0);
            }
        }
        let mut n: std::ffi::c_int = 0;
        drv(unsafe { sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, threads as i32, smem as usize) }.result(), name)?;
        let blocks = n.max(0) as u32 * self.sm_count;
        self.resident.lock().unwrap().insert(key, blocks);
        Ok(blocks)
    }

    fn launch_config(&self, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> sys::CUlaunchConfig {
        sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: smem,
            hStream: self.cur(),
            attrs: std::ptr::null_mut(),
            numAttrs: 0,
        }
    }

    /// Capture every launch/copy issued by `body` on the stream into a graph (nothing runs
    /// during capture). Pointers are baked in; values the graph should see change per
    /// replay must be read by the kernels from device memory.
    pub fn capture(&self, body: impl FnOnce(&Self) -> Result<()>) -> Result<CudaGraph> {
        self.bind()?;
        let s = self.stream.cu_stream();
        drv(
            unsafe { result::stream::begin_capture(s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) },
            "begin capture",
        )?;
        let body_res = body(self);
        let graph = drv(unsafe { result::stream::end_capture(s) }, "end capture");
        body_res?;
        let graph = graph?;
        let exec = drv(unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }, "instantiate")?;
        Ok(CudaGraph { graph, exec, stream: s, ctx: self.ctx.clone() })
    }

    pub fn timer(&self) -> Result<EventTimer> {
        self.bind()?;
        let f = sys::CUevent_flags::CU_EVENT_DEFAULT;
        Ok(EventTimer { start: drv(result::event::create(f), "event")?, end: drv(result::event::create(f), "event")? })
    }

    pub fn record_start(&self, t: &EventTimer) -> Result<()> {
        drv(unsafe { result::event::record(t.start, self.stream.cu_stream()) }, "event record")
    }
    /// Record the end event, wait for it, and return the elapsed milliseconds.
    pub fn record_end_ms(&self, t: &EventTimer) -> Result<f32> {
        drv(unsafe { result::event::record(t.end, self.stream.cu_stream()) }, "event record")?;
        drv(unsafe { result::event::synchronize(t.end) }, "event sync")?;
        drv(unsafe { result::event::elapsed(t.start, t.end) }, "event elapsed")
    }

    /// Modules loaded so far: (name, seconds to obtain the cubin, came from the disk cache).
    pub fn compile_log(&self) -> Vec<(String, f64, bool)> {
        self.compile_log.lock().unwrap().clone()
    }
}

fn cluster_attr(cluster: u32) -> sys::CUlaunchAttribute {
    let mut a: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    a.value.clusterDim.x = cluster;
    a.value.clusterDim.y = 1;
    a.value.clusterDim.z = 1;
    a
}

/// Clusters beyond 8 blocks are "non-portable": the kernel must opt in.
fn allow_large_clusters(f: sys::CUfunction, cluster: u32, name: &str) -> Result<()> {
    if cluster <= 8 {
        return Ok(());
    }
    let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED;
    drv(unsafe { sys::cuFuncSetAttribute(f, attr, 1) }.result(), name)
}

impl Drop for EventTimer {
    fn drop(&mut self) {
        unsafe {
            let _ = result::event::destroy(self.start);
            let _ = result::event::destroy(self.end);
        }
    }
}
