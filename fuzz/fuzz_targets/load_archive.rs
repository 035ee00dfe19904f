//! Any bytes as a whole checkpoint file: the loader returns a value or a typed error, never
//! panics, hangs or allocates far beyond the input.
#![no_main]
use ckptio::LoadOptions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    for wo in [true, false] {
        let _ = ckptio::torch::load_from_bytes(
            bytes.clone(),
            "fuzz.pt",
            &LoadOptions::default().weights_only(wo),
        );
    }
});
