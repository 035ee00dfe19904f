//! Sets an rpath to libtorch so binaries, tests and examples run without `LD_LIBRARY_PATH`,
//! and keeps libtorch's CUDA backend linked where a GPU driver is installed.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // libtorch's CUDA backend registers itself when `libtorch_cuda.so` is loaded, and no symbol
    // of it is referred to, so the linker's default `--as-needed` drops it and CUDA is never
    // available to this package's binaries, tests and examples (tch's build script keeps it for
    // tch's own examples the same way, with `-ltorch`, which needs it). A program of yours that
    // uses ckptio with CUDA needs these arguments too.
    //
    // Loading it and the CUDA libraries it needs costs every process start about 0.2 s and
    // 400 MB of resident memory (a test binary listing its tests: 0.47 s and 508 MB against
    // 0.26 s and 115 MB), for nothing where no GPU driver is installed, so by default it is
    // linked only where one is (`/dev/nvidiactl` or `/proc/driver/nvidia`). `CKPTIO_LINK_CUDA=1`
    // links it anyway, even where the CUDA libraries it needs are missing (a build machine
    // without the GPU and CUDA libraries its binaries run with: they must be found at run time),
    // `CKPTIO_LINK_CUDA=0` never does.
    println!("cargo:rerun-if-env-changed=CKPTIO_LINK_CUDA");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let cuda = lib.join("libtorch_cuda.so");
    let forced = std::env::var("CKPTIO_LINK_CUDA").ok();
    let wanted = match forced.as_deref() {
        Some("1") => true,
        Some("0") => false,
        _ => Path::new("/dev/nvidiactl").exists() || Path::new("/proc/driver/nvidia").exists(),
    };
    if linux && wanted && cuda.exists() {
        println!("cargo:rerun-if-changed={}", cuda.display());
        let forced = forced.as_deref() == Some("1");
        if forced || loads(&cuda) {
            println!("cargo:rustc-link-arg=-L{}", lib.display());
            if forced {
                // Its own dependencies (libcudart, cuDNN, ...) may be absent here.
                println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
            }
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        } else {
            println!(
                "cargo:warning=ckptio: {} is there but some library it needs is not (a libtorch \
                 installed without its CUDA libraries?): not linked, so CUDA is not available \
                 to ckptio's own tests, examples and binary",
                cuda.display()
            );
        }
    }
}

/// Whether every library `so` needs is found (`ldd` lists none "not found"); false when `ldd`
/// cannot be run.
fn loads(so: &Path) -> bool {
    match std::process::Command::new("ldd").arg(so).output() {
        Ok(out) => {
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("not found")
        }
        Err(_) => false,
    }
}
