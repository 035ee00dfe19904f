//! tch
