//! portwatch's userspace: the embedded kernel object, access to its maps, and the CLI verbs.

pub mod maps;
pub mod object;
