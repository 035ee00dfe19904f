//! `ckptio._ckptio`: the native half of ckptio's Python package.
//!
//! A thin layer over the `ckptio` crate: it turns Python's pickled structure and tensor
//! storages into ckptio's [`pickled`](ckptio::torch::pickled) checkpoints, runs saves and loads
//! with the GIL released, and turns ckptio's errors into Python exceptions. Everything that
//! knows PyTorch's object model (pickling, unpickling, devices) is in the Python package
//! (`ckptio/`), which uses PyTorch's own code for it.
#![deny(unsafe_code)]
#![warn(rust_2018_idioms)]

mod archive;
mod engine;
mod errors;
mod storage;

use pyo3::prelude::*;

/// The native module.
#[pymodule]
fn _ckptio(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(engine::save, m)?)?;
    m.add_function(wrap_pyfunction!(engine::remove, m)?)?;
    m.add_function(wrap_pyfunction!(engine::write_protect_unavailable, m)?)?;
    m.add_function(wrap_pyfunction!(engine::clean_temp_files, m)?)?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<engine::Handle>()?;
    m.add_class::<archive::Archive>()?;
    errors::register(m)?;
    Ok(())
}
