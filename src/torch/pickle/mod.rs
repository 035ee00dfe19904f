//! Pickle: opcodes, a reader that never executes anything, and a protocol-2 writer.

pub(crate) mod opcodes;
pub(crate) mod reader;
pub(crate) mod writer;
