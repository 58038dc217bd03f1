//! portwatch's userspace: the embedded kernel object, the pinned layout, map access, attaching,
//! and one module per CLI verb.

pub mod attach;
pub mod cli;
pub mod cmd;
pub mod error;
pub mod generations;
pub mod maps;
pub mod netlink;
pub mod object;
pub mod output;
pub mod pinned;
pub mod ports;
pub mod report;
pub mod sys;
