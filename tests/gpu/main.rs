//! The CUDA path (`runtime::gpu`, `lossc_eval_cuda`).
//!
//! On a machine without an NVIDIA driver or GPU (CI): the call reports "no device" as an
//! error value. On a machine with one (`bench/gpu.sh`, which sets `LOSSC_REQUIRE_GPU=1` so
//! that a missing device fails instead of skipping): every GPU-capable stdlib loss against
//! the CPU path, twice (bitwise equal), and, as an ignored test that `bench/gpu.sh` runs,
//! forward+backward timings against a same-run device bandwidth probe.

use std::time::Instant;

#[path = "../common/mod.rs"]
mod common;

use lossc::backend::ptx::THREADS;
use lossc::runtime::cuda::{DeviceBuffer, Driver, Stream};
use lossc::runtime::gpu::{self, DeviceArray};
use lossc::runtime::has_sort;
use lossc::synth::{self, Rng};
use lossc::{Error, Loss, View};

/// The driver, or `None` (with a message) where there is none and none is required.
fn device() -> Option<&'static Driver> {
    match Driver::get() {
        Ok(d) => Some(d),
        Err(e) if std::env::var("LOSSC_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("LOSSC_REQUIRE_GPU=1 but the CUDA path cannot run: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

#[test]
fn without_a_device_the_cuda_path_says_so() {
    if Driver::get().is_ok() {
        eprintln!("SKIPPED: this machine has a CUDA device; the other tests use it");
        return;
    }
    let loss = Loss::compile("dice", "").expect("compiles");
    // Never dereferenced: the driver is looked for before anything touches the arrays.
    let arrays = [DeviceArray { shape: [2, 1, 64], data: 0x1000, grad: 0x2000 }; 2];
    match gpu::evaluate(&loss, &arrays, 0) {
        Err(Error::NoDevice(message)) => {
            assert!(message.contains("CUDA") || message.contains("driver"), "{message}");
            let rendered = Error::NoDevice(message).render();
            assert!(rendered.starts_with("error: no GPU: "), "{rendered}");
        }
        other => panic!("expected a no-device error, got {other:?}"),
    }
    // Wrong shapes are still shape errors, and sort-based losses are refused for what they are.
    let bad = [
        DeviceArray { shape: [2, 1, 64], data: 0x1000, grad: 0 },
        DeviceArray { shape: [3, 1, 64], data: 0x1000, grad: 0 },
    ];
    assert!(matches!(gpu::evaluate(&loss, &bad, 0), Err(Error::Shape(_))));
    let lovasz = Loss::compile("lovasz_hinge", "").expect("compiles");
    assert!(matches!(gpu::evaluate(&lovasz, &arrays, 0), Err(Error::Unsupported(_))));
}

/// Uploads f32 values.
fn upload(driver: &Driver, data: &[f32]) -> DeviceBuffer {
    let buffer = driver.alloc(4 * data.len().max(1)).expect("alloc");
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    driver.copy_to_device(buffer.ptr(), &bytes, Stream(0)).expect("upload");
    buffer
}

fn download(driver: &Driver, buffer: &DeviceBuffer, n: usize) -> Vec<f32> {
    let mut bytes = vec![0u8; 4 * n];
    driver.copy_from_device(&mut bytes, buffer.ptr(), Stream(0)).expect("download");
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The loss and every gradient on the GPU.
fn on_gpu(driver: &Driver, loss: &Loss, shapes: &[[usize; 3]], data: &[Vec<f32>]) -> (f64, Vec<Vec<f32>>) {
    let inputs: Vec<DeviceBuffer> = data.iter().map(|d| upload(driver, d)).collect();
    let grads: Vec<DeviceBuffer> = data.iter().map(|d| upload(driver, &vec![f32::NAN; d.len()])).collect();
    let arrays: Vec<DeviceArray> = shapes
        .iter()
        .zip(inputs.iter().zip(&grads))
        .map(|(&shape, (i, g))| DeviceArray { shape, data: i.ptr(), grad: g.ptr() })
        .collect();
    let value = gpu::evaluate(loss, &arrays, 0).unwrap_or_else(|e| panic!("{}: {e}", loss.name()));
    let out = grads.iter().zip(data).map(|(g, d)| download(driver, g, d.len())).collect();
    (value, out)
}

#[test]
fn every_stdlib_loss_agrees_with_the_cpu_path_and_repeats_bitwise() {
    let Some(driver) = device() else { return };
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let losses: Vec<Loss> = lossc::stdlib::stdlib()
        .defs
        .iter()
        .filter_map(|d| Loss::compile(&d.name.name, "").ok())
        .filter(|l| !has_sort(l))
        .collect();
    for ext in [[1, 1, 7], [2, 1, 100_003], [3, 4, 50_001]] {
        for loss in &losses {
            let inputs = synth::inputs(loss.inputs(), ext, &mut rng);
            let shapes: Vec<[usize; 3]> = inputs.iter().map(|t| t.shape).collect();
            let data: Vec<Vec<f32>> = inputs.iter().map(|t| t.data.iter().map(|&v| v as f32).collect()).collect();
            let views: Vec<View> = shapes.iter().zip(&data).map(|(s, d)| View::new(*s, d)).collect();
            let mut cpu: Vec<Vec<f32>> = data.iter().map(|d| vec![0.0; d.len()]).collect();
            let mut slots: Vec<Option<&mut [f32]>> = cpu.iter_mut().map(|b| Some(b.as_mut_slice())).collect();
            let want = loss.evaluate(&views, &mut slots).expect("cpu");
            let (got, grads) = on_gpu(driver, loss, &shapes, &data);
            let (again, grads_again) = on_gpu(driver, loss, &shapes, &data);
            let what = format!("{} at {ext:?}", loss.name());
            if got.to_bits() != again.to_bits() || grads != grads_again {
                failures.push(format!("{what}: two runs differ"));
            }
            if !((got - want).abs() <= 1e-5 * want.abs() || (got.is_nan() && want.is_nan())) {
                failures.push(format!("{what}: loss {got} vs {want} on the CPU"));
            }
            let tiny = ext.iter().product::<usize>() < 8;
            for (i, (g, c)) in grads.iter().zip(&cpu).enumerate() {
                let scale = c.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let tolerance = common::gradient_tolerance(f64::from(scale), tiny);
                if let Some(k) =
                    g.iter().zip(c).position(|(a, b)| !common::within(f64::from(*a), f64::from(*b), tolerance))
                {
                    failures.push(format!(
                        "{what}: d/d{} [{k}] = {} vs {} (max |g| {scale})",
                        loss.inputs()[i].name,
                        g[k],
                        c[k]
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

/// A device bandwidth probe: `out = a + b` over n floats (reads two arrays, writes one),
/// the GPU twin of `lossc bench`'s CPU probe.
const PROBE: &str = r#"
.version 7.0
.target sm_70
.address_size 64
.visible .entry probe(.param .u64 a, .param .u64 b, .param .u64 out, .param .u64 n)
{
	.reg .pred %p<2>;
	.reg .b32 %r<5>;
	.reg .b64 %rd<12>;
	.reg .f32 %f<4>;
	ld.param.u64 %rd1, [a];
	ld.param.u64 %rd2, [b];
	ld.param.u64 %rd3, [out];
	ld.param.u64 %rd4, [n];
	mov.u32 %r1, %tid.x;
	mov.u32 %r2, %ctaid.x;
	mov.u32 %r3, %ntid.x;
	mov.u32 %r4, %nctaid.x;
	mul.wide.u32 %rd5, %r2, %r3;
	cvt.u64.u32 %rd6, %r1;
	add.u64 %rd5, %rd5, %rd6;
	mul.wide.u32 %rd7, %r3, %r4;
$loop:
	setp.ge.u64 %p1, %rd5, %rd4;
	@%p1 bra $done;
	shl.b64 %rd8, %rd5, 2;
	add.u64 %rd9, %rd1, %rd8;
	add.u64 %rd10, %rd2, %rd8;
	add.u64 %rd11, %rd3, %rd8;
	ld.global.nc.f32 %f1, [%rd9];
	ld.global.nc.f32 %f2, [%rd10];
	add.f32 %f3, %f1, %f2;
	st.global.f32 [%rd11], %f3;
	add.u64 %rd5, %rd5, %rd7;
	bra $loop;
$done:
	ret;
}
"#;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median seconds of `f` (after one warm-up call), each timed to completion.
fn time(driver: &Driver, runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    driver.synchronize(Stream(0)).expect("sync");
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                driver.synchronize(Stream(0)).expect("sync");
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Forward+backward at 16M and 256M elements against the probe. Run by `bench/gpu.sh`.
#[test]
#[ignore = "a benchmark for machines with a GPU: bench/gpu.sh runs it"]
fn bench_forward_backward_against_device_bandwidth() {
    let Some(driver) = device() else { return };
    driver.context().expect("context");
    let info = driver.device_info().expect("device");
    let module = driver.load_module(PROBE).expect("probe module");
    let probe = driver.function(&module, "probe").expect("probe kernel");
    let (major, minor) = info.compute_capability;
    println!("device: {} (sm_{major}{minor}, {} SMs)", info.name, info.multiprocessors);
    println!("| loss | elements | ms | plan GB/s | probe ms | x probe (same bytes) |");
    println!("|---|---|---|---|---|---|");
    let mut rng = Rng::new(7);
    for n in [1usize << 24, 1 << 28] {
        let a = upload(driver, &vec![0.5; n]);
        let b = upload(driver, &vec![0.25; n]);
        let out = driver.alloc(4 * n).expect("alloc");
        let blocks = (n.div_ceil(THREADS as usize)).min(8 * info.multiprocessors.max(1) as usize) as u32;
        let probe_s = time(driver, 10, || {
            let mut v = [a.ptr(), b.ptr(), out.ptr(), n as u64];
            let mut params: Vec<*mut std::ffi::c_void> = v.iter_mut().map(|x| (x as *mut u64).cast()).collect();
            // SAFETY: the probe takes four u64 parameters; a, b and out hold n floats.
            unsafe { driver.launch(&probe, [blocks, 1, 1], [THREADS, 1, 1], 0, Stream(0), &mut params) }
                .expect("probe");
        });
        let probe_bytes = 12.0 * n as f64;
        for name in ["dice", "tversky", "focal_tversky", "combo", "dice_bce", "bce_logits", "focal", "dice_multiclass"]
        {
            let loss = Loss::compile(name, "").expect("compiles");
            let ext = if name == "dice_multiclass" { [4, 5, n / 20] } else { [1, 1, n] };
            let elements: usize = ext.iter().product();
            let inputs = synth::inputs(loss.inputs(), [1, 1, 1 << 16], &mut rng);
            // Tile a small random sample up to size: the kernels' speed does not depend on the values.
            let full: Vec<Vec<f32>> =
                inputs.iter().map(|t| t.data.iter().map(|&v| v as f32).cycle().take(elements).collect()).collect();
            let shapes = vec![ext; full.len()];
            let device_inputs: Vec<DeviceBuffer> = full.iter().map(|d| upload(driver, d)).collect();
            let grads: Vec<DeviceBuffer> = full.iter().map(|_| driver.alloc(4 * elements).expect("alloc")).collect();
            let arrays: Vec<DeviceArray> = shapes
                .iter()
                .zip(device_inputs.iter().zip(&grads))
                .map(|(&shape, (x, g))| DeviceArray { shape, data: x.ptr(), grad: g.ptr() })
                .collect();
            let s = time(driver, 10, || {
                gpu::evaluate(&loss, &arrays, 0).expect("evaluate");
            });
            let plan = lossc::schedule::schedule(&loss);
            // The plan's traffic with every gradient written: each sweep reads its inputs
            // and writes its gradients once.
            let arrays_moved: usize = plan.sweeps.iter().map(|w| w.reads.len() + w.writes.len()).sum();
            let bytes = 4.0 * elements as f64 * arrays_moved as f64;
            let same_bytes_probe = probe_s * bytes / probe_bytes;
            println!(
                "| {name} | {elements} | {:.3} | {:.0} | {:.3} | {:.2} |",
                s * 1e3,
                bytes / s / 1e9,
                same_bytes_probe * 1e3,
                s / same_bytes_probe
            );
        }
    }
}
