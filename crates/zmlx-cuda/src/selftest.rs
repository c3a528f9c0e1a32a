//! Device self-tests: every kernel on fresh random data (never zeros), outputs poisoned
//! (all-ones bytes = NaN) before each launch, compared with the f64 references and, for
//! the elementwise kernels, bit for bit with an f32 emulation of MLX's op sequence.
//! Optionally dumps qmv / gather_qmv / attention cases for tests/torch_check.py.

use std::path::{Path, PathBuf};

use zmlx_core::{mlx_math, DType};

use crate::ops::{self, AttnShape, QuantWeight};
use crate::reference::{self as re, Cmp, RefVal, Rng};
use crate::runtime::{CudaDevice, DevBuf};
use crate::Result;

#[derive(Clone, Debug)]
pub struct TestRow {
    pub name: String,
    pub shape: String,
    pub passed: bool,
    /// worst error in units of the per-element tolerance (≤ 1 passes)
    pub worst: f64,
    pub rel_norm: f64,
    pub note: String,
}

fn up(dev: &CudaDevice, dt: DType, v: &[f32]) -> Result<DevBuf> {
    dev.upload(&re::encode(dt, v))
}
fn down(dev: &CudaDevice, dt: DType, p: u64, n: usize) -> Result<Vec<f32>> {
    Ok(re::decode(dt, &dev.read::<u8>(p, n * dt.size_bytes())?))
}
fn poisoned(dev: &CudaDevice, bytes: usize) -> Result<DevBuf> {
    let b = dev.alloc(bytes)?;
    dev.memset(b.ptr(), 0xff, bytes)?;
    Ok(b)
}
fn dtn(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

fn row_from(name: &str, shape: String, dt: DType, c: Cmp, extra_ok: bool, note: String) -> TestRow {
    let passed = c.unwritten == 0 && c.worst <= 1.0 && c.rel_norm <= re::norm_bound(dt) && extra_ok;
    let note = if c.unwritten > 0 { format!("{} unwritten/NaN; {note}", c.unwritten) } else { note };
    TestRow { name: name.into(), shape, passed, worst: c.worst, rel_norm: c.rel_norm, note }
}

/// Write raw little-endian arrays + meta.json for the torch cross-check.
struct Dump(Option<PathBuf>);
impl Dump {
    fn case(&self, name: &str, meta: String, arrays: &[(&str, Vec<u8>)]) {
        let Some(root) = &self.0 else { return };
        let d = root.join(name);
        if std::fs::create_dir_all(&d).is_err() {
            return;
        }
        let _ = std::fs::write(d.join("meta.json"), meta);
        for (n, b) in arrays {
            let _ = std::fs::write(d.join(n), b);
        }
    }
}
fn f32b(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn u32b(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

struct QData {
    words: Vec<u32>,
    scales: Vec<f32>,
    biases: Vec<f32>,
}
fn qdata(rng: &mut Rng, dt: DType, e: usize, n: usize, k: usize, bits: u32, gs: usize) -> QData {
    let groups = e * n * k / gs;
    // Scales of both signs around 1/2^bits, biases around ±0.5: dequantized weights ~ ±1.
    let span = 1.0 / (1u32 << bits) as f32;
    let scales = (0..groups)
        .map(|_| {
            let s = rng.uniform(0.5 * span, 1.5 * span);
            dt.round(if rng.next_u32() & 1 == 0 { s } else { -s })
        })
        .collect();
    QData { words: rng.words(e * n * k * bits as usize / 32), scales, biases: rng.vec(groups, -0.5, 0.5, dt) }
}

#[allow(clippy::too_many_arguments)]
fn test_qmv(dev: &CudaDevice, dump: &Dump, rng: &mut Rng, dt: DType, n: usize, k: usize, bits: u32, gs: usize) -> Result<TestRow> {
    let q = qdata(rng, dt, 1, n, k, bits, gs);
    let x = rng.vec(k, -1.0, 1.0, dt);
    let (wb, sb, bb, xb) = (dev.upload(&q.words)?, up(dev, dt, &q.scales)?, up(dev, dt, &q.biases)?, up(dev, dt, &x)?);
    let yb = poisoned(dev, n * dt.size_bytes())?;
    let wq = QuantWeight { w: wb.ptr(), scales: sb.ptr(), biases: bb.ptr(), n, k, bits, group_size: gs as u32, n_experts: 1 };
    ops::qmv(dev, dt, &wq, xb.ptr(), yb.ptr())?;
    let y = down(dev, dt, yb.ptr(), n)?;
    let refs = re::qmv(&q.words, &q.scales, &q.biases, &x, 0, n, k, bits, gs);
    let name = format!("qmv_{}_b{bits}_g{gs}_n{n}_k{k}", dtn(dt));
    dump.case(
        &name,
        format!(r#"{{"kind":"qmv","dtype":"{}","n":{n},"k":{k},"bits":{bits},"gs":{gs},"e":1,"slots":1,"x_per_slot":false}}"#, dtn(dt)),
        &[("words.u32", u32b(&q.words)), ("scales.f32", f32b(&q.scales)), ("biases.f32", f32b(&q.biases)), ("x.f32", f32b(&x)), ("y.f32", f32b(&y)), ("ids.u32", u32b(&[0]))],
    );
    Ok(row_from("qmv", format!("{} N={n} K={k} b{bits} g{gs}", dtn(dt)), dt, re::compare(dt, &y, &refs), true, String::new()))
}

#[allow(clippy::too_many_arguments)]
fn test_gather(dev: &CudaDevice, dump: &Dump, rng: &mut Rng, dt: DType, e: usize, n: usize, k: usize, bits: u32, gs: usize, slots: usize, per_slot: bool) -> Result<TestRow> {
    let q = qdata(rng, dt, e, n, k, bits, gs);
    // distinct experts, in random order, always including the last one (stride check)
    let mut ids: Vec<u32> = vec![(e - 1) as u32];
    while ids.len() < slots {
        let c = rng.next_u32() % e as u32;
        if !ids.contains(&c) {
            ids.push(c);
        }
    }
    ids.rotate_left(slots / 2);
    let xs = rng.vec(if per_slot { slots * k } else { k }, -1.0, 1.0, dt);
    let (wb, sb, bb, xb, ib) = (dev.upload(&q.words)?, up(dev, dt, &q.scales)?, up(dev, dt, &q.biases)?, up(dev, dt, &xs)?, dev.upload(&ids)?);
    let yb = poisoned(dev, slots * n * dt.size_bytes())?;
    let wq = QuantWeight { w: wb.ptr(), scales: sb.ptr(), biases: bb.ptr(), n, k, bits, group_size: gs as u32, n_experts: e };
    ops::gather_qmv(dev, dt, &wq, ib.ptr(), slots, xb.ptr(), per_slot, yb.ptr())?;
    let y = down(dev, dt, yb.ptr(), slots * n)?;
    let mut refs = Vec::new();
    for (s, &id) in ids.iter().enumerate() {
        let x = if per_slot { &xs[s * k..(s + 1) * k] } else { &xs[..] };
        refs.extend(re::qmv(&q.words, &q.scales, &q.biases, x, id as usize, n, k, bits, gs));
    }
    let name = format!("gather_{}_b{bits}_g{gs}_e{e}_n{n}_k{k}_s{slots}_{}", dtn(dt), if per_slot { "px" } else { "sx" });
    dump.case(
        &name,
        format!(r#"{{"kind":"gather","dtype":"{}","n":{n},"k":{k},"bits":{bits},"gs":{gs},"e":{e},"slots":{slots},"x_per_slot":{per_slot}}}"#, dtn(dt)),
        &[("words.u32", u32b(&q.words)), ("scales.f32", f32b(&q.scales)), ("biases.f32", f32b(&q.biases)), ("x.f32", f32b(&xs)), ("y.f32", f32b(&y)), ("ids.u32", u32b(&ids))],
    );
    Ok(row_from(
        "gather_qmv",
        format!("{} E={e} N={n} K={k} b{bits} g{gs} k={slots} {}", dtn(dt), if per_slot { "x/expert" } else { "shared x" }),
        dt,
        re::compare(dt, &y, &refs),
        true,
        String::new(),
    ))
}

fn test_attention(dev: &CudaDevice, dump: &Dump, rng: &mut Rng, dt: DType, s: AttnShape, len: usize) -> Result<TestRow> {
    let (nh, nk, hd, ml) = (s.n_heads, s.n_kv_heads, s.head_dim, s.max_len);
    let q = rng.vec(nh * hd, -2.0, 2.0, dt);
    let kc = rng.vec(nk * ml * hd, -2.0, 2.0, dt);
    let vc = rng.vec(nk * ml * hd, -1.0, 1.0, dt);
    let scale = 1.0 / (hd as f32).sqrt();
    let (qb, kb, vb) = (up(dev, dt, &q)?, up(dev, dt, &kc)?, up(dev, dt, &vc)?);
    let lenb = dev.upload(&[(len as i32) - 3])?; // exercise len_add
    let ws = poisoned(dev, s.workspace_bytes())?;
    let ob = poisoned(dev, nh * hd * dt.size_bytes())?;
    ops::attention_decode(dev, dt, &s, qb.ptr(), kb.ptr(), vb.ptr(), lenb.ptr(), 3, scale, ws.ptr(), ob.ptr())?;
    let out = down(dev, dt, ob.ptr(), nh * hd)?;
    let refs = re::attention(&q, &kc, &vc, nh, nk, hd, ml, len, scale, dt);
    let name = format!("attn_{}_h{nh}_kv{nk}_d{hd}_len{len}", dtn(dt));
    dump.case(
        &name,
        format!(r#"{{"kind":"attention","dtype":"{}","n_heads":{nh},"n_kv":{nk},"hd":{hd},"max_len":{ml},"len":{len},"scale":{scale:e}}}"#, dtn(dt)),
        &[("q.f32", f32b(&q)), ("k.f32", f32b(&kc)), ("v.f32", f32b(&vc)), ("out.f32", f32b(&out))],
    );
    Ok(row_from("attention_decode", format!("{} H={nh} KV={nk} D={hd} len={len}/{ml}", dtn(dt)), dt, re::compare(dt, &out, &refs), true, String::new()))
}

/// Bit-exact comparison with an emulation; returns (mismatches, note).
fn exact(out: &[f32], emu: &[f32]) -> (usize, String) {
    let bad = out.iter().zip(emu).filter(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan())).count();
    (bad, format!("{}/{} bit-exact vs MLX-op emulation", out.len() - bad, out.len()))
}

/// Loose f64 comparison for elementwise chains: tolerance c·Σ|terms| + 1 ulp.
fn compare_loose(dt: DType, out: &[f32], refs: &[RefVal], c: f64) -> Cmp {
    let mut worst = 0.0f64;
    let (mut num, mut den, mut unw) = (0.0, 0.0, 0);
    for (&o, r) in out.iter().zip(refs) {
        if !o.is_finite() {
            unw += 1;
            continue;
        }
        let e = (o as f64 - r.v).abs();
        worst = worst.max(e / (re::ulp(dt, r.v) + c * r.scale));
        num += e * e;
        den += r.v * r.v;
    }
    Cmp { worst, rel_norm: (num / den.max(1e-300)).sqrt(), unwritten: unw }
}
fn chain_c(dt: DType) -> f64 {
    match dt {
        DType::BF16 => 3.0 / 256.0,
        DType::F16 => 3.0 / 2048.0,
        _ => 1e-6,
    }
}
fn loose_row(name: &str, shape: String, _dt: DType, c: Cmp, bad: usize, note: String) -> TestRow {
    let passed = c.unwritten == 0 && c.worst <= 1.0 && bad == 0;
    let note = if c.unwritten > 0 { format!("{} unwritten; {note}", c.unwritten) } else { note };
    TestRow { name: name.into(), shape, passed, worst: c.worst, rel_norm: c.rel_norm, note }
}

fn test_rms_norm(dev: &CudaDevice, rng: &mut Rng, dt: DType, rows: usize, n: usize) -> Result<TestRow> {
    let x = rng.vec(rows * n, -3.0, 3.0, dt);
    let w = rng.vec(n, 0.5, 1.5, dt);
    let eps = 1e-6f32;
    let (xb, wb) = (up(dev, dt, &x)?, up(dev, dt, &w)?);
    let yb = poisoned(dev, rows * n * dt.size_bytes())?;
    ops::rms_norm(dev, dt, xb.ptr(), wb.ptr(), yb.ptr(), rows, n, eps)?;
    let y = down(dev, dt, yb.ptr(), rows * n)?;
    let mut refs = Vec::new();
    let mut emu = Vec::new();
    let inv_n = (1.0f64 / n as f64) as f32;
    for r in 0..rows {
        let row = &x[r * n..(r + 1) * n];
        let ms: f64 = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
        let rr = 1.0 / (ms + eps as f64).sqrt();
        refs.extend(row.iter().zip(&w).map(|(&v, &wi)| {
            let t = v as f64 * rr * wi as f64;
            RefVal { v: t, scale: t.abs() }
        }));
        let mut ss = 0.0f32;
        for &v in row {
            ss += v * v;
        }
        let rf = 1.0f32 / (ss * inv_n + eps).sqrt();
        emu.extend(row.iter().zip(&w).map(|(&v, &wi)| dt.round(dt.round(v * rf) * wi)));
    }
    let (bad, note) = exact(&y, &emu);
    // The f32 sum of squares runs in a different order than the sequential emulation, so
    // a rare 1-ulp difference is allowed there; the f64 check bounds it.
    let c = compare_loose(dt, &y, &refs, chain_c(dt) * 0.7);
    // f32: nothing rounds the sum-order difference away, so only the f64 check applies.
    let gate = if dt == DType::F32 || bad * 100 <= y.len() { 0 } else { bad };
    Ok(loose_row("rms_norm", format!("{} rows={rows} D={n}", dtn(dt)), dt, c, gate, note))
}

fn rope_emulate(dt: DType, x: &[f32], rows: usize, hd: usize, dims: usize, base: f32, pos: usize) -> Vec<f32> {
    let half = dims / 2;
    let step = base.ln() / half as f32;
    let mut out = x.to_vec();
    for r in 0..rows {
        for i in 0..half {
            let inv = mlx_math::exp(-(i as f32) * step);
            let theta = (pos as f32 * 1.0) * inv;
            let (c, s) = (dt.round(mlx_math::cos(theta)), dt.round(mlx_math::sin(theta)));
            let (x1, x2) = (x[r * hd + i], x[r * hd + i + half]);
            out[r * hd + i] = dt.round(dt.round(x1 * c) - dt.round(x2 * s));
            out[r * hd + i + half] = dt.round(dt.round(x1 * s) + dt.round(x2 * c));
        }
    }
    out
}

fn test_rope(dev: &CudaDevice, rng: &mut Rng, dt: DType, rows: usize, hd: usize, dims: usize, pos: usize) -> Result<TestRow> {
    let base = 1_000_000.0f32;
    let x = rng.vec(rows * hd, -2.0, 2.0, dt);
    let xb = up(dev, dt, &x)?;
    let pb = dev.upload(&[pos as i32 - 1])?;
    let yb = poisoned(dev, rows * hd * dt.size_bytes())?;
    ops::rope(dev, dt, xb.ptr(), yb.ptr(), pb.ptr(), 1, rows, hd, dims, base, 1.0)?;
    let y = down(dev, dt, yb.ptr(), rows * hd)?;
    let emu = rope_emulate(dt, &x, rows, hd, dims, base, pos);
    let half = dims / 2;
    let mut refs = Vec::new();
    for r in 0..rows {
        for j in 0..hd {
            let v = if j < dims {
                let i = j % half;
                let th = pos as f64 * (base as f64).powf(-(i as f64) / half as f64);
                let (x1, x2) = (x[r * hd + i] as f64, x[r * hd + i + half] as f64);
                // scale |x1| + |x2|: an angle error moves the result by up to that much
                let sc = x1.abs() + x2.abs();
                if j < half {
                    RefVal { v: x1 * th.cos() - x2 * th.sin(), scale: sc }
                } else {
                    RefVal { v: x1 * th.sin() + x2 * th.cos(), scale: sc }
                }
            } else {
                RefVal { v: x[r * hd + j] as f64, scale: x[r * hd + j].abs() as f64 }
            };
            refs.push(v);
        }
    }
    let (bad, note) = exact(&y, &emu);
    // f64 angles vs MLX's f32 angle arithmetic differ by ~pos·2^-24 rad: loosen with pos.
    let c = chain_c(dt) + pos as f64 * 1e-7;
    Ok(loose_row("rope", format!("{} rows={rows} hd={hd} dims={dims} pos={pos}", dtn(dt)), dt, compare_loose(dt, &y, &refs, c), bad, note))
}

fn test_swiglu(dev: &CudaDevice, rng: &mut Rng, dt: DType, n: usize) -> Result<TestRow> {
    let g = rng.vec(n, -8.0, 8.0, dt);
    let u = rng.vec(n, -3.0, 3.0, dt);
    let (gb, ub) = (up(dev, dt, &g)?, up(dev, dt, &u)?);
    let ob = poisoned(dev, n * dt.size_bytes())?;
    ops::swiglu(dev, dt, gb.ptr(), ub.ptr(), ob.ptr(), n)?;
    let o = down(dev, dt, ob.ptr(), n)?;
    let emu: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| mlx_math::swiglu(dt, a, b)).collect();
    let refs: Vec<RefVal> = g
        .iter()
        .zip(&u)
        .map(|(&a, &b)| {
            let v = a as f64 / (1.0 + (-(a as f64)).exp()) * b as f64;
            RefVal { v, scale: v.abs() }
        })
        .collect();
    let (bad, note) = exact(&o, &emu);
    Ok(loose_row("swiglu", format!("{} n={n}", dtn(dt)), dt, compare_loose(dt, &o, &refs, chain_c(dt)), bad, note))
}

fn test_add_combine(dev: &CudaDevice, rng: &mut Rng, dt: DType, k: usize, n: usize) -> Result<Vec<TestRow>> {
    let y = rng.vec(k * n, -2.0, 2.0, dt);
    let w = rng.vec(k, 0.0, 0.3, dt);
    let (yb, wb) = (up(dev, dt, &y)?, dev.upload(&w)?);
    let ob = poisoned(dev, n * dt.size_bytes())?;
    ops::moe_combine(dev, dt, yb.ptr(), wb.ptr(), ob.ptr(), k, n)?;
    let o = down(dev, dt, ob.ptr(), n)?;
    let mut emu = vec![0.0f32; n];
    let mut refs = Vec::new();
    for i in 0..n {
        let mut acc = 0.0f32;
        let (mut r, mut sc) = (0.0f64, 0.0f64);
        for j in 0..k {
            acc = dt.round(acc + dt.round(w[j] * y[j * n + i]));
            r += w[j] as f64 * y[j * n + i] as f64;
            sc += (w[j] as f64 * y[j * n + i] as f64).abs();
        }
        emu[i] = acc;
        refs.push(RefVal { v: r, scale: sc });
    }
    let (bad, note) = exact(&o, &emu);
    let row1 = loose_row("moe_combine", format!("{} k={k} n={n}", dtn(dt)), dt, compare_loose(dt, &o, &refs, chain_c(dt) * k as f64 / 2.0), bad, note);
    // residual add
    let a = &y[..n];
    let b = &y[n..2 * n];
    let ob2 = poisoned(dev, n * dt.size_bytes())?;
    ops::add(dev, dt, yb.ptr(), yb.ptr() + (n * dt.size_bytes()) as u64, ob2.ptr(), n)?;
    let o2 = down(dev, dt, ob2.ptr(), n)?;
    let emu2: Vec<f32> = a.iter().zip(b).map(|(&p, &q)| dt.round(p + q)).collect();
    let refs2: Vec<RefVal> = a.iter().zip(b).map(|(&p, &q)| RefVal { v: p as f64 + q as f64, scale: (p as f64).abs() + (q as f64).abs() }).collect();
    let (bad2, note2) = exact(&o2, &emu2);
    let row2 = loose_row("add", format!("{} n={n}", dtn(dt)), dt, compare_loose(dt, &o2, &refs2, 1e-9), bad2, note2);
    Ok(vec![row1, row2])
}

fn test_embed(dev: &CudaDevice, rng: &mut Rng, dt: DType, vocab: usize, dim: usize, bits: u32, gs: usize) -> Result<TestRow> {
    let q = qdata(rng, dt, 1, vocab, dim, bits, gs);
    let id = vocab as u32 - 1 - rng.next_u32() % 7;
    let (wb, sb, bb, ib) = (dev.upload(&q.words)?, up(dev, dt, &q.scales)?, up(dev, dt, &q.biases)?, dev.upload(&[id])?);
    let ob = poisoned(dev, dim * dt.size_bytes())?;
    let wq = QuantWeight { w: wb.ptr(), scales: sb.ptr(), biases: bb.ptr(), n: vocab, k: dim, bits, group_size: gs as u32, n_experts: 1 };
    ops::embed(dev, dt, &wq, ib.ptr(), ob.ptr())?;
    let o = down(dev, dt, ob.ptr(), dim)?;
    let wpr = dim * bits as usize / 32;
    let row = id as usize;
    let mut emu = Vec::new();
    let mut refs = Vec::new();
    for j in 0..dim {
        let c = re::code(&q.words, row * wpr, j, bits) as f32;
        let g = row * (dim / gs) + j / gs;
        emu.push(dt.round(dt.round(q.scales[g] * c) + q.biases[g]));
        let v = q.scales[g] as f64 * c as f64 + q.biases[g] as f64;
        refs.push(RefVal { v, scale: (q.scales[g] as f64 * c as f64).abs() + (q.biases[g] as f64).abs() });
    }
    let (bad, note) = exact(&o, &emu);
    Ok(loose_row("embed", format!("{} vocab={vocab} D={dim} b{bits} g{gs} id={id}", dtn(dt)), dt, compare_loose(dt, &o, &refs, chain_c(dt)), bad, note))
}

fn test_topk(dev: &CudaDevice, rng: &mut Rng, dt: DType, rows: usize, e: usize, k: usize, round_probs: bool) -> Result<TestRow> {
    let logits = rng.vec(rows * e, -4.0, 4.0, dt);
    let lb = up(dev, dt, &logits)?;
    let ib = poisoned(dev, rows * k * 4)?;
    let wb = poisoned(dev, rows * k * 4)?;
    ops::softmax_topk(dev, dt, lb.ptr(), rows, e, k, round_probs, true, ib.ptr(), wb.ptr())?;
    let ids: Vec<u32> = dev.read(ib.ptr(), rows * k)?;
    let ws: Vec<f32> = dev.read(wb.ptr(), rows * k)?;
    let mut worst = 0.0f64;
    let mut bad_ids = 0;
    let mut num = 0.0;
    let mut den = 0.0;
    for r in 0..rows {
        let l = &logits[r * e..(r + 1) * e];
        // f64 reference (round_probs: emulate the dtype rounding of the probabilities)
        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = l.iter().map(|&v| (v as f64 - m).exp()).sum();
        let p: Vec<f64> = l
            .iter()
            .map(|&v| {
                let pv = (v as f64 - m).exp() / z;
                if round_probs {
                    dt.round(pv as f32) as f64
                } else {
                    pv
                }
            })
            .collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
        let top = &order[..k];
        let s: f64 = top.iter().map(|&i| p[i]).sum();
        for j in 0..k {
            let got = ids[r * k + j] as usize;
            if got != top[j] {
                // accept only a near-tie swap
                if got >= e || (p[got] - p[top[j]]).abs() > 1e-6 * p[top[j]].max(1e-30) + if round_probs { re::ulp(dt, p[top[j]]) } else { 0.0 } {
                    bad_ids += 1;
                }
            }
            let rv = p[top[j]] / s;
            let err = (ws[r * k + j] as f64 - rv).abs();
            let tol = if round_probs { 3.0 * re::ulp(dt, rv) } else { 1e-5 * rv };
            worst = worst.max(err / tol);
            num += err * err;
            den += rv * rv;
        }
    }
    let c = Cmp { worst, rel_norm: (num / den).sqrt(), unwritten: ws.iter().filter(|v| v.is_nan()).count() };
    Ok(loose_row(
        "softmax_topk",
        format!("{} rows={rows} E={e} k={k} {}", dtn(dt), if round_probs { "probs in dtype" } else { "f32 probs" }),
        dt,
        c,
        bad_ids,
        format!("{bad_ids} id mismatches"),
    ))
}

fn test_argmax(dev: &CudaDevice, rng: &mut Rng, dt: DType, n: usize) -> Result<TestRow> {
    let mut x = rng.vec(n, -10.0, 10.0, dt);
    let p1 = (rng.next_u32() as usize) % (n / 2);
    let p2 = n / 2 + (rng.next_u32() as usize) % (n / 2);
    x[p1] = 20.0;
    x[p2] = 20.0;
    let xb = up(dev, dt, &x)?;
    let ws = dev.alloc(ops::ARGMAX_WORKSPACE_BYTES)?;
    dev.memset(ws.ptr(), 0, ops::ARGMAX_WORKSPACE_BYTES)?;
    let mut got = Vec::new();
    for _ in 0..2 {
        // twice: the workspace must come back zeroed
        let ob = poisoned(dev, 4)?;
        ops::argmax(dev, dt, xb.ptr(), n, ws.ptr(), ob.ptr())?;
        got.push(dev.read::<u32>(ob.ptr(), 1)?[0]);
    }
    let ok = got.iter().all(|&g| g as usize == p1);
    Ok(TestRow {
        name: "argmax".into(),
        shape: format!("{} n={n}", dtn(dt)),
        passed: ok,
        worst: if ok { 0.0 } else { f64::INFINITY },
        rel_norm: 0.0,
        note: format!("tie at {p1} and {p2}; got {got:?}"),
    })
}

/// One captured graph (rope q, rope k, kv append, attention) replayed at two positions,
/// position read from device memory each replay.
fn test_graph(dev: &CudaDevice, rng: &mut Rng) -> Result<TestRow> {
    let dt = DType::BF16;
    let s = AttnShape { n_heads: 8, n_kv_heads: 2, head_dim: 128, max_len: 1024 };
    let (nh, nk, hd, ml) = (s.n_heads, s.n_kv_heads, s.head_dim, s.max_len);
    let base = 10000.0f32;
    let mut kc = rng.vec(nk * ml * hd, -2.0, 2.0, dt);
    let mut vc = rng.vec(nk * ml * hd, -1.0, 1.0, dt);
    let (kb, vb) = (up(dev, dt, &kc)?, up(dev, dt, &vc)?);
    let mut arena = dev.arena(1 << 22)?;
    let q_in = arena.alloc(nh * hd * 2)?;
    let k_in = arena.alloc(nk * hd * 2)?;
    let v_in = arena.alloc(nk * hd * 2)?;
    let q_rot = arena.alloc(nh * hd * 2)?;
    let k_rot = arena.alloc(nk * hd * 2)?;
    let out = arena.alloc(nh * hd * 2)?;
    let pos = arena.alloc(4)?;
    let ws = arena.alloc(s.workspace_bytes())?;
    let scale = 1.0 / (hd as f32).sqrt();
    let graph = dev.capture(|d| {
        ops::rope(d, dt, q_in, q_rot, pos, 0, nh, hd, hd, base, 1.0)?;
        ops::rope(d, dt, k_in, k_rot, pos, 0, nk, hd, hd, base, 1.0)?;
        ops::kv_append(d, dt, &s, k_rot, v_in, kb.ptr(), vb.ptr(), pos, 0)?;
        ops::attention_decode(d, dt, &s, q_rot, kb.ptr(), vb.ptr(), pos, 1, scale, ws, out)
    })?;
    let mut worst = 0.0f64;
    let mut rel = 0.0f64;
    let mut unw = 0;
    for &p in &[100usize, 700] {
        let q = rng.vec(nh * hd, -2.0, 2.0, dt);
        let k = rng.vec(nk * hd, -2.0, 2.0, dt);
        let v = rng.vec(nk * hd, -1.0, 1.0, dt);
        dev.write(q_in, &re::encode(dt, &q))?;
        dev.write(k_in, &re::encode(dt, &k))?;
        dev.write(v_in, &re::encode(dt, &v))?;
        dev.write(pos, &[p as i32])?;
        dev.memset(out, 0xff, nh * hd * 2)?;
        graph.replay()?;
        let o = down(dev, dt, out, nh * hd)?;
        let qr = rope_emulate(dt, &q, nh, hd, hd, base, p);
        let kr = rope_emulate(dt, &k, nk, hd, hd, base, p);
        for h in 0..nk {
            for d in 0..hd {
                kc[(h * ml + p) * hd + d] = kr[h * hd + d];
                vc[(h * ml + p) * hd + d] = v[h * hd + d];
            }
        }
        let refs = re::attention(&qr, &kc, &vc, nh, nk, hd, ml, p + 1, scale, dt);
        let c = re::compare(dt, &o, &refs);
        worst = worst.max(c.worst);
        rel = rel.max(c.rel_norm);
        unw += c.unwritten;
    }
    let c = Cmp { worst, rel_norm: rel, unwritten: unw };
    Ok(row_from("cuda_graph", "bf16 rope+append+attention, replay at pos 100, 700".into(), dt, c, true, format!("arena used {} B", arena.used())))
}

/// Run every self-test; `dump` (a directory) receives cases for tests/torch_check.py.
pub fn run_self_tests_dump(dev: &CudaDevice, dump: Option<&Path>) -> Vec<TestRow> {
    let dump = Dump(dump.map(|p| p.to_path_buf()));
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
    let mut rng = Rng::new(seed);
    let mut rows = Vec::new();
    let mut push = |name: &str, r: Result<TestRow>| match r {
        Ok(t) => rows.push(t),
        Err(e) => rows.push(TestRow { name: name.into(), shape: String::new(), passed: false, worst: f64::NAN, rel_norm: f64::NAN, note: e.to_string() }),
    };
    let (bf, f16, f32) = (DType::BF16, DType::F16, DType::F32);
    for bits in [2, 3, 4, 5, 6, 8] {
        for gs in [32, 64, 128] {
            push("qmv", test_qmv(dev, &dump, &mut rng, bf, 300, 640, bits, gs));
        }
    }
    for bits in [3, 4, 6] {
        push("qmv", test_qmv(dev, &dump, &mut rng, bf, 9000, 1024, bits, 64));
    }
    for dt in [f16, f32] {
        for bits in [3, 4, 5, 8] {
            push("qmv", test_qmv(dev, &dump, &mut rng, dt, 520, 1024, bits, 64));
        }
    }
    push("gather_qmv", test_gather(dev, &dump, &mut rng, bf, 16, 200, 512, 4, 64, 4, false));
    push("gather_qmv", test_gather(dev, &dump, &mut rng, bf, 16, 200, 512, 4, 64, 4, true));
    push("gather_qmv", test_gather(dev, &dump, &mut rng, f16, 8, 96, 256, 3, 32, 3, true));
    push("gather_qmv", test_gather(dev, &dump, &mut rng, f32, 8, 96, 384, 6, 128, 2, false));
    push("gather_qmv", test_gather(dev, &dump, &mut rng, bf, 128, 768, 2048, 4, 64, 8, false));
    push("gather_qmv", test_gather(dev, &dump, &mut rng, bf, 128, 2048, 768, 4, 64, 8, true));
    let a = |h, kv, d, ml| AttnShape { n_heads: h, n_kv_heads: kv, head_dim: d, max_len: ml };
    push("attention_decode", test_attention(dev, &dump, &mut rng, bf, a(32, 4, 128, 1024), 1000));
    push("attention_decode", test_attention(dev, &dump, &mut rng, bf, a(32, 4, 128, 8192), 5000));
    push("attention_decode", test_attention(dev, &dump, &mut rng, bf, a(16, 16, 64, 600), 1));
    push("attention_decode", test_attention(dev, &dump, &mut rng, f16, a(16, 1, 64, 700), 513));
    push("attention_decode", test_attention(dev, &dump, &mut rng, f32, a(8, 2, 128, 2048), 2048));
    for dt in [bf, f16, f32] {
        push("rms_norm", test_rms_norm(dev, &mut rng, dt, 1, 2048));
        push("rms_norm", test_rms_norm(dev, &mut rng, dt, 32, 128));
        push("rope", test_rope(dev, &mut rng, dt, 32, 128, 128, 7));
        push("rope", test_rope(dev, &mut rng, dt, 4, 128, 64, 3000));
        push("swiglu", test_swiglu(dev, &mut rng, dt, 8 * 768 + 5));
        match test_add_combine(dev, &mut rng, dt, 8, 2048 + 3) {
            Ok(v) => v.into_iter().for_each(|t| push("moe_combine", Ok(t))),
            Err(e) => push("moe_combine", Err(e)),
        }
        push("embed", test_embed(dev, &mut rng, dt, 1000, 2048, 4, 64));
        push("argmax", test_argmax(dev, &mut rng, dt, 151936));
    }
    push("embed", test_embed(dev, &mut rng, bf, 500, 1024, 3, 32));
    push("embed", test_embed(dev, &mut rng, bf, 500, 1024, 6, 128));
    push("softmax_topk", test_topk(dev, &mut rng, f32, 4, 128, 8, false));
    push("softmax_topk", test_topk(dev, &mut rng, bf, 1, 128, 8, true));
    push("softmax_topk", test_topk(dev, &mut rng, bf, 3, 512, 10, false));
    push("cuda_graph", test_graph(dev, &mut rng));
    rows.extend(fused_tests::run(dev, &mut rng));
    rows
}

/// Run every self-test (no dumps).
pub fn run_self_tests(dev: &CudaDevice) -> Vec<TestRow> {
    run_self_tests_dump(dev, None)
}

/// Plain-text table of test rows.
pub fn format_tests(rows: &[TestRow]) -> String {
    let mut s = format!("{:<18} {:<52} {:>6} {:>9} {:>10}  {}\n", "kernel", "case", "result", "worst/tol", "rel_norm", "note");
    for r in rows {
        s += &format!(
            "{:<18} {:<52} {:>6} {:>9.3} {:>10.2e}  {}\n",
            r.name,
            r.shape,
            if r.passed { "PASS" } else { "FAIL" },
            r.worst,
            r.rel_norm,
            r.note
        );
    }
    let failed = rows.iter().filter(|r| !r.passed).count();
    s += &format!("{} tests, {} failed\n", rows.len(), failed);
    s
}

/// Fused kernels (crate::fused) against the unfused launch sequence they replace, bit for
/// bit on the device, on fresh random data with poisoned outputs; plus an f64 sanity check.
pub(crate) mod fused_tests {
    use super::*;
    use crate::fused;

    fn q_up(dev: &CudaDevice, dt: DType, q: &QData) -> Result<(DevBuf, DevBuf, DevBuf)> {
        Ok((dev.upload(&q.words)?, up(dev, dt, &q.scales)?, up(dev, dt, &q.biases)?))
    }
    fn qw(b: &(DevBuf, DevBuf, DevBuf), e: usize, n: usize, k: usize, bits: u32, gs: usize) -> QuantWeight {
        QuantWeight { w: b.0.ptr(), scales: b.1.ptr(), biases: b.2.ptr(), n, k, bits, group_size: gs as u32, n_experts: e }
    }
    fn bytes(dev: &CudaDevice, p: u64, n: usize) -> Result<Vec<u8>> {
        dev.read::<u8>(p, n)
    }
    /// Count of differing elements of `esz` bytes.
    fn diff(a: &[u8], b: &[u8], esz: usize) -> usize {
        a.chunks(esz).zip(b.chunks(esz)).filter(|(x, y)| x != y).count()
    }
    fn rel_bound(dt: DType) -> f64 {
        match dt {
            DType::BF16 => 0.03,
            DType::F16 => 0.005,
            _ => 1e-4,
        }
    }
    fn rel(out: &[f32], refs: &[f64]) -> (f64, usize) {
        let (mut num, mut den, mut bad) = (0.0, 0.0, 0);
        for (&o, &r) in out.iter().zip(refs) {
            if !o.is_finite() {
                bad += 1;
                continue;
            }
            num += (o as f64 - r) * (o as f64 - r);
            den += r * r;
        }
        ((num / den.max(1e-300)).sqrt(), bad)
    }
    fn silu64(g: f64) -> f64 {
        g / (1.0 + (-g).exp())
    }

    /// One MoE block: unfused (qmv router, softmax_topk, gather gate, gather up, swiglu,
    /// gather down, moe_combine, add) vs fused (moe_gating, gather_qmm_swiglu,
    /// gather_qmm_combine with the residual, in place).
    #[allow(clippy::too_many_arguments)]
    pub fn test_moe_block(dev: &CudaDevice, rng: &mut Rng, dt: DType, e: usize, d: usize, f: usize, k: usize, bits: u32, gs: usize, rbits: u32, r: u32) -> Result<TestRow> {
        let sz = dt.size_bytes();
        let gq = qdata(rng, dt, e, f, d, bits, gs);
        let uq = qdata(rng, dt, e, f, d, bits, gs);
        let dq = qdata(rng, dt, e, d, f, bits, gs);
        let rq = qdata(rng, dt, 1, e, d, rbits, 64.min(gs.max(32)));
        let rgs = 64.min(gs.max(32));
        let x = rng.vec(d, -0.25, 0.25, dt);
        let h = rng.vec(d, -2.0, 2.0, dt);
        let (gb, ub, db, rb) = (q_up(dev, dt, &gq)?, q_up(dev, dt, &uq)?, q_up(dev, dt, &dq)?, q_up(dev, dt, &rq)?);
        let (gw, uw, dw, rw) = (qw(&gb, e, f, d, bits, gs), qw(&ub, e, f, d, bits, gs), qw(&db, e, d, f, bits, gs), qw(&rb, 1, e, d, rbits, rgs));
        let (xb, hb) = (up(dev, dt, &x)?, up(dev, dt, &h)?);
        // unfused
        let logits = poisoned(dev, e * sz)?;
        let (ids, wts) = (poisoned(dev, k * 4)?, poisoned(dev, k * 4)?);
        let (g, u, act, y, ff) = (poisoned(dev, k * f * sz)?, poisoned(dev, k * f * sz)?, poisoned(dev, k * f * sz)?, poisoned(dev, k * d * sz)?, poisoned(dev, d * sz)?);
        let out = poisoned(dev, d * sz)?;
        ops::qmv(dev, dt, &rw, xb.ptr(), logits.ptr())?;
        ops::softmax_topk(dev, dt, logits.ptr(), 1, e, k, true, true, ids.ptr(), wts.ptr())?;
        ops::gather_qmv(dev, dt, &gw, ids.ptr(), k, xb.ptr(), false, g.ptr())?;
        ops::gather_qmv(dev, dt, &uw, ids.ptr(), k, xb.ptr(), false, u.ptr())?;
        ops::swiglu(dev, dt, g.ptr(), u.ptr(), act.ptr(), k * f)?;
        ops::gather_qmv(dev, dt, &dw, ids.ptr(), k, act.ptr(), true, y.ptr())?;
        ops::moe_combine(dev, dt, y.ptr(), wts.ptr(), ff.ptr(), k, d)?;
        ops::add(dev, dt, hb.ptr(), ff.ptr(), out.ptr(), d)?;
        // fused (twice: the gating counter must come back to zero; the second run is in place)
        let ws = dev.alloc(fused::moe_gating_workspace_bytes(e))?;
        dev.memset(ws.ptr(), 0, fused::moe_gating_workspace_bytes(e))?;
        let mut bad = [0usize; 5];
        let mut act_f = Vec::new();
        for it in 0..2 {
            let (ids2, wts2, act2) = (poisoned(dev, k * 4)?, poisoned(dev, k * 4)?, poisoned(dev, k * f * sz)?);
            fused::moe_gating(dev, dt, &rw, xb.ptr(), k, true, true, ids2.ptr(), wts2.ptr(), ws.ptr())?;
            fused::gather_qmm_swiglu_rows(dev, dt, &gw, &uw, ids2.ptr(), k, xb.ptr(), act2.ptr(), if it == 0 { r } else { 3 - r }, if it == 0 { 128 } else { 256 })?;
            let out2 = if it == 0 { poisoned(dev, d * sz)? } else { up(dev, dt, &h)? };
            let resid = if it == 0 { hb.ptr() } else { out2.ptr() };
            fused::gather_qmm_combine_rows(dev, dt, &dw, ids2.ptr(), wts2.ptr(), k, act2.ptr(), resid, out2.ptr(), if it == 0 { 2 } else { 4 })?;
            bad[0] += diff(&bytes(dev, ids.ptr(), k * 4)?, &bytes(dev, ids2.ptr(), k * 4)?, 4);
            bad[1] += diff(&bytes(dev, wts.ptr(), k * 4)?, &bytes(dev, wts2.ptr(), k * 4)?, 4);
            bad[2] += diff(&bytes(dev, act.ptr(), k * f * sz)?, &bytes(dev, act2.ptr(), k * f * sz)?, sz);
            bad[3] += diff(&bytes(dev, out.ptr(), d * sz)?, &bytes(dev, out2.ptr(), d * sz)?, sz);
            if it == 0 {
                act_f = down(dev, dt, act2.ptr(), k * f)?;
            }
        }
        // combine without residual vs moe_combine alone
        let ff2 = poisoned(dev, d * sz)?;
        fused::gather_qmm_combine_rows(dev, dt, &dw, ids.ptr(), wts.ptr(), k, act.ptr(), 0, ff2.ptr(), 1)?;
        bad[4] = diff(&bytes(dev, ff.ptr(), d * sz)?, &bytes(dev, ff2.ptr(), d * sz)?, sz);
        let gws = dev.read::<u32>(ws.ptr(), 1)?[0];
        // f64 sanity: act vs swiglu(gate, up) in f64; out vs h + Σ w (down · act_device).
        let idv: Vec<u32> = dev.read(ids.ptr(), k)?;
        let wv: Vec<f32> = dev.read(wts.ptr(), k)?;
        let mut act_ref = Vec::new();
        let mut out_ref: Vec<f64> = h.iter().map(|&v| v as f64).collect();
        for (j, &id) in idv.iter().enumerate() {
            let gr = re::qmv(&gq.words, &gq.scales, &gq.biases, &x, id as usize, f, d, bits, gs);
            let ur = re::qmv(&uq.words, &uq.scales, &uq.biases, &x, id as usize, f, d, bits, gs);
            act_ref.extend(gr.iter().zip(&ur).map(|(a, b)| silu64(a.v) * b.v));
            let yr = re::qmv(&dq.words, &dq.scales, &dq.biases, &act_f[j * f..(j + 1) * f], id as usize, d, f, bits, gs);
            for (o, yv) in out_ref.iter_mut().zip(&yr) {
                *o += wv[j] as f64 * yv.v;
            }
        }
        let (ra, na) = rel(&act_f, &act_ref);
        let (ro, no) = rel(&down(dev, dt, out.ptr(), d)?, &out_ref);
        let passed = bad.iter().all(|&b| b == 0) && gws == 0 && na == 0 && no == 0 && ra <= rel_bound(dt) && ro <= rel_bound(dt);
        Ok(TestRow {
            name: "fused_moe_block".into(),
            shape: format!("{} E={e} D={d} F={f} k={k} b{bits} g{gs} router b{rbits}", dtn(dt)),
            passed,
            worst: bad.iter().sum::<usize>() as f64,
            rel_norm: ra.max(ro),
            note: format!(
                "bitwise diffs ids/w/act/out/combine-only = {}/{}/{}/{}/{} (x2 runs, in place); gating ws {gws}; f64 rel act {ra:.1e} out {ro:.1e}",
                bad[0], bad[1], bad[2], bad[3], bad[4]
            ),
        })
    }

    /// gather_qmm_swiglu / gather_qmm_combine alone on ragged N (not a multiple of the rows
    /// per block) vs gather_qmv + swiglu / gather_qmv + moe_combine + add.
    #[allow(clippy::too_many_arguments)]
    pub fn test_ragged(dev: &CudaDevice, rng: &mut Rng, dt: DType, e: usize, n: usize, kdim: usize, k: usize, bits: u32, gs: usize) -> Result<TestRow> {
        let sz = dt.size_bytes();
        let (gq, uq) = (qdata(rng, dt, e, n, kdim, bits, gs), qdata(rng, dt, e, n, kdim, bits, gs));
        let (gb, ub) = (q_up(dev, dt, &gq)?, q_up(dev, dt, &uq)?);
        let (gw, uw) = (qw(&gb, e, n, kdim, bits, gs), qw(&ub, e, n, kdim, bits, gs));
        let mut idv: Vec<u32> = vec![(e - 1) as u32];
        while idv.len() < k {
            idv.push(rng.next_u32() % e as u32); // repeats allowed
        }
        let ids = dev.upload(&idv)?;
        let wv = rng.vec(k, 0.0, 0.4, dt);
        let wts = dev.upload(&wv)?;
        let x = rng.vec(kdim, -0.5, 0.5, dt);
        let xk = rng.vec(k * kdim, -1.0, 1.0, dt);
        let h = rng.vec(n, -2.0, 2.0, dt);
        let (xb, xkb, hb) = (up(dev, dt, &x)?, up(dev, dt, &xk)?, up(dev, dt, &h)?);
        let (g, u, act, y, ff, out) = (poisoned(dev, k * n * sz)?, poisoned(dev, k * n * sz)?, poisoned(dev, k * n * sz)?, poisoned(dev, k * n * sz)?, poisoned(dev, n * sz)?, poisoned(dev, n * sz)?);
        ops::gather_qmv(dev, dt, &gw, ids.ptr(), k, xb.ptr(), false, g.ptr())?;
        ops::gather_qmv(dev, dt, &uw, ids.ptr(), k, xb.ptr(), false, u.ptr())?;
        ops::swiglu(dev, dt, g.ptr(), u.ptr(), act.ptr(), k * n)?;
        ops::gather_qmv(dev, dt, &gw, ids.ptr(), k, xkb.ptr(), true, y.ptr())?;
        ops::moe_combine(dev, dt, y.ptr(), wts.ptr(), ff.ptr(), k, n)?;
        ops::add(dev, dt, hb.ptr(), ff.ptr(), out.ptr(), n)?;
        let mut bad = 0;
        for r in [1u32, 2] {
            let act2 = poisoned(dev, k * n * sz)?;
            fused::gather_qmm_swiglu_rows(dev, dt, &gw, &uw, ids.ptr(), k, xb.ptr(), act2.ptr(), r, 64 * r)?;
            bad += diff(&bytes(dev, act.ptr(), k * n * sz)?, &bytes(dev, act2.ptr(), k * n * sz)?, sz);
        }
        for r in [1u32, 2, 4] {
            let out2 = poisoned(dev, n * sz)?;
            fused::gather_qmm_combine_rows(dev, dt, &gw, ids.ptr(), wts.ptr(), k, xkb.ptr(), hb.ptr(), out2.ptr(), r)?;
            bad += diff(&bytes(dev, out.ptr(), n * sz)?, &bytes(dev, out2.ptr(), n * sz)?, sz);
        }
        Ok(TestRow {
            name: "fused_gather".into(),
            shape: format!("{} E={e} N={n} K={kdim} k={k} b{bits} g{gs} (ragged N, repeated ids)", dtn(dt)),
            passed: bad == 0,
            worst: bad as f64,
            rel_norm: 0.0,
            note: format!("{bad} bitwise diffs (swiglu r1, r2; combine+residual r1, r2, r4)"),
        })
    }

    /// add_rms_norm vs add + rms_norm (and in place).
    pub fn test_add_rms_norm(dev: &CudaDevice, rng: &mut Rng, dt: DType, n: usize) -> Result<TestRow> {
        let sz = dt.size_bytes();
        let (x, dl, w) = (rng.vec(n, -3.0, 3.0, dt), rng.vec(n, -1.0, 1.0, dt), rng.vec(n, 0.5, 1.5, dt));
        let (xb, db, wb) = (up(dev, dt, &x)?, up(dev, dt, &dl)?, up(dev, dt, &w)?);
        let (h, y) = (poisoned(dev, n * sz)?, poisoned(dev, n * sz)?);
        ops::add(dev, dt, xb.ptr(), db.ptr(), h.ptr(), n)?;
        ops::rms_norm(dev, dt, h.ptr(), wb.ptr(), y.ptr(), 1, n, 1e-6)?;
        let (h2, y2) = (poisoned(dev, n * sz)?, poisoned(dev, n * sz)?);
        fused::add_rms_norm(dev, dt, xb.ptr(), db.ptr(), wb.ptr(), h2.ptr(), y2.ptr(), n, 1e-6)?;
        let (h3, y3) = (up(dev, dt, &x)?, poisoned(dev, n * sz)?);
        fused::add_rms_norm(dev, dt, h3.ptr(), db.ptr(), wb.ptr(), h3.ptr(), y3.ptr(), n, 1e-6)?;
        let (hr, yr) = (bytes(dev, h.ptr(), n * sz)?, bytes(dev, y.ptr(), n * sz)?);
        let bad = diff(&hr, &bytes(dev, h2.ptr(), n * sz)?, sz)
            + diff(&yr, &bytes(dev, y2.ptr(), n * sz)?, sz)
            + diff(&hr, &bytes(dev, h3.ptr(), n * sz)?, sz)
            + diff(&yr, &bytes(dev, y3.ptr(), n * sz)?, sz);
        // f64 sanity
        let hv: Vec<f64> = x.iter().zip(&dl).map(|(&a, &b)| a as f64 + b as f64).collect();
        let ms = hv.iter().map(|v| v * v).sum::<f64>() / n as f64;
        let refs: Vec<f64> = hv.iter().zip(&w).map(|(v, &wi)| v / (ms + 1e-6).sqrt() * wi as f64).collect();
        let (rn, nb) = rel(&down(dev, dt, y2.ptr(), n)?, &refs);
        Ok(TestRow {
            name: "fused_add_rms_norm".into(),
            shape: format!("{} n={n}", dtn(dt)),
            passed: bad == 0 && nb == 0 && rn <= rel_bound(dt),
            worst: bad as f64,
            rel_norm: rn,
            note: format!("{bad} bitwise diffs vs add+rms_norm (out of place and in place)"),
        })
    }

    pub fn run(dev: &CudaDevice, rng: &mut Rng) -> Vec<TestRow> {
        let mut rows = Vec::new();
        let mut push = |name: &str, r: Result<TestRow>| match r {
            Ok(t) => rows.push(t),
            Err(e) => rows.push(TestRow { name: name.into(), shape: String::new(), passed: false, worst: f64::NAN, rel_norm: f64::NAN, note: e.to_string() }),
        };
        let (bf, f16, f32) = (DType::BF16, DType::F16, DType::F32);
        // Qwen3-30B-A3B: hidden 2048, 128 experts, top-8, FFN 768, 4-bit g64, router 8-bit g64.
        push("fused_moe_block", test_moe_block(dev, rng, bf, 128, 2048, 768, 8, 4, 64, 8, 1));
        push("fused_moe_block", test_moe_block(dev, rng, bf, 128, 2048, 768, 8, 4, 64, 8, 2));
        let ks = [1usize, 3, 8, 10, 5, 2];
        let mut i = 0;
        for dt in [bf, f16, f32] {
            for bits in [2u32, 3, 4, 5, 6, 8] {
                for gs in [32usize, 64, 128] {
                    let k = ks[i % ks.len()];
                    i += 1;
                    push("fused_moe_block", test_moe_block(dev, rng, dt, 16, 640, 384, k, bits, gs, if i % 2 == 0 { 8 } else { bits }, 1 + (i % 2) as u32));
                }
            }
            push("fused_gather", test_ragged(dev, rng, dt, 6, 101, 256, 3, 4, 64));
            push("fused_gather", test_ragged(dev, rng, dt, 6, 37, 384, 9, 6, 128));
            push("fused_gather", test_ragged(dev, rng, dt, 6, 13, 96, 5, 3, 32));
            push("fused_add_rms_norm", test_add_rms_norm(dev, rng, dt, 2048));
            push("fused_add_rms_norm", test_add_rms_norm(dev, rng, dt, 4096 + 7));
            push("fused_add_rms_norm", test_add_rms_norm(dev, rng, dt, 9000));
        }
        rows
    }
}
